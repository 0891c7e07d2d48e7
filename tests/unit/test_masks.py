"""Schmitt trigger, adaptive masks, APPO advantages, ADPO and ARS (seed 004)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.losses import clipped_surrogate
from twodrl.masks import (
    adaptive_mask,
    adaptive_mask_batch,
    adpo_loss,
    appo_token_advantages,
    ars_loss,
    ars_select,
    schmitt_trigger,
    schmitt_trigger_batch,
    segment_means,
    token_rewards_from_segments,
)

F64 = torch.float64


def _trigger_reference(rewards, baseline, delta, hysteresis):
    """The recursion written out token by token."""
    state, out = 0, []
    for r in rewards:
        if r > baseline + delta:
            s = 1
        elif r < baseline - delta:
            s = -1
        else:
            s = state if hysteresis else 0
        state = s
        out.append(s)
    return out


def test_schmitt_trigger_hand_cases():
    r = torch.tensor([0.0, 0.5, 0.05, -0.5, 0.0, 0.3, 0.1, -0.1])
    # b = 0, δ = 0.1: band is [−0.1, 0.1] (closed: exactly ±δ stays inside).
    assert schmitt_trigger(r, 0.0, 0.1).tolist() == [0, 1, 1, -1, -1, 1, 1, 1]
    assert schmitt_trigger(r, 0.0, 0.1, hysteresis=False).tolist() == [0, 1, 0, -1, 0, 1, 0, 0]  # Eq. 18
    assert schmitt_trigger(r, 0.0, 0.1).dtype == torch.long
    # δ = 0: no band, the sign of r − b (ties at b keep the state / are 0).
    assert schmitt_trigger(r, 0.0, 0.0, hysteresis=False).tolist() == [0, 1, 1, -1, 0, 1, 1, -1]
    # Per-token baseline.
    b = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert schmitt_trigger(r, b, 0.1).tolist() == [0, -1, -1, -1, -1, 1, 1, 1]
    with pytest.raises(ValueError, match="delta"):
        schmitt_trigger(r, 0.0, -0.1)


def test_hysteresis_suppresses_chatter_that_eq18_produces():
    # A noisy good run that dips into the band: Eq. 18 chops it, the trigger does not.
    r = torch.tensor([0.3, 0.05, 0.25, -0.02, 0.3, 0.08])
    eq18 = schmitt_trigger(r, 0.0, 0.1, hysteresis=False)
    hyst = schmitt_trigger(r, 0.0, 0.1)
    assert hyst.tolist() == [1] * 6
    assert eq18.tolist() == [1, 0, 1, 0, 1, 0]


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.lists(st.floats(-2, 2, allow_nan=False), min_size=1, max_size=12), min_size=1, max_size=5),
    delta=st.floats(0, 0.8),
    baseline=st.floats(-0.5, 0.5),
    hysteresis=st.booleans(),
)
def test_batched_trigger_equals_sequential_recursion(data, delta, baseline, hysteresis):
    T = max(len(x) for x in data)
    r = torch.zeros(len(data), T, dtype=F64)
    mask = torch.zeros(len(data), T, dtype=torch.bool)
    for i, row in enumerate(data):
        r[i, : len(row)] = torch.tensor(row, dtype=F64)
        mask[i, : len(row)] = True
        r[i, len(row):] = 100.0  # padding values must not switch anything
    got = schmitt_trigger_batch(r, baseline, delta, mask=mask, hysteresis=hysteresis)
    for i, row in enumerate(data):
        ref = _trigger_reference(torch.tensor(row, dtype=F64).tolist(), baseline, delta, hysteresis)
        assert got[i, : len(row)].tolist() == ref
        assert got[i, len(row):].abs().sum() == 0


def test_batched_trigger_padding_inside_keeps_state_and_per_row_baseline():
    r = torch.tensor([[0.5, 9.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    b = torch.tensor([0.0, 0.2])
    got = schmitt_trigger_batch(r, b, 0.1, mask=mask)
    # Row 0: the masked 9.0 neither switches nor shows; state 1 carries over it.
    # Row 1: baseline 0.2 → 0.0 is below b − δ = 0.1 → −1 from the start.
    assert got.tolist() == [[1, 0, 1, 1], [-1, -1, -1, -1]]


def test_adaptive_mask_chosen_and_rejected():
    r = torch.tensor([0.0, 0.5, 0.05, -0.5, 0.0, 0.3])
    assert adaptive_mask(r, 0.0, 0.1, chosen=True).tolist() == [0, 1, 1, 0, 0, 1]
    assert adaptive_mask(r, 0.0, 0.1, chosen=False).tolist() == [0, 0, 0, 1, 1, 0]
    assert adaptive_mask(r, 0.0, 0.1, chosen=True, hysteresis=False).tolist() == [0, 1, 0, 0, 0, 1]
    batch = torch.stack([r, r])
    got = adaptive_mask(batch, 0.0, 0.1, chosen=torch.tensor([True, False]))
    assert got.tolist() == [[0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 0]]
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    got = adaptive_mask_batch(batch, torch.tensor([0.0, 0.0]), 0.1, torch.tensor([True, False]), mask=pad)
    assert got.tolist() == [[0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]]
    # Eq. 13 with δ = 0, no hysteresis: chosen keeps R > b.
    assert adaptive_mask(r, 0.05, 0.0, chosen=True, hysteresis=False).tolist() == [0, 1, 0, 0, 0, 1]


def test_token_rewards_and_segment_means():
    seg = torch.tensor([[1.0, -1.0, 0.5]])
    ids = torch.tensor([[-1, 0, 0, 1, 2, -1]])
    assert token_rewards_from_segments(seg, ids).tolist() == [[0.0, 1.0, 1.0, -1.0, 0.5, 0.0]]
    vals = torch.tensor([[9.0, 1.0, 3.0, 4.0, 5.0, 9.0]])
    assert segment_means(vals, ids, 3).tolist() == [[2.0, 4.0, 5.0]]


def test_appo_token_advantages_by_hand():
    # One prompt, K = 2 samples. Sample 0: segments rewarded 1.0 and 0.0 (2 tokens each);
    # sample 1: a single 0.2 segment over 3 tokens, then padding.
    seg = torch.tensor([[1.0, 0.0], [0.2, float("nan")]], dtype=F64)
    ids = torch.tensor([[0, 0, 1, 1], [0, 0, 0, -1]])
    out = appo_token_advantages(seg, ids, group_size=2, delta=0.1, hysteresis=False)
    # Sequence rewards: 0.5 and 0.2 → baseline 0.35; sample 0 chosen, sample 1 rejected.
    torch.testing.assert_close(out.sequence_rewards, torch.tensor([0.5, 0.2], dtype=F64))
    torch.testing.assert_close(out.baselines, torch.tensor([0.35], dtype=F64))
    assert out.chosen.tolist() == [True, False]
    # Chosen keeps tokens above 0.45 (its 1.0 segment); rejected keeps tokens below 0.25.
    assert out.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    torch.testing.assert_close(
        out.advantages, torch.tensor([[0.65, 0.65, -0.35, -0.35], [-0.15, -0.15, -0.15, 0.0]], dtype=F64)
    )
    seq = appo_token_advantages(seg, ids, group_size=2, mode="sequence")
    torch.testing.assert_close(seq.advantages, torch.tensor([[0.15] * 4, [-0.15] * 3 + [0.0]], dtype=F64))
    scaled = appo_token_advantages(seg, ids, group_size=2, scale_by_std=True, eps=0.0)
    torch.testing.assert_close(scaled.advantages, out.advantages / 0.15)  # group std of (0.5, 0.2)
    with pytest.raises(ValueError, match="groups of 3"):
        appo_token_advantages(seg, ids, group_size=3)


def test_appo_masked_surrogate_only_moves_kept_tokens():
    seg = torch.tensor([[1.0, 0.0], [0.2, 0.2]], dtype=F64)
    ids = torch.tensor([[0, 0, 1, 1], [0, 0, 1, -1]])
    adv = appo_token_advantages(seg, ids, group_size=2, delta=0.1)
    logp = torch.full((2, 4), -1.0, dtype=F64, requires_grad=True)
    loss = clipped_surrogate(logp, logp.detach(), adv.advantages, adv.mask)
    loss.backward()
    assert ((logp.grad != 0) == adv.mask.bool()).all()
    # At ρ = 1: loss = −mean of kept advantages.
    kept = adv.advantages[adv.mask.bool()]
    assert loss.item() == pytest.approx(-kept.mean().item())


def test_adpo_formula_and_empty_masks():
    rc = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.3, 0.3]], dtype=F64, requires_grad=True)
    rr = torch.tensor([[-0.4, 0.2, 0.0], [0.1, 0.1, 0.1]], dtype=F64)
    mc = torch.tensor([[1, 0, 1], [0, 0, 0]])
    mr = torch.tensor([[1, 0, 0], [0, 0, 0]])
    out = adpo_loss(rc, rr, mc, mr, beta=0.5)
    x = 0.5 * ((0.5 + 0.1) - (-0.4))
    assert out[0].item() == pytest.approx(math.log1p(math.exp(-x)), abs=1e-12)
    assert out[1].item() == 0.0  # nothing kept on either side
    out.sum().backward()
    assert rc.grad[0, 1] == 0 and rc.grad[0, 0] < 0 and rc.grad[1].abs().sum() == 0


def test_ars_select_and_loss():
    idx, keep = ars_select(torch.tensor([[0.1, 0.9, 0.3], [0.2, 0.1, 0.0]]), threshold=0.5)
    assert idx.tolist() == [1, 0] and keep.tolist() == [True, False]
    assert ars_select(torch.tensor([[0.1, 0.9]]))[1].tolist() == [True]
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -2.0, 0.0]], dtype=F64)
    keep_m = torch.tensor([[1, 0, 1, 0]])
    resp = torch.tensor([[1, 1, 1, 0]])
    out = ars_loss(logp, ref, keep_m, resp, kl_coef=0.5)
    nll = (1.0 + 3.0) / 2
    d = [-0.5, 0.0, 1.0]  # ref − policy on response tokens
    kl = sum(math.exp(v) - v - 1 for v in d) / 3
    assert out.item() == pytest.approx(nll + 0.5 * kl, abs=1e-12)
    out.backward()
    assert logp.grad[0, 3] == 0  # outside the response
    assert logp.grad[0, 1] == 0  # not kept, and KL gradient vanishes where policy = ref


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_masked_losses_dtypes(dtype, tol):
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 8, generator=g, dtype=F64) * 3
    old = lp + torch.randn(3, 8, generator=g, dtype=F64) * 0.1
    ref_lp = lp + torch.randn(3, 8, generator=g, dtype=F64) * 0.2
    adv = torch.randn(3, 8, generator=g, dtype=F64)
    m1 = (torch.rand(3, 8, generator=g) > 0.4).long()
    m2 = (torch.rand(3, 8, generator=g) > 0.4).long()
    resp = torch.ones(3, 8, dtype=torch.long)
    cases = [
        (lambda a, b, c: clipped_surrogate(a, b, c, m1), (lp, old, adv)),
        (lambda a, b: adpo_loss(a, b, m1, m2, beta=0.5), (lp - ref_lp, old - ref_lp)),
        (lambda a, b: ars_loss(a, b, m1, resp), (lp, ref_lp)),
    ]
    for fn, args in cases:
        want = fn(*args)
        low = [x.to(dtype) for x in args]
        got = fn(*low)
        assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        torch.testing.assert_close(got.double(), fn(*[x.double() for x in low]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.double(), want, rtol=tol * 5, atol=tol * 5)
    # The trigger compares in the input's precision: bf16 rewards give the same states as
    # their float64 values.
    r = torch.randn(2, 16, generator=g).to(torch.bfloat16)
    assert torch.equal(schmitt_trigger_batch(r, 0.0, 0.25), schmitt_trigger_batch(r.double(), 0.0, 0.25))
