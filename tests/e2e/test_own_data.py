"""Acceptance: the online job on a team's own prompts. ``twodrl run`` on a prompt file
this project has never seen (plain prompts and chat ``messages`` rows), rated by a real
``twodrl serve-judge --mode generic`` server over HTTP: every drawn prompt and every
written sample comes from that file, eval carries per-aspect judge ratings and a win
rate against the round-0 policy, and ``--resume`` continues the prompt cursor.

Real parts throughout: the CLI, a local Ray cluster, vLLM (CPU build), DeepSpeed, the
judge server as its own process.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twodrl.rounds import PromptCursor
from twodrl.tracking import read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
PROMPTS_PER_ROUND = 6
SMALL = [
    "task.name=dataset",
    "task.eval_prompts=6",
    f"rollout.prompts_per_round={PROMPTS_PER_ROUND}",
    "rollout.samples_per_prompt=2",
    "eval.num_prompts=4",
    "scorer.rm_train_responses=24",
    "scorer.train_epochs=1",
    "learner.epochs_per_round=1",
    "logging.progress=false",
    "logging.wandb=false",
    "logging.plots=false",
]


def unseen_prompts(n: int, seed: int = 1234) -> list[dict]:
    """Prompts written at test time from random parts, so no file of the project holds
    them; every fifth is a multi-turn chat in the messages layout."""
    rng = random.Random(seed)
    verbs = ["repair", "paint", "explain", "plan", "compare", "store", "measure", "choose"]
    things = ["a bicycle chain", "a garden fence", "a budget spreadsheet", "a sourdough starter",
              "a wool sweater", "a leaking tap", "a hiking route", "a chess opening"]
    tails = ["on a rainy day", "with no special tools", "for a beginner", "in under an hour", "on a tight budget"]
    rows, seen = [], set()
    while len(rows) < n:
        text = f"How would you {rng.choice(verbs)} {rng.choice(things)} {rng.choice(tails)}?"
        if text in seen:
            continue
        seen.add(text)
        k = len(rows)
        if k % 5 == 4:
            rows.append({"id": f"mine-{k}", "messages": [
                {"role": "system", "content": "Answer in plain words."},
                {"role": "user", "content": "I have a practical question."},
                {"role": "assistant", "content": "Go ahead."},
                {"role": "user", "content": text}]})
        else:
            rows.append({"id": f"mine-{k}", "prompt": text})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"})
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def generic_judge():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "twodrl", "serve-judge", "--mode", "generic", "--port", str(port)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def run_job(run_dir: Path, data: Path, judge: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "twodrl", "run", "configs/quickstart.yaml", "--run-dir", str(run_dir),
           "--set", f"task.dataset={data}", "--set", f"annotator.base_url={judge}"]
    for kv in SMALL:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd + list(extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def test_own_prompts_drive_every_stage(tmp_path, generic_judge):
    rows = unseen_prompts(60)
    data = tmp_path / "my_prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = {r.get("prompt") or r["messages"][-1]["content"] for r in rows}
    ids = {r["id"] for r in rows}
    run_dir = tmp_path / "run"

    first = run_job(run_dir, data, generic_judge, "--set", "rounds=1")
    assert "task dataset:" in first.stdout
    # Continue the same run for one more round: the cursor carries on.
    run_job(run_dir, data, generic_judge, "--set", "rounds=2", "--resume")

    drawn = {}
    for path in sorted((run_dir / "rounds").glob("round-*.prompts.json")):
        doc = json.loads(path.read_text())
        drawn[doc["round"]] = doc["prompts"]
        for p in doc["prompts"]:
            assert p["prompt"] in texts and p["id"] in ids, p
    assert sorted(drawn) == [0, 1, 2]

    samples = sorted((run_dir / "samples").glob("round-*.jsonl"))
    assert samples
    for path in samples:
        for line in path.read_text().splitlines():
            s = json.loads(line)
            assert s["prompt"] in texts and s["id"] in ids
    assert (run_dir / "eval" / "baseline.jsonl").exists()

    # The cursor over the whole resumed run is the one uninterrupted cursor.
    from twodrl.config import load_config
    from twodrl.tasks import prepare_task

    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      [f"task.dataset={data}", f"annotator.base_url={generic_judge}", *SMALL])
    pool = prepare_task(cfg).train
    reference = PromptCursor(len(pool), seed=cfg.seed)
    for k in range(3):
        assert [(p["epoch"], p["index"]) for p in drawn[k]] == reference.take(PROMPTS_PER_ROUND)
        assert [p["id"] for p in drawn[k]] == [pool[i].id for _, i in ((p["epoch"], p["index"]) for p in drawn[k])]

    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert "task/dropped_too_long" in metrics[0]
    for m in metrics:
        assert m["eval/rater"] in ("judge", "judge+reward_model")
        for aspect in cfg.aspects.names:
            assert isinstance(m[f"eval/reward/{aspect}"], (int, float))
    for m in metrics[1:]:
        wr = m["eval/win_rate"]
        assert isinstance(wr, float) and not math.isnan(wr) and 0.0 <= wr <= 1.0
        assert m["eval/win_rate_ci_low"] <= wr <= m["eval/win_rate_ci_high"]
    assert sum(m["rollout/prompts"] for m in metrics) == sum(m["rollout/prompts_planned"] for m in metrics)


def test_shipped_english_prompts_run(tmp_path, generic_judge):
    """The 200 English prompts shipped with the project (some multi-turn) drive a short
    run end to end: train and eval prompts, samples and the judge's eval ratings."""
    import twodrl

    shipped = Path(twodrl.__file__).parent / "data" / "prompts_en.jsonl"
    texts = set()
    for line in shipped.read_text().splitlines():
        row = json.loads(line)
        texts.add(row.get("prompt") or row["messages"][-1]["content"])
    run_dir = tmp_path / "shipped"
    run_job(run_dir, shipped, generic_judge, "--set", "rounds=1")
    for path in (run_dir / "rounds").glob("round-*.prompts.json"):
        assert all(p["prompt"] in texts for p in json.loads(path.read_text())["prompts"])
    for path in (run_dir / "samples").glob("round-*.jsonl"):
        assert all(json.loads(line)["prompt"] in texts for line in path.read_text().splitlines())
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1]
    assert isinstance(metrics[1]["eval/win_rate"], float)
