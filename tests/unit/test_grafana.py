"""Monitoring files: deploy/grafana/twodrl.json and deploy/prometheus/prometheus.yml.

Every Grafana query must name a series the project exports — a ``twodrl.metrics`` round
metric under Ray's exporter prefix — or one of Ray's own node gauges, read from the
installed Ray (so a renamed Ray metric fails here, not on a blank dashboard).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from twodrl.aspects import DEFAULT_ASPECTS
from twodrl.metrics import ray_metric_name, round_metric_keys

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "twodrl.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def _generator():
    spec = importlib.util.spec_from_file_location("make_dashboard", ROOT / "deploy" / "grafana" / "make_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {...} or by/without/on(...) lists), strings, durations or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors [5m]
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "."):
            continue  # 1e3, 0.5
        names.add(word)
    return names


def exported_names() -> dict[str, str]:
    """Prometheus series name → where it comes from."""
    from ray._private.telemetry.open_telemetry_metric_recorder import NAMESPACE
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    out = {f"{NAMESPACE}_{ray_metric_name(k)}": f"twodrl round metric {k!r}" for k in round_metric_keys()}
    out.update({f"{NAMESPACE}_{name}": "Ray node metric" for name in METRICS_GAUGES})
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r}", t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            out.append((f"variable ${var['name']}", inner.group(1) if inner else q))
    return out


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_metric_name_extraction():
    assert metric_names('sum(rate(ray_node_cpu_utilization{instance=~"a|b"}[5m])) by (instance)') == {
        "ray_node_cpu_utilization"}
    assert metric_names("ray_node_gram_used{x='y'} * 1024 * 1024") == {"ray_node_gram_used"}
    assert metric_names("a_metric / on(run) group_left b_metric + 1e3") == {"a_metric", "b_metric"}


def test_ray_prefixes_application_metrics_as_the_dashboard_assumes():
    gen = _generator()
    from ray._private.telemetry.open_telemetry_metric_recorder import NAMESPACE

    assert gen.PROMETHEUS_NAMESPACE == f"{NAMESPACE}_"
    assert gen.prom("reward/weighted") == "ray_twodrl_reward_weighted"


def test_every_query_names_an_exported_metric(dashboard):
    exported = exported_names()
    qs = queries(dashboard)
    assert len(qs) > 20
    for where, expr in qs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - set(exported)
        assert not unknown, f"{where}: {sorted(unknown)} is neither a twodrl round metric nor a Ray node metric ({expr!r})"


def test_the_check_rejects_a_metric_nobody_exports():
    exported = exported_names()
    assert metric_names('ray_twodrl_reward_bogus{run=~"$run"}') - set(exported) == {"ray_twodrl_reward_bogus"}
    assert metric_names("twodrl_reward_weighted") - set(exported), "the un-prefixed name is not what Prometheus sees"


def test_required_panels_are_there(dashboard):
    used = set().union(*(metric_names(e) for _, e in queries(dashboard)))
    p = lambda k: "ray_" + ray_metric_name(k)  # noqa: E731
    required = [p(f"reward/{a}") for a in DEFAULT_ASPECTS] + [p(f"eval/reward/{a}") for a in DEFAULT_ASPECTS]
    required += [p(k) for k in ("reward/weighted", "eval/reward/weighted", "train/loss", "train/kl",
                                "train/rewards/accuracies", "rollout/tokens_per_s", "annotate/requests",
                                "annotate/failures", "annotate/cost_usd")]
    required += [p(k) for k in round_metric_keys() if k.startswith("time/")]
    required += ["ray_node_cpu_utilization", "ray_node_mem_used", "ray_node_gpus_utilization", "ray_node_gram_used"]
    missing = [m for m in required if m not in used]
    assert not missing, f"no panel shows {missing}"


def test_dashboard_structure(dashboard):
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p["id"])
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, f"panel {p['title']!r} overflows the 24-column grid"
            for t in p.get("targets", []):
                assert t["datasource"]["uid"] == "${datasource}"
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert dashboard["uid"] and dashboard["title"] == "twodrl"
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "run", "instance"} <= names


def test_dashboard_json_is_generated_from_the_metric_list():
    gen = _generator()
    assert DASHBOARD.read_text() == gen.render(), "stale: run python deploy/grafana/make_dashboard.py"


def test_prometheus_scrape_config():
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    files = [f for j in jobs.values() for sd in j.get("file_sd_configs", []) for f in sd["files"]]
    assert "/tmp/ray/prom_metrics_service_discovery.json" in files, "Ray's service discovery file is not scraped"
    # Kubernetes discovery keeps the port the manifests name "metrics" on Ray pods.
    k8s = [j for j in jobs.values() if "kubernetes_sd_configs" in j]
    assert k8s
    keeps = {(tuple(r["source_labels"]), r["regex"]) for r in k8s[0]["relabel_configs"] if r.get("action") == "keep"}
    assert (("__meta_kubernetes_pod_container_port_name",), "metrics") in keeps
    assert (("__meta_kubernetes_pod_label_ray_io_is_ray_node",), "yes") in keeps
    cluster = yaml.safe_load((ROOT / "deploy" / "k8s" / "raycluster.yaml").read_text())["spec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for t in templates:
        assert any(p["name"] == "metrics" for c in t["spec"]["containers"] for p in c.get("ports", []))
