"""Acceptance: one judge budget for the whole run. Two annotator actors share the cap
through the run's SQLite store; when it is spent the job stops by itself with exit code
3 and a message naming the caps, and a ``--resume`` starts from the recorded spend
instead of from zero (so it stops again without going past the cap).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
CAP = 120
SMALL = [
    "rounds=2",
    "rollout.prompts_per_round=6",
    "rollout.samples_per_prompt=2",
    "eval.num_prompts=3",
    "task.sft_examples=16",
    "scorer.rm_train_responses=12",
    "scorer.train_epochs=1",
    "annotator.num_actors=2",
    f"annotator.max_requests={CAP}",
    "logging.progress=false",
    "logging.wandb=false",
    "logging.plots=false",
]


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "twodrl", "run", "configs/quickstart.yaml", "--run-dir", str(run_dir)]
    for kv in SMALL:
        cmd += ["--set", kv]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd + list(extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)


def _spent(run_dir: Path) -> int:
    from twodrl.annotation.cache import JudgeCache

    cache = JudgeCache(str(run_dir / "judge_cache.sqlite"))
    try:
        return cache.spend().requests
    finally:
        cache.close()


def test_two_annotators_and_a_resume_stop_at_one_cap(tmp_path):
    run_dir = tmp_path / "run"
    first = _run(run_dir)
    assert first.returncode == 3, first.stdout[-3000:] + first.stderr[-5000:]
    assert "judge budget is spent" in first.stderr and f"max_requests={CAP}" in first.stderr
    assert _spent(run_dir) <= CAP
    # Round 0 fits in the cap: a checkpoint to resume from exists.
    assert list((run_dir / "checkpoints").glob("round-*"))

    again = _run(run_dir, "--resume")
    assert again.returncode == 3, again.stdout[-3000:] + again.stderr[-5000:]
    assert _spent(run_dir) <= CAP
