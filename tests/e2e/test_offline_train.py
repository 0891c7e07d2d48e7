"""Acceptance of ``twodrl train`` (python -m jobs.train): a run killed with ``kill -9``
after its first checkpoint and continued with ``--resume`` ends with the same final
weights as a run that was never interrupted (max |Δ| ≤ 1e-6, float32 on CPU), every step
is logged once, and the final policy loads with ``AutoModelForCausalLM``.

Shrunk quickstart: 64 synthetic pairs, 2 DeepSpeed ranks (ZeRO-2), 14 optimizer steps,
a checkpoint every 4.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from twodrl.tracking import read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "data.synthetic_pairs=64", "data.eval_fraction=0.12", "train.epochs=2", "train.eval_every_steps=4",
    "train.save_every_steps=4", "train.log_every_steps=2", "learner.micro_batch_size=4",
    "logging.progress=false", "logging.wandb=false", "logging.keep_checkpoints=1",
]
TOTAL_STEPS = 14  # 56 train pairs / (4 per micro-batch × 2 ranks) = 7 steps per epoch
RAY_START_TIMEOUT = "The current node timed out during startup"


def train_cmd(run_dir: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "jobs.train", "configs/offline-quickstart.yaml", "--run-dir", str(run_dir)]
    for kv in SMALL:
        cmd += ["--set", kv]
    return cmd + list(extra)


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    return env


def run_job(cmd: list[str], log: Path, attempts: int = 3) -> subprocess.CompletedProcess:
    """Run to the end; a start that failed only because the local Ray node was slow to
    come up on a busy machine is retried."""
    for attempt in range(attempts):
        with open(log, "w") as out:
            proc = subprocess.run(cmd, cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT, timeout=900)
        if proc.returncode == 0 or RAY_START_TIMEOUT not in log.read_text() or attempt == attempts - 1:
            return proc
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("offline") / "straight"
    log = run_dir.parent / "straight.log"
    proc = run_job(train_cmd(run_dir), log)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return run_dir


def test_learner_output_goes_to_run_dir_logs_not_the_terminal(uninterrupted):
    terminal = (uninterrupted.parent / "straight.log").read_text(errors="replace")
    assert "(LearnerRank pid=" not in terminal, terminal[-4000:]
    for rank in (0, 1):
        log = (uninterrupted / "logs" / f"learner-{rank}.log").read_text(errors="replace")
        assert log.startswith(f"==== learner-{rank}: pid") and "deepspeed" in log.lower(), log[-3000:]


def test_uninterrupted_run_logs_every_step_and_saves_a_loadable_policy(uninterrupted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read_metrics(uninterrupted / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, TOTAL_STEPS + 1, 2))
    assert rows[-1]["epoch"] == pytest.approx(2.0)
    evals = [r for r in rows if r.get("eval/loss") is not None]
    assert [r["step"] for r in evals] == [4, 8, 12, 14]
    for key in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins", "eval/rewards/accuracies",
                "eval/rewards/margins/correctness", "train/loss", "train/lr", "train/tokens_per_s"):
        assert isinstance(rows[-1].get(key) if key.startswith("train") else evals[-1].get(key), float), key
    assert (uninterrupted / "reference_logps" / "train.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(uninterrupted / "final")
    tok = AutoTokenizer.from_pretrained(uninterrupted / "final")
    out = model(**tok("Tell me about the owl.", return_tensors="pt"))
    assert torch.isfinite(out.logits).all()


def test_kill_9_after_first_checkpoint_then_resume_gives_the_same_weights(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    log1 = tmp_path / "first.log"
    for _attempt in range(3):
        with open(log1, "w") as out:
            proc = subprocess.Popen(train_cmd(run_dir), cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None:
                if (run_dir / "checkpoints" / "round-0004" / "driver.json").exists():
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        if RAY_START_TIMEOUT in log1.read_text() and proc.returncode != -signal.SIGKILL:
            run_dir = tmp_path / f"killed-{_attempt + 1}"  # a fresh directory for the retry
            continue
        break
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way:\n{log1.read_text()[-3000:]}"
    assert not (run_dir / "final").exists(), "the run finished before the kill; nothing was tested"
    killed_rows = read_metrics(run_dir / "metrics.jsonl")

    log2 = tmp_path / "resume.log"
    resumed = run_job(train_cmd(run_dir, "--resume"), log2)
    text = log2.read_text()
    assert resumed.returncode == 0, text[-4000:]
    assert "resumed after step" in text

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, TOTAL_STEPS + 1, 2)), "every logged step exactly once"
    checkpointed = [r for r in killed_rows if r["step"] <= 4]
    assert rows[: len(checkpointed)] == checkpointed

    a, b = final_weights(uninterrupted), final_weights(run_dir)
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff <= 1e-6, f"resumed run's final weights differ by {diff}"
    # ... and training did move them away from the initial policy.
    from twodrl.models.tiny import tiny_model_path
    from safetensors.torch import load_file

    init = load_file(str(tiny_model_path("policy") / "model.safetensors"))
    assert max(float((a[k] - init[k]).abs().max()) for k in a if k in init) > 1e-4
