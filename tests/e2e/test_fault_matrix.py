"""Acceptance: the run rides through an actor killed at any stage.

One run of the quickstart (tiny models, CPU) with seven online rounds: in round k the
test-only hook ``TWODRL_TEST_FAULTS`` kills ``rollout-0``, ``scorer-0`` and
``annotator-0`` (Ray restarts each) as the driver reaches the k-th stage — rollout,
score, annotate, train, sync, eval, checkpoint — so every (role, stage) case of the
matrix happens once, deterministically, in one warm cluster. The run must finish on its
own with every round once, no prompt lost, and each role's restarts counted.

A second case uses up an actor's restarts: the job stops with one message naming the
actor and the stage, with a checkpoint to resume from.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from twodrl.config import load_config
from twodrl.tracking import read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
STAGES = ["rollout", "score", "annotate", "train", "sync", "eval", "checkpoint"]
ROLES = ["rollout", "scorer", "annotator"]
SMALL = [
    f"rounds={len(STAGES)}",
    "rollout.prompts_per_round=6",
    "rollout.samples_per_prompt=2",
    "eval.num_prompts=3",
    "task.sft_examples=32",
    "scorer.rm_train_responses=32",
    "scorer.train_epochs=1",
    "learner.epochs_per_round=1",
    "rollout.max_restarts=10",
    "scorer.max_restarts=10",
    "annotator.max_restarts=10",
    "logging.progress=false",
    "logging.wandb=false",
    "logging.plots=false",
]


def _run(run_dir: Path, overrides: list[str]):
    from jobs.driver import OnlineDriver

    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), overrides)
    started_ray = not ray.is_initialized()
    driver = OnlineDriver(cfg, run_dir)
    try:
        driver.setup()
        return driver, driver.run()
    finally:
        driver.shutdown()
        if started_ray:
            ray.shutdown()


def test_every_role_killed_at_every_stage(tmp_path, monkeypatch):
    faults = [f"{role}-0@{stage}@{k}" for k, stage in enumerate(STAGES, start=1) for role in ROLES]
    monkeypatch.setenv("TWODRL_TEST_FAULTS", ",".join(faults))
    driver, rows = _run(tmp_path / "matrix", SMALL)
    assert driver._faults_fired == set(faults)
    on_disk = read_metrics(driver.run_dir / "metrics.jsonl")
    assert [r["round"] for r in on_disk] == [r["round"] for r in rows] == list(range(len(STAGES) + 1))
    assert sum(r["rollout/prompts"] for r in on_disk) == sum(r["rollout/prompts_planned"] for r in on_disk)
    last = on_disk[-1]
    for role in ROLES:
        assert last[f"recovery/{role}_restarts"] == len(STAGES), (role, last[f"recovery/{role}_restarts"])
    # Every round after a kill still trained and was evaluated by the judge.
    for r in on_disk[1:]:
        assert isinstance(r["train/loss"], float) and isinstance(r["eval/reward/weighted"], float)


def test_restarts_used_up_stop_with_one_message(tmp_path, monkeypatch):
    from jobs.driver import RunStopped

    monkeypatch.setenv("TWODRL_TEST_FAULTS", "rollout-0@score@1")
    overrides = [kv for kv in SMALL if not kv.startswith(("rounds=", "rollout.max_restarts="))]
    with pytest.raises(RunStopped) as stop:
        _run(tmp_path / "used-up", overrides + ["rounds=1", "rollout.max_restarts=0"])
    msg = str(stop.value)
    assert "round 1" in msg and "rollout-0" in msg and "--resume continues after round 0" in msg, msg
    assert (tmp_path / "used-up" / "error.log").exists()
    log = tmp_path / "used-up" / "logs" / "rollout-0.log"
    if log.exists():  # the driver started Ray, so actor output went to RUN_DIR/logs (no shared cluster)
        # A killed actor leaves no traceback: the message ends with what its log said last.
        tail = msg.split(f"---- last lines of {log} ----\n", 1)
        assert len(tail) == 2, msg
        assert 0 < len(tail[1].splitlines()) <= 40 and tail[1].splitlines()[-1] in log.read_text(), msg
        assert "last lines of" in (tmp_path / "used-up" / "error.log").read_text()
