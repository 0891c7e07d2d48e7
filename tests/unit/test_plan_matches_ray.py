"""`twodrl plan` reports what the actors really ask Ray for.

For every shipped config, each actor's GPUs and CPUs in the plan must equal what its
``actor_options`` and placement-group bundles request (no cluster: the placement group
constructor is replaced by one that records its bundles)."""

from __future__ import annotations

from pathlib import Path

import pytest

import actors.common as common
from twodrl.config import ConfigError, RunConfig, load_config
from twodrl.planner import Cluster, plan

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


class _FakeGroup:
    def __init__(self, bundles, strategy, name=""):
        self.bundle_specs = [dict(b) for b in bundles]
        self.strategy = strategy


@pytest.fixture
def fake_groups(monkeypatch):
    monkeypatch.setattr(common, "placement_group", lambda bundles, strategy, name="": _FakeGroup(bundles, strategy, name))


def _ray_asks(cfg) -> dict[str, tuple[float, float]]:
    """actor name -> (GPUs, CPUs) it holds, from the options and groups the actor
    factories (actors/rollout.py, actors/scorer.py, actors/learner.py, actors/reward_learner.py,
    actors/annotator.py)
    pass to Ray."""
    out = {}
    rank_groups = {role: common.learner_group(cfg, role=role) for role in ("learner", "rm_learner")}
    for role in common.ROLES:
        res = common.role_resources(cfg, role)
        for i in range(res.count):
            opts = common.actor_options(role, i, cfg, namespace="t")
            if role in ("rollout", "scorer"):
                pg, index, own = common.tensor_parallel_group(res), 0, "all"
            elif rank_groups.get(role) is not None:  # DeepSpeed ranks: one bundle each
                pg, index, own = rank_groups[role], i, "one"
            else:
                pg = None
            if pg is None:
                out[f"{role}-{i}"] = (float(opts["num_gpus"]), float(opts["num_cpus"]))
                continue
            bundle = pg.bundle_specs[index]
            # Ray schedules the actor out of its bundle: what it asks must fit there.
            assert opts["num_gpus"] <= bundle.get("GPU", 0.0) + 1e-9, (role, opts, bundle)
            assert opts["num_cpus"] <= bundle.get("CPU", 0.0) + 1e-9, (role, opts, bundle)
            held = pg.bundle_specs if own == "all" else [bundle]
            out[f"{role}-{i}"] = (sum(b.get("GPU", 0.0) for b in held), sum(b.get("CPU", 0.0) for b in held))
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_plan_reports_what_ray_is_asked_for(path, fake_groups):
    try:
        cfg = load_config(str(path))
    except ConfigError as e:  # a config that does not load is the config tests' failure
        pytest.skip(f"{path.name} does not load: {e}")
    if not isinstance(cfg, RunConfig):  # an offline-training config starts no online actors
        pytest.skip(f"{path.name} is a {type(cfg).__name__}, not an online run config")
    p = plan(cfg, Cluster(nodes=8, gpus_per_node=8, gpu_memory_gb=80), config_name=path.name)
    planned = {a.name: (a.bundles * a.share, a.cpus) for a in p.actors if a.role != "driver"}
    asked = _ray_asks(cfg)
    assert set(planned) == set(asked), f"{path.name}: plan {sorted(planned)} vs Ray {sorted(asked)}"
    for name in planned:
        assert planned[name] == pytest.approx(asked[name]), f"{path.name}: {name} plan (GPUs, CPUs) {planned[name]} vs Ray {asked[name]}"


def test_hf_scorer_with_several_gpus_asks_for_them(fake_groups):
    path = str(Path(__file__).resolve().parents[2] / "configs" / "qwen2-7b-2ddpo-a100.yaml")
    cfg = load_config(path, ["scorer.backend=hf"])
    assert cfg.scorer.tensor_parallel_size == 4
    opts = common.actor_options("scorer", 0, cfg, namespace="t")
    assert opts["num_gpus"] == 4 and common.tensor_parallel_group(common.role_resources(cfg, "scorer")) is None
    p = plan(cfg, Cluster(nodes=4, gpus_per_node=8, gpu_memory_gb=80))
    scorer = next(a for a in p.actors if a.name == "scorer-0")
    assert scorer.bundles * scorer.share == 4 and len(scorer.gpus) == 4

    vllm = load_config(path, ["scorer.backend=vllm"])
    pg = common.tensor_parallel_group(common.role_resources(vllm, "scorer"))
    assert pg.strategy == "STRICT_PACK" and [b["GPU"] for b in pg.bundle_specs] == [1.0] * 4
    assert common.actor_options("scorer", 0, vllm, namespace="t")["num_gpus"] == 0


def test_auto_backend():
    path = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    assert load_config(path).scorer.resolved_backend() == "hf"  # CPU
    gpu = load_config(path, ["scorer.num_gpus=1", "scorer.rm_train_responses=0", "scorer.update_every_rounds=0"])
    assert gpu.scorer.resolved_backend() == "vllm"
    # A run that trains the RM needs the HF copy, on GPU too.
    assert load_config(path, ["scorer.num_gpus=1"]).scorer.resolved_backend() == "hf"
    with pytest.raises(ConfigError, match="scorer.backend=vllm"):
        load_config(path, ["scorer.num_gpus=1", "scorer.backend=vllm"])
