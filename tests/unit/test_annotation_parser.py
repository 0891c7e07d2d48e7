"""Reply parser: well-formed replies round-trip, every malformation is a ParseError
with a specific reason, and arbitrary text never raises anything else."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twodrl.annotation.parser import ParseError, format_reply, parse_reply
from twodrl.aspects import ASPECTS, DEFAULT_ASPECTS

# Remarks a judge might write: anything on one line that does not itself look like a
# rating ("Rating: n") — the format puts the rating on its own line.
remark = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
    max_size=40,
).filter(lambda s: "rating" not in s.lower())


@st.composite
def replies(draw):
    aspect = draw(st.sampled_from(DEFAULT_ASPECTS))
    a = ASPECTS[aspect]
    n_resp = draw(st.integers(1, 2))
    values = [a.low, a.high] if a.binary else list(range(a.low, a.high + 1))
    scores = []
    for _ in range(n_resp):
        row = draw(st.lists(st.sampled_from(values), min_size=1, max_size=12))
        if a.monotone:
            row = sorted(row)
        scores.append(row)
    remarks = [[draw(remark) for _ in row] for row in scores]
    return aspect, scores, remarks


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies())
def test_well_formed_replies_round_trip(case):
    aspect, scores, remarks = case
    text = format_reply(aspect, scores, remarks)
    parsed = parse_reply(text, aspect, [len(r) for r in scores])
    assert parsed.scores == scores
    assert parsed.monotone_repairs == 0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400), st.sampled_from(DEFAULT_ASPECTS), st.lists(st.integers(1, 6), min_size=1, max_size=2))
def test_garbage_never_raises_anything_but_parse_error(text, aspect, counts):
    try:
        parsed = parse_reply(text, aspect, counts)
    except ParseError as e:
        assert str(e)
    else:  # if it parsed, it must be valid
        assert [len(r) for r in parsed.scores] == counts


@settings(max_examples=200, deadline=None)
@given(replies(), st.data())
def test_mutated_replies_parse_or_fail_cleanly(case, data):
    aspect, scores, remarks = case
    text = format_reply(aspect, scores, remarks)
    lines = text.splitlines()
    i = data.draw(st.integers(0, len(lines) - 1))
    op = data.draw(st.sampled_from(["drop", "dup", "swap", "cut"]))
    if op == "drop":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[i])
    elif op == "swap" and i + 1 < len(lines):
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
    else:
        lines[i] = lines[i][: len(lines[i]) // 2]
    try:
        parsed = parse_reply("\n".join(lines), aspect, [len(r) for r in scores])
    except ParseError:
        return
    assert [len(r) for r in parsed.scores] == [len(r) for r in scores]
    for row in parsed.scores:
        assert all(ASPECTS[aspect].valid(v) for v in row)


PAIR = """Response 1 Evaluation:
<1> Evaluation: fine
Correctness Rating: 4
<2> Evaluation: wrong
Correctness Rating: 0
Response 2 Evaluation:
<1> Evaluation: ok
Correctness Rating: 3
"""


def test_paper_layout_with_decorations():
    text = "**Response 1 Evaluation:**\n- <1> Evaluation: a\n  **Correctness Rating:** 4\n<2> b\nCorrectness Rating: 0\n\n## Response 2 Evaluation\n<1> Evaluation: c. Correctness Rating: 3"
    assert parse_reply(text, "correctness", [2, 1]).scores == [[4, 0], [3]]
    assert parse_reply(PAIR, "correctness", [2, 1]).scores == [[4, 0], [3]]


@pytest.mark.parametrize(
    "text, counts, aspect, match",
    [
        ("", [1], "correctness", "empty"),
        ("I refuse.", [2, 1], "correctness", "no 'Response 1 Evaluation:' header"),
        (PAIR.split("Response 2")[0], [2, 1], "correctness", "no 'Response 2 Evaluation:' block"),
        (PAIR, [3, 1], "correctness", r"Response 1: no rating for segment\(s\) <3>"),
        (PAIR, [1, 1], "correctness", "segment <2> does not exist"),
        (PAIR.replace("<2>", "<1>"), [2, 1], "correctness", "segment <1> is rated more than once"),
        (PAIR.replace("Rating: 3", "Rating: 5"), [2, 1], "correctness", "rating 5 is not a whole number 0–4"),
        (PAIR.replace("Rating: 3", "Rating: 2.5"), [2, 1], "correctness", "rating 2.5"),
        (PAIR.replace("Correctness", "Safety").replace("Rating: 3", "Rating: 2"), [2, 1], "safety", "not 0 or 4"),
        (PAIR.replace("Correctness Rating: 3", "no score here"), [2, 1], "correctness", "<1> has no 'Rating: n' line"),
        (PAIR + "Response 3 Evaluation:\n<1> x\nRating: 1", [2, 1], "correctness", "unexpected 'Response 3"),
        (PAIR + "Response 2 Evaluation:\n<1> x\nRating: 1", [2, 1], "correctness", "more than once"),
    ],
)
def test_specific_reasons(text, counts, aspect, match):
    with pytest.raises(ParseError, match=match):
        parse_reply(text, aspect, counts)


def test_completeness_monotonicity_repaired_and_counted():
    text = format_reply("completeness", [[1, 3, 2, 4, 0], [2, 1]])
    parsed = parse_reply(text, "completeness", [5, 2])
    assert parsed.scores == [[1, 3, 3, 4, 4], [2, 2]]
    assert parsed.monotone_repairs == 3
    # Other aspects may go down: no repair.
    assert parse_reply(format_reply("clarity", [[4, 2]]), "clarity", [2]).scores == [[4, 2]]


def test_single_mode_tolerates_missing_header():
    text = "<1> Evaluation: good\nHelpfulness Rating: 4\n<2> Evaluation: meh\nHelpfulness Rating: 1"
    assert parse_reply(text, "helpfulness", [2]).scores == [[4, 1]]
