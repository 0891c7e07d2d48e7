"""The judge budget is the run's, not one actor's: its spend lives in the run's answer
cache (SQLite, shared by every annotator and kept across restarts and resumes), caps
that cannot be enforced are refused up front, and a key never leaves for a plain-http
remote host without a warning."""

from __future__ import annotations

import asyncio
import logging

import pytest

from twodrl.annotation.cache import JudgeCache
from twodrl.annotation.client import Budget, BudgetExhausted, ChatClient, check_budget_config, sends_key_in_clear
from twodrl.annotation.judge_server import Faults, JudgeServer
from twodrl.annotation.pool import AnnotationPool, JudgeItem
from twodrl.annotation.pricing import Price
from twodrl.config import AnnotatorConfig
from twodrl.synthetic import make_preference_records

KEY = "sk-budget-test-0f1e2d3c4b5a69788796a5b4"


@pytest.fixture
def server():
    s = JudgeServer(faults=Faults(latency_s=0.002)).start()
    yield s
    s.stop()


def items(n, seed=3):
    return [JudgeItem(r["prompt"], [r["chosen"]["segments"], r["rejected"]["segments"]], key=i)
            for i, r in enumerate(make_preference_records(n, seed=seed))]


def make_pool(server, cache_path, budget=None, concurrency=2):
    client = ChatClient(base_url=server.url, api_key=None, model="twodrl-synthetic-judge", concurrency=concurrency,
                        backoff_base_s=0.01, backoff_max_s=0.02, budget=budget or Budget())
    # Each "actor" opens the file itself, as annotator actors in other processes do.
    return AnnotationPool(client, JudgeCache(cache_path))


async def run_pool(pool, its):
    try:
        return await pool.annotate(its, window=4)
    finally:
        await pool.client.aclose()
        pool.cache.close()


def test_two_actors_on_one_cache_stop_at_one_shared_cap(server, tmp_path):
    path = tmp_path / "judge_cache.sqlite"
    a = make_pool(server, path, Budget(max_requests=23))
    b = make_pool(server, path, Budget(max_requests=23))

    async def both():
        # Different items per actor, as a driver splits the work: no cache hits between them.
        return await asyncio.gather(run_pool(a, items(8, seed=1)), run_pool(b, items(8, seed=2)))

    ra, rb = asyncio.run(both())
    # Each actor alone would have sent 23 (46 in all); together they sent 23.
    assert server.stats()["requests"] == 23
    assert a.client.stats.requests + b.client.stats.requests == 23
    assert a.client.stats.requests > 0 and b.client.stats.requests > 0
    for pool, results in ((a, ra), (b, rb)):
        failed = [r for r in results if not r.ok]
        assert failed and all(r.error.startswith("budget exhausted") for r in failed)
        assert pool.stats()["budget_exceeded"] is True
        assert "max_requests=23" in pool.stop_reason and "by the run" in pool.stop_reason
    ledger = JudgeCache(path)
    assert ledger.spend().requests == 23
    ledger.close()


def test_resume_starts_from_the_recorded_spend(server, tmp_path):
    path = tmp_path / "judge_cache.sqlite"
    first = make_pool(server, path, Budget(max_requests=12))
    r1 = asyncio.run(run_pool(first, items(6)))
    assert server.stats()["requests"] == 12 and any(not r.ok for r in r1)
    ledger = JudgeCache(path)
    spent = ledger.spend()
    assert spent.requests == 12
    assert spent.tokens == first.client.stats.prompt_tokens + first.client.stats.completion_tokens

    # A restarted actor (or a resumed run) with the same cap: nothing left to spend.
    again = make_pool(server, path, Budget(max_requests=12))
    r2 = asyncio.run(run_pool(again, items(6)))
    assert server.stats()["requests"] == 12
    assert all(not r.ok and "12 of max_requests=12" in r.error for r in r2 if r.cached < 5)
    assert again.stats()["budget_exceeded"] is True

    # A raised cap: the run continues from 12, not from 0, and the 12 paid answers come
    # from the cache, so 6 pairs × 5 aspects fit in exactly 30.
    more = make_pool(server, path, Budget(max_requests=30))
    r3 = asyncio.run(run_pool(more, items(6)))
    assert all(r.ok for r in r3) and server.stats()["requests"] == 30
    assert ledger.spend().requests == 30 and more.stats()["budget_exceeded"] is False
    ledger.close()


def test_spend_is_recorded_with_each_answer_and_costed(server, tmp_path):
    path = tmp_path / "judge_cache.sqlite"
    price = Price(1.0, 2.0)
    pool = make_pool(server, path, Budget(price=price))
    results = asyncio.run(run_pool(pool, items(3)))
    assert all(r.ok for r in results)
    st = pool.client.stats
    ledger = JudgeCache(path)
    run = ledger.spend()
    assert run.requests == st.requests == 15
    assert run.tokens == st.prompt_tokens + st.completion_tokens
    assert run.cost_usd == pytest.approx(price.cost(st.prompt_tokens, st.completion_tokens)) == pytest.approx(st.cost_usd)
    assert pool.client.budget.unrecorded_tokens == 0 and pool.client.budget.unrecorded_cost == pytest.approx(0.0)
    ledger.close()


def test_cost_cap_is_run_wide_across_resumes(server, tmp_path):
    path = tmp_path / "judge_cache.sqlite"
    price = Price(100.0, 100.0)  # expensive on purpose: a few requests reach the cap
    first = make_pool(server, path, Budget(max_cost_usd=0.5, price=price), concurrency=1)
    asyncio.run(run_pool(first, items(4)))
    ledger = JudgeCache(path)
    spent = ledger.spend()
    assert first.client.budget.exhausted and "max_cost_usd=0.5" in first.client.budget.exhausted
    assert 0 < spent.cost_usd <= 0.5
    n = server.stats()["requests"]
    again = make_pool(server, path, Budget(max_cost_usd=0.5, price=price), concurrency=1)
    asyncio.run(run_pool(again, items(4, seed=9)))
    # The new pool sees the recorded spend: at most what was left fits.
    assert ledger.spend().cost_usd <= 0.5 and server.stats()["requests"] - n <= 1
    ledger.close()


def test_budget_exhausted_is_the_error_type(server, tmp_path):
    budget = Budget(max_requests=0)
    budget.attach_ledger(JudgeCache(tmp_path / "c.sqlite"))
    with pytest.raises(BudgetExhausted, match="0 of max_requests=0 sent by the run"):
        budget.reserve(10, 10)


def test_actor_surfaces_budget_exceeded(server, tmp_path):
    from actors.annotator import AnnotatorActor

    cls = AnnotatorActor.__ray_metadata__.modified_class  # the plain class: no Ray needed
    cfg = AnnotatorConfig(base_url=server.url, max_requests=5, concurrency=1)
    actor = cls(cfg, cache_path=str(tmp_path / "judge_cache.sqlite"))
    recs = make_preference_records(3, seed=4)
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"]["text"], "rejected": r["rejected"]["text"]} for r in recs]

    async def go():
        try:
            return await actor.annotate_pairs(pairs), actor.stats()
        finally:
            await actor.close()

    results, stats = asyncio.run(go())
    assert results[0].get("error") is None  # the first pair fits in 5 requests
    assert all(r["error"].startswith("budget exhausted") for r in results[1:])
    assert stats["budget_exceeded"] is True and stats["run_requests"] == 5 and stats["requests"] == 5


# ----------------------------------------------------------------------------- config


def test_check_budget_config_refuses_an_unpriced_cost_cap():
    with pytest.raises(ValueError) as e:
        check_budget_config(AnnotatorConfig(model="my-own-judge", max_cost_usd=5.0))
    for field_name in ("annotator.max_cost_usd", "annotator.model", "annotator.price_input_per_mtok",
                       "annotator.price_output_per_mtok"):
        assert field_name in str(e.value)
    check_budget_config(AnnotatorConfig(model="my-own-judge", max_cost_usd=5.0, price_input_per_mtok=1.0,
                                        price_output_per_mtok=2.0))
    check_budget_config(AnnotatorConfig(model="gpt-4o-mini-2024-07-18", max_cost_usd=5.0))
    check_budget_config(AnnotatorConfig(model="my-own-judge"))  # no cost cap: nothing to price
    with pytest.raises(ValueError, match="annotator.max_requests"):
        check_budget_config(AnnotatorConfig(max_requests=-1))


# ----------------------------------------------------------------------------- the key in clear


@pytest.mark.parametrize("url,clear", [
    ("http://judge.example.com/v1", True),
    ("http://10.0.0.7:8000/v1", True),
    ("HTTP://judge.internal:80/v1", True),
    ("http://[2001:db8::1]:8000/v1", True),
    ("https://api.openai.com/v1", False),
    ("https://10.0.0.7/v1", False),
    ("http://127.0.0.1:8000/v1", False),
    ("http://127.3.4.5:8000/v1", False),
    ("http://localhost:8000/v1", False),
    ("http://LOCALHOST./v1", False),
    ("http://[::1]:8000/v1", False),
    ("http://[::ffff:127.0.0.1]:8000/v1", False),
    ("http://127.0.0.1.evil.example/v1", True),
])
def test_sends_key_in_clear(url, clear):
    assert sends_key_in_clear(url) is clear


def _client(url, key):
    return ChatClient(base_url=url, api_key=key, model="m")


def test_warns_once_for_a_key_to_a_plain_http_remote_host(caplog):
    caplog.set_level(logging.WARNING, logger="twodrl.annotation.client")
    c = _client("http://someone:url-password@judge.example.com:8000/v1", KEY)
    warnings = [r for r in caplog.records if "unencrypted" in r.getMessage()]
    assert len(warnings) == 1 and "judge.example.com" in warnings[0].getMessage()
    # Neither the key nor credentials embedded in the URL are logged.
    assert KEY not in caplog.text and KEY[3:15] not in caplog.text and "url-password" not in caplog.text
    # Once per client: using it does not warn again.
    asyncio.run(c.aclose())
    assert len([r for r in caplog.records if "unencrypted" in r.getMessage()]) == 1


@pytest.mark.parametrize("url,key", [
    ("https://judge.example.com/v1", KEY),
    ("http://127.0.0.1:8000/v1", KEY),
    ("http://localhost:8000/v1", KEY),
    ("http://[::1]:8000/v1", KEY),
    ("http://judge.example.com/v1", None),  # no key: nothing secret to send
])
def test_no_warning_for_https_loopback_or_no_key(caplog, url, key):
    caplog.set_level(logging.WARNING, logger="twodrl.annotation.client")
    c = _client(url, key)
    assert not [r for r in caplog.records if "unencrypted" in r.getMessage()]
    asyncio.run(c.aclose())
