"""A hung actor (alive, its call never returns) does not stall the work queue: once a
call passes its deadline the actor is restarted, its items are re-queued, and every
item comes back exactly once, soon after the deadline."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.integration

DEADLINE_S = 3.0
# Deadline, a restart of a small actor and the re-queued chunks, on a busy 2-core box.
MARGIN_S = 45.0


def _actor_class(ray):
    @ray.remote
    class HangsInFirstLife:
        """Test-only pool member: with ``hang`` set, every call of its first life sleeps
        far past any deadline; after Ray restarts it, it answers at once."""

        def __init__(self, hang: bool, deadline_s=None):
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
            self.hang = hang and not restarted
            self.deadline_s = deadline_s

        def ready(self) -> bool:
            return True

        def deadlines(self) -> dict:
            return {"work": self.deadline_s}

        def work(self, items: list[dict]) -> list[dict]:
            if self.hang:
                time.sleep(3600)
            return [{"id": it["id"], "pid": os.getpid()} for it in items]

        def pid(self) -> int:
            return os.getpid()

    return HangsInFirstLife


def _pool(ray, deadline_s=None):
    cls = _actor_class(ray)
    opts = dict(num_cpus=0.1, max_restarts=1, max_task_retries=0, max_concurrency=1)
    hung = cls.options(**opts).remote(True, deadline_s)
    fine = cls.options(**opts).remote(False, deadline_s)
    ray.get([hung.ready.remote(), fine.ready.remote()])
    return hung, fine


@pytest.mark.parametrize("how", ["argument", "asked"])
def test_hung_actor_is_restarted_and_its_items_requeued(ray_cluster, how):
    from actors.workqueue import WorkQueue

    ray = ray_cluster
    hung, fine = _pool(ray, deadline_s=DEADLINE_S if how == "asked" else None)
    first_pid = ray.get(hung.pid.remote(), timeout=30)
    items = [{"id": f"item-{i}"} for i in range(12)]
    queue = WorkQueue([hung, fine], "work", chunk_size=2,
                      call_timeout_s=DEADLINE_S if how == "argument" else None)
    assert queue.call_timeout_s == DEADLINE_S
    t0 = time.monotonic()
    results = queue.run(items)
    elapsed = time.monotonic() - t0

    assert [r["id"] for r in results] == [it["id"] for it in items]  # all, once, in order
    stats = queue.stats
    assert stats.timeouts == 1
    assert stats.items_requeued >= 2 and stats.chunks_failed >= 1
    assert stats.duplicates_dropped == 0 and stats.actors_lost == []
    assert DEADLINE_S <= elapsed < DEADLINE_S + MARGIN_S
    # The hung life answered nothing; the restarted actor is a new process.
    assert first_pid not in {r["pid"] for r in results}
    assert ray.get(hung.pid.remote(), timeout=30) != first_pid
    for h in (hung, fine):
        ray.kill(h)


def test_run_work_queue_takes_the_deadline(ray_cluster):
    from actors.workqueue import run_work_queue

    ray = ray_cluster
    hung, fine = _pool(ray)
    items = [{"id": i} for i in range(6)]
    t0 = time.monotonic()
    results = run_work_queue([hung, fine], items, method="work", chunk_size=1, call_timeout_s=DEADLINE_S)
    assert [r["id"] for r in results] == list(range(6))
    assert time.monotonic() - t0 < DEADLINE_S + MARGIN_S
    for h in (hung, fine):
        ray.kill(h)
