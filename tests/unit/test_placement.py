"""Pure parts of the actor layer: names, resource options and placement checks
(actors/common.py), and the learner's data plan / DeepSpeed config / lr schedule
(actors/learner.py). No Ray cluster needed."""

from __future__ import annotations

import collections
import math

import pytest

from actors.common import PlacementError, actor_name, actor_options, role_resources, run_namespace, validate_placement
from actors.learner import build_ds_config, estimate_total_steps, lr_lambda, merge_metrics, plan_micro_batches
from twodrl.config import ConfigError, load_config


def cfg(*overrides):
    return load_config(None, list(overrides))


def test_names_and_namespace():
    assert [actor_name(r, 0) for r in ("rollout", "scorer", "learner", "annotator")] == [
        "rollout-0", "scorer-0", "learner-0", "annotator-0"]
    assert actor_name("learner", 3) == "learner-3"
    with pytest.raises(ValueError, match="unknown actor role"):
        actor_name("critic", 0)
    assert run_namespace(cfg("run_name=abc")) == "twodrl-abc"
    assert run_namespace(cfg("run_name=abc", "ray.namespace=mine")) == "mine"


def test_actor_options_from_config():
    c = cfg("rollout.num_cpus=0.5", "rollout.max_restarts=3", "run_name=x")
    opts = actor_options("rollout", 1, c)
    assert opts["name"] == "rollout-1" and opts["namespace"] == "twodrl-x"
    assert opts["num_cpus"] == 0.5 and opts["num_gpus"] == 0.0
    assert opts["max_restarts"] == 3 and opts["max_task_retries"] == 0
    lopts = actor_options("learner", 0, cfg("learner.num_cpus_per_rank=0.75"))
    assert lopts["num_cpus"] == 0.75


def test_validate_placement_ok_and_totals():
    need = validate_placement(cfg(), cluster={"CPU": 8.0}, nodes=[{"CPU": 8.0}])
    # 1 rollout + 1 scorer (0.25 each) + 2 learner ranks (0.25) + annotator (0.05).
    assert math.isclose(need["CPU"], 0.25 + 0.25 + 0.5 + 0.05)
    assert need["GPU"] == 0


def test_validate_placement_names_the_field():
    with pytest.raises(PlacementError, match="rollout.num_gpus"):
        validate_placement(cfg("rollout.num_gpus=1"), cluster={"CPU": 8.0}, nodes=[{"CPU": 8.0}])
    with pytest.raises(PlacementError, match="CPUs"):
        validate_placement(cfg("learner.num_cpus_per_rank=4"), cluster={"CPU": 2.0}, nodes=[{"CPU": 2.0}])
    gpu = {"CPU": 64.0, "GPU": 8.0}
    with pytest.raises(PlacementError, match="rollout.tensor_parallel_size = 16"):
        validate_placement(cfg("rollout.num_gpus=1", "rollout.tensor_parallel_size=16"), cluster=gpu, nodes=[gpu])
    with pytest.raises(PlacementError, match="GPUs"):
        validate_placement(
            cfg("learner.num_gpus_per_rank=1", "learner.num_ranks=8", "scorer.num_gpus=1", "scorer.tensor_parallel_size=4"),
            cluster=gpu, nodes=[gpu],
        )
    assert issubclass(PlacementError, ConfigError)


def test_reference_actor_only_when_not_colocated():
    assert role_resources(cfg(), "reference").count == 0
    assert role_resources(cfg("learner.colocate_reference=false"), "reference").count == 1


@pytest.mark.parametrize("n,world,micro,accum,unit", [(1, 2, 4, 1, 1), (7, 2, 2, 1, 1), (33, 2, 8, 2, 1), (24, 2, 2, 1, 4), (64, 3, 8, 1, 1)])
def test_plan_micro_batches_equal_steps_nothing_lost(n, world, micro, accum, unit):
    plan = plan_micro_batches(n, world, micro, accum, seed=1, unit=unit)
    steps = {len(p) for p in plan}
    assert len(steps) == 1, "every rank must take the same number of steps"
    (s,) = steps
    assert s % accum == 0
    seen = collections.Counter(i for p in plan for mb in p for i in mb)
    assert set(seen) == set(range(n)), "no item is dropped"
    assert max(seen.values()) <= 1 + (world * micro * s) // n
    for p in plan:
        for mb in p:
            assert 0 < len(mb) <= micro * unit
            if unit > 1:  # whole groups stay together
                firsts = mb[::unit]
                assert all(f % unit == 0 and mb[k * unit : (k + 1) * unit] == list(range(f, f + unit)) for k, f in enumerate(firsts))
    # Evenly divisible data is visited exactly once.
    even = plan_micro_batches(16, 2, 4, 1, seed=0)
    assert sorted(i for p in even for mb in p for i in mb) == list(range(16))


def test_ds_config_and_schedule():
    c = cfg("learner.zero_stage=3", "learner.micro_batch_size=4", "learner.grad_accum_steps=2", "learner.max_grad_norm=0.5")
    ds = build_ds_config(c.learner, world_size=2, on_gpu=False)
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is False
    assert build_ds_config(cfg("learner.bf16=true").learner, 2, on_gpu=True)["bf16"]["enabled"] is True
    f = lr_lambda("cosine", warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(7) == 1.0
    assert estimate_total_steps(cfg("rounds=4", "rollout.prompts_per_round=64")) == 4 * 2 * 4


def test_merge_metrics_weighted_by_count():
    parts = [{"sums": {"loss": 2.0}, "count": 2, "last": {"lr": 0.1}}, {"sums": {"loss": 9.0}, "count": 3, "last": {"lr": 0.1}}]
    out = merge_metrics(parts)
    assert out == {"train/loss": pytest.approx(11.0 / 5), "train/lr": 0.1}
