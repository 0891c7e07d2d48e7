"""Acceptance: ``kill -9`` of the driver's whole process group in the middle of a round,
then ``--resume``: every round is logged exactly once and in order, the prompt cursor
carries on where the last checkpoint left it, and nothing of the killed local Ray
cluster is left running.

One real run of ``python -m jobs.online`` on the quickstart config (tiny models, vLLM
CPU rollout, DeepSpeed learner), shrunk to a few prompts per round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twodrl.metrics import round_metric_keys
from twodrl.rounds import PromptCursor
from twodrl.synthetic import split_prompts
from twodrl.tracking import read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 4  # rounds 0..4: the kill lands in round 2 with rounds 3-4 still to run
PROMPTS_PER_ROUND = 8
SMALL = [
    f"rounds={ROUNDS}",
    f"rollout.prompts_per_round={PROMPTS_PER_ROUND}",
    "eval.num_prompts=4",
    "task.sft_examples=64",
    "scorer.rm_train_responses=64",
    "logging.progress=false",
    "logging.wandb=false",
    # The most pipelined schedule: later rounds' prompts are drawn and collected while
    # a round trains, so a resume must re-issue exactly those (sync resumes are covered
    # by the own-data resume test).
    "scheduling=stream",
]
# Keys every round measures, so they must hold a number (not the logger's null filler).
MEASURED = ["round", "reward/weighted", "eval/reward/weighted", "train/loss", "train/rewards/accuracies",
            "time/round_s", "time/rollout_s", "time/score_s", "time/train_s", "time/sync_s",
            "rollout/prompts", "rollout/prompts_planned", "rollout/samples", "rollout/tokens_per_s",
            "annotate/requests", "annotate/failures"]


def online_cmd(run_dir: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "jobs.online", "configs/quickstart.yaml", "--run-dir", str(run_dir)]
    for kv in SMALL:
        cmd += ["--set", kv]
    return cmd + list(extra)


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"})
    return env


# Ray gives a new node 30 s (hard-coded) to register; on a 2-core machine shared with
# other heavy jobs that can run out before the driver does anything of its own.
RAY_START_TIMEOUT = "The current node timed out during startup"


def run_online(cmd: list[str], log: Path, *, wait: bool, attempts: int = 3) -> subprocess.Popen:
    """Start the job in its own process group (and session); a start that failed only
    because the local Ray node did not come up in time is retried."""
    for attempt in range(attempts):
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        if wait:
            proc.wait(timeout=900)
        else:
            # Give a failing Ray start-up the chance to show itself; the driver writes
            # RUN_DIR/ray.json once its cluster is up, and from then on the run is
            # handed to the caller (rounds take seconds: waiting longer could miss them).
            ray_json = Path(cmd[cmd.index("--run-dir") + 1]) / "ray.json"
            deadline = time.monotonic() + 300
            while (proc.poll() is None and time.monotonic() < deadline and not ray_json.exists()
                   and RAY_START_TIMEOUT not in log.read_text()):
                time.sleep(0.2)
            if proc.poll() is None and RAY_START_TIMEOUT not in log.read_text():
                return proc
            proc.wait(timeout=60)
        if proc.returncode == 0 or RAY_START_TIMEOUT not in log.read_text() or attempt == attempts - 1:
            return proc
    return proc


def cluster_pids(gcs_address: str, session: int) -> set[int]:
    """Processes of one local Ray cluster: in the driver's session, or naming its GCS
    address / port on their command line (raylet, gcs_server, workers, monitors)."""
    port = gcs_address.rsplit(":", 1)[-1]
    needles = (gcs_address.encode(), f"gcs_server_port={port}".encode(), f"--gcs-address=127.0.0.1:{port}".encode())
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes()
            in_session = os.getsid(pid) == session
        except (OSError, ProcessLookupError):
            continue
        if in_session or any(n in cmdline for n in needles):
            found.add(pid)
    return found


def wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("gone", "Z", "X"):  # a zombie has exited; only its parent's wait is missing
                alive.discard(pid)
        if alive:
            time.sleep(0.5)
    return alive


def prompt_files(run_dir: Path) -> dict[int, dict]:
    return {int(p.name[6:10]): json.loads(p.read_text()) for p in sorted((run_dir / "rounds").glob("round-*.prompts.json"))}


def check_metric_lines(rows: list[dict]) -> None:
    keys = round_metric_keys(["helpfulness", "correctness", "safety", "completeness", "clarity"])
    for row in rows:
        missing = [k for k in keys if k not in row]
        assert not missing, f"round {row.get('round')}: metric keys missing: {missing}"
        unset = [k for k in MEASURED if not isinstance(row[k], (int, float))]
        assert not unset, f"round {row['round']}: no value for {unset}"
        assert 0.0 <= row["reward/weighted"] <= 4.0 and 0.0 <= row["eval/reward/weighted"] <= 4.0


def test_kill_9_mid_round_then_resume(tmp_path):
    run_dir = tmp_path / "resume-run"
    log1 = tmp_path / "first.log"
    proc = run_online(online_cmd(run_dir), log1, wait=False)
    pgid = proc.pid  # start_new_session: the child leads its own group and session
    metrics_path = run_dir / "metrics.jsonl"
    try:
        # Mid-run: rounds 0 and 1 are logged and round 2 has drawn its prompts.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc={proc.returncode}) before it could be killed:\n{log1.read_text()[-3000:]}")
            # Round 2's prompts are drawn right after round 1 is logged: kill then,
            # while round 2 runs (rounds take seconds here, so poll tightly).
            if (run_dir / "rounds" / "round-0002.prompts.json").exists() and len(read_metrics(metrics_path)) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no 2 logged rounds within 600 s:\n{log1.read_text()[-3000:]}")
        gcs = json.loads((run_dir / "ray.json").read_text())["address"]
        before_kill = cluster_pids(gcs, pgid)
        os.killpg(pgid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=60)

    # The killed driver's cluster must not outlive it (Ray ties raylet/GCS to the
    # driver's life); anything still there after a grace period is a leak, cleaned up
    # here so later tests do not inherit it.
    survivors = wait_gone(before_kill | cluster_pids(gcs, pgid), timeout_s=30)
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not survivors, f"processes of the killed Ray cluster {gcs} survived kill -9 of the driver: {sorted(survivors)}"

    killed_rows = read_metrics(metrics_path)
    killed_prompts = prompt_files(run_dir)
    assert [r["round"] for r in killed_rows][:2] == [0, 1]

    log2 = tmp_path / "resume.log"
    resumed = run_online(online_cmd(run_dir, "--resume"), log2, wait=True)
    text = log2.read_text()
    assert resumed.returncode == 0, text[-4000:]
    last_ckpt = max(r["round"] for r in killed_rows)
    assert f"resumed after round {last_ckpt}" in text

    rows = read_metrics(metrics_path)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1)), "every round exactly once, in order"
    # Rounds finished before the kill are kept as they were, not re-run.
    assert rows[: len(killed_rows)] == killed_rows
    check_metric_lines(rows)
    assert sum(r["rollout/prompts"] for r in rows) == sum(r["rollout/prompts_planned"] for r in rows) \
        == (ROUNDS + 1) * PROMPTS_PER_ROUND

    # The cursor continued: the interrupted round redrew exactly the prompts it had
    # drawn before the kill, and no prompt came twice within an epoch.
    prompts = prompt_files(run_dir)
    assert sorted(prompts) == list(range(ROUNDS + 1))
    assert prompts[2]["prompts"] == killed_prompts[2]["prompts"]
    seen: set[tuple[int, int]] = set()
    for k in range(ROUNDS + 1):
        picks = [(p["epoch"], p["index"]) for p in prompts[k]["prompts"]]
        assert len(picks) == PROMPTS_PER_ROUND
        assert not seen & set(picks), f"round {k} reused prompts {sorted(seen & set(picks))} within their epoch"
        seen |= set(picks)
    # ... and the final checkpoint's cursor is where an uninterrupted run would be.
    reference = PromptCursor(len(split_prompts(0)[0]), seed=0)
    for _ in range(ROUNDS + 1):
        reference.take(PROMPTS_PER_ROUND)
    state = json.loads((run_dir / "checkpoints" / f"round-{ROUNDS:04d}" / "driver.json").read_text())
    assert state["cursor"] == reference.state()
    assert state["planned_prompts"] == state["completed_prompts"] == (ROUNDS + 1) * PROMPTS_PER_ROUND
