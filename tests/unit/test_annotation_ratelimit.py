"""Token buckets: bursts up to capacity, then the configured rate, FIFO waiting."""

from __future__ import annotations

import asyncio

import pytest

from twodrl.annotation.ratelimit import RateLimiter, TokenBucket


class FakeTime:
    def __init__(self):
        self.now = 0.0

    def clock(self):
        return self.now

    async def sleep(self, s):
        self.now += s


def test_bucket_burst_then_rate():
    t = FakeTime()
    b = TokenBucket(60, clock=t.clock, sleep=t.sleep)  # 1/s, capacity 60

    async def go():
        for _ in range(60):
            assert await b.acquire() == 0.0  # the burst
        waited = [await b.acquire() for _ in range(5)]
        return waited

    waited = asyncio.run(go())
    assert waited == pytest.approx([1.0] * 5)
    assert t.now == pytest.approx(5.0)


def test_oversized_request_is_clamped_and_refund_works():
    t = FakeTime()
    b = TokenBucket(600, capacity=100, clock=t.clock, sleep=t.sleep)  # 10/s

    async def go():
        await b.acquire(1000)  # clamped to 100: must not deadlock
        w = await b.acquire(50)
        b.refund(30)
        w2 = await b.acquire(30)
        return w, w2

    w, w2 = asyncio.run(go())
    assert w == pytest.approx(5.0) and w2 == 0.0


def test_rate_limiter_real_time_smoke():
    lim = RateLimiter(requests_per_minute=600, tokens_per_minute=None)  # 10/s, burst 600

    async def go():
        return sum([await lim.acquire(10) for _ in range(20)])

    assert asyncio.run(go()) == 0.0
    with pytest.raises(ValueError):
        TokenBucket(0)
