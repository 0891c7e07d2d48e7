"""The pool end to end over real HTTP: ratings equal the task's rules, the cache makes
reruns free, malformed replies get up to ``max_repairs`` repairs, budgets (run-wide
through the cache file) and bad items never crash it."""

from __future__ import annotations

import asyncio

import pytest

from twodrl.annotation.cache import JudgeCache
from twodrl.annotation.client import Budget, ChatClient
from twodrl.annotation.judge_server import Faults, JudgeServer
from twodrl.annotation.pool import AnnotationPool, JudgeItem
from twodrl.aspects import DEFAULT_ASPECTS
from twodrl.synthetic import make_preference_records, score_segments


@pytest.fixture
def records():
    return make_preference_records(6, seed=11)


def items_of(records):
    return [JudgeItem(r["prompt"], [r["chosen"]["segments"], r["rejected"]["segments"]], key=i) for i, r in enumerate(records)]


def annotate(server, items, cache=None, **kw):
    pool_kw = {k: kw.pop(k) for k in ("pairwise", "max_repairs") if k in kw}
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)

    async def go():
        c = ChatClient(base_url=server.url, api_key=None, model="twodrl-synthetic-judge", **kw)
        pool = AnnotationPool(c, cache, **pool_kw)
        try:
            return await pool.annotate(items, window=4), pool
        finally:
            await c.aclose()

    return asyncio.run(go())


@pytest.fixture
def serve():
    servers = []

    def make(seed=0, **faults):
        s = JudgeServer(faults=Faults(**faults), seed=seed).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def test_scores_equal_the_rules_and_cache_makes_rerun_free(serve, records, tmp_path):
    s = serve()
    cache = JudgeCache(tmp_path / "c.sqlite")
    results, pool = annotate(s, items_of(records), cache)
    assert sorted(r.key for r in results) == list(range(len(records)))
    for r in results:
        rec = records[r.key]
        assert r.ok and r.requests == len(DEFAULT_ASPECTS) and r.cached == 0
        for side, scores in zip(("chosen", "rejected"), r.scores):
            assert scores == rec[side]["scores"]
    n = s.stats()["requests"]
    assert n == len(records) * 5 and len(cache) == n
    again, pool2 = annotate(s, items_of(records), cache)
    assert s.stats()["requests"] == n  # nothing re-paid
    assert all(r.cached == 5 for r in again) and pool2.stats()["cache_hits"] == 5 * len(records)
    assert [r.scores for r in sorted(again, key=lambda r: r.key)] == [r.scores for r in sorted(results, key=lambda r: r.key)]


def test_malformed_reply_gets_one_repair(serve, records, tmp_path):
    s = serve(rate_malformed=1.0, on_repair=False)  # first answer always bad, repair good
    cache = JudgeCache(tmp_path / "c.sqlite")
    results, pool = annotate(s, items_of(records[:2]), cache)
    assert all(r.ok for r in results)
    assert pool.stats()["repairs"] == 10 and s.stats()["requests"] == 20
    # Only good answers are cached (the malformed ones are worth nothing); each repaired
    # answer is stored for the repair round and for the original request, so a rerun
    # asks nothing again.
    assert len(cache) == 20
    again, pool2 = annotate(s, items_of(records[:2]), cache)
    assert s.stats()["requests"] == 20 and pool2.stats()["repairs"] == 0
    assert {r.key: r.scores for r in again} == {r.key: r.scores for r in results}


def test_persistently_malformed_fails_with_reason(serve, records, tmp_path):
    s = serve(rate_wrong_count=1.0)
    cache = JudgeCache(tmp_path / "c.sqlite")
    results, pool = annotate(s, items_of(records[:2]), cache)
    for r in results:
        assert not r.ok and "malformed judge reply after 2 repairs" in r.error and "segment" in r.error
    # 2 items × 5 aspects × (the question + 2 repairs), each repair counted.
    assert s.stats()["requests"] == 30 and len(cache) == 0 and pool.stats()["failures"] == 2
    assert pool.stats()["repairs"] == 20 and pool.stats()["repair_failures"] == 10
    # Malformed answers are not cached, but they were paid for: the run's spend has them.
    assert cache.spend().requests == 30 and cache.spend().tokens > 0


@pytest.mark.parametrize("max_repairs", [0, 1, 3])
def test_max_repairs_is_the_number_of_re_asks(serve, records, max_repairs):
    s = serve(rate_wrong_count=1.0)
    (r,), pool = annotate(s, items_of(records[:1]), max_repairs=max_repairs)
    assert not r.ok and f"after {max_repairs} repair" in r.error
    assert r.repairs == 5 * max_repairs and pool.stats()["repairs"] == 5 * max_repairs
    assert s.stats()["requests"] == 5 * (max_repairs + 1)


def test_second_repair_rescues_what_the_first_could_not(serve, records, tmp_path):
    # Every answer is garbled except those to a conversation with 3+ user turns (the
    # second repair): one repair would fail every aspect, two repair them all.
    s = serve(rate_wrong_count=1.0)
    real_draw = s.record_and_draw

    def draw(messages):
        fault = real_draw(messages)
        return "ok" if sum(1 for m in messages if m.get("role") == "user") >= 3 else fault

    s.record_and_draw = draw
    cache = JudgeCache(tmp_path / "c.sqlite")
    (r,), pool = annotate(s, items_of(records[:1]), cache)
    assert r.ok and r.repairs == 10 and r.scores[0] == records[0]["chosen"]["scores"]
    assert s.stats()["requests"] == 15
    # A rerun asks nothing: the good answer is cached under the original question too.
    (again,), _ = annotate(s, items_of(records[:1]), cache)
    assert again.ok and again.requests == 0 and s.stats()["requests"] == 15


def test_single_mode_and_one_response_items(serve, records):
    s = serve()
    items = items_of(records[:2]) + [JudgeItem(records[0]["prompt"], [records[0]["chosen"]["segments"]], key="solo")]
    results, _ = annotate(s, items, pairwise=False)
    assert s.stats()["requests"] == 2 * 10 + 5
    solo = next(r for r in results if r.key == "solo")
    assert solo.scores == [records[0]["chosen"]["scores"]]


def test_budget_exhaustion_marks_the_rest(serve, records):
    s = serve()
    results, pool = annotate(s, items_of(records), budget=Budget(max_requests=12), concurrency=2)
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    assert len(results) == len(records) and failed and len(ok) <= 2
    assert all(r.error.startswith("budget exhausted") for r in failed)
    assert s.stats()["requests"] == 12 and pool.stop_reason.startswith("budget exhausted")


def test_bad_items_never_crash(serve, records):
    s = serve()
    items = [JudgeItem("q", [], key="none"), JudgeItem("q", [["a"], []], key="empty"), items_of(records[:1])[0]]
    results, _ = annotate(s, items)
    by = {r.key: r for r in results}
    assert "1 or 2 responses" in by["none"].error and "at least one segment" in by["empty"].error
    assert by[0].ok


def test_history_reaches_the_judge(serve):
    # The request names no animal; the topic comes from the earlier turn.
    s = serve()
    item = JudgeItem("What does it eat?", [["The otter eats fish."]], [{"role": "user", "content": "Tell me about the otter."}, {"role": "assistant", "content": "Sure."}])
    (r,), _ = annotate(s, [item])
    expected = score_segments("Tell me about the otter. What does it eat?", ["The otter eats fish."])
    assert r.scores[0]["correctness"] == [expected[0][1]] == [4]
