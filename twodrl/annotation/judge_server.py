"""The local judge: an OpenAI-compatible HTTP server that rates segments by fixed rules.

``POST /v1/chat/completions`` reads a request built by :mod:`twodrl.annotation.prompts`
(the aspect from the system message, the conversation and the ``<k>`` segments from
the user message), rates every segment and answers in the judge reply format, with
``usage`` token counts. ``GET /v1/models`` lists the model; ``GET /stats`` returns
request counters (tests, dashboards).

Two rule sets (``mode``):

* ``synthetic`` (default): the embedded animal task, :func:`twodrl.synthetic.score_segments`.
  Exact labels for that task; any other sentence is "unknown" and rated as useless.
* ``generic``: :mod:`twodrl.annotation.generic_rules`, surface rules for any English
  text. A stand-in that exercises the pipeline end to end on real prompts; its ratings
  say nothing reliable about quality.

Fault injection (rates are probabilities per request, drawn from a seeded RNG) makes
the unhappy paths of the client testable over real HTTP: 429 with ``Retry-After``,
500, replies slower than the client's timeout, malformed replies, replies with a
wrong segment count. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from twodrl.annotation.generic_rules import remarks_generic, score_segments_generic
from twodrl.annotation.parser import format_reply
from twodrl.annotation.prompts import JudgeRequest, load_templates, messages_digest, parse_request
from twodrl.synthetic import classify, score_segments, topic_of

DEFAULT_MODEL = "twodrl-synthetic-judge"
GENERIC_MODEL = "twodrl-generic-judge"
MODES: tuple[str, ...] = ("synthetic", "generic")
_MODEL_OF_MODE = {"synthetic": DEFAULT_MODEL, "generic": GENERIC_MODEL}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"judge mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def default_model(mode: str = "synthetic") -> str:
    """The model name a judge in ``mode`` reports when none is given."""
    return _MODEL_OF_MODE[check_mode(mode)]


@dataclass
class Faults:
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_slow: float = 0.0
    rate_malformed: float = 0.0
    rate_wrong_count: float = 0.0
    slow_s: float = 5.0  # how long a "slow" reply takes
    latency_s: float = 0.0  # added to every reply
    retry_after_s: float = 1.0  # sent with 429s
    on_repair: bool = True  # False: repair rounds are always answered cleanly

    def __post_init__(self):
        rates = [self.rate_429, self.rate_500, self.rate_slow, self.rate_malformed, self.rate_wrong_count]
        if any(r < 0 or r > 1 for r in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError(f"fault rates must be in [0, 1] and sum to ≤ 1, got {rates}")


_REMARKS = {
    "true": "A true fact about the animal asked about.",
    "false": "A false statement about the animal asked about.",
    "other": "True, but about a different animal.",
    "filler": "Filler that adds no information.",
    "unsafe": "Harmful advice or abuse.",
    "repeat": "Repeats an earlier segment.",
    "unknown": "Not a statement the rules recognise.",
}


def judge_answer(messages: list[dict], mode: str = "synthetic") -> str:
    """The rule-based judge's well-formed reply to a request in our frame."""
    req = parse_request(messages, load_templates())
    if check_mode(mode) == "generic":
        return _generic_answer(req)
    # The topic may come from an earlier turn ("and what does it eat?"): the rules take
    # the last animal named, so the request goes last.
    context = " ".join([t["content"] for t in req.history if t["role"] == "user"] + [req.prompt])
    topic = topic_of(context)
    scores, remarks = [], []
    for segs in req.responses:
        scores.append([row[0] for row in score_segments(context, segs, [req.aspect])])
        kinds = [classify(topic, s, segs[:k]) for k, s in enumerate(segs)]
        remarks.append([_REMARKS[kind] for kind in kinds])
    return format_reply(req.aspect, scores, remarks)


def _generic_answer(req: JudgeRequest) -> str:
    scores, remarks = [], []
    for segs in req.responses:
        rows = score_segments_generic(req.prompt, segs, [req.aspect], req.history)
        scores.append([row[0] for row in rows])
        remarks.append(remarks_generic(req.prompt, segs, req.aspect, req.history))
    return format_reply(req.aspect, scores, remarks)


def _malformed(reply: str, rng: random.Random) -> str:
    choice = rng.randrange(4)
    if choice == 0:
        return "I am sorry, but I cannot rate these responses segment by segment."
    if choice == 1:
        return reply[: max(1, len(reply) // 2)]  # cut off mid-answer
    if choice == 2:  # a rating off the scale
        lines = reply.splitlines()
        idx = [i for i, line in enumerate(lines) if "Rating:" in line]
        i = rng.choice(idx)
        lines[i] = lines[i].rsplit(":", 1)[0] + ": 7"
        return "\n".join(lines)
    return reply.replace("Response 1 Evaluation:", "Evaluation of the first response:")


def _wrong_count(reply: str, rng: random.Random) -> str:
    lines = reply.splitlines()
    if rng.random() < 0.5:  # drop the last segment's two lines
        return "\n".join(lines[:-2])
    last_marker = max(i for i, line in enumerate(lines) if line.startswith("<"))
    k = int(lines[last_marker][1 : lines[last_marker].index(">")])
    extra = [f"<{k + 1}> Evaluation: a segment that does not exist", lines[last_marker + 1]]
    return "\n".join(lines[: last_marker + 2] + extra + lines[last_marker + 2 :])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses connections
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # quiet; and request headers (which carry the key) are never logged

    def _send(self, status: int, payload: dict, headers: Optional[dict] = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. a slow reply past its timeout)

    def _error(self, status: int, message: str, kind: str, headers: Optional[dict] = None) -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": None}}, headers)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model", "owned_by": "twodrl"}]})
        elif self.path.rstrip("/") == "/stats":
            self._send(200, self.server.judge.stats())
        else:
            self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        judge = self.server.judge
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}", "not_found")
            return
        if judge.api_key is not None and self.headers.get("Authorization") != f"Bearer {judge.api_key}":
            self._error(401, "invalid API key", "invalid_request_error")
            return
        try:
            body = json.loads(raw or b"{}")
            messages = body["messages"]
            if body.get("stream"):
                raise ValueError("streaming is not supported by the local judge")
        except (ValueError, KeyError, TypeError) as e:
            self._error(400, f"bad request body: {e}", "invalid_request_error")
            return
        with judge.lock:
            judge.inflight += 1
            judge.max_inflight = max(judge.max_inflight, judge.inflight)
        try:
            self._complete(judge, body, messages, raw)
        finally:
            with judge.lock:
                judge.inflight -= 1

    def _complete(self, judge: "JudgeServer", body: dict, messages: list, raw: bytes) -> None:
        fault = judge.record_and_draw(messages)
        if judge.faults.latency_s:
            time.sleep(judge.faults.latency_s)
        if fault == "429":
            ra = judge.faults.retry_after_s
            self._error(429, "rate limit reached (injected)", "rate_limit_exceeded",
                        {"retry-after-ms": str(int(ra * 1000)), "retry-after": str(math.ceil(ra))})
            return
        if fault == "500":
            self._error(500, "internal error (injected)", "server_error")
            return
        if fault == "slow":
            time.sleep(judge.faults.slow_s)
        try:
            reply = judge_answer(messages, judge.mode)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._error(400, f"not a twodrl judge request: {e}", "invalid_request_error")
            return
        if fault in ("malformed", "wrong_count"):
            with judge.lock:
                seed = judge.rng.random()
            rng = random.Random(seed)
            reply = _malformed(reply, rng) if fault == "malformed" else _wrong_count(reply, rng)
        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 4 * len(messages)
        completion_tokens = max(1, len(reply) // 4)
        self._send(200, {
            "id": "chatcmpl-" + hashlib.sha256(raw).hexdigest()[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.server.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # slow (sleeping) handlers must not block shutdown
    allow_reuse_address = True
    request_queue_size = 128
    judge: "JudgeServer"
    model: str

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        # Clients that time out hang up mid-request; that is expected here, not an error.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class JudgeServer:
    """The server with its counters. ``start()`` serves in a background thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Optional[Faults] = None,
        seed: int = 0,
        model: Optional[str] = None,
        api_key: Optional[str] = None,
        mode: str = "synthetic",
    ):
        # Checked before the socket is bound: a typo must not leave a port held.
        self.mode = check_mode(mode)
        model = model or default_model(mode)
        self.model = model
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.api_key = api_key  # if set, requests must carry it (tests of the 401 path)
        self.digests: Counter[str] = Counter()  # sha256 of canonical messages -> count
        self.by_fault: Counter[str] = Counter()
        self.inflight = 0
        self.max_inflight = 0  # most requests handled at once (concurrency checks)
        self._httpd = _Server((host, port), _Handler)
        self._httpd.judge = self
        self._httpd.model = model
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def record_and_draw(self, messages: list[dict]) -> str:
        with self.lock:
            try:
                self.digests[messages_digest(messages)] += 1
            except TypeError:
                pass
            f = self.faults
            r = self.rng.random()
            fault = "ok"
            if not f.on_repair and sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "user") > 1:
                r = 2.0  # past every rate: no fault
            for name, rate in (("429", f.rate_429), ("500", f.rate_500), ("slow", f.rate_slow),
                               ("malformed", f.rate_malformed), ("wrong_count", f.rate_wrong_count)):
                if r < rate:
                    fault = name
                    break
                r -= rate
            self.by_fault[fault] += 1
            return fault

    def stats(self) -> dict:
        with self.lock:
            return {"requests": sum(self.digests.values()), "by_fault": dict(self.by_fault),
                    "distinct_requests": len(self.digests), "max_inflight": self.max_inflight}

    def start(self) -> "JudgeServer":
        # Short poll interval: stop() returns within ~50 ms (tests start many servers).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="judge-server", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def start_judge_server(
    host: str = "127.0.0.1",
    port: int = 0,
    faults: Optional[Faults] = None,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[str, Callable[[], None]]:
    """Start the judge in a background thread (port 0 = a free port); returns the base
    URL for ``AsyncOpenAI(base_url=...)`` and a function that stops it. ``kwargs`` go
    to :class:`JudgeServer` (``model``, ``api_key``, ``mode="generic"`` …)."""
    server = JudgeServer(host, port, faults, seed, **kwargs).start()
    return server.url, server.stop
