"""Ray actor wrapping the annotation pool (``annotator-<i>`` in a run's namespace).

An async actor: Ray runs its methods on one event loop, which owns the pool's
AsyncOpenAI client, so concurrent calls share the concurrency limit, the rate limits
and the budget. The SQLite answer cache may be shared by several annotators (WAL,
one transaction per answer). The actor is I/O bound; it asks for a fraction of a CPU
(``annotator.num_cpus``).

Items (a list of dicts) take either layout:

* a pair, as accepted by ``twodrl annotate`` (``prompt``, ``chosen``/``rejected`` or
  ``response_1``/``response_2``/``preference_strength``, optional ``history``;
  responses as strings or ``{"text", "segments"}``) → a HelpSteer-2D record;
* ``{"prompt", "responses": [[seg, ...], ...], "history"?}`` with 1 or 2 segmented
  responses → ``{"scores": [{aspect: [int per segment]}, ...]}``.

Each result carries ``"index"`` (the item's own ``index`` if it has one, else its
position in the call) and, on failure, ``"error"`` with the reason instead of a payload.
When the run's judge budget is spent, every further item fails with an error starting
``"budget exhausted: "`` and :meth:`stats` reports ``budget_exceeded: True``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import ray

from twodrl.aspects import DEFAULT_ASPECTS, DEFAULT_WEIGHTS
from twodrl.config import AnnotatorConfig


@ray.remote
class AnnotatorActor:
    def __init__(
        self,
        cfg: AnnotatorConfig | dict | None = None,
        aspects: Sequence[str] = DEFAULT_ASPECTS,
        weights: Sequence[float] = DEFAULT_WEIGHTS,
        base_url: Optional[str] = None,
        cache_path: Optional[str] = None,
    ):
        from actors.common import count_incarnation, redirect_actor_output

        redirect_actor_output()  # RUN_DIR/logs/annotator-N.log
        self._incarnation = count_incarnation()
        if isinstance(cfg, dict):
            cfg = AnnotatorConfig(**cfg)
        self.cfg = cfg or AnnotatorConfig()
        self.aspects, self.weights = list(aspects), list(weights)
        self.base_url = base_url or self.cfg.base_url
        self.cache_path = cache_path or self.cfg.cache_path
        self._stop_server = None
        self._pool = None
        self._cache = None
        self._input_failures = 0  # items rejected before reaching the pool

    def _ensure_pool(self):
        # Built on first use, inside the actor's event loop (the async client and its
        # semaphore must belong to the loop that awaits them).
        if self._pool is not None:
            return self._pool
        from twodrl.annotation.cache import JudgeCache
        from twodrl.annotation.client import ChatClient
        from twodrl.annotation.pool import AnnotationPool

        if self.base_url is None:
            from twodrl.annotation.judge_server import start_judge_server

            self.base_url, self._stop_server = start_judge_server(model=self.cfg.model)
        self._cache = JudgeCache(self.cache_path) if self.cache_path else None
        client = ChatClient.from_config(self.cfg, base_url=self.base_url)
        # With a cache, the pool makes the client's budget run-wide (the cache file's
        # spend table, shared by every annotator of the run and kept across restarts).
        self._pool = AnnotationPool(client, self._cache, aspects=self.aspects, pairwise=self.cfg.pairwise,
                                    max_repairs=self.cfg.max_repairs)
        return self._pool

    async def annotate_pairs(self, items: list[dict]) -> list[dict]:
        """Annotate ``items`` (see the module docstring); results in input order."""
        from twodrl.annotation.pool import JudgeItem
        from twodrl.annotation.records import parse_input, to_record

        pool = self._ensure_pool()
        results: list[Optional[dict]] = [None] * len(items)
        judge_items, pairs = [], {}
        for pos, item in enumerate(items):
            index = item.get("index", pos) if isinstance(item, dict) else pos
            try:
                if isinstance(item, dict) and "responses" in item:
                    responses = item["responses"]
                    if not isinstance(responses, list) or not all(isinstance(r, list) for r in responses):
                        raise ValueError("responses: expected a list of segment lists")
                    history = item.get("history") or []
                    judge_items.append(JudgeItem(str(item.get("prompt", "")), responses, history, key=pos))
                else:
                    pair = parse_input(item)
                    pairs[pos] = pair
                    judge_items.append(JudgeItem(pair.prompt, pair.segments, pair.history, key=pos))
            except (ValueError, TypeError) as e:
                results[pos] = {"index": index, "error": f"item {pos}: {e}"}
                self._input_failures += 1
        for r in await pool.annotate(judge_items):
            index = items[r.key].get("index", r.key)
            if not r.ok:
                results[r.key] = {"index": index, "error": r.error}
            elif r.key in pairs:
                try:
                    record = to_record(pairs[r.key], r.scores, None, self.aspects, self.weights)
                    results[r.key] = {**record, "index": index}
                except ValueError as e:
                    results[r.key] = {"index": index, "error": str(e)}
                    self._input_failures += 1
            else:
                results[r.key] = {"index": index, "scores": r.scores}
        for pos, r in enumerate(results):
            # Callers that dispatch through the work queue match results by ``id``.
            if r is not None and isinstance(items[pos], dict) and "id" in items[pos]:
                r["id"] = items[pos]["id"]
        return results  # type: ignore[return-value]

    async def annotate_responses(self, items: list[dict]) -> list[dict]:
        """Single responses, one judge request per aspect: items ``{"id", "prompt",
        "response": text (or "segments": [...]), "history"?}`` → ``{"id", "segments",
        "scores": [S][A] in this actor's aspect order}``, or ``{"id", "segments",
        "scores": None, "error": reason}``."""
        from twodrl.annotation.pool import JudgeItem
        from twodrl.annotation.records import segment_text

        pool = self._ensure_pool()
        results: list[Optional[dict]] = [None] * len(items)
        judge_items = []
        segments: dict[int, list[str]] = {}
        for pos, item in enumerate(items):
            segs = list(item.get("segments") or segment_text(str(item.get("response") or "")))
            segments[pos] = segs
            if not segs:
                results[pos] = {"id": item.get("id", pos), "segments": [], "scores": None, "error": "empty response"}
                self._input_failures += 1
                continue
            judge_items.append(JudgeItem(str(item.get("prompt", "")), [segs], list(item.get("history") or []), key=pos))
        for r in await pool.annotate(judge_items):
            item_id = items[r.key].get("id", r.key)
            if r.ok:
                by_aspect = r.scores[0]
                rows = [list(row) for row in zip(*(by_aspect[a] for a in self.aspects))]
                results[r.key] = {"id": item_id, "segments": segments[r.key], "scores": rows}
            else:
                results[r.key] = {"id": item_id, "segments": segments[r.key], "scores": None, "error": r.error}
        return results  # type: ignore[return-value]

    async def annotate(self, items: list[dict]) -> list[dict]:
        """Alias of :meth:`annotate_pairs`."""
        return await self.annotate_pairs(items)

    async def incarnation(self) -> int:
        """1, plus one for every restart of this actor."""
        return self._incarnation

    async def ready(self) -> int:
        """Liveness ping (the work queue waits on it after a restart); the process id
        changes when Ray restarts the actor."""
        return os.getpid()

    def stats(self) -> dict:
        """``requests`` (HTTP requests sent), ``failures`` (items), ``cost_usd``,
        ``tokens`` (this actor's), plus cache hits, retries, repairs, ``budget_exceeded``
        and, with a cache, ``run_requests``/``run_tokens``/``run_cost_usd`` (the run's)."""
        if self._pool is None:
            return {"requests": 0, "failures": self._input_failures, "cost_usd": 0.0, "tokens": 0,
                    "repairs": 0, "budget_exceeded": False}
        stats = self._pool.stats()
        stats["failures"] += self._input_failures
        return stats

    def base_url_in_use(self) -> Optional[str]:
        return self.base_url

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.client.aclose()
        if self._cache is not None:
            self._cache.close()
        if self._stop_server is not None:
            self._stop_server()
            self._stop_server = None


def _is_loopback_url(url: str) -> bool:
    from urllib.parse import urlparse

    from twodrl.annotation.client import _is_loopback

    return _is_loopback(urlparse(url).hostname or "")


def create_annotators(
    cfg: Any,
    namespace: Optional[str] = None,
    base_url: Optional[str] = None,
    run_dir: Optional[str] = None,
    cache_path: Optional[str] = None,
    num: Optional[int] = None,
) -> list:
    """Start (or re-attach to) ``annotator-0 … annotator-{n-1}`` for a ``RunConfig``:
    ``annotator.num_actors`` actors in the run's namespace, resources from the config.
    They share one answer cache: ``cache_path``, else ``annotator.cache_path``, else
    ``RUN_DIR/judge_cache.sqlite`` when ``run_dir`` is given (else no cache)."""
    from actors.common import actor_options, get_or_create_actor

    ann = cfg.annotator
    n = num if num is not None else ann.num_actors
    cache_path = cache_path or ann.cache_path or (os.path.join(str(run_dir), "judge_cache.sqlite") if run_dir else None)
    handles = []
    for i in range(n):
        opts = actor_options("annotator", i, cfg, namespace=namespace)
        # An async actor: concurrent calls (annotate + stats) share one event loop and
        # one pool, so the concurrency/rate/budget limits hold across them.
        opts["max_concurrency"] = 16
        if base_url is not None and _is_loopback_url(base_url):
            # A judge on 127.0.0.1 (the job's local server, or one the user started
            # beside the driver) is reachable only from this node: keep the annotators
            # here rather than let Ray place them where they cannot connect.
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=False)
        handles.append(
            get_or_create_actor(
                AnnotatorActor, opts, dataclasses.asdict(ann), list(cfg.aspects.names), list(cfg.aspects.weights),
                base_url, cache_path,
            )
        )
    return handles
