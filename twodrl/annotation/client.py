"""A bounded, auditable chat-completions client for the judge.

What it guarantees, whatever the server does:

* at most ``concurrency`` requests in flight (asyncio.Semaphore);
* requests/min and tokens/min limits applied before sending (token buckets);
* a total per-request deadline (``timeout_s``), not just an idle-read timeout;
* retries only on transient failures (429, 5xx, 408/409, connection errors,
  timeouts) with exponential backoff and full jitter, honouring ``Retry-After``;
  the openai SDK's own retries are off so these are the only ones and the request
  count in the budget is exact;
* a budget (requests, tokens, USD) checked *before* each request with the in-flight
  requests reserved, so it is never overrun by more than estimation error; once spent
  every further call raises :class:`BudgetExhausted` at once. With a ledger (the run's
  answer cache, attached by the pool) the caps hold for the whole run: every process
  sharing the file, and every resume, reads and adds to the same totals;
* a warning when a key would travel in clear text (http://) to a host other than this
  machine;
* the API key is never logged and never appears in an exception message produced
  here (:func:`redact` scrubs server error text, which may echo a masked key).
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit

import openai

from twodrl.annotation.pricing import Price, price_for
from twodrl.annotation.ratelimit import RateLimiter

log = logging.getLogger(__name__)

LOCAL_API_KEY = "twodrl-local-judge"  # placeholder key for keyless local servers


class JudgeError(Exception):
    """A request that could not be answered; ``str(e)`` is the failure reason."""


class BudgetExhausted(JudgeError):
    """The configured budget is spent; no further requests will be sent."""


class FatalJudgeError(JudgeError):
    """A failure that every further request would repeat (bad key, no quota)."""


def redact(text: str, secret: Optional[str]) -> str:
    """``text`` without ``secret``, any 8+ character piece of it, or anything that
    looks like an OpenAI key or a bearer token (servers echo masked keys in 401s)."""
    out = str(text)
    if secret:
        out = out.replace(secret, "[redacted]")
        if len(secret) >= 8:
            for i in range(len(secret) - 7):
                piece = secret[i : i + 8]
                if piece in out:
                    out = out.replace(piece, "[redacted]")
    out = re.sub(r"sk-[A-Za-z0-9_\-*.]+", "sk-[redacted]", out)
    out = re.sub(r"(?i)bearer\s+\S+", "Bearer [redacted]", out)
    return out


def resolve_api_key(env_name: str, explicit: Optional[str] = None) -> Optional[str]:
    """The key from ``explicit`` or the environment variable ``env_name`` (never from a
    config file: keys do not belong in files that get committed or copied)."""
    if explicit:
        return explicit
    return os.environ.get(env_name) or None


@dataclass(eq=False)
class Spend:
    """What one ``chat`` call cost (every attempt): tokens and USD the budget charged.
    ``recorded`` once it is in the run's ledger, so it is never counted twice."""

    tokens: int = 0
    cost: float = 0.0
    recorded: bool = False


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The call's spend, for the caller to record with the answer it stores (set by chat).
    spend: Optional[Spend] = field(default=None, repr=False, compare=False)

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests sent (every attempt, retries included)
    answers: int = 0  # requests that returned a completion
    retries: int = 0
    timeouts: int = 0
    rate_limited: int = 0  # 429 replies
    server_errors: int = 0  # 5xx / 408 / 409 replies
    connection_errors: int = 0
    other_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    rate_wait_s: float = 0.0
    backoff_s: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens"] = self.prompt_tokens + self.completion_tokens
        return d


@dataclass
class Budget:
    """Caps on requests, tokens and cost; ``None`` = unlimited. In-flight requests
    hold reservations (their estimated tokens and cost) until they settle.

    Without a ledger the counts are this object's alone. With one (see
    :meth:`attach_ledger`) the caps apply to the ledger's run-wide totals plus what
    this process has in flight or has not yet recorded; ``used_*`` stay this process's
    share (for its stats)."""

    max_requests: Optional[int] = None
    max_tokens: Optional[int] = None
    max_cost_usd: Optional[float] = None
    price: Optional[Price] = None
    used_requests: int = 0
    used_tokens: int = 0
    used_cost: float = 0.0
    reserved_tokens: int = 0
    reserved_cost: float = 0.0
    exhausted: Optional[str] = field(default=None)
    ledger: Optional[Any] = field(default=None, repr=False)  # e.g. JudgeCache
    unrecorded_tokens: int = 0  # billed here, not yet in the ledger
    unrecorded_cost: float = 0.0

    def __post_init__(self):
        if self.max_cost_usd is not None and self.price is None:
            raise ValueError("a cost budget needs a price for the model (see twodrl/annotation/pricing.py)")

    def attach_ledger(self, ledger: Any) -> None:
        """Count against ``ledger`` (``claim_request``, ``add_spend``, ``spend``), the
        run's shared record, from now on."""
        self.ledger = ledger

    def _over(self, requests: int, tokens: int, cost: float, pend_tokens: int, pend_cost: float, scope: str) -> str:
        """Why the next request may not be sent (caller knows that one cap is hit)."""
        if self.max_requests is not None and requests >= self.max_requests:
            return f"budget exhausted: {requests} of max_requests={self.max_requests} sent{scope}"
        if self.max_tokens is not None and tokens + pend_tokens > self.max_tokens:
            return (
                f"budget exhausted: {tokens} tokens used{scope} (+{pend_tokens} in flight or next), "
                f"next request would pass max_tokens={self.max_tokens}"
            )
        return (
            f"budget exhausted: ${cost:.4f} spent{scope} (+${pend_cost:.4f} in flight or next), "
            f"next request would pass max_cost_usd={self.max_cost_usd}"
        )

    def reserve(self, est_prompt: int, est_completion: int) -> tuple[int, float]:
        if self.exhausted:
            raise BudgetExhausted(self.exhausted)
        est_tokens = est_prompt + est_completion
        est_cost = self.price.cost(est_prompt, est_completion) if self.price else 0.0
        if self.ledger is not None:
            pend_tokens = self.unrecorded_tokens + self.reserved_tokens + est_tokens
            pend_cost = self.unrecorded_cost + self.reserved_cost + est_cost
            run = self.ledger.claim_request(self.max_requests, self.max_tokens, self.max_cost_usd, pend_tokens, pend_cost)
            if run is not None:
                self.exhausted = self._over(run.requests, run.tokens, run.cost_usd, pend_tokens, pend_cost, " by the run")
        else:
            pend_tokens = self.reserved_tokens + est_tokens
            pend_cost = self.reserved_cost + est_cost
            if (
                (self.max_requests is not None and self.used_requests >= self.max_requests)
                or (self.max_tokens is not None and self.used_tokens + pend_tokens > self.max_tokens)
                or (self.max_cost_usd is not None and self.used_cost + pend_cost > self.max_cost_usd)
            ):
                self.exhausted = self._over(self.used_requests, self.used_tokens, self.used_cost, pend_tokens, pend_cost, "")
        if self.exhausted:
            raise BudgetExhausted(self.exhausted)
        self.used_requests += 1
        self.reserved_tokens += est_tokens
        self.reserved_cost += est_cost
        return est_tokens, est_cost

    def settle(self, reservation: tuple[int, float], usage: Optional[Usage], spend: Optional[Spend] = None) -> float:
        est_tokens, est_cost = reservation
        self.reserved_tokens -= est_tokens
        self.reserved_cost -= est_cost
        if usage is None:  # failed request: assume it was not billed
            return 0.0
        cost = self.price.cost(usage.prompt_tokens, usage.completion_tokens) if self.price else 0.0
        self.used_tokens += usage.total
        self.used_cost += cost
        if self.ledger is not None:
            self.unrecorded_tokens += usage.total
            self.unrecorded_cost += cost
            if spend is not None:
                spend.tokens += usage.total
                spend.cost += cost
        return cost

    def mark_recorded(self, spend: Optional[Spend]) -> None:
        """``spend`` has been written to the ledger by the caller (with an answer)."""
        if spend is None or spend.recorded or self.ledger is None:
            return
        spend.recorded = True
        self.unrecorded_tokens -= spend.tokens
        self.unrecorded_cost -= spend.cost

    def record(self, spend: Optional[Spend]) -> None:
        """Write ``spend`` to the ledger on its own (no answer goes with it). On a write
        error it stays unrecorded, so this process still counts it."""
        if spend is None or spend.recorded or self.ledger is None:
            return
        self.ledger.add_spend(spend.tokens, spend.cost)
        self.mark_recorded(spend)


def check_budget_config(cfg: Any) -> None:
    """Refuse an ``annotator`` config whose budget cannot be enforced, before anything
    starts: caps must not be negative, and a cost cap needs the judge model's price
    (a budget that silently counts $0 is no budget). Raises ``ValueError``."""
    for name in ("max_requests", "max_tokens", "max_cost_usd", "price_input_per_mtok", "price_output_per_mtok"):
        value = getattr(cfg, name, None)
        if value is not None and value < 0:
            raise ValueError(f"annotator.{name} must be ≥ 0, got {value}")
    if getattr(cfg, "max_cost_usd", None) is not None:
        price = price_for(cfg.model, cfg.price_input_per_mtok, cfg.price_output_per_mtok)
        if price is None:
            raise ValueError(
                f"annotator.max_cost_usd is set but annotator.model {cfg.model!r} has no price: add it to "
                "twodrl/annotation/pricing.py or set annotator.price_input_per_mtok / annotator.price_output_per_mtok"
            )


def _is_loopback(host: str) -> bool:
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return False  # a DNS name other than localhost: anything, possibly remote
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def sends_key_in_clear(base_url: str) -> bool:
    """True when a bearer token sent to ``base_url`` would cross the network unencrypted:
    not https, and the host is not this machine (127.0.0.0/8, ::1, localhost)."""
    parts = urlsplit(base_url)
    if parts.scheme.lower() == "https":
        return False
    return not _is_loopback(parts.hostname or "")


class _Retryable(Exception):
    def __init__(self, kind: str, detail: str, retry_after: Optional[float] = None):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.retry_after = retry_after


def _retry_after(headers: Any) -> Optional[float]:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def estimate_tokens(messages: Sequence[Mapping[str, str]]) -> int:
    """Rough prompt size (≈ 4 characters per token) for budgets and rate limits
    before the server reports the real usage."""
    return sum(len(m.get("content") or "") for m in messages) // 4 + 8 * len(messages)


class ChatClient:
    """One judge endpoint. ``await chat(messages, expected_completion_tokens)`` returns
    ``(reply_text, usage)`` or raises :class:`JudgeError` (its subclasses
    :class:`BudgetExhausted` / :class:`FatalJudgeError` mean: stop asking)."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: Optional[str],
        model: str,
        concurrency: int = 8,
        timeout_s: float = 30.0,
        max_retries: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        requests_per_minute: Optional[float] = None,
        tokens_per_minute: Optional[float] = None,
        budget: Optional[Budget] = None,
        temperature: float = 0.0,
        max_completion_tokens: Optional[int] = None,
        rng: Optional[random.Random] = None,
    ):
        if concurrency < 1:
            raise ValueError(f"annotator.concurrency must be ≥ 1, got {concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"annotator.timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"annotator.max_retries must be ≥ 0, got {max_retries}")
        self.base_url = base_url
        self.model = model
        self._secret = api_key
        if api_key and sends_key_in_clear(base_url):
            # Once per client (here, not per request); only scheme and host are shown,
            # since a URL may carry credentials of its own.
            parts = urlsplit(base_url)
            log.warning(
                "annotator.base_url is plain %s to %s, which is not this machine: the judge API key "
                "will cross the network unencrypted; use https:// (or a loopback address for a "
                "local judge)", parts.scheme or "(no scheme)", parts.hostname or "(no host)",
            )
        self.concurrency = concurrency
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.temperature = temperature
        self.max_completion_tokens = max_completion_tokens
        self.budget = budget or Budget()
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute)
        self.stats = ClientStats()
        self._rng = rng or random.Random()
        self._sem: Optional[asyncio.Semaphore] = None
        self._fatal: Optional[str] = None
        # max_retries=0: the SDK would otherwise retry on its own (2 times by default)
        # with its own backoff, invisible to our budget, our request counts and our
        # Retry-After handling; the loop in `chat` is the only retry policy.
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or LOCAL_API_KEY,
            max_retries=0,
            timeout=self.timeout_s,
        )

    @classmethod
    def from_config(cls, cfg: Any, *, base_url: str, api_key: Optional[str] = None, **overrides: Any) -> "ChatClient":
        """Build from an :class:`twodrl.config.AnnotatorConfig`."""
        check_budget_config(cfg)
        price = price_for(cfg.model, cfg.price_input_per_mtok, cfg.price_output_per_mtok)
        budget = Budget(cfg.max_requests, cfg.max_tokens, cfg.max_cost_usd, price)
        kwargs = dict(
            base_url=base_url,
            api_key=resolve_api_key(cfg.api_key_env, api_key),
            model=cfg.model,
            concurrency=cfg.concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            requests_per_minute=cfg.requests_per_minute,
            tokens_per_minute=cfg.tokens_per_minute,
            budget=budget,
            max_completion_tokens=cfg.max_completion_tokens,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        # Full jitter: uniform in [0, min(cap, base·2^attempt)] spreads the retries of
        # many concurrent requests instead of synchronising them into new bursts.
        delay = self._rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * (2.0**attempt)))
        if retry_after is not None:
            # The server's word is a floor; capped so that one absurd header cannot park
            # the job for hours.
            delay = max(delay, min(retry_after, max(self.backoff_max_s, 60.0)))
        return delay

    async def _attempt(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, Optional[Usage]]:
        kwargs: dict[str, Any] = dict(model=self.model, messages=list(messages), temperature=self.temperature)
        if self.max_completion_tokens:
            kwargs["max_tokens"] = self.max_completion_tokens
        try:
            # wait_for is the total deadline; the SDK timeout alone bounds only each
            # network read, so a server trickling bytes could hold a slot forever.
            resp = await asyncio.wait_for(self._client.chat.completions.create(**kwargs), self.timeout_s)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            self.stats.timeouts += 1
            raise _Retryable("timeout", f"no reply within {self.timeout_s:g} s") from None
        except openai.APIConnectionError as e:
            self.stats.connection_errors += 1
            raise _Retryable("connection error", redact(str(e), self._secret)[:200]) from None
        except openai.APIStatusError as e:
            status = e.status_code
            detail = redact(getattr(e, "message", "") or str(e), self._secret)[:300]
            code = getattr(e, "code", None)
            if status == 429 and code == "insufficient_quota":
                raise FatalJudgeError(f"http 429 insufficient_quota: {detail}") from None
            if status == 429:
                self.stats.rate_limited += 1
                raise _Retryable("http 429", detail, _retry_after(e.response.headers)) from None
            if status >= 500 or status in (408, 409):
                self.stats.server_errors += 1
                raise _Retryable(f"http {status}", detail, _retry_after(e.response.headers)) from None
            self.stats.other_errors += 1
            if status in (401, 403):
                raise FatalJudgeError(f"http {status} (authentication/permission): {detail}") from None
            raise JudgeError(f"http {status}: {detail}") from None
        except openai.OpenAIError as e:
            self.stats.other_errors += 1
            raise JudgeError(f"bad response from the judge: {redact(str(e), self._secret)[:200]}") from None
        choices = getattr(resp, "choices", None) or []
        if not choices:
            self.stats.other_errors += 1
            raise JudgeError("the judge's response has no choices")
        text = choices[0].message.content or ""
        u = getattr(resp, "usage", None)
        usage = (
            Usage(int(u.prompt_tokens or 0), int(u.completion_tokens or 0))
            if u is not None
            else Usage(estimate_tokens(messages), len(text) // 4)  # server reported none
        )
        return text, usage

    async def chat(self, messages: Sequence[Mapping[str, str]], expected_completion_tokens: int = 256) -> tuple[str, Usage]:
        """The reply and its usage; ``usage.spend`` is what the call cost (all attempts),
        for the caller to record in the ledger together with the answer it stores
        (:meth:`Budget.mark_recorded`) or on its own (:meth:`Budget.record`)."""
        spend = Spend()
        try:
            text, usage = await self._chat(messages, expected_completion_tokens, spend)
        except BaseException:
            # No answer to store with it: the spend goes to the ledger now.
            self.record_spend(spend)
            raise
        usage.spend = spend
        return text, usage

    def record_spend(self, spend: Spend) -> None:
        """Put ``spend`` in the run's ledger on its own (no answer is stored with it).
        Never raises: on a write error it stays counted by this process's budget."""
        try:
            self.budget.record(spend)
        except Exception as e:  # stays counted in this process; never mask the real error
            log.warning("could not record judge spend in the run ledger: %s", e)

    async def _chat(self, messages: Sequence[Mapping[str, str]], expected_completion_tokens: int, spend: Spend) -> tuple[str, Usage]:
        if self._sem is None:  # created lazily: it must belong to the running loop
            self._sem = asyncio.Semaphore(self.concurrency)
        est_prompt = estimate_tokens(messages)
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if self._fatal:
                raise FatalJudgeError(self._fatal)
            async with self._sem:
                reservation = self.budget.reserve(est_prompt, expected_completion_tokens)
                usage: Optional[Usage] = None
                billed: Optional[Usage] = None  # what the budget is charged
                try:
                    self.stats.rate_wait_s += await self.limiter.acquire(est_prompt + expected_completion_tokens)
                    self.stats.requests += 1
                    text, usage = await self._attempt(messages)
                    billed = usage
                except _Retryable as e:
                    last, retry_after = str(e), e.retry_after
                    if e.kind == "timeout":
                        # The server may have done (and billed) the work we stopped
                        # waiting for: charge the estimate, so timeouts cannot make the
                        # budget undercount. Error replies are not billed by APIs.
                        billed = Usage(est_prompt, expected_completion_tokens)
                except FatalJudgeError as e:
                    self._fatal = str(e)
                    raise
                finally:
                    self.stats.cost_usd += self.budget.settle(reservation, billed, spend)
                    if usage is not None:
                        self.limiter.settle(est_prompt + expected_completion_tokens, usage.total)
                if usage is not None:
                    self.stats.answers += 1
                    self.stats.prompt_tokens += usage.prompt_tokens
                    self.stats.completion_tokens += usage.completion_tokens
                    return text, usage
            if attempt == self.max_retries:
                break
            self.stats.retries += 1
            delay = self._backoff(attempt, retry_after)
            self.stats.backoff_s += delay
            log.debug("judge request failed (%s); retry %d in %.2f s", last, attempt + 1, delay)
            await asyncio.sleep(delay)
        raise JudgeError(f"gave up after {self.max_retries + 1} attempts; last error: {last}")

    async def aclose(self) -> None:
        await self._client.close()

