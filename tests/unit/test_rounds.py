import math

import pytest
import torch

from twodrl.aspects import DEFAULT_ASPECTS, DEFAULT_WEIGHTS
from twodrl.rounds import PromptCursor, ScoredSample, agreement, reward_summary, select_pairs, sample_rating


def test_cursor_never_repeats_within_epoch_and_resumes_exactly():
    c = PromptCursor(pool_size=10, seed=3)
    first = c.take(4) + c.take(4)
    assert len({i for _, i in first}) == 8 and all(e == 0 for e, _ in first)
    state = c.state()
    rest = c.take(5)  # crosses into epoch 1
    assert [e for e, _ in rest] == [0, 0, 1, 1, 1]
    epoch0 = {i for _, i in first} | {i for e, i in rest if e == 0}
    assert epoch0 == set(range(10))
    resumed = PromptCursor.from_state(state)
    assert resumed.take(5) == rest


def test_cursor_orders_differ_between_epochs_and_seeds():
    a = PromptCursor(50, seed=0).take(100)
    assert [i for _, i in a[:50]] != [i for _, i in a[50:]]
    assert PromptCursor(50, seed=1).take(50) != a[:50]


def _sample(pid, scores, text="x."):
    return ScoredSample(prompt_id=pid, prompt="p", text=text, segments=["s"] * len(scores), scores=scores)


def test_select_pairs_best_vs_worst_by_weighted_representative_score():
    good = _sample("a", [[4, 4, 4, 4, 4]])
    mid = _sample("a", [[2, 2, 4, 2, 2]])
    bad = _sample("a", [[0, 0, 0, 0, 0]])
    pairs = select_pairs([[mid, bad, good]], DEFAULT_WEIGHTS, DEFAULT_ASPECTS)
    assert len(pairs) == 1
    assert pairs[0]["chosen"]["scores"]["helpfulness"] == [4]
    assert pairs[0]["rejected"]["scores"]["safety"] == [0]
    assert pairs[0]["margin"] == pytest.approx(4.0)


def test_select_pairs_skips_ties_and_empty_samples():
    tie = [_sample("a", [[3, 3, 4, 3, 3]]), _sample("a", [[3, 3, 4, 3, 3]])]
    empty = [_sample("b", [[4, 4, 4, 4, 4]]), ScoredSample("b", "p", "", [], [])]
    assert select_pairs([tie, empty], DEFAULT_WEIGHTS, DEFAULT_ASPECTS) == []


def test_sample_rating_uses_per_aspect_reductions():
    # helpfulness/correctness mean, safety min, completeness/clarity last segment
    s = _sample("a", [[4, 2, 4, 1, 4], [2, 4, 0, 3, 2]])
    weighted, rep = sample_rating(s, DEFAULT_WEIGHTS, DEFAULT_ASPECTS)
    assert rep == [3.0, 3.0, 0.0, 3.0, 2.0]
    assert weighted == pytest.approx(0.3 * 3 + 0.4 * 3 + 0.1 * 0 + 0.1 * 3 + 0.1 * 2)


def test_reward_summary_and_agreement():
    s1 = _sample("a", [[4, 4, 4, 4, 4]])
    s2 = _sample("b", [[2, 2, 4, 2, 2]])
    summary = reward_summary([s1, s2], DEFAULT_WEIGHTS, DEFAULT_ASPECTS)
    assert summary["reward/helpfulness"] == pytest.approx(3.0)
    assert math.isnan(reward_summary([], DEFAULT_WEIGHTS, DEFAULT_ASPECTS)["reward/weighted"])
    agree = agreement([[[3.6, 0.4, 3.9, 2.2, 5.0]]], [[[4, 1, 4, 2, 4]]], DEFAULT_ASPECTS)
    assert agree == {
        "rm/agreement/helpfulness": 1.0,
        "rm/agreement/correctness": 0.0,
        "rm/agreement/safety": 1.0,
        "rm/agreement/completeness": 1.0,
        "rm/agreement/clarity": 1.0,  # 5.0 clamps to 4
    }


# ----------------------------------------------------------------------------- scheduling


def test_audit_draw_is_per_sample_and_order_free():
    from twodrl.rounds import audited

    keys = [(f"r1-e0-p{i}", k) for i in range(50) for k in range(4)]
    a = [audited(0, 1, p, k, 0.5) for p, k in keys]
    b = [audited(0, 1, p, k, 0.5) for p, k in reversed(keys)][::-1]
    assert a == b and 60 < sum(a) < 140
    assert not any(audited(0, 1, p, k, 0.0) for p, k in keys)
    assert all(audited(0, 1, p, k, 1.0) for p, k in keys)
    assert a != [audited(1, 1, p, k, 0.5) for p, k in keys]  # the seed matters


def test_staleness_summary():
    from twodrl.rounds import staleness_summary

    assert staleness_summary([3, 3, 2, None], learner_version=3) == {
        "rollout/staleness_mean": pytest.approx(1 / 3), "rollout/staleness_max": 1.0}
    assert staleness_summary([], 5) == {"rollout/staleness_mean": 0.0, "rollout/staleness_max": 0.0}


def test_rounds_to_prefetch_bounds_staleness():
    from twodrl.rounds import rounds_to_prefetch

    assert rounds_to_prefetch(2, 10, 0, []) == []  # on-policy: nothing ahead
    assert rounds_to_prefetch(2, 10, 1, []) == [3]
    assert rounds_to_prefetch(2, 10, 3, [3]) == [4, 5]
    assert rounds_to_prefetch(8, 10, 3, []) == [9]  # never past the last round
