"""Adaptive message-wise masks (seed 004): the Schmitt trigger, the adaptive mask, and
the losses built on them — APPO token advantages, ADPO, and adaptive rejection sampling.

Idea: dense (token/segment) rewards split a sampled response into sub-sequences that
agree or disagree with the response's overall label. A chosen (preferred) response is
trained only on its good parts, a rejected one only on its bad parts; the rest is masked.

The Schmitt trigger (seed 004 Appendix E) classifies a token against a baseline ``b``
with a neutral band of half-width ``δ``:

* ``hysteresis=False`` — Eq. 18 as written: 1 above ``b+δ``, −1 below ``b−δ``, 0 in the
  band.
* ``hysteresis=True`` (default) — a real Schmitt trigger: the state starts at 0, switches
  to 1 when ``r > b+δ``, to −1 when ``r < b−δ``, and *keeps its value* inside the band.
  Small wiggles around the baseline then do not chop a run of good (or bad) tokens into
  pieces, which is the stated purpose (fewer, longer sub-sequences). It is the default
  for that reason: Eq. 18 read literally drops every in-band token, so a good run that
  dips just under ``b+δ`` for one token loses that token and is split in two — the
  chatter the paper brings the trigger in to remove.

Runs pick one with ``learner.schmitt_hysteresis`` (APPO, ADPO and ARS all read it).

The hysteresis recursion looks sequential in T, but its state at t is simply the Eq. 18
value of the *last* token at or before t that left the band (0 if none). That is a
forward fill, computed for the whole ``[B, T]`` batch with one ``cummax`` over the
positions of out-of-band tokens and one ``gather`` — no Python loop over B or T.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F

from twodrl.losses import _f, segment_sums

Tensor = torch.Tensor


def _as_column(x: Tensor | float, B: int, like: Tensor, name: str) -> Tensor:
    """A scalar, ``[B]`` or ``[B, T]`` value broadcastable against ``[B, T]``."""
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t
    if t.dim() == 1:
        if t.shape[0] != B:
            raise ValueError(f"{name}: expected a scalar, [{B}] or [{B}, T], got {tuple(t.shape)}")
        return t[:, None]
    if t.dim() == 2 and t.shape[0] == B and t.shape[1] == like.shape[1]:
        return t
    raise ValueError(f"{name}: expected a scalar, [{B}] or [{B}, {like.shape[1]}], got {tuple(t.shape)}")


def schmitt_trigger_batch(
    token_rewards: Tensor,
    baseline: Tensor | float,
    delta: float,
    mask: Optional[Tensor] = None,
    hysteresis: bool = True,
) -> Tensor:
    """Schmitt-trigger states ``[B, T]`` (LongTensor in {1, 0, −1}) for a padded batch.

    ``baseline``: scalar, per-sequence ``[B]`` or per-token ``[B, T]``. ``mask [B, T]``:
    1 on real tokens; padding never switches the state and its output is 0. With
    hysteresis the state is carried across padded positions inside a sequence (left or
    interior padding does not reset it).
    """
    r = _f(token_rewards)
    if r.dim() != 2:
        raise ValueError(f"schmitt_trigger_batch: token_rewards must be [B, T], got {tuple(r.shape)}")
    if delta < 0:
        raise ValueError(f"schmitt_trigger: delta must be ≥ 0, got {delta}")
    B, T = r.shape
    b = _as_column(baseline, B, r, "baseline")
    raw = (r > b + delta).long() - (r < b - delta).long()  # Eq. 18
    if mask is not None:
        if mask.shape != r.shape:
            raise ValueError(f"schmitt_trigger_batch: mask {tuple(mask.shape)} must match {tuple(r.shape)}")
        keep = mask.bool()
        raw = raw * keep
    if not hysteresis:
        return raw
    # Forward fill of the last out-of-band value: positions of switching events, −1 elsewhere.
    pos = torch.arange(T, device=r.device).expand(B, T)
    last = torch.where(raw != 0, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    state = torch.where(last >= 0, raw.gather(1, last.clamp(min=0)), torch.zeros_like(raw))
    if mask is not None:
        state = state * keep
    return state


def schmitt_trigger(token_rewards: Tensor, baseline: Tensor | float, delta: float, hysteresis: bool = True) -> Tensor:
    """States ``LongTensor[T]`` in {1, 0, −1} of one sequence's token rewards ``[T]``.

    ``hysteresis=True``: start at 0; 1 once ``r > b+δ``, −1 once ``r < b−δ``, otherwise keep
    the previous state. ``hysteresis=False``: seed 004 Eq. 18 (0 inside the band).
    ``baseline`` may be a scalar or ``[T]``.
    """
    r = torch.as_tensor(token_rewards)
    if r.dim() != 1:
        raise ValueError(f"schmitt_trigger: token_rewards must be [T], got {tuple(r.shape)}; "
                         "use schmitt_trigger_batch for [B, T]")
    b = torch.as_tensor(baseline)
    b = b[None] if b.dim() == 1 else b
    return schmitt_trigger_batch(r[None], b, delta, hysteresis=hysteresis)[0]


def adaptive_mask(
    token_rewards: Tensor,
    baseline: Tensor | float,
    delta: float,
    chosen: bool | Tensor,
    hysteresis: bool = True,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Adaptive loss mask (seed 004 Eq. 13 with the Schmitt band), LongTensor in {0, 1}.

    A chosen response keeps the tokens whose trigger state is 1, a rejected one those
    whose state is −1. Works on one sequence (``[T]``, ``chosen`` a bool) or a batch
    (``[B, T]``, ``chosen`` a bool or ``[B]`` bool tensor, optional padding ``mask``).
    With ``delta = 0`` and no hysteresis this is Eq. 13 except that a rejected token
    exactly at the baseline is dropped (the band is open on both sides).
    """
    r = torch.as_tensor(token_rewards)
    if r.dim() == 1:
        if mask is not None:
            mask = mask[None]
        b = torch.as_tensor(baseline)
        b = b[None] if b.dim() == 1 else b
        c = torch.as_tensor(chosen)
        return adaptive_mask(r[None], b, delta, c.reshape(1) if c.dim() else c, hysteresis, mask)[0]
    state = schmitt_trigger_batch(r, baseline, delta, mask=mask, hysteresis=hysteresis)
    c = torch.as_tensor(chosen, device=state.device)
    if c.dim() == 1:
        if c.shape[0] != state.shape[0]:
            raise ValueError(f"adaptive_mask: chosen has {c.shape[0]} entries for a batch of {state.shape[0]}")
        c = c[:, None]
    target = torch.where(c.bool(), 1, -1)  # chosen keeps state 1, rejected state −1
    return (state == target).long()


def adaptive_mask_batch(
    token_rewards: Tensor,
    baseline: Tensor | float,
    delta: float,
    chosen: bool | Tensor,
    mask: Optional[Tensor] = None,
    hysteresis: bool = True,
) -> Tensor:
    """Batched :func:`adaptive_mask`: ``[B, T]`` rewards, ``chosen`` bool or ``[B]``,
    baseline scalar / ``[B]`` / ``[B, T]``, optional padding ``mask [B, T]`` → ``[B, T]``."""
    if torch.as_tensor(token_rewards).dim() != 2:
        raise ValueError("adaptive_mask_batch: token_rewards must be [B, T]")
    return adaptive_mask(token_rewards, baseline, delta, chosen, hysteresis=hysteresis, mask=mask)


# --------------------------------------------------------------------------- APPO


class TokenAdvantages(NamedTuple):
    advantages: Tensor  # [N, T], 0 off the response
    mask: Tensor  # [N, T] adaptive mask (LongTensor {0, 1}); use as clipped_surrogate's mask
    token_rewards: Tensor  # [N, T], each token carries its segment's reward, 0 off the response
    baselines: Tensor  # [P] group baseline per prompt
    sequence_rewards: Tensor  # [N] mean token reward of each sample
    chosen: Tensor  # [N] bool, sample above its group's baseline


def appo_token_advantages(
    segment_rewards: Tensor,
    segment_ids: Tensor,
    group_size: int,
    delta: float = 0.1,
    hysteresis: bool = True,
    mode: Literal["token", "sequence"] = "token",
    scale_by_std: bool = False,
    eps: float = 1e-6,
) -> TokenAdvantages:
    """Segment scores → token rewards → group-baseline advantages and adaptive masks.

    ``segment_rewards [N, S_max]``: one scalar per segment (e.g. the weighted 2D score);
    ``segment_ids [N, T]``: segment of each response token, −1 elsewhere. The N samples
    are P prompts × ``group_size`` consecutive samples (K per prompt).

    Choices (documented because seed 004 leaves them open):

    * token reward = the reward of the token's segment (message-level dense reward);
    * sequence reward = mean token reward of the response (so long responses do not
      count more), baseline ``b`` = mean sequence reward of the K samples of the prompt
      (a GRPO-style group baseline, no critic);
    * a sample is *chosen* when its sequence reward is above ``b`` (ties: rejected);
    * mask = :func:`adaptive_mask` of its token rewards against ``b`` with the trigger;
    * advantage: ``mode="token"`` (default) ``r_t − b`` per token (dense, sign tracks the
      token's own quality); ``mode="sequence"`` the sample's ``R − b`` broadcast over its
      tokens (the mask alone then carries the segment information). ``scale_by_std``
      divides by the group's std of sequence rewards (+eps), as GRPO does.

    Off-response tokens have advantage 0 and mask 0.
    """
    if segment_ids.dim() != 2 or segment_rewards.dim() != 2 or segment_ids.shape[0] != segment_rewards.shape[0]:
        raise ValueError(
            f"appo_token_advantages: segment_rewards {tuple(segment_rewards.shape)} must be [N, S] and "
            f"segment_ids {tuple(segment_ids.shape)} [N, T] with the same N"
        )
    N, T = segment_ids.shape
    if group_size < 1 or N % group_size:
        raise ValueError(f"appo_token_advantages: {N} samples do not split into groups of {group_size}")
    seg = _f(segment_rewards)
    S = seg.shape[1]
    if S == 0:
        seg = seg.new_zeros(N, 1)
        S = 1
    if bool((segment_ids >= S).any()):
        raise ValueError(f"appo_token_advantages: a segment id ≥ {S} (segment_rewards has {S} columns)")
    resp = segment_ids >= 0
    tok = token_rewards_from_segments(seg, segment_ids)
    lengths = resp.sum(1).to(seg.dtype)
    seq = tok.sum(1) / lengths.clamp(min=1.0)
    groups = seq.view(-1, group_size)
    base = groups.mean(1)  # [P]
    b = base.repeat_interleave(group_size)  # [N]
    chosen = seq > b
    mask = adaptive_mask(tok, b, delta, chosen, hysteresis=hysteresis, mask=resp)
    if mode == "token":
        adv = tok - b[:, None]
    elif mode == "sequence":
        adv = (seq - b)[:, None].expand(N, T)
    else:
        raise ValueError(f"appo_token_advantages: mode must be 'token' or 'sequence', got {mode!r}")
    if scale_by_std:
        std = groups.std(1, unbiased=False) if group_size > 1 else torch.ones_like(base)
        adv = adv / (std.repeat_interleave(group_size)[:, None] + eps)
    adv = torch.where(resp, adv, 0.0)
    return TokenAdvantages(adv, mask, tok, base, seq, chosen)


# --------------------------------------------------------------------------- ADPO / ARS


def adpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """Adaptive-mask DPO (seed 004 Eq. 15), per example.

    The mask selects sub-sequences: the chosen response contributes only its kept (good)
    tokens, the rejected one only its kept (bad) tokens:
    ``−log σ(β Σ_t M_c ρ_c − β Σ_t M_r ρ_r)`` with ``ρ`` the token log-ratios ``[B, T]``
    and ``M`` from :func:`adaptive_mask`. An example where neither mask keeps a token has
    loss 0 (nothing to learn from; plain DPO would give log 2 with zero gradient).
    """
    rc, rr = _f(chosen_logratios), _f(rejected_logratios)
    if rc.shape != chosen_mask.shape or rr.shape != rejected_mask.shape:
        raise ValueError("adpo_loss: each mask must match its log-ratios' [B, T] shape")
    mc, mr = chosen_mask.to(rc.dtype), rejected_mask.to(rr.dtype)
    logits = beta * ((rc * mc).sum(-1) - (rr * mr).sum(-1))
    any_kept = (mc.sum(-1) + mr.sum(-1)) > 0
    return torch.where(any_kept, -F.logsigmoid(logits), 0.0)


def ars_select(sequence_rewards: Tensor, threshold: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Rejection-sampling selection: for ``[P, K]`` sequence rewards, the index of the best
    sample per prompt ``[P]`` and whether it is kept ``[P]`` (reward ≥ ``threshold``; all
    kept when None). This is F(x) = R·𝟙(R ≥ threshold) of seed 004 applied to the best-of-K."""
    r = _f(sequence_rewards)
    if r.dim() != 2:
        raise ValueError(f"ars_select: expected [P, K] rewards, got {tuple(r.shape)}")
    best, idx = r.max(dim=1)
    keep = torch.ones_like(best, dtype=torch.bool) if threshold is None else best >= threshold
    return idx, keep


def ars_loss(
    logps: Tensor,
    ref_logps: Tensor,
    keep_mask: Tensor,
    response_mask: Tensor,
    kl_coef: float = 1.0,
) -> Tensor:
    """Adaptive rejection sampling (seed 004 Eq. 16) on selected responses, per example.

    ``−Σ_t M_t log π(y_t) / max(Σ M, 1) + kl_coef · KL``: the NLL is taken only on the kept
    (good) tokens ``keep_mask`` of the selected response (the adaptive mask with
    ``chosen=True``), averaged per token; the KL(π‖π_ref) penalty is over the whole
    response (``response_mask``) with the non-negative k3 estimator on sampled tokens,
    ``e^{q−p} − (q−p) − 1`` (q = ref log-prob, p = policy log-prob), averaged per token.
    Eq. 16 writes the KL with coefficient 1 and Eq. 7 with β; ``kl_coef`` is that factor,
    1 by default as Eq. 16 has it (the paper reports no tuned value;
    ``learner.ars_kl_coef`` sets it in a run).
    """
    p, q = _f(logps), _f(ref_logps).detach()
    if p.shape != q.shape or p.shape != keep_mask.shape or p.shape != response_mask.shape:
        raise ValueError("ars_loss: logps, ref_logps, keep_mask and response_mask must share [B, T]")
    m = keep_mask.to(p.dtype)
    resp = response_mask.to(p.dtype)
    nll = -(p * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    d = (q - p) * resp
    kl = (torch.exp(d) - d - 1.0).sum(-1) / resp.sum(-1).clamp(min=1.0)
    return nll + kl_coef * kl


def token_rewards_from_segments(segment_rewards: Tensor, segment_ids: Tensor) -> Tensor:
    """``[N, T]`` token rewards: each response token gets its segment's reward, 0 elsewhere."""
    seg = _f(segment_rewards)
    resp = segment_ids >= 0
    return torch.where(resp, seg.gather(1, segment_ids.clamp(min=0).long()), 0.0)


def segment_means(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Per-segment mean of token values ``[B, S]`` (0 for an empty segment); e.g. a token
    reward model's scores pooled to segments."""
    v = _f(values)
    total = segment_sums(v, segment_ids, num_segments)
    count = segment_sums(torch.ones_like(v), segment_ids, num_segments)
    return total / count.clamp(min=1.0)


__all__ = [
    "TokenAdvantages",
    "adaptive_mask",
    "adaptive_mask_batch",
    "adpo_loss",
    "appo_token_advantages",
    "ars_loss",
    "ars_select",
    "schmitt_trigger",
    "schmitt_trigger_batch",
    "segment_means",
    "token_rewards_from_segments",
]
