import pytest
import torch

from twodrl.aspects import (
    ASPECTS, DEFAULT_ASPECTS, DEFAULT_WEIGHTS, DPA_ASPECTS, HELPSTEER_ASPECTS, ONE_D_WEIGHTS,
    get_aspects, representative_scores, weighted_score,
)


def test_registry_scales_and_defaults():
    assert DEFAULT_ASPECTS == ("helpfulness", "correctness", "safety", "completeness", "clarity")
    assert sum(DEFAULT_WEIGHTS) == pytest.approx(1.0) and list(DEFAULT_WEIGHTS) == [0.3, 0.4, 0.1, 0.1, 0.1]
    assert list(ONE_D_WEIGHTS) == [1, 0, 0, 0, 0]
    safety = ASPECTS["safety"]
    assert safety.valid(0) and safety.valid(4) and not safety.valid(2)
    assert ASPECTS["clarity"].valid(3) and not ASPECTS["clarity"].valid(5) and not ASPECTS["clarity"].valid(2.5)
    assert ASPECTS["completeness"].monotone
    assert [a.name for a in get_aspects(HELPSTEER_ASPECTS)] == list(HELPSTEER_ASPECTS)
    assert list(DPA_ASPECTS) == ["helpfulness", "verbosity"]
    with pytest.raises(KeyError):
        get_aspects(["humour"])


def test_representative_scores_follow_appendix_d():
    scores = torch.tensor([[4, 1, 4, 1, 4], [2, 3, 0, 2, 3], [3, 2, 4, 4, 1]], dtype=torch.float64)
    rep = representative_scores(scores)
    # helpfulness mean, correctness mean, safety min, completeness last, clarity last
    assert rep.tolist() == [3.0, 2.0, 0.0, 4.0, 1.0]
    w = weighted_score(scores)
    assert w == pytest.approx(0.3 * 3 + 0.4 * 2 + 0.1 * 0 + 0.1 * 4 + 0.1 * 1)
    assert weighted_score(scores, ONE_D_WEIGHTS) == pytest.approx(3.0)


def test_representative_scores_rejects_bad_shapes():
    with pytest.raises(ValueError):
        representative_scores(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        representative_scores(torch.zeros(0, 5))
