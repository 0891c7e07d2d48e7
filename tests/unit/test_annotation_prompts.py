"""Judge prompts: versioned templates, one aspect per request, and an exact inverse
(the local judge recovers prompt, history and segments from the messages)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.annotation.prompts import (
    TemplateError,
    build_messages,
    load_templates,
    messages_digest,
    parse_request,
    repair_messages,
    tag_segments,
)
from twodrl.aspects import DEFAULT_ASPECTS


def test_templates_cover_the_five_aspects_and_have_an_identity():
    t = load_templates()
    assert set(DEFAULT_ASPECTS) <= set(t.aspects)
    assert t.id.startswith("v1-") and len(t.id) == len("v1-") + 12
    with pytest.raises(TemplateError, match="no judge prompt for aspect 'verbosity'"):
        t.aspect("verbosity")
    with pytest.raises(TemplateError, match="template file not found"):
        load_templates("v999")


@pytest.mark.parametrize("aspect", DEFAULT_ASPECTS)
def test_each_aspect_prompt_states_its_own_rubric_only(aspect):
    t = load_templates()
    system = build_messages(aspect, "Tell me about the owl.", [["a."], ["b."]])[0]["content"]
    assert f"Aspect under review: {t.aspects[aspect].title}" in system
    assert f"{t.aspects[aspect].rating_label}: n" in system
    others = [t.aspects[a].rating_label for a in DEFAULT_ASPECTS if a != aspect]
    assert not any(label in system for label in others)  # separate prompt per aspect
    assert "Response 1 Evaluation:" in system and "Response 2 Evaluation:" in system
    assert "<k>segment text</k>" in system and "earlier turns" in system


def test_rubric_facts():
    s = {a: build_messages(a, "q", [["x"]])[0]["content"] for a in DEFAULT_ASPECTS}
    assert "only ratings allowed are 4 (pass) and 0 (fail)" in s["safety"]
    assert "never be rated lower" in s["completeness"]
    for a in ("helpfulness", "correctness", "completeness", "clarity"):
        assert all(f"\n{r} - " in s[a] for r in range(5))
    single = build_messages("clarity", "q", [["x"]])[0]["content"]
    assert "Response 2" not in single


def test_segments_are_tagged_from_one():
    assert tag_segments(["A.", "B."]) == "<1>A.</1> <2>B.</2>"


seg = st.text(min_size=1, max_size=30).filter(lambda s: "<" not in s and s.strip() == s and s)
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=30).filter(lambda s: "[" not in s and s == s.strip())})


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(DEFAULT_ASPECTS),
    st.text(min_size=1, max_size=60).filter(lambda s: "===" not in s and s.strip() == s),
    st.lists(st.lists(seg, min_size=1, max_size=6), min_size=1, max_size=2),
    st.lists(turn, max_size=3),
)
def test_parse_request_inverts_build_messages(aspect, prompt, responses, history):
    req = parse_request(build_messages(aspect, prompt, responses, history))
    assert (req.aspect, req.prompt, req.responses, req.history, req.repair) == (aspect, prompt, responses, history, False)


def test_repair_round_keeps_the_request_and_names_the_problem():
    msgs = build_messages("safety", "Tell me about the bee.", [["The bee buzzes."], ["x.", "y."]])
    fixed = repair_messages(msgs, "nonsense", "no 'Response 1 Evaluation:' header found", "safety", [1, 2])
    assert fixed[:2] == msgs and fixed[2] == {"role": "assistant", "content": "nonsense"}
    assert "no 'Response 1 Evaluation:' header found" in fixed[3]["content"]
    assert "Response 2 has exactly 2 segments" in fixed[3]["content"] and "(4 or 0 only)" in fixed[3]["content"]
    req = parse_request(fixed)
    assert req.repair and req.aspect == "safety" and req.responses == [["The bee buzzes."], ["x.", "y."]]
    assert messages_digest(fixed) != messages_digest(msgs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="1 or 2 responses"):
        build_messages("safety", "q", [["a"], ["b"], ["c"]])
    with pytest.raises(ValueError, match="response 2 has no segments"):
        build_messages("safety", "q", [["a"], []])
    with pytest.raises(ValueError, match="history\\[0\\].role"):
        build_messages("safety", "q", [["a"]], [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="names no aspect"):
        parse_request([{"role": "system", "content": "hi"}, {"role": "user", "content": "x"}])
