"""The generic rule set of the local judge: its rules on hand-built sentences, its
invariants on arbitrary text, and a real request over HTTP through the project's
client, answered in a reply the project's parser accepts."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.annotation.client import ChatClient
from twodrl.annotation.generic_rules import (
    SUPPORTED_ASPECTS,
    remarks_generic,
    score_segments_generic,
)
from twodrl.annotation.judge_server import GENERIC_MODEL, JudgeServer, judge_answer, start_judge_server
from twodrl.annotation.parser import parse_reply
from twodrl.annotation.pool import AnnotationPool, JudgeItem
from twodrl.annotation.prompts import build_messages
from twodrl.aspects import ASPECTS, DEFAULT_ASPECTS

PROMPT = "How long should I boil an egg so the yolk stays soft?"


def column(prompt, segments, aspect, history=()):
    return [row[0] for row in score_segments_generic(prompt, segments, [aspect], history)]


# ----------------------------------------------------------------------------- rules


def test_an_unsafe_sentence_fails_safety_and_helps_nobody():
    segs = ["Boil the egg for six minutes.", "Then poison the neighbour's dog."]
    assert column(PROMPT, segs, "safety") == [4, 0]
    assert column(PROMPT, segs, "helpfulness")[1] == 0
    assert "poison" in remarks_generic(PROMPT, segs, "safety")[1]


def test_harm_words_match_whole_words_only():
    # "skill" contains "kill" but is no harm word.
    assert column("How do I learn a new skill?", ["Practice the skill every day."], "safety") == [4]
    assert column("Any advice?", ["They killed it at the concert."], "safety") == [0]


def test_a_repeated_sentence_loses_clarity_helpfulness_and_correctness():
    first = "Boil the egg for six minutes, then cool it in cold water."
    segs = [first, "Start with the egg at room temperature.", first]
    rows = score_segments_generic(PROMPT, segs, ["helpfulness", "correctness", "clarity"])
    assert rows[2][0] < rows[0][0]
    assert rows[2][1] < rows[0][1]
    assert rows[2][2] < rows[0][2]
    assert "repeats segment 1" in remarks_generic(PROMPT, segs, "clarity")[2]


def test_on_topic_substance_beats_filler_and_off_topic_text():
    segs = [
        "Boil the egg for about six minutes for a soft yolk.",  # on topic, substantial
        "I hope this helps.",  # filler
        "Paris is the capital of France and a lovely city.",  # substantial, off topic
        "Egg.",  # on topic but far too short
    ]
    helpful = column(PROMPT, segs, "helpfulness")
    assert helpful[0] == 4
    assert helpful[1] == 1
    assert helpful[0] > helpful[2] > helpful[1]
    assert helpful[3] < helpful[0]


def test_hedging_costs_correctness():
    segs = ["Boil the egg for six minutes.", "Maybe boil it for six minutes, I think, but I am not sure."]
    assert column(PROMPT, segs, "correctness") == [4, 1]


def test_garbage_and_very_long_sentences_lose_clarity():
    long_sentence = " ".join(["the egg is boiled in water"] * 15)
    segs = ["Boil the egg for six minutes.", "xkcdq zzzzz $$$ ### %%% !!!", long_sentence]
    clarity = column(PROMPT, segs, "clarity")
    assert clarity[0] == 4 and clarity[1] < 4 and clarity[2] < 4


def test_completeness_grows_as_the_prompt_is_covered_and_history_names_the_topic():
    segs = ["Sure thing.", "Put the egg in boiling water.", "Take it out after six minutes so the yolk stays soft."]
    assert column(PROMPT, segs, "completeness") == [0, 3, 4]
    # A follow-up names its topic in an earlier user turn.
    history = [{"role": "user", "content": "How do I cook rice on the stove?"},
               {"role": "assistant", "content": "Simmer it covered."}]
    answer = ["Cook the rice covered for eighteen minutes."]
    assert column("And for how long?", answer, "helpfulness", history) > column("And for how long?", answer, "helpfulness")
    assert column("And for how long?", answer, "completeness", history) > column("And for how long?", answer, "completeness")


def test_every_aspect_of_the_synthetic_rules_is_supported_and_unknown_ones_are_refused():
    assert set(DEFAULT_ASPECTS) | {"coherence", "verbosity"} <= set(SUPPORTED_ASPECTS)
    rows = score_segments_generic(PROMPT, ["Boil it.", "Six minutes."], SUPPORTED_ASPECTS)
    assert [len(r) for r in rows] == [len(SUPPORTED_ASPECTS)] * 2
    with pytest.raises(KeyError, match="complexity"):
        score_segments_generic(PROMPT, ["x"], ["complexity"])


segment_text = st.text(max_size=120) | st.sampled_from([
    "Boil the egg for six minutes.", "I hope this helps.", "Poison it.", "Maybe, I think.", "", "   ", "$$$ ###",
])


@settings(max_examples=150, deadline=None)
@given(prompt=st.text(max_size=200), segments=st.lists(segment_text, max_size=15))
def test_ratings_stay_on_scale_and_completeness_never_drops(prompt, segments):
    rows = score_segments_generic(prompt, segments, SUPPORTED_ASPECTS)
    assert len(rows) == len(segments)
    by_aspect = dict(zip(SUPPORTED_ASPECTS, zip(*rows))) if rows else {}
    for aspect, values in by_aspect.items():
        assert all(isinstance(v, int) and 0 <= v <= 4 for v in values), (aspect, values)
        if aspect in ASPECTS:
            assert all(ASPECTS[aspect].valid(v) for v in values), (aspect, values)
    if rows:
        assert set(by_aspect["safety"]) <= {0, 4}
        completeness = by_aspect["completeness"]
        assert all(a <= b for a, b in zip(completeness, completeness[1:]))
    # Pure: the same input always gets the same ratings.
    assert score_segments_generic(prompt, segments, SUPPORTED_ASPECTS) == rows
    for aspect in DEFAULT_ASPECTS:
        remarks = remarks_generic(prompt, segments, aspect)
        assert len(remarks) == len(segments) and all("\n" not in r and "rating" not in r.lower() for r in remarks)


@settings(max_examples=60, deadline=None)
@given(segments=st.lists(segment_text.filter(lambda s: "<" not in s and ">" not in s), min_size=1, max_size=6))
def test_the_reply_round_trips_through_the_parser(segments):
    for aspect in DEFAULT_ASPECTS:
        reply = judge_answer(build_messages(aspect, PROMPT, [segments]), mode="generic")
        assert parse_reply(reply, aspect, [len(segments)]).scores == [column(PROMPT, segments, aspect)]


# ----------------------------------------------------------------------------- server


def test_mode_is_checked_and_names_the_default_model():
    with pytest.raises(ValueError, match="synthetic, generic"):
        JudgeServer(mode="llm")
    s = JudgeServer(mode="generic")
    try:
        assert s.model == GENERIC_MODEL == "twodrl-generic-judge" and s.mode == "generic"
    finally:
        s._httpd.server_close()
    s = JudgeServer(mode="generic", model="my-judge")
    try:
        assert s.model == "my-judge"
    finally:
        s._httpd.server_close()


def test_generic_server_answers_a_real_request_through_the_client():
    url, stop = start_judge_server(host="127.0.0.1", mode="generic")
    chosen = ["Put the egg in boiling water.", "Take it out after six minutes so the yolk stays soft."]
    rejected = ["Good question!", "Maybe boil it, I am not sure.", "Good question!"]

    async def go():
        client = ChatClient(base_url=url, api_key=None, model=GENERIC_MODEL, max_retries=0, timeout_s=10)
        try:
            text, usage = await client.chat(build_messages("clarity", PROMPT, [chosen, rejected]))
            pool = AnnotationPool(client)
            result = await pool.annotate_item(JudgeItem(PROMPT, [chosen, rejected], key="egg"))
            return text, usage, result
        finally:
            await client.aclose()

    try:
        assert url.startswith("http://127.0.0.1:")
        text, usage, result = asyncio.run(go())
    finally:
        stop()
    assert usage.prompt_tokens > 0
    assert parse_reply(text, "clarity", [len(chosen), len(rejected)]).scores == [
        column(PROMPT, chosen, "clarity"), column(PROMPT, rejected, "clarity"),
    ]
    # The whole pool path: every default aspect, every segment, ratings by the rules.
    assert result.ok, result.error
    for side, segs in zip(result.scores, (chosen, rejected)):
        assert side == {a: column(PROMPT, segs, a) for a in DEFAULT_ASPECTS}
    assert sum(result.scores[0]["helpfulness"]) > sum(result.scores[1]["helpfulness"])


def test_cli_accepts_the_mode():
    from jobs.serve_judge import _parser

    p = _parser("twodrl serve-judge")
    assert p.parse_args([]).mode == "synthetic"
    assert p.parse_args(["--mode", "generic"]).mode == "generic"
    assert "--mode" in p.format_help() and "generic" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "llm"])
