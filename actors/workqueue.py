"""Fault-tolerant dispatch of work items over a pool of actors.

The driver hands a list of items (prompts to sample, responses to score) to a pool of
actors. Items are cut into chunks; each actor holds at most ``max_in_flight`` chunks;
``ray.wait`` returns whichever finishes first, so a slow actor never stalls the fast
ones and the driver never polls in a loop.

When an actor dies mid-request, Ray restarts it (``max_restarts`` from the config) but
does not retry the request (actors are created with ``max_task_retries=0``): this
module puts the unfinished items of that chunk back at the front of the queue, waits
until the actor answers a ``ready()`` ping again, and carries on. Every result carries
the ``id`` of its item and results are de-duplicated by id, so each item comes back
exactly once, in the input order. An actor whose restarts are used up is dropped from
the pool; if no actor is left, :class:`WorkQueueError` names the unfinished ids.

A hung actor (alive, but its call never returns) is treated like a dead one. With a
per-call deadline (``call_timeout_s``, or what the actors' optional ``deadlines()``
method names for the method, e.g. ``rollout.call_timeout_s``), a call that has run
longer than that is taken for hung: the actor is killed with a restart
(``ray.kill(..., no_restart=False)``, which uses one of its ``max_restarts``), its
calls then fail like a death's, and the same re-queueing follows. A call's clock
starts when the actor can start it: actors run one call at a time, so a queued chunk
is not charged for the one ahead of it.

Actors in the pool must have a method taking ``(items: list[dict], **kwargs)`` and
returning one ``dict`` per item with the same ``id``, plus a cheap ``ready()`` method.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

log = logging.getLogger(__name__)


class WorkQueueError(RuntimeError):
    """Work could not be finished: every actor is dead, or a result was malformed."""


@dataclass
class WorkQueueStats:
    items: int = 0
    chunks_submitted: int = 0
    chunks_failed: int = 0
    items_requeued: int = 0
    duplicates_dropped: int = 0
    timeouts: int = 0  # calls past their deadline (their actor was restarted)
    actor_failures: dict[int, int] = field(default_factory=dict)  # pool index -> failures
    actors_lost: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "chunks_submitted": self.chunks_submitted,
            "chunks_failed": self.chunks_failed,
            "items_requeued": self.items_requeued,
            "duplicates_dropped": self.duplicates_dropped,
            "timeouts": self.timeouts,
            "actor_failures": sum(self.actor_failures.values()),
            "actors_lost": len(self.actors_lost),
        }


@dataclass
class _Chunk:
    items: list[dict]
    attempts: int = 0


def _is_actor_failure(err: BaseException) -> bool:
    return isinstance(err, (RayActorError, ActorDiedError, ActorUnavailableError))


class WorkQueue:
    """Dispatch ``method`` calls over ``actors``.

    Args:
        actors: actor handles (created with ``max_task_retries=0``).
        method: name of the actor method that processes a chunk.
        chunk_size: items per call (the actor batches inside a call).
        key: the field that identifies an item and its result.
        max_in_flight: chunks queued per actor (2 keeps an actor busy while the driver
            collects the previous result).
        restart_timeout_s: how long to wait for a dead actor to come back.
        max_attempts: how often one chunk may fail before the queue gives up (a chunk
            that kills every actor it touches must not loop forever).
        method_kwargs: extra keyword arguments for every call.
        call_timeout_s: seconds one call may run before its actor is taken for hung
            and restarted. ``None``: ask the actors (their ``deadlines()[method]``, if
            they have that method); no deadline when none answers.
    """

    def __init__(
        self,
        actors: Sequence[Any],
        method: str,
        chunk_size: int = 8,
        key: str = "id",
        max_in_flight: int = 2,
        restart_timeout_s: float = 300.0,
        max_attempts: int = 4,
        method_kwargs: Optional[dict[str, Any]] = None,
        call_timeout_s: Optional[float] = None,
    ):
        if not actors:
            raise ValueError("WorkQueue needs at least one actor")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
        self.actors = list(actors)
        self.method = method
        self.chunk_size = chunk_size
        self.key = key
        self.max_in_flight = max(1, max_in_flight)
        self.restart_timeout_s = restart_timeout_s
        self.max_attempts = max_attempts
        self.method_kwargs = dict(method_kwargs or {})
        if call_timeout_s is not None and not call_timeout_s > 0:
            raise ValueError(f"call_timeout_s must be > 0, got {call_timeout_s}")
        self.call_timeout_s = call_timeout_s if call_timeout_s is not None else _asked_deadline(self.actors, method)
        self.stats = WorkQueueStats()
        self._dead: set[int] = set()
        # Per actor: its in-flight calls in submission order (it runs them in that
        # order) and when the first of them could start; actors killed for a timeout
        # whose calls have not all come back yet.
        self._queued: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self._clock: dict[int, float] = {}
        self._killed: set[int] = set()

    # ------------------------------------------------------------------ public

    def run(
        self,
        items: Sequence[dict],
        progress: Optional[Callable[[int], None]] = None,
        desc: Optional[str] = None,
        on_result: Optional[Callable[[dict], None]] = None,
    ) -> list[dict]:
        """Results for ``items``, one per item, in input order. ``on_result`` sees each
        result as soon as it arrives (streaming consumers start on it at once)."""
        results: dict[Any, dict] = {}
        bar = _progress_bar(len(items), desc) if desc else None
        try:
            for res in self.iter_results(items):
                results[res[self.key]] = res
                if on_result is not None:
                    on_result(res)
                if progress is not None:
                    progress(1)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [results[item[self.key]] for item in items]

    def iter_results(self, items: Sequence[dict]) -> Iterator[dict]:
        """Yield each item's result exactly once, as soon as its chunk finishes."""
        ids = [item[self.key] for item in items]
        if len(set(ids)) != len(ids):
            dup = [i for i, c in collections.Counter(ids).items() if c > 1][:5]
            raise ValueError(f"work item ids must be unique; repeated: {dup}")
        self.stats.items += len(items)
        pending = collections.deque(
            _Chunk(list(items[i : i + self.chunk_size])) for i in range(0, len(items), self.chunk_size)
        )
        done: set[Any] = set()
        in_flight: dict[ray.ObjectRef, tuple[int, _Chunk]] = {}
        load = collections.Counter()

        while pending or in_flight:
            self._fill(pending, in_flight, load)
            if not in_flight:
                unfinished = [it[self.key] for ch in pending for it in ch.items][:20]
                raise WorkQueueError(
                    f"every actor of the pool for {self.method!r} is dead (restarts used up); "
                    f"{sum(len(c.items) for c in pending)} items unfinished, e.g. ids {unfinished}"
                )
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self._wait_s())
            if not ready:
                self._kill_overdue()
                continue
            ref = ready[0]
            index, chunk = in_flight.pop(ref)
            load[index] -= 1
            self._returned(index, ref)
            try:
                out = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - sorted below
                if not _is_actor_failure(err):
                    raise
                self._on_actor_failure(index, chunk, done, pending, err)
                continue
            yield from self._accept(chunk, out, done)

    # ------------------------------------------------------------------ internals

    def _fill(self, pending, in_flight, load) -> None:
        """Give queued chunks to live actors, least-loaded first."""
        while pending:
            live = [i for i in range(len(self.actors)) if i not in self._dead and load[i] < self.max_in_flight]
            if not live:
                return
            index = min(live, key=lambda i: load[i])
            chunk = pending.popleft()
            chunk.attempts += 1
            ref = getattr(self.actors[index], self.method).remote(chunk.items, **self.method_kwargs)
            in_flight[ref] = (index, chunk)
            if not self._queued[index]:
                self._clock[index] = time.monotonic()
            self._queued[index].append(ref)
            load[index] += 1
            self.stats.chunks_submitted += 1

    def _returned(self, index: int, ref: Any) -> None:
        """A call of actor ``index`` came back: the next one's clock starts now."""
        queue = self._queued[index]
        try:
            queue.remove(ref)
        except ValueError:
            pass
        self._clock[index] = time.monotonic()
        if not queue:
            self._killed.discard(index)  # every call of a killed actor is back

    def _wait_s(self) -> Optional[float]:
        """How long ``ray.wait`` may block: until the earliest deadline of a running
        call (None: no deadline applies)."""
        if self.call_timeout_s is None:
            return None
        starts = [self._clock[i] for i, q in self._queued.items() if q and i not in self._killed]
        if not starts:
            return None
        return max(0.0, min(starts) + self.call_timeout_s - time.monotonic())

    def _kill_overdue(self) -> None:
        """Restart every actor whose running call is past its deadline. Its calls then
        fail with an actor error and are re-queued by :meth:`_on_actor_failure`."""
        now = time.monotonic()
        for index, queue in self._queued.items():
            if not queue or index in self._killed or now < self._clock[index] + self.call_timeout_s:
                continue
            self._killed.add(index)
            self.stats.timeouts += 1
            log.warning(
                "actor %d: %s ran past its %.0fs deadline; restarting it and re-queueing its items",
                index, self.method, self.call_timeout_s,
            )
            ray.kill(self.actors[index], no_restart=False)

    def _accept(self, chunk: _Chunk, out: Any, done: set) -> Iterator[dict]:
        if not isinstance(out, list):
            raise WorkQueueError(f"{self.method!r} returned {type(out).__name__}, expected a list of dicts")
        expected = {it[self.key] for it in chunk.items}
        for res in out:
            rid = res.get(self.key) if isinstance(res, dict) else None
            if rid not in expected:
                raise WorkQueueError(
                    f"{self.method!r} returned a result with {self.key}={rid!r} that was not in its request"
                )
            if rid in done:
                self.stats.duplicates_dropped += 1
                continue
            done.add(rid)
            yield res
        missing = expected - done
        if missing:
            raise WorkQueueError(f"{self.method!r} returned no result for ids {sorted(missing, key=str)[:10]}")

    def _on_actor_failure(self, index, chunk, done, pending, err) -> None:
        self.stats.chunks_failed += 1
        self.stats.actor_failures[index] = self.stats.actor_failures.get(index, 0) + 1
        left = [it for it in chunk.items if it[self.key] not in done]
        log.warning(
            "actor %d died during %s (%s); re-queueing %d items",
            index, self.method, type(err).__name__, len(left),
        )
        if chunk.attempts >= self.max_attempts:
            raise WorkQueueError(
                f"a chunk of {len(chunk.items)} items failed {chunk.attempts} times in {self.method!r} "
                f"(ids {[it[self.key] for it in chunk.items][:10]}): {err}"
            ) from err
        if left:
            self.stats.items_requeued += len(left)
            pending.appendleft(_Chunk(left, chunk.attempts))
        # The actor's other in-flight chunk fails too; only the first failure waits.
        if index not in self._dead and not self._wait_alive(index):
            self._dead.add(index)
            self.stats.actors_lost.append(index)

    def _wait_alive(self, index: int) -> bool:
        return wait_ready(self.actors[index], self.restart_timeout_s)


def _asked_deadline(actors: Sequence[Any], method: str, timeout_s: float = 30.0) -> Optional[float]:
    """The longest deadline the actors name for ``method`` through their optional
    ``deadlines()`` method (``RolloutWorker`` has one); None if none does. An actor
    that is down or slow to answer is skipped: this only picks a number."""
    refs = []
    for actor in actors:
        try:
            refs.append(actor.deadlines.remote())
        except AttributeError:  # the actor class has no such method
            return None
    found = []
    for ref in refs:
        try:
            value = ray.get(ref, timeout=timeout_s).get(method)
        except (RayActorError, GetTimeoutError, ray.exceptions.RayError):
            continue
        if value is not None and value > 0:
            found.append(float(value))
    return max(found) if found else None


def wait_ready(actor: Any, timeout_s: float = 300.0) -> bool:
    """Block until ``actor`` answers ``ready()`` (e.g. while Ray restarts it); False
    if it is dead for good or does not answer within ``timeout_s``. Each try is a
    blocking ``ray.get`` with a timeout, not a busy loop; the retries only cover the
    window in which Ray still reports the restarting actor as unavailable."""
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    died = 0
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return True
        except ActorDiedError:
            # Restarts used up (or killed with no_restart). A ping racing with the
            # death notice can see this once even when a restart follows, so only a
            # second answer in a row counts as gone for good.
            died += 1
            if died >= 2:
                return False
            time.sleep(delay)
        except (ActorUnavailableError, RayActorError, GetTimeoutError):
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    return False


def dispatch(
    actors: Sequence[Any],
    method: str,
    items: Sequence[dict],
    chunk_size: int = 8,
    desc: Optional[str] = None,
    **kwargs: Any,
) -> tuple[list[dict], dict[str, Any]]:
    """One-shot helper: results in input order plus the queue's stats."""
    queue = WorkQueue(actors, method, chunk_size=chunk_size, **kwargs)
    results = queue.run(items, desc=desc)
    return results, queue.stats.as_dict()


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", leave=False)


def run_work_queue(
    actors: Sequence[Any],
    items: Sequence[dict],
    method: str,
    kwargs: Optional[dict[str, Any]] = None,
    chunk_size: int = 8,
    progress: bool = False,
    desc: Optional[str] = None,
    on_result: Optional[Callable[[dict], None]] = None,
    **queue_kwargs: Any,
) -> list[dict]:
    """The driver's entry point: results for ``items`` in input order, each exactly
    once, surviving actor deaths (see the module docstring). ``progress`` shows a bar;
    ``on_result`` is called with each result as it arrives."""
    queue = WorkQueue(actors, method, chunk_size=chunk_size, method_kwargs=kwargs, **queue_kwargs)
    results = queue.run(items, desc=(desc or method) if progress else None, on_result=on_result)
    stats = queue.stats.as_dict()
    if stats["chunks_failed"]:
        log.warning("%s: %d chunk(s) failed and %d item(s) were re-queued", method, stats["chunks_failed"], stats["items_requeued"])
    return results
