"""Input layouts of `twodrl annotate` and the HelpSteer-2D records it writes."""

from __future__ import annotations

import pytest

from twodrl.annotation.records import parse_input, to_record, unpack_helpsteer_prompt

SCORES_GOOD = {"helpfulness": [4, 4], "correctness": [4, 4], "safety": [4, 4], "completeness": [1, 3], "clarity": [4, 4]}
SCORES_BAD = {"helpfulness": [0], "correctness": [1], "safety": [0], "completeness": [0], "clarity": [3]}


def test_plain_pair_layout_and_record_shape():
    p = parse_input({"prompt": "Tell me about the frog.", "chosen": "The frog croaks. The frog lives in ponds.",
                     "rejected": {"text": "x", "segments": ["x"]}, "history": [{"role": "user", "content": "hi"}]})
    assert p.segments == [["The frog croaks.", "The frog lives in ponds."], ["x"]] and p.chosen == 0
    rec = to_record(p, [SCORES_GOOD, SCORES_BAD], index=7)
    assert rec["chosen"]["text"].startswith("The frog croaks") and rec["rejected"]["segments"] == ["x"]
    assert rec["chosen"]["scores"] == SCORES_GOOD and rec["index"] == 7 and rec["history"][0]["content"] == "hi"


@pytest.mark.parametrize("strength, chosen_text", [(-2, "one."), (3, "two.")])
def test_helpsteer2_strength_sign(strength, chosen_text):
    p = parse_input({"prompt": "q", "response_1": "one.", "response_2": "two.", "preference_strength": strength})
    rec = to_record(p, [{k: [4] for k in SCORES_BAD}, {k: [4] for k in SCORES_BAD}])
    assert rec["chosen"]["text"] == chosen_text and "history" not in rec


def test_helpsteer2_tie_is_decided_by_the_judge_or_fails():
    p = parse_input({"prompt": "q", "response_1": "a. b.", "response_2": "c.", "preference_strength": 0})
    assert p.chosen is None
    rec = to_record(p, [SCORES_GOOD, SCORES_BAD])
    assert rec["chosen"]["text"] == "a. b."
    assert to_record(p, [SCORES_BAD, SCORES_GOOD])["chosen"]["text"] == "c."
    with pytest.raises(ValueError, match="tie"):
        to_record(p, [{k: [4, 4] for k in SCORES_GOOD}, {k: [4] for k in SCORES_GOOD}])


def test_helpsteer2_multiturn_prompt_is_unpacked():
    prompt, history = unpack_helpsteer_prompt("Hi there<extra_id_1>Assistant\nHello!<extra_id_1>User\nTell me about owls.")
    assert prompt == "Tell me about owls."
    assert history == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert unpack_helpsteer_prompt("plain") == ("plain", [])
    with pytest.raises(ValueError, match="end with a user turn"):
        unpack_helpsteer_prompt("Hi<extra_id_1>Assistant\nHello")


@pytest.mark.parametrize(
    "obj, match",
    [
        ([1, 2], "expected a JSON object"),
        ({"chosen": "a", "rejected": "b"}, "prompt: missing"),
        ({"prompt": "q", "chosen": "a"}, "expected 'chosen' and 'rejected'"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen: expected a string"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen: the response is empty"),
        ({"prompt": "q", "response_1": "a", "response_2": "b"}, "preference_strength"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "history": [{"role": "bot", "content": "x"}]}, r"history\[0\]"),
    ],
)
def test_bad_inputs_name_the_field(obj, match):
    with pytest.raises(ValueError, match=match):
        parse_input(obj)
