"""DPA core (seed 003): direction sampling, the system prompt, best-of-n by vᵀr."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.dpa import (
    best_of_n,
    default_constraint,
    direction_from_weights,
    direction_system_prompt,
    direction_weights,
    parse_direction_system_prompt,
    sample_directions,
    select_winners,
)


def test_two_objective_directions_angle_range_and_uniformity():
    v = sample_directions(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert v.shape == (20000, 2)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(20000, dtype=torch.float64))
    ang = torch.atan(v[:, 1] / v[:, 0])
    assert ang.min() >= -math.pi / 4 and ang.max() <= 0
    # v1 ∈ [√2/2, 1], v2 ∈ [−√2/2, 0] as the paper states.
    assert v[:, 0].min() >= math.sqrt(2) / 2 - 1e-12 and (v[:, 1] <= 0).all()
    # Uniform in angle: each quarter of the range holds about a quarter of the draws.
    counts = torch.histc(ang, bins=4, min=-math.pi / 4, max=0.0)
    assert ((counts / 20000 - 0.25).abs() < 0.02).all()
    # Same generator seed → same directions; custom range respected.
    again = sample_directions(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(v, again)
    w = sample_directions(500, angle_low=0.1, angle_high=0.2, generator=torch.Generator().manual_seed(1))
    a = torch.atan2(w[:, 1], w[:, 0])
    assert a.min() >= 0.1 - 1e-6 and a.max() <= 0.2 + 1e-6


def test_k_objective_directions_satisfy_constraints():
    v = sample_directions(3000, k=3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3000, dtype=torch.float64))
    assert ((v[:, 0] > v[:, 2]) & (v[:, 2] >= 0)).all()  # v1 > v3 ≥ 0
    ang = torch.atan2(v[:, 1], v[:, 0])
    assert ang.min() >= -math.pi / 4 and ang.max() <= 0
    assert default_constraint(v).all()
    # Not degenerate: the third objective actually varies.
    assert v[:, 2].std() > 0.1
    # A custom constraint replaces the default (here: the open positive orthant).
    u = sample_directions(200, k=4, constraint=lambda x: (x > 0).all(dim=1), generator=torch.Generator().manual_seed(3))
    assert (u > 0).all()
    with pytest.raises(ValueError, match="admissible region"):
        sample_directions(5, k=3, constraint=lambda x: x[:, 0] > 2.0, max_rounds=3)
    with pytest.raises(ValueError):
        sample_directions(5, k=1)


def test_system_prompt_integer_weights_and_roundtrip():
    text = direction_system_prompt([0.8, -0.6], ["helpfulness", "verbosity"])
    assert "helpfulness=80" in text and "verbosity=-60" in text
    assert parse_direction_system_prompt(text) == {"helpfulness": 80, "verbosity": -60}
    # round(100·v): 0.7071 → 71, −0.7071 → −71, 0.125 → 13 (halves away from zero), −0.004 → 0.
    assert direction_weights([0.70710678, -0.70710678, 0.125, -0.004]) == [71, -71, 13, 0]
    # The prompt can sit inside a longer system message.
    wrapped = "You are a helpful assistant.\n" + text + "\nBe kind."
    assert parse_direction_system_prompt(wrapped) == {"helpfulness": 80, "verbosity": -60}
    v = direction_from_weights(parse_direction_system_prompt(text), ["helpfulness", "verbosity"], dtype=torch.float64)
    torch.testing.assert_close(v, torch.tensor([0.8, -0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match="no 'Reply preferences"):
        parse_direction_system_prompt("You are a helpful assistant.")
    with pytest.raises(ValueError, match="2 names"):
        direction_system_prompt([1.0, 0.0, 0.0], ["helpfulness", "verbosity"])


@settings(max_examples=50, deadline=None)
@given(theta=st.floats(-math.pi / 4, 0.0), k3=st.floats(0.0, 0.5))
def test_system_prompt_roundtrip_property(theta, k3):
    v = [math.cos(theta), math.sin(theta), k3]
    names = ["helpfulness", "verbosity", "harmlessness"]
    parsed = parse_direction_system_prompt(direction_system_prompt(v, names))
    assert list(parsed) == names
    for name, x in zip(names, v):
        assert abs(parsed[name] - 100 * x) <= 0.5 + 1e-9


def test_best_of_n_depends_on_direction():
    # Rewards (helpfulness, verbosity) of three responses.
    r = torch.tensor([[3.0, 3.0], [2.8, 1.0], [1.0, -2.0]])
    assert best_of_n(r, torch.tensor([1.0, 0.0])) == 0  # pure helpfulness: 3.0 is best
    # (√2/2, −√2/2): vᵀr ∝ h − v = 0.0, 1.8, 3.0 → the terse third response wins.
    assert best_of_n(r, torch.tensor([math.sqrt(0.5), -math.sqrt(0.5)])) == 2
    # (0.8, −0.6): 0.6, 1.64, 2.0 → third.
    assert best_of_n(r, torch.tensor([0.8, -0.6])) == 2
    # (0.96, −0.28): 2.04, 2.408, 1.52 → second.
    assert best_of_n(r, torch.tensor([0.96, -0.28])) == 1
    # Ties go to the first.
    assert best_of_n(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([1.0, 0.0])) == 0


def test_select_winners_matches_per_prompt_best_of_n():
    g = torch.Generator().manual_seed(4)
    P, N, k = 6, 5, 2
    rewards = torch.randn(P, N, k, generator=g)
    dirs = sample_directions(P, generator=g)
    win = select_winners(rewards, dirs)
    assert win.index.tolist() == [best_of_n(rewards[p], dirs[p]) for p in range(P)]
    torch.testing.assert_close(win.score, torch.stack([rewards[p, win.index[p]] @ dirs[p] for p in range(P)]))
    # Shared direction and a validity mask (an all-invalid prompt gets −1).
    valid = torch.ones(P, N, dtype=torch.bool)
    valid[0, win.index[0]] = False
    valid[1] = False
    masked = select_winners(rewards, torch.tensor([1.0, 0.0]), valid=valid)
    assert masked.index[1].item() == -1 and masked.score[1].item() == -math.inf
    expected0 = max((rewards[0, n, 0].item(), n) for n in range(N) if valid[0, n])[1]
    assert masked.index[0].item() == expected0
    with pytest.raises(ValueError, match="directions"):
        select_winners(rewards, torch.ones(P, 3))
