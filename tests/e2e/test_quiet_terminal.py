"""Acceptance: ``make demo``'s terminal shows the run, not the engines. From the start
of ``twodrl run configs/quickstart.yaml`` to the first ``[round 0]`` line the output
fits on one screen (≤ 25 rows, counted the way a terminal shows them: a progress bar
redrawn in place is one row), and vLLM's, DeepSpeed's and the Ray workers' start-up
logs are in ``RUN_DIR/logs/<actor>.log`` instead.

One real run of the command line on the quickstart config (tiny models, vLLM CPU
rollout, DeepSpeed learner, local judge), shrunk to a few prompts and one online round.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
SCREEN_ROWS = 25
SMALL = [
    "rounds=1",
    "rollout.prompts_per_round=8",
    "eval.num_prompts=4",
    "task.sft_examples=64",
    "scorer.rm_train_responses=64",
]
RAY_START_TIMEOUT = "The current node timed out during startup"  # a loaded 2-core machine; retried
_CSI = re.compile(r"\x1b\[(\d*)([A-Za-z])")


def screen_rows_before(text: str, marker: str) -> int:
    """The number of terminal rows written before the row ``marker`` starts on: ``\\n``
    moves down a row, ``\\r`` back to its start and tqdm's cursor-up (``ESC[nA``) up, so
    a redrawn bar takes one row, as on screen. Long lines are not wrapped."""
    row = line_start = i = 0
    while i < len(text):
        if text.startswith(marker, i) and text[line_start:i].strip("\r") == "":
            return row
        ch = text[i]
        if ch == "\n":
            row += 1
            line_start = i + 1
        elif ch == "\r":
            line_start = i + 1
        elif ch == "\x1b":
            m = _CSI.match(text, i)
            if m:
                if m.group(2) == "A":
                    row = max(0, row - int(m.group(1) or 1))
                i = m.end()
                line_start = i
                continue
        i += 1
    raise AssertionError(f"{marker!r} never printed")


def test_screen_rows_counts_redrawn_bars_once():
    text = "a\nb\n\rbar 1%\rbar 2%\n\x1b[Anested\n\x1b[A\n[round 0] x\n"
    assert screen_rows_before(text, "[round 0]") == 3
    assert screen_rows_before("x\ny\n[round 0]", "[round 0]") == 2


def test_demo_output_fits_one_screen_and_actor_logs_go_to_run_dir(tmp_path):
    run_dir = tmp_path / "quickstart"
    cmd = [sys.executable, "-m", "twodrl", "run", "configs/quickstart.yaml", "--run-dir", str(run_dir)]
    for kv in SMALL:
        cmd += ["--set", kv]
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"})
    for attempt in range(2):
        # stdout and stderr into one stream, as on a terminal (tqdm writes to stderr).
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=1500)
        out = proc.stdout.decode("utf-8", errors="replace")
        if proc.returncode == 0 or RAY_START_TIMEOUT not in out:
            break
        cmd += ["--overwrite"] if "--overwrite" not in cmd else []
    assert proc.returncode == 0, out[-6000:]

    rows = screen_rows_before(out, "[round 0]")
    head = out[: out.index("[round 0]")]
    assert rows <= SCREEN_ROWS, f"{rows} terminal rows before [round 0]:\n{head}"
    for noise in ("(RolloutWorker pid=", "(LearnerRank pid=", "(RewardScorer pid=", "Initializing a V1 LLM engine"):
        assert noise not in out, f"{noise!r} reached the terminal:\n{head}"
    assert "[round 1]" in out and "[twodrl] done" in out  # the run's own lines are all there

    logs = run_dir / "logs"
    names = sorted(p.name for p in logs.glob("*.log"))
    assert {"rollout-0.log", "scorer-0.log", "annotator-0.log", "learner-0.log", "learner-1.log"} <= set(names), names
    rollout = (logs / "rollout-0.log").read_text(errors="replace")
    assert "Initializing a V1 LLM engine" in rollout and "vllm" in rollout.lower(), rollout[-3000:]
    learner = (logs / "learner-0.log").read_text(errors="replace")
    assert "deepspeed" in learner.lower(), learner[-3000:]
    assert "==== learner-1: pid" in (logs / "learner-1.log").read_text(errors="replace")
