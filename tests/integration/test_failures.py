"""Scorer actors killed in the middle of a request: the work queue re-queues what they
had not finished, Ray restarts them, and every item id comes back exactly once."""

from __future__ import annotations

import collections
import time

import pytest

import ray

from twodrl.config import load_config
from twodrl.synthetic import make_prompts, sample_response

pytestmark = pytest.mark.integration


def _items(n, seed=0):
    import random

    rng = random.Random(seed)
    return [{"id": f"item-{i}", "prompt": p.text, "response": sample_response(rng, p.topic)}
            for i, p in enumerate(make_prompts(n, seed=seed))]


def _pool(name, restarts, n=2):
    from actors.scorer import create_scorers

    cfg = load_config(None, [f"run_name={name}", f"scorer.num_workers={n}", f"scorer.max_restarts={restarts}",
                             "scorer.batch_size=4"])
    return create_scorers(cfg)


@pytest.fixture(scope="module")
def restarting_pool(ray_cluster):
    handles = _pool("fail-restart", restarts=3)
    yield handles
    for h in handles:
        ray.kill(h, no_restart=True)


def _run_killing(queue, items, victims):
    """Consume results; after the k-th result, kill victims[k] (restartable)."""
    got = []
    plan = dict(victims)
    for res in queue.iter_results(items):
        got.append(res)
        if len(got) in plan:
            ray.kill(plan[len(got)], no_restart=False)
    return got


def test_killed_scorer_loses_and_duplicates_nothing(restarting_pool):
    from actors.workqueue import WorkQueue

    s0, s1 = restarting_pool
    items = _items(96)
    queue = WorkQueue(restarting_pool, "score", chunk_size=8)
    got = _run_killing(queue, items, {1: s0})
    counts = collections.Counter(r["id"] for r in got)
    assert set(counts) == {it["id"] for it in items}
    assert max(counts.values()) == 1
    assert queue.stats.chunks_failed >= 1 and queue.stats.items_requeued >= 1
    assert not queue.stats.actors_lost
    # the restarted actor answers again (same name, a new process)
    assert ray.get(s0.ready.remote()) > 0
    assert all(len(r["scores"]) == len(r["segments"]) for r in got)


def test_both_scorers_killed_in_turn(restarting_pool):
    from actors.workqueue import WorkQueue, run_work_queue

    s0, s1 = restarting_pool
    items = _items(96, seed=1)
    queue = WorkQueue(restarting_pool, "score", chunk_size=8)
    got = _run_killing(queue, items, {1: s1, 40: s0})
    assert sorted(r["id"] for r in got) == sorted(it["id"] for it in items)
    assert queue.stats.as_dict()["actor_failures"] >= 2
    # results in input order through the driver's entry point, after the restarts
    ordered = run_work_queue(restarting_pool, items[:20], method="score", chunk_size=4)
    assert [r["id"] for r in ordered] == [it["id"] for it in items[:20]]


def test_restarted_scorer_keeps_its_trained_weights(restarting_pool):
    from actors.workqueue import wait_ready
    from twodrl.synthetic import make_preference_records

    s0, _ = restarting_pool
    ray.get(s0.train.remote(make_preference_records(16, seed=2), epochs=1))
    probe = _items(6, seed=3)
    before = ray.get(s0.score.remote(probe))
    pid = ray.get(s0.ready.remote())
    ray.kill(s0, no_restart=False)
    # ray.kill is asynchronous: a ping can still be answered by the old process, so
    # wait until a *new* process answers (a new pid, rebuilt from the config).
    from ray.exceptions import ActorUnavailableError

    new_pid, deadline = pid, time.monotonic() + 180
    while new_pid == pid and time.monotonic() < deadline:
        assert wait_ready(s0, timeout_s=120)
        try:
            new_pid = ray.get(s0.ready.remote(), timeout=60)
        except ActorUnavailableError:
            continue
    assert new_pid != pid
    assert ray.get(s0.score.remote(probe)) == before


def test_restarts_used_up(ray_cluster):
    """An actor that cannot restart is dropped from the pool and the others finish its
    work; when none is left, the error names the unfinished items."""
    from actors.workqueue import WorkQueue, WorkQueueError

    pool = _pool("fail-norestart", restarts=0)
    items = _items(80, seed=4)
    queue = WorkQueue(pool, "score", chunk_size=8, restart_timeout_s=20)
    got = _run_killing(queue, items, {1: pool[0]})
    assert sorted(r["id"] for r in got) == sorted(it["id"] for it in items)
    assert queue.stats.actors_lost == [0]
    ray.kill(pool[1], no_restart=False)  # no restarts configured: gone for good
    with pytest.raises(WorkQueueError, match="every actor of the pool"):
        WorkQueue(pool, "score", chunk_size=8, restart_timeout_s=20).run(items[:8])
