"""Acceptance: ADPO and ARS (seed 004 Eq. 15 and 16) are reachable online algorithms:
``twodrl run configs/quickstart.yaml --set algorithm=adpo|ars`` completes a round at
tiny sizes and logs a finite training loss. Real parts: the CLI, a local Ray cluster,
vLLM (CPU build) rollouts, the DeepSpeed learner (two ranks), the local judge."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from twodrl.tracking import read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "rounds=1",
    "rollout.prompts_per_round=6",
    "rollout.samples_per_prompt=2",
    "eval.num_prompts=3",
    "task.sft_examples=16",
    "scorer.rm_train_responses=12",
    "scorer.train_epochs=1",
    "logging.wandb=false",
    "logging.plots=false",
    "logging.progress=false",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    env.pop("RAY_ADDRESS", None)
    return env


def test_adpo_and_ars_run_a_round(tmp_path):
    for algorithm in ("adpo", "ars"):
        run_dir = tmp_path / algorithm
        cmd = [sys.executable, "-m", "twodrl", "run", "configs/quickstart.yaml", "--run-dir", str(run_dir),
               "--set", f"algorithm={algorithm}"]
        for kv in SMALL:
            cmd += ["--set", kv]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1100)
        assert proc.returncode == 0, (algorithm, proc.stdout[-4000:] + proc.stderr[-6000:])
        rows = read_metrics(run_dir / "metrics.jsonl")
        # round 0 prepares the run (warm start, reward model, baseline eval), round 1 is the online round
        assert [r["round"] for r in rows] == [0, 1], (algorithm, rows)
        row = rows[1]
        loss = row.get("train/loss")
        assert isinstance(loss, (int, float)) and math.isfinite(loss), (algorithm, loss)
        # both methods train only on the tokens their adaptive masks keep
        assert 0.0 <= row["train/mask_fraction"] <= 1.0, (algorithm, row)
        # round 1's eval judges the new policy against round 0's answers (both orders)
        assert 0.0 <= row["eval/win_rate_ci_low"] <= row["eval/win_rate"] <= row["eval/win_rate_ci_high"] <= 1.0
        if algorithm == "ars":
            assert row["train/selected"] == 6  # one sample per prompt
        else:
            assert row["train/pairs"] >= 1
