"""Acceptance of the annotation pool against the real local judge over HTTP:

* 200 pairs under 20% 5xx, 10% 429, 5% replies slower than the timeout and 10%
  malformed replies (repair rounds included): no crash, at least 95% annotated with
  valid scores for all five aspects and every segment, every other input in the
  failures file with a reason;
* kill -9 of the `twodrl annotate` process mid-run, then a rerun: the server receives
  no request whose answer was already in the cache, and the output is intact;
* the API key (a unique fake one the server insists on) appears in no file written;
* the Ray actor wrapper answers pairs and reports its stats.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twodrl.annotation.cache import JudgeCache
from twodrl.annotation.judge_server import Faults, JudgeServer
from twodrl.aspects import ASPECTS, DEFAULT_ASPECTS
from twodrl.synthetic import make_preference_records, score_segments

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-test-9f3c1e77-NEVER-WRITE-ME-4b2a"


def write_inputs(path: Path, n: int, seed: int) -> list[dict]:
    recs = make_preference_records(n, seed=seed)
    with open(path, "w") as fh:
        for r in recs:
            fh.write(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]["text"], "rejected": r["rejected"]["text"]}) + "\n")
    return recs


def check_outputs(out: Path, n: int, recs: list[dict]) -> tuple[set[int], set[int]]:
    """Every index annotated correctly or failed with a reason; never both, never twice."""
    done = []
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        i = rec["index"]
        done.append(i)
        assert rec["prompt"] == recs[i]["prompt"]
        for side in ("chosen", "rejected"):
            segs = rec[side]["segments"]
            assert segs == recs[i][side]["segments"]
            for a in DEFAULT_ASPECTS:
                row = rec[side]["scores"][a]
                assert len(row) == len(segs) and all(ASPECTS[a].valid(v) for v in row), (i, side, a, row)
            # The judge applies the task's rules, so faults must not have bent any rating.
            expected = score_segments(rec["prompt"], segs)
            assert [list(col) for col in zip(*expected)] == [rec[side]["scores"][a] for a in DEFAULT_ASPECTS]
    failed = []
    fail_file = Path(str(out) + ".failures.jsonl")
    for line in fail_file.read_text().splitlines():
        f = json.loads(line)
        assert isinstance(f["reason"], str) and f["reason"]
        failed.append(f["index"])
    assert len(done) == len(set(done)) and len(failed) == len(set(failed))
    assert set(done) | set(failed) == set(range(n)) and not set(done) & set(failed)
    from twodrl.data import load_records

    assert len(load_records(out).records) == len(done)  # the foundation's strict loader agrees
    return set(done), set(failed)


def assert_key_in_no_file(root: Path) -> None:
    checked = 0
    for p in root.rglob("*"):
        if p.is_file():
            checked += 1
            assert KEY.encode() not in p.read_bytes(), f"API key written to {p}"
            assert KEY[8:24].encode() not in p.read_bytes(), f"part of the API key written to {p}"
    assert checked >= 3  # output, failures, cache (+ WAL)


def test_200_pairs_under_faults(tmp_path, monkeypatch):
    from jobs.annotate import main

    recs = write_inputs(tmp_path / "in.jsonl", 200, seed=5)
    faults = Faults(rate_500=0.2, rate_429=0.1, rate_slow=0.05, rate_malformed=0.1, slow_s=1.0, retry_after_s=0.02)
    server = JudgeServer(faults=faults, seed=7, api_key=KEY).start()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = tmp_path / "run" / "out.jsonl"
    try:
        rc = main([
            "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--base-url", server.url,
            "--concurrency", "16", "--timeout", "0.5", "--max-retries", "8", "--no-progress",
            "--set", "annotator.backoff_base_s=0.01", "--set", "annotator.backoff_max_s=0.1",
        ])
        stats = server.stats()
    finally:
        server.stop()
    assert rc == 0
    done, failed = check_outputs(out, 200, recs)
    # Faults really happened, and the pool still annotated ≥ 95%: with one repair a
    # five-aspect pair fails when any aspect gets two bad answers in a row (≈ 11% of
    # pairs here); the default two repairs make that ≈ 2%.
    assert stats["by_fault"]["500"] > 100 and stats["by_fault"]["429"] > 50 and stats["by_fault"]["slow"] > 20
    assert stats["by_fault"]["malformed"] > 50
    assert len(done) >= 190, f"only {len(done)} of 200 annotated; failures: {len(failed)}"
    reasons = [json.loads(x)["reason"] for x in Path(str(out) + ".failures.jsonl").read_text().splitlines()]
    assert all("malformed judge reply after 2 repairs" in r or "gave up after" in r for r in reasons), reasons
    assert_key_in_no_file(tmp_path)


def _cached(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_kill9_then_rerun_never_repays(tmp_path, monkeypatch):
    from jobs.annotate import main

    n = 60
    recs = write_inputs(tmp_path / "in.jsonl", n, seed=9)
    # Some faults, and enough latency that the run is still going when it is killed.
    server = JudgeServer(faults=Faults(rate_500=0.1, rate_malformed=0.05, latency_s=0.05), seed=3, api_key=KEY).start()
    out = tmp_path / "out.jsonl"
    cache = Path(str(out) + ".cache.sqlite")
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--base-url", server.url,
            "--concurrency", "4", "--timeout", "5", "--no-progress", "--set", "annotator.backoff_base_s=0.01"]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "twodrl", "annotate", *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _cached(cache) < 60 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()
        time.sleep(0.2)  # let the server finish handlers of the dead client
        # Simulate the worst torn write: half a record at the end of the output.
        with open(out, "a") as fh:
            fh.write('{"prompt": "Tell me about the')
        cached = JudgeCache(cache).messages_digests()
        assert len(cached) >= 60
        with server.lock:
            server.digests.clear()
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        rc = main(args)
        rerun_requests = set(server.digests)
    finally:
        server.stop()
    assert rc == 0
    assert rerun_requests, "the rerun had work left to do"
    assert not rerun_requests & cached, f"{len(rerun_requests & cached)} requests re-paid after kill -9"
    check_outputs(out, n, recs)
    assert_key_in_no_file(tmp_path)


def test_annotator_actor(ray_cluster, tmp_path):
    import ray

    from actors.annotator import create_annotators
    from twodrl.config import RunConfig

    server = JudgeServer(seed=1).start()
    try:
        cfg = RunConfig()
        cfg.annotator.base_url = server.url
        cfg.annotator.concurrency = 4
        (actor,) = create_annotators(cfg, "twodrl-annotator-test", run_dir=str(tmp_path))
        assert ray.get_actor("annotator-0", namespace="twodrl-annotator-test") is not None
        recs = make_preference_records(3, seed=4)
        items = [{"prompt": r["prompt"], "chosen": r["chosen"]["text"], "rejected": r["rejected"]["text"]} for r in recs]
        items.append({"prompt": recs[0]["prompt"], "responses": [recs[0]["chosen"]["segments"]], "index": "solo"})
        items.append({"prompt": "no responses here"})
        results = ray.get(actor.annotate_pairs.remote(items), timeout=120)
        for r, rec in zip(results[:3], recs):
            assert r["chosen"]["scores"] == rec["chosen"]["scores"] and r["rejected"]["scores"] == rec["rejected"]["scores"]
        assert results[3] == {"index": "solo", "scores": [recs[0]["chosen"]["scores"]]}
        assert results[4]["index"] == 4 and "expected 'chosen' and 'rejected'" in results[4]["error"]
        stats = ray.get(actor.stats.remote())
        assert stats["requests"] == 3 * 5 + 5 and stats["failures"] == 1 and stats["cost_usd"] == 0.0 and stats["tokens"] > 0
        again = ray.get(actor.annotate.remote(items[:3]))  # served from the run's cache
        assert again == results[:3] and ray.get(actor.stats.remote())["requests"] == 20
        assert (tmp_path / "judge_cache.sqlite").exists()

        # The driver's single-response path: [S][A] rows in the config's aspect order.
        singles = [{"id": "7", "prompt": recs[1]["prompt"], "response": recs[1]["rejected"]["text"], "history": None},
                   {"id": "8", "prompt": "x", "response": ""}]
        out = ray.get(actor.annotate_responses.remote(singles))
        expected = score_segments(recs[1]["prompt"], recs[1]["rejected"]["segments"], cfg.aspects.names)
        assert out[0] == {"id": "7", "segments": recs[1]["rejected"]["segments"], "scores": expected}
        assert out[1]["id"] == "8" and out[1]["scores"] is None and out[1]["error"]
        ray.get(actor.close.remote())
        ray.kill(actor)
    finally:
        server.stop()
