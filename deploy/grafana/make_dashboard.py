"""Writes deploy/grafana/twodrl.json, the Grafana dashboard of a twodrl run.

    python deploy/grafana/make_dashboard.py          # rewrite the JSON
    python deploy/grafana/make_dashboard.py --check  # exit 1 if the JSON is stale

Metric names come from :mod:`twodrl.metrics` (the one list behind metrics.jsonl, wandb and
the Ray gauges), so the dashboard cannot drift from what the driver exports. Ray's
Prometheus exporter puts its ``ray_`` namespace in front of every application metric: the
driver's gauge ``twodrl_reward_weighted`` is scraped as ``ray_twodrl_reward_weighted``,
with the ``run`` tag the driver sets. Node panels use Ray's own node gauges
(``ray_node_cpu_utilization``, ``ray_node_mem_used``, ``ray_node_gpus_utilization`` …).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from twodrl.aspects import DEFAULT_ASPECTS
from twodrl.metrics import ray_metric_name, round_metric_keys

OUT = Path(__file__).with_name("twodrl.json")
PROMETHEUS_NAMESPACE = "ray_"  # Ray's exporter prefix for ray.util.metrics gauges
RUN = '{run=~"$run"}'
NODE = '{instance=~"$instance"}'


def prom(key: str) -> str:
    """Prometheus series name of a metrics.jsonl key."""
    return PROMETHEUS_NAMESPACE + ray_metric_name(key)


def _target(expr: str, legend: str, ref: int) -> dict:
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": expr,
        "legendFormat": legend,
        "refId": chr(ord("A") + ref),
    }


def _panel(pid: int, title: str, targets: list[tuple[str, str]], x: int, y: int, w: int = 12, h: int = 8,
           unit: str = "short", description: str = "", kind: str = "timeseries", minmax: tuple | None = None) -> dict:
    defaults: dict = {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 2, "showPoints": "always"}}
    if kind != "timeseries":
        defaults = {"unit": unit}
    if minmax:
        defaults["min"], defaults["max"] = minmax
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [_target(expr, legend, i) for i, (expr, legend) in enumerate(targets)],
    }


def _row(pid: int, title: str, y: int) -> dict:
    return {"id": pid, "type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": []}


def build(aspects: tuple[str, ...] = DEFAULT_ASPECTS) -> dict:
    keys = set(round_metric_keys(aspects))

    def series(key: str, legend: str | None = None) -> tuple[str, str]:
        assert key in keys, f"{key} is not a round metric"  # the generator fails, not Grafana
        return f"{prom(key)}{RUN}", legend or f"{key} · {{{{run}}}}"

    panels: list[dict] = []
    ids = iter(range(1, 1000))
    y = 0
    panels.append(_row(next(ids), "Rewards (0–4 scale)", y))
    y += 1
    panels.append(_panel(next(ids), "On-policy reward per aspect", [series("reward/weighted", "weighted · {{run}}")]
                         + [series(f"reward/{a}", f"{a} · {{{{run}}}}") for a in aspects], 0, y, minmax=(0, 4),
                         description="Mean representative score of the round's samples, per aspect (2D reward model)."))
    panels.append(_panel(next(ids), "Eval reward per aspect (held-out prompts, greedy)",
                         [series("eval/reward/weighted", "weighted · {{run}}")]
                         + [series(f"eval/reward/{a}", f"{a} · {{{{run}}}}") for a in aspects], 12, y, minmax=(0, 4)))
    y += 8
    panels.append(_panel(next(ids), "Reward-model agreement with the judge", [series(f"rm/agreement/{a}", f"{a} · {{{{run}}}}") for a in aspects],
                         0, y, unit="percentunit", minmax=(0, 1),
                         description="Share of audited segments where the rounded reward-model score equals the judge's."))
    panels.append(_panel(next(ids), "Round", [series("round")], 12, y, w=4, kind="stat"))
    panels.append(_panel(next(ids), "Rollout staleness (weight versions behind the learner)",
                         [series("rollout/staleness_mean", "mean · {{run}}"), series("rollout/staleness_max", "max · {{run}}")],
                         16, y, w=8))
    y += 8

    panels.append(_row(next(ids), "Training", y))
    y += 1
    panels.append(_panel(next(ids), "Loss", [series("train/loss")], 0, y, w=8))
    panels.append(_panel(next(ids), "KL to the reference", [series("train/kl")], 8, y, w=8))
    panels.append(_panel(next(ids), "Preference accuracy", [series("train/rewards/accuracies")], 16, y, w=8,
                         unit="percentunit", minmax=(0, 1)))
    y += 8
    panels.append(_panel(next(ids), "Implicit rewards (chosen / rejected / margin)",
                         [series("train/rewards/chosen"), series("train/rewards/rejected"), series("train/rewards/margins")], 0, y))
    panels.append(_panel(next(ids), "Log-probabilities", [series("train/logps/chosen"), series("train/logps/rejected")], 12, y))
    y += 8

    panels.append(_row(next(ids), "Throughput and stage times", y))
    y += 1
    stages = ["time/round_s", "time/rollout_s", "time/score_s", "time/annotate_s", "time/train_s", "time/sync_s",
              "time/driver_overhead_s"]
    panels.append(_panel(next(ids), "Stage times per round", [series(k) for k in stages], 0, y, unit="s"))
    panels.append(_panel(next(ids), "Rollout tokens/s", [series("rollout/tokens_per_s")], 12, y, w=6, unit="short"))
    panels.append(_panel(next(ids), "Prompts and samples per round",
                         [series("rollout/prompts"), series("rollout/prompts_planned"), series("rollout/samples")], 18, y, w=6))
    y += 8

    panels.append(_row(next(ids), "Annotation (LLM judge)", y))
    y += 1
    panels.append(_panel(next(ids), "Judge requests and failures per round",
                         [series("annotate/requests"), series("annotate/failures")], 0, y))
    panels.append(_panel(next(ids), "Judge cost (USD)", [series("annotate/cost_usd")], 12, y, unit="currencyUSD"))
    y += 8

    panels.append(_row(next(ids), "Ray nodes", y))
    y += 1
    panels.append(_panel(next(ids), "CPU utilization", [(f"ray_node_cpu_utilization{NODE}", "{{instance}}")], 0, y, w=8, unit="percent"))
    panels.append(_panel(next(ids), "Memory used", [(f"ray_node_mem_used{NODE}", "used · {{instance}}"),
                                                    (f"ray_node_mem_total{NODE}", "total · {{instance}}")], 8, y, w=8, unit="bytes"))
    panels.append(_panel(next(ids), "Object store / shared memory", [(f"ray_node_mem_shared_bytes{NODE}", "{{instance}}")],
                         16, y, w=8, unit="bytes"))
    y += 8
    panels.append(_panel(next(ids), "GPU utilization", [(f"ray_node_gpus_utilization{NODE}", "{{instance}} gpu{{GpuIndex}}")],
                         0, y, w=8, unit="percent"))
    # Ray reports GPU memory in MiB (its own dashboard scales it the same way).
    panels.append(_panel(next(ids), "GPU memory used", [(f"ray_node_gram_used{NODE} * 1024 * 1024", "{{instance}} gpu{{GpuIndex}}")],
                         8, y, w=8, unit="bytes"))
    panels.append(_panel(next(ids), "Network", [(f"ray_node_network_receive_speed{NODE}", "rx · {{instance}}"),
                                                (f"ray_node_network_send_speed{NODE}", "tx · {{instance}}")], 16, y, w=8, unit="Bps"))

    return {
        "title": "twodrl",
        "uid": "twodrl-run",
        "description": "Online 2D-DPO / APPO / DPA runs: rewards per aspect, training, stage times, judge, Ray nodes.",
        "tags": ["twodrl", "ray"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
                 "current": {}, "hide": 0},
                {"name": "run", "label": "Run", "type": "query",
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "query": {"query": f"label_values({prom('round')}, run)", "refId": "run"},
                 "definition": f"label_values({prom('round')}, run)",
                 "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}, "hide": 0},
                {"name": "instance", "label": "Node", "type": "query",
                 "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "query": {"query": "label_values(ray_node_cpu_utilization, instance)", "refId": "instance"},
                 "definition": "label_values(ray_node_cpu_utilization, instance)",
                 "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}, "hide": 0},
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if twodrl.json differs from the generated one")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
