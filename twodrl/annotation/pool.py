"""The annotation pool: items in, segment × aspect ratings (or a failure reason) out.

One judge request = one aspect × (a pair of responses, or one response). An item with
the five default aspects costs five requests in pairwise mode (ten in single mode).
Per request: cache lookup → request → parse → on a malformed reply, up to
``max_repairs`` repair requests, each showing the judge the conversation so far with
its last answer and what was wrong with it → parse → else the aspect, and with it the
item, fails with the reason. Only answers that parsed are cached.

Budget: with a cache, the client's budget counts against the cache file's run-wide
spend (all actors of a run, across restarts and resumes); what each answer cost is
added in the same transaction that stores it.

:meth:`AnnotationPool.annotate_item` never raises: every problem becomes the item's
``error``, so one bad item or reply can never take the pool down.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from twodrl.annotation.cache import JudgeCache, cache_key
from twodrl.annotation.client import BudgetExhausted, ChatClient, FatalJudgeError, JudgeError, redact
from twodrl.annotation.parser import ParseError, parse_reply
from twodrl.annotation.prompts import JudgeTemplates, build_messages, load_templates, repair_messages
from twodrl.aspects import DEFAULT_ASPECTS

log = logging.getLogger(__name__)

# Reply size per segment used for budget/rate estimates before usage is known.
_TOKENS_PER_SEGMENT = 30


@dataclass
class JudgeItem:
    """One thing to annotate: a prompt (with optional history) and 1 or 2 responses,
    each already cut into segments. ``key`` is the caller's tag, returned as is."""

    prompt: str
    responses: list[list[str]]
    history: list[dict] = field(default_factory=list)
    key: Any = None


@dataclass
class ItemResult:
    key: Any
    scores: Optional[list[dict[str, list[int]]]] = None  # per response: aspect -> ratings
    error: Optional[str] = None
    requests: int = 0  # judge requests answered by the server for this item (not cache)
    cached: int = 0  # requests answered from the cache
    repairs: int = 0  # repair re-asks
    monotone_repairs: int = 0  # completeness ratings raised to the running max

    @property
    def ok(self) -> bool:
        return self.error is None


class _AspectFailed(Exception):
    pass


class AnnotationPool:
    def __init__(
        self,
        client: ChatClient,
        cache: Optional[JudgeCache] = None,
        aspects: Sequence[str] = DEFAULT_ASPECTS,
        pairwise: bool = True,
        templates: Optional[JudgeTemplates] = None,
        max_repairs: int = 2,
    ):
        if max_repairs < 0:
            raise ValueError(f"annotator.max_repairs must be ≥ 0, got {max_repairs}")
        self.client = client
        self.cache = cache
        self.max_repairs = int(max_repairs)
        if cache is not None and client.budget.ledger is None:
            # The run's cache file is shared by every annotator of the run and outlives
            # them: the one place a run-wide budget survives restarts and resumes.
            client.budget.attach_ledger(cache)
        self.aspects = tuple(aspects)
        self.pairwise = pairwise
        self.templates = templates or load_templates()
        for a in self.aspects:
            self.templates.aspect(a)  # fail now, not per request, on a missing template
        self.counts = {"items": 0, "failures": 0, "cache_hits": 0, "repairs": 0, "repair_failures": 0,
                       "monotone_repairs": 0, "judge_answers": 0}
        self.stop_reason: Optional[str] = None
        self.budget_exceeded = False

    # ------------------------------------------------------------------ one request

    def _store(self, aspect: str, key: str, messages: list[dict], text: str, usage: Any, spend: Any = None) -> None:
        """Cache an answer; ``spend`` (a :class:`~twodrl.annotation.client.Spend` not yet
        in the ledger) is added to the run's spend in the same transaction."""
        if self.cache is None:
            if spend is not None:
                self.client.record_spend(spend)
            return
        budget = self.client.budget
        carry = spend is not None and not spend.recorded and budget.ledger is self.cache
        self.cache.put(
            key,
            model=self.client.model,
            template_id=self.templates.id,
            aspect=aspect,
            messages=messages,
            reply=text,
            prompt_tokens=usage.prompt_tokens if usage is not None else 0,
            completion_tokens=usage.completion_tokens if usage is not None else 0,
            spend_tokens=spend.tokens if carry else 0,
            spend_cost=spend.cost if carry else 0.0,
        )
        if carry:
            budget.mark_recorded(spend)
        elif spend is not None:
            self.client.record_spend(spend)  # a ledger other than this cache

    def _charge(self, usage: Any) -> None:
        """Record what a fetched answer cost when no answer is stored with it (it did
        not parse). Never raises: the spend then stays counted in this process."""
        spend = getattr(usage, "spend", None)
        if spend is not None:
            self.client.record_spend(spend)

    async def _judge(self, item: JudgeItem, responses: list[list[str]], aspect: str, result: ItemResult) -> list[list[int]]:
        counts = [len(r) for r in responses]
        messages = build_messages(aspect, item.prompt, responses, item.history, self.templates)
        key = cache_key(self.client.model, self.templates.id, aspect, messages)
        convo, ckey = messages, key
        text, usage = await self._fetch(ckey, convo, aspect, sum(counts), result)
        last_usage = usage  # the newest answer that came from the server (None: all cached)
        repairs = 0
        while True:
            try:
                parsed = parse_reply(text, aspect, counts)
                break
            except ParseError as e:
                self._charge(usage)
                if repairs >= self.max_repairs:
                    self.counts["repair_failures"] += 1
                    raise _AspectFailed(
                        f"{aspect}: malformed judge reply after {repairs} repair{'s' if repairs != 1 else ''}: {e}"
                    ) from None
                # Re-ask, showing the judge its own answer and the precise problem. The
                # conversation grows with each round, so a judge that answers a repeated
                # question identically (temperature 0) is asked something new each time.
                repairs += 1
                result.repairs += 1
                self.counts["repairs"] += 1
                convo = repair_messages(convo, text, str(e), aspect, counts, self.templates)
                ckey = cache_key(self.client.model, self.templates.id, aspect, convo)
                text, usage = await self._fetch(ckey, convo, aspect, sum(counts), result)
                last_usage = usage or last_usage
        if usage is not None:
            self._store(aspect, ckey, convo, text, usage, usage.spend)
        if ckey != key and last_usage is not None:
            # The repaired answer is a valid answer to the original request too: caching
            # it under the original key means a rerun never asks the original question
            # again (its first answer was paid for).
            self._store(aspect, key, messages, text, last_usage)
        result.monotone_repairs += parsed.monotone_repairs
        self.counts["monotone_repairs"] += parsed.monotone_repairs
        return parsed.scores

    async def _fetch(self, key: str, messages: list[dict], aspect: str, n_segments: int, result: ItemResult):
        """``(text, usage)`` where usage is None for a cache hit (nothing to store)."""
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                result.cached += 1
                self.counts["cache_hits"] += 1
                return hit.reply, None
        text, usage = await self.client.chat(messages, _TOKENS_PER_SEGMENT * n_segments + 32)
        result.requests += 1
        self.counts["judge_answers"] += 1
        return text, usage

    async def _judge_aspect(self, item: JudgeItem, aspect: str, result: ItemResult) -> list[list[int]]:
        if self.pairwise or len(item.responses) == 1:
            return await self._judge(item, item.responses, aspect, result)
        rows = []
        for r in item.responses:
            rows.extend(await self._judge(item, [r], aspect, result))
        return rows

    # ------------------------------------------------------------------ one item

    async def annotate_item(self, item: JudgeItem) -> ItemResult:
        """Ratings for every aspect and segment of ``item``; never raises."""
        result = ItemResult(key=item.key)
        self.counts["items"] += 1
        try:
            if self.stop_reason:
                raise _AspectFailed(self.stop_reason)
            if not 1 <= len(item.responses) <= 2 or any(not r for r in item.responses):
                raise _AspectFailed("an item needs 1 or 2 responses, each with at least one segment")
            outcomes = await asyncio.gather(
                *(self._judge_aspect(item, a, result) for a in self.aspects), return_exceptions=True
            )
            errors = []
            for aspect, out in zip(self.aspects, outcomes):
                if isinstance(out, BaseException):
                    if isinstance(out, BudgetExhausted):
                        self.budget_exceeded = True
                    if isinstance(out, (BudgetExhausted, FatalJudgeError)):
                        # Stop the pool: every later item would fail the same way.
                        self.stop_reason = self.stop_reason or str(out)
                        errors.append(str(out))
                    elif isinstance(out, _AspectFailed):
                        errors.append(str(out))
                    elif isinstance(out, JudgeError):
                        errors.append(f"{aspect}: {out}")
                    elif isinstance(out, asyncio.CancelledError):
                        raise out
                    else:
                        log.exception("unexpected error annotating an item", exc_info=out)
                        errors.append(f"{aspect}: internal error: {type(out).__name__}: {out}")
            if errors:
                # Budget/fatal reasons first: they explain why the others did not happen.
                errors.sort(key=lambda e: not e.startswith(("budget exhausted", "http 401", "http 403", "http 429 insufficient")))
                raise _AspectFailed("; ".join(dict.fromkeys(errors)))
            result.scores = [
                {a: list(out[i]) for a, out in zip(self.aspects, outcomes)} for i in range(len(item.responses))
            ]
        except _AspectFailed as e:
            result.error = redact(str(e), self.client._secret)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never crash the pool on one item
            log.exception("unexpected error annotating an item")
            result.error = redact(f"internal error: {type(e).__name__}: {e}", self.client._secret)
        if result.error:
            self.counts["failures"] += 1
        return result

    # ------------------------------------------------------------------ many items

    async def annotate(
        self,
        items: Iterable[JudgeItem],
        on_result: Optional[Callable[[ItemResult], None]] = None,
        window: Optional[int] = None,
    ) -> list[ItemResult]:
        """Annotate ``items`` with a bounded number in flight; results in completion
        order (``on_result`` is called as each finishes, e.g. to write it out)."""
        window = window or max(4, 2 * self.client.concurrency)
        results: list[ItemResult] = []
        pending: set[asyncio.Task] = set()

        def collect(done: set[asyncio.Task]) -> None:
            for t in done:
                r = t.result()
                results.append(r)
                if on_result is not None:
                    on_result(r)

        try:
            for item in items:
                pending.add(asyncio.ensure_future(self.annotate_item(item)))
                if len(pending) >= window:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    collect(done)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                collect(done)
        finally:
            for t in pending:
                t.cancel()
        return results

    def stats(self) -> dict:
        """Counters for logs and metrics (``annotate/requests`` etc.)."""
        s = self.client.stats.as_dict()
        s.update(self.counts)
        s["stopped"] = self.stop_reason
        s["budget_exceeded"] = bool(self.budget_exceeded or self.client.budget.exhausted)
        if self.cache is not None and self.client.budget.ledger is self.cache:
            # This process's numbers above; the run's (every actor, every resume) here.
            try:
                run = self.cache.spend()
            except sqlite3.Error:  # closed or unreadable: the process's own numbers stand
                run = None
            if run is not None:
                s["run_requests"], s["run_tokens"], s["run_cost_usd"] = run.requests, run.tokens, run.cost_usd
        return s
