"""Token-bucket rate limits for the judge client (requests/min and tokens/min).

An API account is limited per minute on two meters at once; sending at the limit and
then backing off on 429s wastes requests and money, so the client waits *before*
sending. Each bucket refills continuously at ``rate_per_minute / 60`` per second up to
``capacity`` (default: one minute's worth, which allows the burst an API also allows).
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional


class TokenBucket:
    """Async token bucket. ``await acquire(n)`` returns once ``n`` units were taken.

    Waiters are served in arrival order (an asyncio.Lock is FIFO), so a large request
    cannot be starved by a stream of small ones. ``n`` above the capacity is clamped to
    the capacity: otherwise one oversized request would wait forever.
    """

    def __init__(
        self,
        rate_per_minute: float,
        capacity: Optional[float] = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], "asyncio.Future"] = asyncio.sleep,
    ):
        if rate_per_minute <= 0:
            raise ValueError(f"rate_per_minute must be > 0, got {rate_per_minute}")
        self.rate = rate_per_minute / 60.0  # units per second
        self.capacity = float(capacity if capacity is not None else rate_per_minute)
        if self.capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self._clock = clock
        self._sleep = sleep
        self._level = self.capacity
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, n: float = 1.0) -> float:
        """Take ``n`` units; returns the seconds spent waiting."""
        n = min(float(n), self.capacity)
        waited = 0.0
        async with self._lock:
            self._refill()
            while self._level < n:
                delay = (n - self._level) / self.rate
                await self._sleep(delay)
                waited += delay
                self._refill()
            self._level -= n
        return waited

    def refund(self, n: float) -> None:
        """Give back units reserved for an estimate that turned out too high."""
        self._refill()
        self._level = min(self.capacity, self._level + max(0.0, n))


class RateLimiter:
    """Requests/min and tokens/min together; either may be None (unlimited)."""

    def __init__(self, requests_per_minute: Optional[float] = None, tokens_per_minute: Optional[float] = None):
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute else None

    async def acquire(self, estimated_tokens: int) -> float:
        waited = 0.0
        if self.requests is not None:
            waited += await self.requests.acquire(1)
        if self.tokens is not None:
            waited += await self.tokens.acquire(estimated_tokens)
        return waited

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        """Correct the token meter once the reply's usage is known."""
        if self.tokens is None:
            return
        if actual_tokens < estimated_tokens:
            self.tokens.refund(estimated_tokens - actual_tokens)
        elif actual_tokens > estimated_tokens:
            # Over-spend is charged against the future: the level may go negative,
            # which delays the next acquire by exactly the excess.
            self.tokens._refill()
            self.tokens._level -= actual_tokens - estimated_tokens
