"""The loss family against formulas written out here (never by calling the function
under test again), TRL's formulas for DPO/IPO/SimPO, a hand-computed 2D-DPO example and
a per-example loop reference for the vectorized 2D-DPO."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.aspects import DEFAULT_WEIGHTS
from twodrl.losses import (
    RANK_GRID,
    clipped_surrogate,
    dpo_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    per_token_kl,
    preference_metrics,
    segment_sums,
    sequence_logps,
    sft_loss,
    simpo_loss,
    tdpo_loss,
    two_d_dpo_loss,
    two_d_dpo_ungrouped_loss,
)

F64 = torch.float64


def _softplus(x: float) -> float:
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _neg_logsig(x: float) -> float:  # −log σ(x)
    return _softplus(-x)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _logps(B: int = 6, seed: int = 0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [(-torch.rand(B, generator=g, dtype=F64) * 40 - 1).to(dtype) for _ in range(4)]


# --------------------------------------------------------------------------- DPO family


def test_dpo_matches_formula_and_trl():
    c, r, rc, rr = _logps()
    for beta, ls in ((0.1, 0.0), (0.2, 0.0), (0.5, 0.1)):
        out = dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=ls)
        assert out.shape == (6,)
        for i in range(6):
            h = (c[i].item() - rc[i].item()) - (r[i].item() - rr[i].item())
            # DPO paper: −log σ(β h); cDPO / TRL's label smoothing mixes in the flipped label.
            expected = (1 - ls) * _neg_logsig(beta * h) + ls * _neg_logsig(-beta * h)
            assert out[i].item() == pytest.approx(expected, abs=1e-12)
        # TRL (DPOTrainer, loss_type="sigmoid"):
        #   logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
        #   losses = -logsigmoid(beta*logits)*(1-ls) - logsigmoid(-beta*logits)*ls
        logits = (c - r) - (rc - rr)
        trl = -torch.nn.functional.logsigmoid(beta * logits) * (1 - ls) - torch.nn.functional.logsigmoid(-beta * logits) * ls
        torch.testing.assert_close(out, trl, rtol=0, atol=1e-12)


def test_ipo_matches_formula_and_trl():
    c, r, rc, rr = _logps(seed=1)
    c, r, rc, rr = c / 30, r / 30, rc / 30, rr / 30  # average log-probs, as IPO uses
    beta = 0.1
    out = ipo_loss(c, r, rc, rr, beta=beta)
    for i in range(6):
        h = (c[i].item() - rc[i].item()) - (r[i].item() - rr[i].item())
        assert out[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-12)
    # TRL (loss_type="ipo"): losses = (logits - 1/(2*beta))**2 with the same logits as DPO.
    logits = (c - r) - (rc - rr)
    torch.testing.assert_close(out, (logits - 1 / (2 * beta)) ** 2, rtol=0, atol=1e-12)


def test_simpo_matches_formula_and_trl():
    c, r, _, _ = _logps(seed=2)
    c, r = c / 25, r / 40  # average log-probs
    for beta, gamma, ls in ((2.0, 0.5, 0.0), (0.2, 0.5, 0.0), (2.5, 1.0, 0.1)):
        out = simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=ls)
        for i in range(6):
            m = beta * c[i].item() - beta * r[i].item() - gamma  # SimPO paper's margin
            expected = (1 - ls) * _neg_logsig(m) + ls * _neg_logsig(-m)
            assert out[i].item() == pytest.approx(expected, abs=1e-12)
        # TRL (CPOTrainer, loss_type="simpo"): gamma_logratios = simpo_gamma / beta;
        #   logits = (chosen - rejected) - gamma_logratios
        #   losses = -logsigmoid(beta*logits)*(1-ls) - logsigmoid(-beta*logits)*ls
        logits = (c - r) - gamma / beta
        trl = -torch.nn.functional.logsigmoid(beta * logits) * (1 - ls) - torch.nn.functional.logsigmoid(-beta * logits) * ls
        torch.testing.assert_close(out, trl, rtol=0, atol=1e-12)


def test_kto_paired_formula():
    c, r, rc, rr = _logps(seed=3)
    beta, wd, wu = 0.1, 1.0, 1.33
    kl = torch.tensor([0.5, 1.5, 2.5], dtype=F64)  # mismatched-pair log-ratios, mean 1.5
    out = kto_loss(c, r, rc, rr, beta=beta, desirable_weight=wd, undesirable_weight=wu, kl_logratios=kl)
    for i in range(6):
        lc = c[i].item() - rc[i].item()
        lr = r[i].item() - rr[i].item()
        expected = wd * (1 - _sig(beta * (lc - 1.5))) + wu * (1 - _sig(beta * (1.5 - lr)))
        assert out[i].item() == pytest.approx(expected, abs=1e-12)
    # Without mismatched pairs: z = mean of the batch's own log-ratios, clamped at 0.
    out2 = kto_loss(c, r, rc, rr, beta=beta)
    ratios = [c[i].item() - rc[i].item() for i in range(6)] + [r[i].item() - rr[i].item() for i in range(6)]
    z = max(0.0, sum(ratios) / len(ratios))
    for i in range(6):
        expected = (1 - _sig(beta * (ratios[i] - z))) + (1 - _sig(beta * (z - ratios[6 + i])))
        assert out2[i].item() == pytest.approx(expected, abs=1e-12)
    # A negative KL estimate is clamped to 0, and z carries no gradient.
    out3 = kto_loss(c, r, rc, rr, beta=beta, kl_logratios=torch.tensor([-5.0], dtype=F64))
    lc0 = c[0].item() - rc[0].item()
    lr0 = r[0].item() - rr[0].item()
    assert out3[0].item() == pytest.approx((1 - _sig(beta * lc0)) + (1 - _sig(-beta * lr0)), abs=1e-12)
    kl_t = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    kto_loss(c.clone().requires_grad_(True), r, rc, rr, kl_logratios=kl_t).sum().backward()
    assert kl_t.grad is None or torch.all(kl_t.grad == 0)


def test_orpo_formula():
    c = torch.tensor([-0.2, -1.1, -0.05, -3.0], dtype=F64)
    r = torch.tensor([-0.9, -0.8, -2.0, -3.5], dtype=F64)
    lam = 0.1
    out = orpo_loss(c, r, lam=lam)
    for i in range(4):
        pc, pr = math.exp(c[i].item()), math.exp(r[i].item())
        log_or = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        expected = -c[i].item() + lam * _neg_logsig(log_or)
        assert out[i].item() == pytest.approx(expected, abs=1e-10)


def test_log1mexp_both_branches():
    x = torch.tensor([-1e-8, -0.1, -0.69, -0.7, -5.0, -40.0], dtype=F64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-15)
    assert torch.isfinite(log1mexp(torch.zeros(1))).all()  # log p = 0 stays finite


def test_per_token_kl_against_explicit_sum():
    g = torch.Generator().manual_seed(4)
    B, T, V = 2, 3, 5
    pol = torch.randn(B, T, V, generator=g, dtype=F64)
    ref = torch.randn(B, T, V, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = per_token_kl(pol, ref, mask)
    for b in range(B):
        total = 0.0
        for t in range(T):
            if not mask[b, t]:
                continue
            zp = sum(math.exp(x) for x in pol[b, t].tolist())
            zq = sum(math.exp(x) for x in ref[b, t].tolist())
            for v in range(V):
                p = math.exp(pol[b, t, v].item()) / zp
                q = math.exp(ref[b, t, v].item()) / zq
                total += q * math.log(q / p)  # KL(π_ref ‖ π_θ)
        assert out[b].item() == pytest.approx(total, abs=1e-12)
    # Log-probs in, same answer; identical distributions give 0; per-token form sums to it.
    torch.testing.assert_close(per_token_kl(pol.log_softmax(-1), ref.log_softmax(-1), mask), out)
    assert per_token_kl(pol, pol, mask).abs().max() < 1e-12
    torch.testing.assert_close(per_token_kl(pol, ref, mask, reduction="none").sum(-1), out)


def test_tdpo_versions_and_stop_gradient():
    c, r, rc, rr = _logps(B=4, seed=5)
    kc = torch.tensor([0.3, 1.0, 0.0, 2.0], dtype=F64, requires_grad=True)
    kr = torch.tensor([0.1, 0.5, 1.5, 0.2], dtype=F64, requires_grad=True)
    beta, alpha = 0.1, 0.5
    t1 = tdpo_loss(c, r, rc, rr, kc, kr, beta=beta, version=1)
    t2 = tdpo_loss(c, r, rc, rr, kc, kr, beta=beta, alpha=alpha, version=2)
    for i in range(4):
        u = (c[i].item() - rc[i].item()) - (r[i].item() - rr[i].item())
        d = kr[i].item() - kc[i].item()
        assert t1[i].item() == pytest.approx(_neg_logsig(beta * (u - d)), abs=1e-12)
        assert t2[i].item() == pytest.approx(_neg_logsig(beta * (u - alpha * d)), abs=1e-12)
    t2.sum().backward()
    assert kc.grad is None or bool((kc.grad == 0).all())  # TDPO2 stops the gradient through the chosen KL
    assert torch.all(kr.grad != 0)
    kc.grad = None
    t1.sum().backward()
    assert torch.all(kc.grad != 0)
    with pytest.raises(ValueError, match="version"):
        tdpo_loss(c, r, rc, rr, kc, kr, version=3)


def test_clipped_surrogate_by_hand():
    logp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0, math.log(1.1)]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 4, dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = clipped_surrogate(logp, old, adv, mask, clip_eps=0.2)
    # ρ = 1.5, 0.5, 1.0, (masked). Terms: min(1.5, 1.2)=1.2; min(0.5, 0.8)=0.5; min(−2, −2)=−2.
    assert out.item() == pytest.approx(-(1.2 + 0.5 - 2.0) / 3, abs=1e-12)
    out.backward()
    # Clipped term (ρ=1.5, A>0) and masked token have no gradient; the others dρ/dlogp·A = ρA.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 3, 2.0 / 3, 0.0]], dtype=F64))
    empty = clipped_surrogate(logp, old, adv, torch.zeros(1, 4))
    assert empty.item() == 0.0


def test_sft_and_sequence_helpers():
    tok = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(sequence_logps(tok, mask), torch.tensor([-6.0, -1.0]))
    torch.testing.assert_close(sequence_logps(tok, mask, average=True), torch.tensor([-2.0, -0.5]))
    torch.testing.assert_close(sft_loss(torch.tensor([-6.0, -1.0]), torch.tensor([3, 2])), torch.tensor([2.0, 0.5]))
    assert sft_loss(torch.tensor([0.0]), torch.tensor([0])).item() == 0.0


def test_segment_sums_loop_and_gradient():
    g = torch.Generator().manual_seed(6)
    v = torch.randn(3, 10, generator=g, dtype=F64, requires_grad=True)
    ids = torch.randint(-1, 4, (3, 10), generator=g)
    out = segment_sums(v, ids, 4)
    for b in range(3):
        for s in range(4):
            expected = sum(v[b, t].item() for t in range(10) if ids[b, t] == s)
            assert out[b, s].item() == pytest.approx(expected, abs=1e-12)
    out.sum().backward()
    torch.testing.assert_close(v.grad, (ids >= 0).to(F64))
    # Off-response values never leak, even NaN.
    v2 = torch.where(ids >= 0, v.detach(), torch.full_like(v, float("nan")))
    assert torch.isfinite(segment_sums(v2, ids, 4)).all()


def test_preference_metrics_names_and_values():
    m = preference_metrics(
        torch.tensor([1.0, 0.5, -0.2]), torch.tensor([0.0, 1.0, -0.4]),
        torch.tensor([-10.0, -20.0, -30.0]), torch.tensor([-12.0, -22.0, -38.0]),
    )
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected"}
    assert m["rewards/chosen"] == pytest.approx(1.3 / 3)
    assert m["rewards/margins"] == pytest.approx((1.0 - 0.5 + 0.2) / 3)
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)
    assert m["logps/rejected"] == pytest.approx(-24.0)


# --------------------------------------------------------------------------- 2D-DPO


def _hand_example(dtype=F64):
    # One pair, two aspects with weights (0.5, 0.5); g = 0.5(s1/4+1) + 0.5(s2/4+1).
    # chosen: 2 prompt tokens, then segments 0 | 1 | 2, then 1 pad.
    #   seg0 ratios 0.1, 0.2     → R=0.3,  scores (4,4) → g=2.0
    #   seg1 ratio −0.4          → R=−0.4, scores (0,0) → g=1.0
    #   seg2 ratios 0.5, 0.5, 0  → R=1.0,  scores (4,0) → g=1.5
    # rejected: 1 prompt token, segments 0 | 1, 2 pads (a different T than chosen).
    #   seg0 ratio 0.2           → R=0.2,  scores (2,2) → g=1.5
    #   seg1 ratios −0.1, −0.3   → R=−0.4, scores (0,4) → g=1.5  (ties with seg0)
    lr_c = torch.tensor([[0, 0, 0.1, 0.2, -0.4, 0.5, 0.5, 0.0, 0]], dtype=dtype)
    ids_c = torch.tensor([[-1, -1, 0, 0, 1, 2, 2, 2, -1]])
    lr_r = torch.tensor([[0, 0.2, -0.1, -0.3, 0, 0]], dtype=dtype)
    ids_r = torch.tensor([[-1, 0, 1, 1, -1, -1]])
    sc = torch.tensor([[[4, 4], [0, 0], [4, 0]]], dtype=dtype)
    sr = torch.tensor([[[2, 2], [0, 4], [float("nan"), float("nan")]]], dtype=dtype)  # row 2 unused
    return lr_c, lr_r, ids_c, ids_r, sc, sr


def test_two_d_dpo_hand_computed():
    # N = min(3, 2) = 2. Chosen by g descending: seg0 (2.0), seg2 (1.5). Rejected by g
    # ascending: seg0 (1.5), seg1 (1.5) — a tie, kept in segment order.
    # β_c = 0.2 / mean(2.0, 1.5) = 0.2/1.75;  β_r = 0.2 / mean(1.5, 1.5) = 0.2/1.5.
    # pair 0: β_c·2.0·0.3 − β_r·1.5·0.2    = 0.0685714 − 0.04 = 1/35   = 0.0285714
    # pair 1: β_c·1.5·1.0 − β_r·1.5·(−0.4) = 0.1714286 + 0.08 = 8.8/35 = 0.2514286
    # loss = log(1 + e^{−1/35}) + log(1 + e^{−8.8/35}) = 0.6789635 + 0.5753142 = 1.2542777
    out = two_d_dpo_loss(*_hand_example(), weights=[0.5, 0.5], beta=0.2)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(1.2542777125, abs=1e-9)
    # Swapping the tie order would give log(1+e^{-(0.0685714+0.08)}) + log(1+e^{-(0.1714286-0.04)})
    # = 1.2512086: a different number, so this also pins the tie rule.
    assert abs(out.item() - 1.2512086423) > 1e-3


def test_two_d_dpo_hand_gradient_lands_on_selected_segments():
    lr_c, lr_r, ids_c, ids_r, sc, sr = _hand_example()
    lr_c.requires_grad_(True)
    lr_r.requires_grad_(True)
    two_d_dpo_loss(lr_c, lr_r, ids_c, ids_r, sc, sr, weights=[0.5, 0.5]).sum().backward()
    gc = lr_c.grad[0]
    # Chosen seg1 (not selected), prompt and padding get nothing; tokens of one segment
    # share one gradient (the loss sees only the segment sum), negative (push up).
    assert gc[[0, 1, 4, 8]].abs().max() == 0
    assert gc[2] == gc[3] and gc[5] == gc[6] == gc[7]
    assert gc[2] < 0 and gc[5] < 0
    # d/dR_c,0 = −σ(−l0)·β_c·g = −σ(−1/35)·(0.2/1.75)·2.0
    assert gc[2].item() == pytest.approx(-_sig(-1 / 35) * 0.2 / 1.75 * 2.0, abs=1e-12)
    assert (lr_r.grad[0, 1:4] > 0).all() and lr_r.grad[0, [0, 4, 5]].abs().max() == 0


def _random_pairs(B, T, S_max, A, seed, dtype=F64, zero_rows=(), few_levels=False):
    rng = random.Random(seed)

    def side():
        ids = torch.full((B, T), -1, dtype=torch.long)
        ratios = torch.zeros(B, T, dtype=F64)
        counts = []
        for b in range(B):
            S = 0 if b in zero_rows and rng.random() < 0.5 else rng.randint(1, S_max)
            start = rng.randint(0, 5)
            pos = start
            for k in range(S):
                length = rng.randint(1, max(1, (T - start) // max(S, 1)))
                ids[b, pos: pos + length] = k
                pos += length
            counts.append(S)
            ratios[b] = torch.tensor([rng.gauss(0, 0.5) for _ in range(T)], dtype=F64)
        ratios = torch.where(ids >= 0, ratios, torch.zeros((), dtype=F64))
        levels = [0, 4] if few_levels else [0, 1, 2, 3, 4]
        scores = torch.tensor([[[rng.choice(levels) for _ in range(A)] for _ in range(S_max)] for _ in range(B)],
                              dtype=F64)
        for b, S in enumerate(counts):
            scores[b, S:] = float("nan")
        return ratios.to(dtype), ids, scores.to(dtype)

    lr_c, ids_c, sc = side()
    lr_r, ids_r, sr = side()
    return lr_c, lr_r, ids_c, ids_r, sc, sr


def _loop_reference(lr_c, lr_r, ids_c, ids_r, sc, sr, weights, beta, grouped=True):
    """Per-example, per-segment Python loop over plain floats."""
    out = []
    for b in range(lr_c.shape[0]):
        sides = []
        for lr, ids, sco in ((lr_c, ids_c, sc), (lr_r, ids_r, sr)):
            S = int(ids[b].max().item()) + 1 if (ids[b] >= 0).any() else 0
            R = [sum(x for x, i in zip(lr[b].tolist(), ids[b].tolist()) if i == k) for k in range(S)]
            g = [sum(w * (s / 4 + 1) for w, s in zip(weights, sco[b, k].tolist())) for k in range(S)]
            sides.append((R, g))
        (Rc, gc), (Rr, gr) = sides
        N = min(len(Rc), len(Rr))
        if N == 0:
            out.append(0.0)
            continue
        if not grouped:
            bc = beta / (sum(gc) / len(gc))
            br = beta / (sum(gr) / len(gr))
            x = bc * sum(a * b_ for a, b_ in zip(gc, Rc)) - br * sum(a * b_ for a, b_ in zip(gr, Rr))
            out.append(_neg_logsig(x))
            continue
        # Python's sort is stable: ties keep segment order.
        top_c = sorted(range(len(gc)), key=lambda k: -round(gc[k] / RANK_GRID))[:N]
        low_r = sorted(range(len(gr)), key=lambda k: round(gr[k] / RANK_GRID))[:N]
        bc = beta / (sum(gc[k] for k in top_c) / N)
        br = beta / (sum(gr[k] for k in low_r) / N)
        out.append(sum(_neg_logsig(bc * gc[i] * Rc[i] - br * gr[j] * Rr[j]) for i, j in zip(top_c, low_r)))
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("seed", range(6))
def test_two_d_dpo_vectorized_equals_loop(seed):
    # Default (non-dyadic) weights: equal-in-exact-arithmetic mixes must still tie; few
    # rating levels make ties frequent; some responses have no segment at all.
    batch = _random_pairs(B=7, T=48, S_max=9, A=5, seed=seed, zero_rows=(1, 4), few_levels=seed % 2 == 0)
    w = list(DEFAULT_WEIGHTS)
    for beta in (0.2, 0.1):
        got = two_d_dpo_loss(*batch, weights=w, beta=beta)
        ref = _loop_reference(*batch, w, beta)
        assert (got - ref).abs().max().item() <= 1e-6 * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)
        got_u = two_d_dpo_ungrouped_loss(*batch, weights=w, beta=beta)
        torch.testing.assert_close(got_u, _loop_reference(*batch, w, beta, grouped=False), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float64, 1e-12)])
def test_two_d_dpo_dtypes(dtype, tol):
    batch64 = _random_pairs(B=5, T=40, S_max=6, A=5, seed=11)
    ref = two_d_dpo_loss(*batch64, weights=list(DEFAULT_WEIGHTS))
    lr_c, lr_r, ids_c, ids_r, sc, sr = batch64
    lr_c = lr_c.to(dtype).requires_grad_(True)
    got = two_d_dpo_loss(lr_c, lr_r.to(dtype), ids_c, ids_r, sc.to(dtype), sr.to(dtype), weights=list(DEFAULT_WEIGHTS))
    assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    # bfloat16 inputs are rounded to 8 bits of mantissa, hence the looser tolerance.
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    got.sum().backward()
    assert lr_c.grad.dtype == dtype and torch.isfinite(lr_c.grad.float()).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_sequence_losses_dtypes(dtype, tol):
    c, r, rc, rr = _logps(seed=7)
    avg_c, avg_r = c / 30, r / 30
    kl_c, kl_r = torch.rand(6, dtype=F64), torch.rand(6, dtype=F64)
    cases = [
        (dpo_loss, (c, r, rc, rr)),
        (ipo_loss, (avg_c, avg_r, rc / 30, rr / 30)),
        (kto_loss, (c, r, rc, rr)),
        (orpo_loss, (avg_c, avg_r)),
        (simpo_loss, (avg_c, avg_r)),
        (tdpo_loss, (c, r, rc, rr, kl_c, kl_r)),
    ]
    for fn, args in cases:
        ref = fn(*args)
        low = [a.to(dtype) for a in args]
        got = fn(*low)
        # The low-precision inputs are the reference's inputs rounded; compare with the
        # float64 loss of those rounded inputs (tight) and of the originals (loose).
        torch.testing.assert_close(got.double(), fn(*[a.double() for a in low]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.double(), ref, rtol=tol * 10, atol=tol * 10)


def test_two_d_dpo_zero_segments_nan_rows_and_errors():
    lr_c, lr_r, ids_c, ids_r, sc, sr = _hand_example()
    lr_c2 = torch.cat([lr_c, lr_c]).requires_grad_(True)
    ids_c2 = torch.cat([ids_c, torch.full_like(ids_c, -1)])  # second chosen: no segment
    out = two_d_dpo_loss(lr_c2, torch.cat([lr_r, lr_r]), ids_c2, torch.cat([ids_r, ids_r]),
                         torch.cat([sc, torch.full_like(sc, float("nan"))]), torch.cat([sr, sr]), weights=[0.5, 0.5])
    assert out[1].item() == 0.0 and torch.isfinite(out).all()
    out.sum().backward()
    assert lr_c2.grad[1].abs().max() == 0 and torch.isfinite(lr_c2.grad).all()
    u = two_d_dpo_ungrouped_loss(lr_c2, torch.cat([lr_r, lr_r]), ids_c2, torch.cat([ids_r, ids_r]),
                                 torch.cat([sc, sc]), torch.cat([sr, sr]), weights=[0.5, 0.5])
    assert u[1].item() == 0.0
    with pytest.raises(ValueError, match=r"chosen_segments\[0\] has segment id 2 but chosen_scores has only 2 rows"):
        two_d_dpo_loss(lr_c, lr_r, ids_c, ids_r, sc[:, :2], sr, weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="3 weights for 2 aspects"):
        two_d_dpo_loss(lr_c, lr_r, ids_c, ids_r, sc, sr, weights=[0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="rejected_segments"):
        two_d_dpo_loss(lr_c, lr_r, ids_c, ids_r[:, :3], sc, sr, weights=[0.5, 0.5])


@settings(max_examples=40, deadline=None)
@given(
    rc=st.floats(-5, 5), rr=st.floats(-5, 5), level=st.integers(0, 4), beta=st.floats(0.01, 1.0),
    len_c=st.integers(1, 6), len_r=st.integers(1, 6),
)
def test_two_d_dpo_single_segment_uniform_scores_is_dpo(rc, rr, level, beta, len_c, len_r):
    # One segment per response with equal ratings: β equalisation cancels g, so the
    # grouped and ungrouped 2D-DPO both reduce to DPO on the summed log-ratios.
    T = 6
    lr_c = torch.zeros(1, T, dtype=F64)
    lr_c[0, :len_c] = rc / len_c
    lr_r = torch.zeros(1, T, dtype=F64)
    lr_r[0, :len_r] = rr / len_r
    ids_c = torch.tensor([[0] * len_c + [-1] * (T - len_c)])
    ids_r = torch.tensor([[0] * len_r + [-1] * (T - len_r)])
    scores = torch.full((1, 1, 5), float(level), dtype=F64)
    args = (lr_c, lr_r, ids_c, ids_r, scores, scores.clone())
    expected = _neg_logsig(beta * (lr_c.sum().item() - lr_r.sum().item()))
    assert two_d_dpo_loss(*args, weights=list(DEFAULT_WEIGHTS), beta=beta).item() == pytest.approx(expected, abs=1e-9)
    assert two_d_dpo_ungrouped_loss(*args, weights=list(DEFAULT_WEIGHTS), beta=beta).item() == pytest.approx(
        expected, abs=1e-9
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), B=st.integers(1, 5), T=st.integers(4, 40), S_max=st.integers(1, 7),
       levels=st.booleans(), beta=st.floats(0.05, 1.0))
def test_two_d_dpo_vectorized_equals_loop_property(seed, B, T, S_max, levels, beta):
    batch = _random_pairs(B=B, T=T, S_max=min(S_max, T - 5) if T > 5 else 1, A=5, seed=seed,
                          zero_rows=(0,), few_levels=levels)
    w = list(DEFAULT_WEIGHTS)
    torch.testing.assert_close(two_d_dpo_loss(*batch, weights=w, beta=beta), _loop_reference(*batch, w, beta),
                               rtol=1e-12, atol=1e-10)


def test_two_d_dpo_gradcheck():
    lr_c, lr_r, ids_c, ids_r, sc, sr = _random_pairs(B=3, T=12, S_max=4, A=5, seed=21)
    lr_c.requires_grad_(True)
    lr_r.requires_grad_(True)
    w = list(DEFAULT_WEIGHTS)
    assert torch.autograd.gradcheck(
        lambda a, b: two_d_dpo_loss(a, b, ids_c, ids_r, sc, sr, weights=w), (lr_c, lr_r)
    )
    assert torch.autograd.gradcheck(
        lambda a, b: two_d_dpo_ungrouped_loss(a, b, ids_c, ids_r, sc, sr, weights=w), (lr_c, lr_r)
    )
