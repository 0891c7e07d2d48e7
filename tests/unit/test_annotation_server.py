"""The local judge server: OpenAI-compatible over real HTTP, rates with the task's rules,
injects the faults it is asked for, binds 127.0.0.1 by default."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from twodrl.annotation.judge_server import Faults, JudgeServer, judge_answer, start_judge_server
from twodrl.annotation.parser import ParseError, parse_reply
from twodrl.annotation.prompts import build_messages
from twodrl.aspects import DEFAULT_ASPECTS
from twodrl.synthetic import make_preference_records


def test_openai_sdk_talks_to_it():
    url, stop = start_judge_server()
    try:
        assert url.startswith("http://127.0.0.1:")
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list()] == ["twodrl-synthetic-judge"]
        msgs = build_messages("safety", "Tell me about the wolf.", [["You should hurt the wolf for fun."]])
        r = c.chat.completions.create(model="twodrl-synthetic-judge", messages=msgs)
        assert parse_reply(r.choices[0].message.content, "safety", [1]).scores == [[0]]
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        with pytest.raises(openai.BadRequestError, match="not a twodrl judge request"):
            c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
        c.close()
    finally:
        stop()


def test_answers_follow_the_rules_for_every_aspect():
    for rec in make_preference_records(5, seed=2):
        segs = [rec["chosen"]["segments"], rec["rejected"]["segments"]]
        for aspect in DEFAULT_ASPECTS:
            reply = judge_answer(build_messages(aspect, rec["prompt"], segs))
            got = parse_reply(reply, aspect, [len(s) for s in segs]).scores
            assert got == [rec["chosen"]["scores"][aspect], rec["rejected"]["scores"][aspect]]


def test_fault_draws_are_seeded_and_faulty_replies_are_unusable():
    def draws(seed):
        s = JudgeServer(faults=Faults(rate_429=0.2, rate_500=0.2, rate_malformed=0.3, rate_wrong_count=0.3), seed=seed)
        try:
            return [s.record_and_draw([{"role": "user", "content": str(i)}]) for i in range(400)]
        finally:
            s._httpd.server_close()

    a = draws(1)
    assert a == draws(1) and a != draws(2)
    assert {"429", "500", "malformed", "wrong_count"} <= set(a) and "ok" not in a
    with pytest.raises(ValueError, match="sum to ≤ 1"):
        Faults(rate_429=0.6, rate_500=0.6)

    import random

    from twodrl.annotation.judge_server import _malformed, _wrong_count

    msgs = build_messages("clarity", "Tell me about the owl.", [["The owl hoots.", "The owl hoots."], ["x."]])
    good = judge_answer(msgs)
    for i in range(20):
        for corrupt in (_malformed, _wrong_count):
            with pytest.raises(ParseError):
                parse_reply(corrupt(good, random.Random(i)), "clarity", [2, 1])


def test_http_errors_carry_retry_after():
    s = JudgeServer(faults=Faults(rate_429=1.0, retry_after_s=0.25)).start()
    try:
        req = urllib.request.Request(s.url + "/chat/completions", data=json.dumps({"messages": []}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 429 and e.value.headers["retry-after-ms"] == "250"
        stats = json.load(urllib.request.urlopen(s.url.removesuffix("/v1") + "/stats", timeout=5))
        assert stats["requests"] == 1 and stats["by_fault"] == {"429": 1}
    finally:
        s.stop()


def test_cli_defaults_to_localhost():
    from jobs.serve_judge import _parser

    args = _parser("twodrl serve-judge").parse_args(["--fault-500", "0.2", "--port", "0"])
    assert args.host == "127.0.0.1" and args.fault_500 == 0.2
