"""The preference-loss family: DPO, 2D-DPO (grouped Eq. 6 and ungrouped Eq. 5), IPO,
KTO, ORPO, SimPO, TDPO1/2, the PPO clipped surrogate, an SFT term, and TRL-named metrics.

Conventions shared by every loss here:

* Per-example outputs (``Tensor[B]``), like TRL's ``*_loss`` functions before their
  ``.mean()``; the learner averages (and adds ``sft_coef * sft_loss(chosen)`` for every
  method except ORPO, whose NLL term is already inside :func:`orpo_loss`; the 2D-DPO
  paper uses ``sft_coef = 0.1`` for all other methods).
* ``*_logps`` are sequence log-probabilities summed over response tokens unless the name
  says ``avg`` (per-token average, as IPO/ORPO/SimPO are defined).
* 16-bit inputs are upcast: the loss is computed and returned in float32, because sums
  of hundreds of bfloat16 log-ratios and ``logsigmoid`` of small margins lose most of
  their digits otherwise. float32 and float64 inputs keep their dtype. Gradients flow
  back through the cast to the 16-bit tensors.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _f(x: Tensor | float) -> Tensor:
    """As a floating tensor in the compute dtype (16-bit → float32)."""
    x = torch.as_tensor(x)
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if not x.is_floating_point():
        return x.to(torch.get_default_dtype())
    return x


def _bt(logits: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Bradley–Terry negative log-likelihood, with the conservative (cDPO) label noise."""
    if label_smoothing == 0.0:
        return -F.logsigmoid(logits)
    return -F.logsigmoid(logits) * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {k: tuple(torch.as_tensor(v).shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


# --------------------------------------------------------------------------- helpers


def sequence_logps(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or per-token mean) of ``[B, T]`` token log-probs over ``mask`` → ``[B]``."""
    lp = _f(token_logps)
    m = mask.to(lp.dtype)
    total = (lp * m).sum(-1)
    if average:
        return total / m.sum(-1).clamp(min=1.0)
    return total


def sft_loss(logps_sum: Tensor, num_tokens: Tensor) -> Tensor:
    """Per-example token-averaged NLL of a response: ``−logps_sum / max(num_tokens, 1)``.

    The learner adds ``learner.sft_coef * sft_loss(chosen)`` (0.1 in the 2D-DPO paper for
    every method except ORPO, which has its own NLL term).
    """
    lp = _f(logps_sum)
    n = torch.as_tensor(num_tokens, device=lp.device).to(lp.dtype).clamp(min=1.0)
    return -lp / n


def segment_sums(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """``out[b, s] = Σ_t values[b, t] · [segment_ids[b, t] == s]`` → ``[B, num_segments]``.

    Tokens with a negative id (prompt, padding) go to a spare column that is dropped, so
    their values never reach the result (they may even be NaN). One ``scatter_add`` over
    the whole batch; differentiable w.r.t. ``values``.
    """
    if values.shape != segment_ids.shape or values.dim() != 2:
        raise ValueError(
            f"segment_sums: values {tuple(values.shape)} and segment_ids {tuple(segment_ids.shape)} "
            "must both be [B, T]"
        )
    B = values.shape[0]
    ids = torch.where(segment_ids >= 0, segment_ids, num_segments).long()
    out = values.new_zeros(B, num_segments + 1).scatter_add(1, ids, values)
    return out[:, :num_segments]


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate on both sides of ``−log 2``.

    ``x`` is clamped just below 0 so that a (rounded) log-probability of exactly 0 gives a
    large finite value instead of −inf.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# --------------------------------------------------------------------------- DPO family


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO (sigmoid loss): ``−log σ(β[(π_c − ref_c) − (π_r − ref_r)])`` per example.

    ``label_smoothing`` > 0 gives conservative DPO (the label is flipped with that
    probability), as TRL's ``label_smoothing``.
    """
    _check_same_shape(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    logits = (_f(chosen_logps) - _f(ref_chosen_logps)) - (_f(rejected_logps) - _f(ref_rejected_logps))
    return _bt(beta * logits, label_smoothing)


def ipo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """IPO: ``(h − 1/(2β))²`` with ``h = (π_c − ref_c) − (π_r − ref_r)`` per example.

    β is IPO's τ (regularisation). As in TRL, IPO is meant for per-token *average* log
    probabilities (the learner passes ``sequence_logps(..., average=True)``); the formula
    itself does not care.
    """
    _check_same_shape(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    h = (_f(chosen_logps) - _f(ref_chosen_logps)) - (_f(rejected_logps) - _f(ref_rejected_logps))
    return (h - 1.0 / (2.0 * beta)) ** 2


def kto_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl_logratios: Optional[Tensor] = None,
) -> Tensor:
    """KTO in paired-batch form: each pair gives one desirable and one undesirable example.

    Per example ``λ_D (1 − σ(β(r_c − z))) + λ_U (1 − σ(β(z − r_r)))`` where
    ``r = log π − log π_ref`` of the sequence and ``z`` is the reference point, an estimate
    of KL(π‖π_ref) that is *detached* and clamped at 0 (KTO paper; TRL does the same).

    ``kl_logratios``: sequence log-ratios ``log π(y'|x) − log π_ref(y'|x)`` of *mismatched*
    pairs (the completion of another example in the batch, as TRL builds its KL dataset);
    ``z`` is their mean. When omitted, ``z`` is estimated from this batch's own chosen and
    rejected log-ratios (their mean): cheaper (no extra forward pass) but biased once
    training separates chosen from rejected, so the learner passes mismatched pairs when
    it can.
    """
    _check_same_shape(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    rc = _f(chosen_logps) - _f(ref_chosen_logps)
    rr = _f(rejected_logps) - _f(ref_rejected_logps)
    with torch.no_grad():
        if kl_logratios is None:
            z = torch.cat([rc.reshape(-1), rr.reshape(-1)]).mean()
        else:
            z = _f(kl_logratios).to(rc.device).mean()
        z = z.clamp(min=0.0)
    chosen = 1.0 - torch.sigmoid(beta * (rc - z))
    rejected = 1.0 - torch.sigmoid(beta * (z - rr))
    return desirable_weight * chosen + undesirable_weight * rejected


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, lam: float = 0.1) -> Tensor:
    """ORPO per example: ``NLL(chosen) − λ · log σ(log odds_c − log odds_r)``.

    Inputs are per-token *average* log-probs (ORPO's odds are of the length-normalised
    likelihood); ``odds(p) = p / (1 − p)``, so ``log odds = a − log(1 − e^a)``. The NLL term
    is the chosen response's average token NLL (TRL averages over all tokens of the batch
    instead; with equal lengths the two agree). No reference model, no extra SFT term.
    """
    _check_same_shape(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    c, r = _f(chosen_avg_logps), _f(rejected_avg_logps)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return -c - lam * F.logsigmoid(log_odds)


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO: ``−log σ(β·avg_c − β·avg_r − γ)`` per example (reference-free, length-
    normalised; γ is the target reward margin, 0.5 in the 2D-DPO comparison). Inputs are
    per-token average log-probs."""
    _check_same_shape(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    logits = beta * (_f(chosen_avg_logps) - _f(rejected_avg_logps)) - gamma
    return _bt(logits, label_smoothing)


def per_token_kl(
    policy_logits: Tensor,
    ref_logits: Tensor,
    mask: Tensor,
    reduction: Literal["sum", "none"] = "sum",
) -> Tensor:
    """Sequential KL used by TDPO: ``Σ_t m_t · KL(π_ref(·|y<t) ‖ π_θ(·|y<t))``.

    ``policy_logits``, ``ref_logits``: ``[B, T, V]`` logits or log-probs (a log-softmax is
    applied, which leaves log-probs unchanged), aligned with ``mask [B, T]`` (1 on response
    tokens). Computed in float32 at least. ``reduction="none"`` returns the masked
    per-token KL ``[B, T]``, ``"sum"`` (default) the per-sequence sum ``[B]``.
    """
    if policy_logits.shape != ref_logits.shape or policy_logits.dim() != 3:
        raise ValueError(
            f"per_token_kl: policy {tuple(policy_logits.shape)} and ref {tuple(ref_logits.shape)} "
            "must both be [B, T, V]"
        )
    p = torch.log_softmax(_f(policy_logits), dim=-1)
    q = torch.log_softmax(_f(ref_logits), dim=-1)
    kl = (q.exp() * (q - p)).sum(-1) * mask.to(p.dtype)
    return kl if reduction == "none" else kl.sum(-1)


def tdpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_seq_kl: Tensor,
    rejected_seq_kl: Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    version: Literal[1, 2] = 2,
) -> Tensor:
    """Token-level DPO. With ``u = (π_c − ref_c) − (π_r − ref_r)`` and the sequential KLs
    ``D_c, D_r`` from :func:`per_token_kl` (KL(π_ref‖π_θ) summed over each response):

    * TDPO1: ``−log σ(β(u − (D_r − D_c)))``
    * TDPO2: ``−log σ(β(u − α(D_r − sg(D_c))))`` (the chosen KL is detached; α = 0.5 in
      the 2D-DPO comparison).
    """
    _check_same_shape(chosen_logps=chosen_logps, chosen_seq_kl=chosen_seq_kl, rejected_seq_kl=rejected_seq_kl)
    u = (_f(chosen_logps) - _f(ref_chosen_logps)) - (_f(rejected_logps) - _f(ref_rejected_logps))
    kc, kr = _f(chosen_seq_kl), _f(rejected_seq_kl)
    if version == 1:
        delta = kr - kc
    elif version == 2:
        delta = alpha * (kr - kc.detach())
    else:
        raise ValueError(f"tdpo_loss: version must be 1 or 2, got {version!r}")
    return -F.logsigmoid(beta * (u - delta))


# --------------------------------------------------------------------------- 2D-DPO


# Segments are ranked by g rounded to this grid, so that rating mixes that are equal in
# exact arithmetic (0.3·4 = 0.4·3 with the default weights) tie whatever the order of the
# floating-point operations that produced them; ties then keep segment order.
RANK_GRID = 1e-9


class _Segmented(NamedTuple):
    R: Tensor  # [2B, S] per-segment log-ratio sums (chosen rows first, then rejected)
    g: Tensor  # [2B, S] float64 weighted normalised segment scores, 0 past each count
    n: Tensor  # [2B] segment count of each response
    invalid: Tensor  # [2B, S] bool, k ≥ n (no such segment)
    arange: Tensor  # [S]
    B: int
    dtype: torch.dtype  # the loss dtype


@functools.lru_cache(maxsize=32)
def _weight_terms(weights: tuple[float, ...], device: torch.device) -> tuple[Tensor, float]:
    """``(w/4 as float64 [A], Σw)``; cached because it runs every step with the same weights
    (a list of Python floats must not pass through float32: 0.3 would lose digits)."""
    with torch.inference_mode(False):  # a cached tensor must not become an inference tensor
        w = torch.tensor(weights, dtype=torch.float64, device=device) * 0.25
    return w, math.fsum(weights)


@functools.lru_cache(maxsize=64)
def _pair_constants(B: int, S: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``arange(S)`` and the per-row sort-key scale of the stacked [chosen; rejected]
    rows: −1/RANK_GRID (descending) for chosen, +1/RANK_GRID (ascending) for rejected."""
    with torch.inference_mode(False):
        sign = torch.full((2 * B, 1), 1.0 / RANK_GRID, dtype=torch.float64, device=device)
        sign[:B] = -1.0 / RANK_GRID
        return torch.arange(S, device=device), sign


def _segment_inputs(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_segments: Tensor,
    rejected_segments: Tensor,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    weights: Sequence[float] | Tensor,
) -> _Segmented:
    """Validate and reduce both sides into one ``[2B, S]`` stack so that every later op
    runs once for chosen and rejected together.

    Cost is dominated by one scatter_add per side over ``[B, T]``; everything after works
    on ``[2B, S_max]``. The only host sync is one ``tolist`` of the 2B segment counts,
    used for the bounds check.
    """
    for name, t in (("chosen_logratios", chosen_logratios), ("rejected_logratios", rejected_logratios)):
        if t.dim() != 2:
            raise ValueError(f"two_d_dpo_loss: {name} must be [B, T], got {tuple(t.shape)}")
    for side, lr, ids in (("chosen", chosen_logratios, chosen_segments), ("rejected", rejected_logratios, rejected_segments)):
        if ids.shape != lr.shape:
            raise ValueError(
                f"two_d_dpo_loss: {side}_segments {tuple(ids.shape)} must match {side}_logratios {tuple(lr.shape)}"
            )
        if ids.is_floating_point():
            raise ValueError(f"two_d_dpo_loss: {side}_segments must be an integer tensor, got {ids.dtype}")
    B = chosen_logratios.shape[0]
    if rejected_logratios.shape[0] != B or chosen_scores.shape[0] != B or rejected_scores.shape[0] != B:
        raise ValueError(
            f"two_d_dpo_loss: batch sizes differ: chosen_logratios {B}, rejected_logratios "
            f"{rejected_logratios.shape[0]}, chosen_scores {chosen_scores.shape[0]}, "
            f"rejected_scores {rejected_scores.shape[0]}"
        )
    if chosen_scores.dim() != 3 or rejected_scores.dim() != 3 or chosen_scores.shape[2] != rejected_scores.shape[2]:
        raise ValueError(
            f"two_d_dpo_loss: scores must be [B, S_max, A] with the same A, got chosen "
            f"{tuple(chosen_scores.shape)} and rejected {tuple(rejected_scores.shape)}"
        )
    A = chosen_scores.shape[2]
    w_tuple = tuple(float(x) for x in (weights.tolist() if torch.is_tensor(weights) else weights))
    if len(w_tuple) != A:
        raise ValueError(f"two_d_dpo_loss: {len(w_tuple)} weights for {A} aspects in the scores")

    lr_c, lr_r = _f(chosen_logratios), _f(rejected_logratios)
    dtype = torch.promote_types(lr_c.dtype, lr_r.dtype)
    device = lr_c.device
    S_c, S_r = chosen_scores.shape[1], rejected_scores.shape[1]
    S = max(S_c, S_r)

    # Segment sums: column 0 of each row collects the off-response tokens (id −1 → 0)
    # and is dropped; each side scatters into its half of one buffer (no [2B, T] copy).
    ids_c = chosen_segments + 1
    ids_r = rejected_segments + 1
    if ids_c.dtype != torch.long:
        ids_c, ids_r = ids_c.long(), ids_r.long()
    elif ids_r.dtype != torch.long:
        ids_r = ids_r.long()
    buf = torch.zeros(2 * B, S + 1, dtype=dtype, device=device)
    if lr_c.dtype != dtype:
        lr_c = lr_c.to(dtype)
    if lr_r.dtype != dtype:
        lr_r = lr_r.to(dtype)
    if ids_c.shape[1]:
        buf[:B].scatter_add_(1, ids_c, lr_c)
    if ids_r.shape[1]:
        buf[B:].scatter_add_(1, ids_r, lr_r)
    R = buf[:, 1:]

    # Segment count = max id + 1 (ids are contiguous from 0); empty rows count 0.
    if ids_c.shape[1] and ids_r.shape[1]:
        n = torch.cat([ids_c.amax(1), ids_r.amax(1)])
    else:
        zero = torch.zeros(B, dtype=torch.long, device=device)
        n = torch.cat([ids_c.amax(1) if ids_c.shape[1] else zero, ids_r.amax(1) if ids_r.shape[1] else zero])
    counts = n.tolist()  # the one host sync: bounds check with a readable error
    for side, rows, cap in (("chosen", counts[:B], S_c), ("rejected", counts[B:], S_r)):
        worst = max(rows, default=0)
        if worst > cap:
            b = rows.index(worst)
            raise ValueError(
                f"two_d_dpo_loss: {side}_segments[{b}] has segment id {worst - 1} but "
                f"{side}_scores has only {cap} rows (S_max)"
            )

    sc, sr = chosen_scores, rejected_scores
    if S_c != S:
        sc = F.pad(sc.to(torch.float64), (0, 0, 0, S - S_c))
    if S_r != S:
        sr = F.pad(sr.to(torch.float64), (0, 0, 0, S - S_r))
    scores = torch.cat([sc, sr])
    if scores.dtype != torch.float64 or scores.device != device:
        scores = scores.to(device=device, dtype=torch.float64)
    arange, _ = _pair_constants(B, S, device)
    invalid = arange >= n[:, None]
    # g = Σ_a w_a (s_a/4 + 1) = s·(w/4) + Σ w: ratings 0..4 → 1..2, then the weighted
    # aspect mix. Computed in float64 (the tensor is tiny) so that the ranking does not
    # depend on the loss dtype; rows past the count (possibly NaN) become 0.
    w_quarter, w_sum = _weight_terms(w_tuple, device)
    g64 = (scores @ w_quarter).add_(w_sum).masked_fill_(invalid, 0.0)  # fresh, no grad: in place
    return _Segmented(R, g64, n, invalid, arange, B, dtype)


def two_d_dpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_segments: Tensor,
    rejected_segments: Tensor,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    weights: Sequence[float] | Tensor,
    beta: float = 0.2,
) -> Tensor:
    """2D-DPO, grouped form (paper Eq. 6 with its Appendix B.3 semantics), per example.

    Shapes: ``*_logratios [B, T]`` token ``log π_θ − log π_ref`` (0 off the response);
    ``*_segments [B, T]`` segment id 0..S−1 per response token, −1 elsewhere (ids
    contiguous from 0; chosen and rejected may have different T); ``*_scores [B, S_max, A]``
    raw 0–4 ratings (rows ≥ S ignored, may be NaN); ``weights``: A aspect weights.

    For each example, with ``g_k = Σ_a w_a (s_{k,a}/4 + 1)`` and ``R_k`` the sum of the
    log-ratios of segment k:

    1. ``N = min(S_c, S_r)``; the N chosen segments with the highest g (descending) are
       paired in order with the N rejected segments with the lowest g (ascending). g is
       ranked after rounding to ``RANK_GRID`` (1e-9) and ties keep segment order, so the
       pairing is deterministic and independent of float rounding.
    2. β is equalised per example and side: ``β_c = β / mean(g_c of the selected)``, same
       for rejected, so the average effective β is the configured one.
    3. loss = ``Σ_{i<N} −log σ(β_c g_c,i R_c,i − β_r g_r,i R_r,i)``.

    An example whose chosen or rejected response has no segment (N = 0) has loss 0 and no
    gradient (the reference code skips it). Fully vectorized: one scatter_add per side
    for all segment sums, one sort of the ``[2B, S_max]`` keys, gathers; no Python loop.
    (The paper's code finds segments as runs of equal token scores, which merges adjacent
    segments with identical ratings; segment ids here keep them apart.)
    """
    R, g64, n, invalid, arange, B, dtype = _segment_inputs(
        chosen_logratios, rejected_logratios, chosen_segments, rejected_segments,
        chosen_scores, rejected_scores, weights,
    )
    # One ascending sort ranks both sides. Key = (g on the RANK_GRID, negated for chosen
    # so that it sorts descending) · S + segment index: every real key is distinct and
    # ties resolve to segment order whatever the sort algorithm (exact in float64 while
    # 2e9·S < 2^53). Rows past the count get +inf and sort last.
    S = arange.shape[0]
    _, sign = _pair_constants(B, S, g64.device)
    key = torch.add(arange, torch.round(g64 * sign).masked_fill_(invalid, math.inf), alpha=S)
    order = torch.sort(key, dim=1).indices
    N = torch.minimum(n[:B], n[B:])  # N = min(S_c, S_r)
    N2 = torch.cat([N, N])[:, None]  # once per side
    pair = arange < N2  # the first N sorted rows of each side
    g_sel = g64.gather(1, order) * pair
    if dtype != torch.float64:
        g_sel = g_sel.to(dtype)
    # β_side / β = 1 / mean(selected g) = N / Σ selected g (g ≥ Σw > 0 on real rows; for
    # N = 0 the numerator is 0 and the clamp only avoids 0/0). β itself is applied once,
    # to the difference.
    scaled = (N2 / g_sel.sum(1, keepdim=True).clamp(min=1e-12) * g_sel) * R.gather(1, order)
    # −log σ(x) = softplus(−x), with −x = β (rejected term − chosen term).
    return (F.softplus(beta * (scaled[B:] - scaled[:B])) * pair[:B]).sum(1)


def two_d_dpo_ungrouped_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_segments: Tensor,
    rejected_segments: Tensor,
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    weights: Sequence[float] | Tensor,
    beta: float = 0.2,
    equalize_beta: bool = True,
) -> Tensor:
    """2D-DPO, ungrouped form (paper Eq. 5): one Bradley–Terry term per example over
    *all* segments, ``−log σ(β_c Σ_k g_c,k R_c,k − β_r Σ_k g_r,k R_r,k)``.

    Same inputs and g as :func:`two_d_dpo_loss`. With ``equalize_beta`` (default) β is
    divided per example and side by the mean g over all that response's segments (the
    grouped form's equalisation applied to every segment); otherwise ``β_c = β_r = β``.
    Loss 0 (no gradient) where either response has no segment.
    """
    R, g64, n, _, _, B, dtype = _segment_inputs(
        chosen_logratios, rejected_logratios, chosen_segments, rejected_segments,
        chosen_scores, rejected_scores, weights,
    )
    g = g64.to(dtype)
    reward = (g * R).sum(1)  # g is 0 past n, so those rows add nothing
    if equalize_beta:
        reward = reward * (n.to(dtype) * beta / g.sum(1).clamp(min=1e-12))
    else:
        reward = reward * beta
    logits = reward[:B] - reward[B:]
    ok = (n[:B] > 0) & (n[B:] > 0)
    return F.softplus(-logits) * ok


# --------------------------------------------------------------------------- PPO


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> Tensor:
    """PPO clipped surrogate (APPO with an adaptive mask as ``mask``), a scalar:

    ``−Σ M·min(ρA, clip(ρ, 1−ε, 1+ε)·A) / max(Σ M, 1)``, ``ρ = exp(logp − old_logp)``.
    All inputs share one shape (typically ``[B, T]``); ``old_logp`` and ``advantages`` are
    treated as constants.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    lp = _f(logp)
    ratio = torch.exp(lp - _f(old_logp).detach())
    adv = _f(advantages).detach()
    m = mask.to(lp.dtype)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    return -(surrogate * m).sum() / m.sum().clamp(min=1.0)


# --------------------------------------------------------------------------- metrics


def implicit_rewards(logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward ``β (log π − log π_ref)`` (detached)."""
    return (beta * (_f(logps) - _f(ref_logps))).detach()


@torch.no_grad()
def preference_metrics(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_logps: Tensor, rejected_logps: Tensor
) -> dict[str, float]:
    """Batch means under TRL's names: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies`` (share with chosen > rejected),
    ``logps/chosen``, ``logps/rejected``. The learner prefixes ``train/``."""
    c, r = _f(chosen_rewards).detach(), _f(rejected_rewards).detach()
    return {
        "rewards/chosen": float(c.mean()),
        "rewards/rejected": float(r.mean()),
        "rewards/margins": float((c - r).mean()),
        "rewards/accuracies": float((c > r).to(c.dtype).mean()),
        "logps/chosen": float(_f(chosen_logps).detach().mean()),
        "logps/rejected": float(_f(rejected_logps).detach().mean()),
    }


__all__ = [
    "clipped_surrogate",
    "dpo_loss",
    "implicit_rewards",
    "ipo_loss",
    "kto_loss",
    "log1mexp",
    "orpo_loss",
    "per_token_kl",
    "preference_metrics",
    "segment_sums",
    "sequence_logps",
    "sft_loss",
    "simpo_loss",
    "tdpo_loss",
    "two_d_dpo_loss",
    "two_d_dpo_ungrouped_loss",
]
