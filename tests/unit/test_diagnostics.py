"""Segment credit: grouping of per-segment log-prob changes by side and rating bin."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.diagnostics import (
    BINS,
    PairSegmentLogps,
    SegmentLogps,
    credit_metric_keys,
    credit_metrics,
    draw_probe_pairs,
    rating_bin,
    segment_deltas,
    split_probe_pairs,
)

ASPECTS = ("helpfulness", "correctness")
WEIGHTS = (0.25, 0.75)


def _side(h, c):
    return {"text": " ".join(f"s{k}." for k in range(len(h))), "segments": [f"s{k}." for k in range(len(h))],
            "scores": {"helpfulness": list(h), "correctness": list(c)}}


def _logps(before, after, seg):
    return SegmentLogps(before, seg), SegmentLogps(after, seg)


def _example():
    """Two pairs with known ratings and per-token changes (see the expected values)."""
    pairs = [
        # chosen ratings 4, 1, 3.25; rejected 0, 2
        {"prompt": "p1", "chosen": _side([4, 1, 4], [4, 1, 3]), "rejected": _side([0, 2], [0, 2])},
        # chosen 2, 0; rejected 3
        {"prompt": "p2", "chosen": _side([2, 0], [2, 0]), "rejected": _side([3], [3])},
    ]
    c1 = _logps([-1.0] * 6, [-0.5, -0.7, -1.2, -0.9, -0.8, -0.7], [0, 0, 1, 2, 2, 2])  # Δ 0.4, -0.2, 0.2
    r1 = _logps([-1.0] * 3, [-1.6, -1.1, -1.3], [0, 1, 1])  # Δ -0.6, -0.2
    c2 = _logps([-2.0] * 3, [-1.9, -2.3, -2.5], [0, 1, 1])  # Δ 0.1, -0.4
    r2 = _logps([-0.5] * 2, [-1.5, -1.5], [0, 0])  # Δ -1.0
    before = [PairSegmentLogps(c1[0], r1[0]), PairSegmentLogps(c2[0], r2[0])]
    after = [PairSegmentLogps(c1[1], r1[1]), PairSegmentLogps(c2[1], r2[1])]
    return pairs, before, after


def test_hand_built_example_exact_values():
    pairs, before, after = _example()
    m = credit_metrics(pairs, before, after, ASPECTS, WEIGHTS)
    expected = {
        "chosen/0-1": (-0.4, 1), "chosen/1-2": (-0.2, 1), "chosen/2-3": (0.1, 1), "chosen/3-4": (0.3, 2),
        "rejected/0-1": (-0.6, 1), "rejected/2-3": (-0.2, 1), "rejected/3-4": (-1.0, 1),
    }
    for key, (value, n) in expected.items():
        assert m[f"credit/{key}"] == pytest.approx(value, abs=1e-9), key
        assert m[f"credit/{key}_n"] == n, key
    # no rejected segment rated in [1, 2)
    assert math.isnan(m["credit/rejected/1-2"]) and m["credit/rejected/1-2_n"] == 0
    # top chosen bin 0.3 minus pooled bottom bins mean(-0.4, -0.2)
    assert m["credit/selectivity"] == pytest.approx(0.6, abs=1e-9)
    # OLS over chosen (rating, Δ): (4, .4) (1, -.2) (3.25, .2) (2, .1) (0, -.4)
    assert m["credit/slope"] == pytest.approx(2.045 / 10.55, abs=1e-9)
    assert set(m) == set(credit_metric_keys())


def test_empty_probe_gives_nan_and_zero_counts():
    m = credit_metrics([], [], [], ASPECTS, WEIGHTS)
    assert set(m) == set(credit_metric_keys())
    for side in ("chosen", "rejected"):
        for b in BINS:
            assert math.isnan(m[f"credit/{side}/{b}"]) and m[f"credit/{side}/{b}_n"] == 0
    assert math.isnan(m["credit/selectivity"]) and math.isnan(m["credit/slope"])


@pytest.mark.parametrize(
    "rating, expected",
    [(0.0, 0), (0.999, 0), (1.0, 1), (1.5, 1), (2.0, 2), (2.999, 2), (3.0, 3), (3.999, 3), (4.0, 3),
     (-0.3, 0), (4.2, 3)],
)
def test_rating_bins_and_top_edge(rating, expected):
    assert rating_bin(rating) == expected


def test_rating_exactly_four_lands_in_top_bin():
    pairs = [{"prompt": "p", "chosen": _side([4], [4]), "rejected": _side([0], [0])}]
    b = [PairSegmentLogps(SegmentLogps([-1.0], [0]), SegmentLogps([-1.0], [0]))]
    a = [PairSegmentLogps(SegmentLogps([-0.5], [0]), SegmentLogps([-1.5], [0]))]
    m = credit_metrics(pairs, b, a, ASPECTS, WEIGHTS)
    assert m["credit/chosen/3-4_n"] == 1 and m["credit/chosen/3-4"] == pytest.approx(0.5)
    assert m["credit/rejected/0-1"] == pytest.approx(-0.5)


def test_list_scores_and_segments_without_tokens():
    # [S][A] scores; segment 2 was cut off by truncation (no tokens): it takes no part.
    side = {"text": "a. b. c.", "segments": ["a.", "b.", "c."], "scores": [[4, 4], [0, 0], [2, 2]]}
    pairs = [{"prompt": "p", "chosen": side, "rejected": side}]
    seg = [0, 0, 1]
    b = [PairSegmentLogps(SegmentLogps([0.0] * 3, seg), SegmentLogps([0.0] * 3, seg))]
    a = [PairSegmentLogps(SegmentLogps([1.0, 1.0, -1.0], seg), SegmentLogps([0.0] * 3, seg))]
    m = credit_metrics(pairs, b, a, ASPECTS, WEIGHTS)
    assert m["credit/chosen/3-4"] == pytest.approx(1.0) and m["credit/chosen/0-1"] == pytest.approx(-1.0)
    assert m["credit/chosen/2-3_n"] == 0
    assert m["credit/selectivity"] == pytest.approx(2.0)


def test_segment_deltas_checks_alignment():
    with pytest.raises(ValueError, match="not aligned"):
        segment_deltas(SegmentLogps([0.0, 0.0], [0, 1]), SegmentLogps([0.0, 0.0], [0, 0]), 2)
    with pytest.raises(ValueError, match="outside"):
        segment_deltas(SegmentLogps([0.0], [3]), SegmentLogps([0.0], [3]), 2)
    with pytest.raises(ValueError):
        SegmentLogps([0.0], [0, 1])
    d = segment_deltas(SegmentLogps([0.0, 0.0], [0, 0]), SegmentLogps([1.0, 3.0], [0, 0]), 2)
    assert d[0].item() == pytest.approx(2.0) and math.isnan(d[1].item())


def test_pair_logps_dict_roundtrip():
    _, before, _ = _example()
    for p in before:
        assert PairSegmentLogps.from_dict(p.as_dict()) == p


def test_probe_draw_is_deterministic_and_held_out():
    pairs = [{"prompt": f"p{i}"} for i in range(20)]
    probe, rest = split_probe_pairs(pairs, 5, seed=3)
    assert probe == draw_probe_pairs(pairs, 5, seed=3) == split_probe_pairs(pairs, 5, seed=3)[0]
    assert len(probe) == 5 and len(rest) == 15
    assert sorted(p["prompt"] for p in probe + rest) == sorted(p["prompt"] for p in pairs)
    assert [pairs.index(p) for p in probe] == sorted(pairs.index(p) for p in probe)  # original order
    assert draw_probe_pairs(pairs, 5, seed=4) != probe
    assert draw_probe_pairs(pairs, 50, seed=3) == pairs
    assert split_probe_pairs(pairs, 0, seed=3) == ([], pairs)


# --------------------------------------------------------------------------- property


@st.composite
def _probe(draw):
    n_pairs = draw(st.integers(1, 3))
    pairs, before = [], []
    logp = st.floats(-20, 0, allow_nan=False)
    for _ in range(n_pairs):
        rec, sides = {"prompt": "p"}, {}
        for side in ("chosen", "rejected"):
            S = draw(st.integers(1, 4))
            h = draw(st.lists(st.integers(0, 4), min_size=S, max_size=S))
            c = draw(st.lists(st.integers(0, 4), min_size=S, max_size=S))
            rec[side] = _side(h, c)
            # segment ids in order, every segment at least one token
            seg = [k for k in range(S) for _ in range(draw(st.integers(1, 3)))]
            sides[side] = SegmentLogps(draw(st.lists(logp, min_size=len(seg), max_size=len(seg))), seg)
        pairs.append(rec)
        before.append(PairSegmentLogps(sides["chosen"], sides["rejected"]))
    return pairs, before


@settings(max_examples=60, deadline=None)
@given(_probe(), st.floats(-5, 5, allow_nan=False))
def test_uniform_shift_moves_every_bin_by_the_shift(probe, c):
    pairs, before = probe
    shift = lambda s: SegmentLogps([x + c for x in s.token_logps], s.segment_ids)  # noqa: E731
    after = [PairSegmentLogps(shift(p.chosen), shift(p.rejected)) for p in before]
    m = credit_metrics(pairs, before, after, ASPECTS, WEIGHTS)
    total = 0
    for side in ("chosen", "rejected"):
        for b in BINS:
            n = m[f"credit/{side}/{b}_n"]
            total += n
            if n:
                assert m[f"credit/{side}/{b}"] == pytest.approx(c, abs=1e-9)
            else:
                assert math.isnan(m[f"credit/{side}/{b}"])
    assert total == sum(len(r[s]["segments"]) for r in pairs for s in ("chosen", "rejected"))
    if not math.isnan(m["credit/selectivity"]):
        assert m["credit/selectivity"] == pytest.approx(0.0, abs=1e-9)
    if not math.isnan(m["credit/slope"]):
        assert m["credit/slope"] == pytest.approx(0.0, abs=1e-7)
