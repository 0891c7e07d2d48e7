"""The judge client over real HTTP (local judge server on 127.0.0.1, real AsyncOpenAI):
retries and their limits, Retry-After, timeouts, budgets, fatal auth errors, and the
API key never showing up in what it reports."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from twodrl.annotation.client import Budget, BudgetExhausted, ChatClient, FatalJudgeError, JudgeError, _retry_after, redact
from twodrl.annotation.judge_server import Faults, JudgeServer
from twodrl.annotation.pricing import price_for
from twodrl.annotation.prompts import build_messages
from twodrl.config import AnnotatorConfig

MSGS = build_messages("correctness", "Tell me about the owl.", [["The owl hoots."], ["The owl eats mice."]])


@pytest.fixture
def server_factory():
    servers = []

    def make(**kw):
        api_key = kw.pop("api_key", None)
        seed = kw.pop("seed", 0)
        s = JudgeServer(faults=Faults(**kw), seed=seed, api_key=api_key).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def client(server, **kw):
    kw.setdefault("model", "twodrl-synthetic-judge")
    kw.setdefault("api_key", None)
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return ChatClient(base_url=server.url, **kw)


def run(coro):
    return asyncio.run(coro)


async def _chat_n(c, n, msgs=MSGS):
    try:
        return await asyncio.gather(*(c.chat(msgs) for _ in range(n)), return_exceptions=True)
    finally:
        await c.aclose()


def test_answers_and_counts_usage(server_factory):
    s = server_factory()
    c = client(s)
    (text, usage), = run(_chat_n(c, 1))
    assert text.startswith("Response 1 Evaluation:") and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert c.stats.requests == 1 == s.stats()["requests"]
    assert c.stats.prompt_tokens == usage.prompt_tokens


def test_sdk_retries_are_off_and_ours_are_bounded(server_factory):
    s = server_factory(rate_500=1.0)
    c = client(s, max_retries=3)
    (err,) = run(_chat_n(c, 1))
    assert isinstance(err, JudgeError) and "gave up after 4 attempts" in str(err) and "http 500" in str(err)
    # Exactly our 4 attempts reached the server: the SDK added none of its own.
    assert s.stats()["requests"] == 4 and c.stats.retries == 3


def test_transient_errors_are_retried_until_success(server_factory):
    s = server_factory(rate_500=0.3, rate_429=0.3, retry_after_s=0.01, seed=3)
    c = client(s, max_retries=12, concurrency=4)
    out = run(_chat_n(c, 20))
    assert all(isinstance(o, tuple) for o in out)
    assert c.stats.retries > 0 and c.stats.rate_limited > 0 and c.stats.server_errors > 0
    assert c.stats.answers == 20 and c.stats.requests == s.stats()["requests"]


def test_retry_after_is_honoured(server_factory):
    s = server_factory(rate_429=1.0, retry_after_s=0.15)
    c = client(s, max_retries=2, backoff_base_s=0.0001, backoff_max_s=0.0001)
    t0 = time.monotonic()
    (err,) = run(_chat_n(c, 1))
    assert "http 429" in str(err)
    # jitter alone would be ~0 s; the server asked for 0.15 s before each retry.
    assert time.monotonic() - t0 >= 0.3 and c.stats.backoff_s >= 0.3


def test_retry_after_header_forms():
    assert _retry_after({"retry-after-ms": "250"}) == 0.25
    assert _retry_after({"retry-after": "3"}) == 3.0
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < _retry_after({"retry-after": future}) <= 31
    assert _retry_after({"retry-after": "soon"}) is None and _retry_after({}) is None


def test_total_timeout_on_slow_replies(server_factory):
    s = server_factory(rate_slow=1.0, slow_s=2.0)
    c = client(s, timeout_s=0.2, max_retries=1)
    t0 = time.monotonic()
    (err,) = run(_chat_n(c, 1))
    assert "timeout" in str(err) and c.stats.timeouts == 2
    assert time.monotonic() - t0 < 1.5


def test_concurrency_is_bounded(server_factory):
    s = server_factory(latency_s=0.05)
    c = client(s, concurrency=3)
    run(_chat_n(c, 12))
    assert s.stats()["max_inflight"] == 3


def test_budget_on_requests_stops_cleanly(server_factory):
    s = server_factory()
    c = client(s, budget=Budget(max_requests=5), concurrency=2)
    out = run(_chat_n(c, 8))
    errors = [o for o in out if isinstance(o, BaseException)]
    assert len(errors) == 3 and all(isinstance(e, BudgetExhausted) for e in errors)
    assert "max_requests=5" in str(errors[0]) and s.stats()["requests"] == 5


def test_budget_on_tokens_and_cost(server_factory):
    s = server_factory()
    c = client(s, budget=Budget(max_tokens=1500), concurrency=1)
    out = run(_chat_n(c, 10))
    assert any(isinstance(o, BudgetExhausted) for o in out)
    assert c.budget.used_tokens <= 1500
    with pytest.raises(ValueError, match="needs a price"):
        Budget(max_cost_usd=1.0)
    p = price_for("gpt-4o-mini-2024-07-18")
    assert p.input_per_mtok == 0.15 and price_for("gpt-4o-2024-08-06").input_per_mtok == 2.5
    assert price_for("my-model") is None and price_for("my-model", 1.0, 2.0).cost(1e6, 1e6) == 3.0
    b = Budget(max_cost_usd=0.001, price=price_for("gpt-4o"))
    b.reserve(100, 20)
    with pytest.raises(BudgetExhausted, match="max_cost_usd"):
        b.reserve(1000, 100)
    with pytest.raises(ValueError, match="has no price"):
        ChatClient.from_config(AnnotatorConfig(model="mystery", max_cost_usd=1.0), base_url=s.url)


SECRET = "sk-proj-UNIQUEsecret0123456789abcdef"


def test_bad_key_is_fatal_and_never_reported(server_factory):
    s = server_factory(api_key="the-right-key")
    c = client(s, api_key=SECRET)
    out = run(_chat_n(c, 3))
    assert all(isinstance(o, FatalJudgeError) for o in out)
    assert "http 401" in str(out[0])
    assert all(SECRET not in str(o) and SECRET[3:11] not in str(o) for o in out)
    # Fatal: no retries, and the other calls stop without sending again.
    assert s.stats()["requests"] <= 3 and c.stats.retries == 0


def test_key_from_environment_reaches_the_server(server_factory, monkeypatch):
    s = server_factory(api_key=SECRET)
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    c = ChatClient.from_config(AnnotatorConfig(api_key_env="MY_JUDGE_KEY"), base_url=s.url)
    (ok,) = run(_chat_n(c, 1))
    assert isinstance(ok, tuple)


def test_redact():
    msg = f"Incorrect API key provided: {SECRET[:8]}****{SECRET[-4:]}. Authorization: Bearer {SECRET}"
    out = redact(msg, SECRET)
    assert SECRET not in out and SECRET[:8] not in out and "Bearer [redacted]" in out
    assert redact("plain text", None) == "plain text"
