"""What the learner optimises, given model outputs: batch collation from records to
tensors, the forward pass to per-token log-probs, and one function per family that
turns a batch's outputs into ``(loss, metrics)`` by calling :mod:`twodrl.losses` and
:mod:`twodrl.masks`. Pure torch: the DeepSpeed ranks in ``actors/learner.py`` call it,
and so do the unit tests with a plain Hugging Face model.

Conventions
- A preference batch stacks the P chosen sequences over the P rejected ones (rows
  ``[0, P)`` and ``[P, 2P)``), so policy and reference each run one forward per
  micro-batch.
- ``token_logps[n, t] = log π(x_t | x_<t)``, 0 on every non-response token; a model
  output dict is ``{"token_logps": [2P, T], "logits": [2P, T, V] or None}`` with logits
  aligned the same way (row t is the distribution that produced token t).
- Metrics use TRL's names without the ``train/`` prefix (the learner group adds it):
  ``loss``, ``rewards/chosen|rejected|margins|accuracies``, ``logps/chosen|rejected``,
  ``kl``, plus ``pref_loss`` and ``sft_loss``.
- ``kl`` is the sequence-level KL estimate the 2D-DPO paper plots (its Figure 5):
  the mean over chosen and rejected responses of Σ_t (log π − log π_ref).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import torch

from twodrl import losses

Tensor = torch.Tensor

PREFERENCE_ALGORITHMS = ("2d-dpo", "1d-dpo", "dpo", "ipo", "kto", "orpo", "simpo", "tdpo1", "tdpo2", "adpo")
NEEDS_REFERENCE_LOGITS = frozenset({"tdpo1", "tdpo2"})
# ORPO has its own NLL term; every other method adds learner.sft_coef × NLL(chosen).
NO_SFT_TERM = frozenset({"orpo"})


# --------------------------------------------------------------------------- batches


@dataclass
class SequenceBatch:
    """Padded token batch plus whatever the objective needs about each row."""

    input_ids: Tensor  # [N, T]
    attention_mask: Tensor  # [N, T]
    response_mask: Tensor  # [N, T] bool: tokens whose log-prob is trained
    segment_ids: Tensor  # [N, T] long: segment of each response token, −1 elsewhere
    position_ids: Optional[Tensor] = None  # [N, T] (packed batches)
    scores: Optional[Tensor] = None  # [N, S_max, A] raw 0–4 ratings, NaN padded
    num_pairs: int = 0  # > 0: rows [0, P) chosen, [P, 2P) rejected
    aspects: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Training examples in the batch: pairs for preference batches, else rows."""
        return self.num_pairs or int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> "SequenceBatch":
        moved = {
            f.name: (getattr(self, f.name).to(device) if torch.is_tensor(getattr(self, f.name)) else getattr(self, f.name))
            for f in fields(self)
        }
        return SequenceBatch(**moved)

    def chosen(self, t: Tensor) -> Tensor:
        return t[: self.num_pairs]

    def rejected(self, t: Tensor) -> Tensor:
        return t[self.num_pairs :]


def _encode(tokenizer, prompts, responses, segments, histories, systems, max_length) -> SequenceBatch:
    """Tokenize (prompt, response) rows through the one log-prob encoding path of
    :mod:`twodrl.models.logprobs` (chat template, segment alignment)."""
    from twodrl.models.logprobs import encode_pairs

    enc = encode_pairs(
        tokenizer, prompts, responses, histories=histories, systems=systems, segments=segments,
        max_length=max_length,
    )
    return SequenceBatch(
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        response_mask=enc.response_mask.bool(),
        segment_ids=enc.segment_ids.long(),
        position_ids=getattr(enc, "position_ids", None),
    )


def _side_scores(side: dict, aspects: Sequence[str], where: str) -> list[list[float]]:
    """``[S][A]`` ratings of one response: HelpSteer-2D's ``{aspect: [per segment]}`` or
    an ``[S][A]`` list, checked against its ``segments``."""
    segments = side.get("segments")
    raw = side.get("scores")
    if segments is None or raw is None:
        raise ValueError(f"{where}: needs 'segments' and 'scores'")
    if isinstance(raw, dict):
        missing = [a for a in aspects if a not in raw]
        if missing:
            raise ValueError(f"{where}.scores: missing aspect(s) {missing}; has {sorted(raw)}")
        cols = [list(raw[a]) for a in aspects]
        for a, col in zip(aspects, cols):
            if len(col) != len(segments):
                raise ValueError(f"{where}.scores.{a}: {len(col)} ratings for {len(segments)} segments")
        return [list(row) for row in zip(*cols)] if cols else []
    rows = [list(r) for r in raw]
    if len(rows) != len(segments):
        raise ValueError(f"{where}.scores: {len(rows)} rows for {len(segments)} segments")
    for k, r in enumerate(rows):
        if len(r) != len(aspects):
            raise ValueError(f"{where}.scores[{k}]: {len(r)} ratings for {len(aspects)} aspects {list(aspects)}")
    return rows


def scores_tensor(rows: Sequence[Sequence[Sequence[float]]], num_aspects: int) -> Tensor:
    """Stack per-response ``[S_i][A]`` ratings into ``[N, S_max, A]`` float32, NaN padded
    (rows past a response's segment count are ignored by the losses)."""
    S = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(S, 1), num_aspects), math.nan, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def collate_pairs(tokenizer, pairs: Sequence[dict], aspects: Sequence[str], max_length: int) -> SequenceBatch:
    """HelpSteer-2D pair records → one batch of 2P rows (chosen, then rejected) with
    segment ids from the records' own segments and ``scores [2P, S_max, A]``."""
    P = len(pairs)
    if P == 0:
        raise ValueError("collate_pairs: empty batch")
    prompts, responses, segments, histories, systems, rows = [], [], [], [], [], []
    for side in ("chosen", "rejected"):
        for i, rec in enumerate(pairs):
            s = rec[side]
            prompts.append(rec["prompt"])
            responses.append(s["text"])
            segments.append(list(s["segments"]))
            histories.append(rec.get("history"))
            systems.append(rec.get("system"))
            rows.append(_side_scores(s, aspects, f"pair {i}.{side}"))
    batch = _encode(tokenizer, prompts, responses, segments, histories, systems, max_length)
    batch.scores = scores_tensor(rows, len(aspects))
    batch.num_pairs = P
    batch.aspects = tuple(aspects)
    return batch


def collate_sequences(tokenizer, items: Sequence[dict], max_length: int) -> SequenceBatch:
    """SFT examples / log-prob requests: ``{"prompt", "response", "system"?,
    "history"?}`` (chat template applied) or ``{"prompt_token_ids",
    "response_token_ids"}`` (ids used as given, e.g. to compare with a sampler)."""
    if not items:
        raise ValueError("collate_sequences: empty batch")
    if "prompt_token_ids" in items[0]:
        return collate_token_ids(
            [it["prompt_token_ids"] for it in items], [it["response_token_ids"] for it in items],
            pad_id=tokenizer.pad_token_id if tokenizer is not None else 0,
        )
    return _encode(
        tokenizer,
        [it["prompt"] for it in items],
        [it["response"] for it in items],
        None,
        [it.get("history") for it in items],
        [it.get("system") for it in items],
        max_length,
    )


def collate_token_ids(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int = 0) -> SequenceBatch:
    """Right-padded batch from raw token ids; the response tokens are trained/scored."""
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    T = max(len(s) for s in seqs)
    N = len(seqs)
    ids = torch.full((N, T), int(pad_id), dtype=torch.long)
    attn = torch.zeros((N, T), dtype=torch.long)
    resp = torch.zeros((N, T), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        resp[i, len(p) : len(s)] = True
    seg = torch.where(resp, torch.zeros_like(ids), torch.full_like(ids, -1))
    return SequenceBatch(ids, attn, resp, seg)


def rollout_items(groups: Sequence[Sequence[Any]]) -> tuple[list[dict], int]:
    """Flatten ``groups[p][k]`` scored samples (objects or dicts) into item dicts, K
    consecutive per prompt; returns ``(items, K)``. All groups must have K samples."""
    items: list[dict] = []
    sizes = {len(g) for g in groups}
    if not groups:
        return [], 1
    if len(sizes) != 1:
        raise ValueError(f"APPO needs the same number of samples per prompt, got group sizes {sorted(sizes)}")
    k = sizes.pop()
    for p, group in enumerate(groups):
        for j, s in enumerate(group):
            get = (lambda key, d=None, s=s: s.get(key, d)) if isinstance(s, dict) else (lambda key, d=None, s=s: getattr(s, key, d))
            text = get("text", None)
            if text is None:
                text = get("response", "")
            items.append({
                "prompt": get("prompt"), "text": text, "segments": list(get("segments", []) or []),
                "scores": [list(r) for r in (get("scores", []) or [])], "history": get("history"),
                "system": get("system"), "group": p,
            })
    return items, k


def collate_rollouts(tokenizer, items: Sequence[dict], aspects: Sequence[str], max_length: int) -> SequenceBatch:
    """Scored samples (K consecutive per prompt) → batch with segment ids and scores."""
    rows = []
    for i, it in enumerate(items):
        rows.append(_side_scores({"segments": it["segments"], "scores": it["scores"]}, aspects, f"sample {i}"))
    batch = _encode(
        tokenizer,
        [it["prompt"] for it in items],
        [it["text"] for it in items],
        [it["segments"] for it in items],
        [it.get("history") for it in items],
        [it.get("system") for it in items],
        max_length,
    )
    batch.scores = scores_tensor(rows, len(aspects))
    batch.aspects = tuple(aspects)
    return batch


def unpad_response(token_logps: Tensor, response_mask: Tensor) -> list[list[float]]:
    """Per-row lists of the response tokens' values."""
    return [row[m].tolist() for row, m in zip(token_logps, response_mask.bool())]


# --------------------------------------------------------------------------- forward


def forward_token_logps(model, batch: SequenceBatch, return_logits: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``(token_logps [N, T], logits [N, T, V] or None)`` with ``token_logps[n, t] =
    log π(x_t | x_<t)`` on response tokens and 0 elsewhere.

    ``model`` is a causal LM (or a DeepSpeed engine wrapping one). The taken token's
    log-prob comes from :func:`twodrl.models.logprobs.token_logprobs_from_logits`
    (float32, a few rows at a time, never a full ``[N, T, V]`` log-softmax), the same
    arithmetic as the model package's ``response_logprobs``; logits are returned only
    when asked (TDPO's KL).
    """
    from twodrl.models.logprobs import token_logprobs_from_logits

    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    logits = out.logits[:, :-1]
    taken = token_logprobs_from_logits(logits, batch.input_ids[:, 1:])
    lp = torch.nn.functional.pad(taken, (1, 0))  # position 0 has no prediction
    lp = torch.where(batch.response_mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    aligned = torch.nn.functional.pad(logits.float(), (0, 0, 1, 0)) if return_logits else None
    return lp, aligned


# --------------------------------------------------------------------------- preference


def one_d_weights(aspects: Sequence[str]) -> list[float]:
    """1D-DPO: helpfulness only (2D-DPO paper: weights [1, 0, 0, 0, 0])."""
    if "helpfulness" not in aspects:
        raise ValueError(f"1d-dpo rates helpfulness only, but aspects.names is {list(aspects)}")
    return [1.0 if a == "helpfulness" else 0.0 for a in aspects]


def compute_preference_loss(
    algorithm: str,
    policy: dict[str, Optional[Tensor]],
    reference: dict[str, Optional[Tensor]],
    batch: SequenceBatch,
    cfg,
    weights: Sequence[float],
) -> tuple[Tensor, dict[str, float]]:
    """Mean loss of a preference batch and its metrics.

    ``policy`` / ``reference``: ``{"token_logps": [2P, T], "logits": [2P, T, V]?}``
    (logits only for TDPO). ``cfg``: :class:`twodrl.config.LearnerConfig` (β, SFT
    coefficient, SimPO γ, TDPO α, KTO weights, ORPO λ, label smoothing). ``weights``:
    the aspect weights (2D-DPO); ``1d-dpo`` replaces them by helpfulness only.
    """
    if algorithm not in PREFERENCE_ALGORITHMS:
        raise ValueError(f"unknown preference algorithm {algorithm!r}; known: {PREFERENCE_ALGORITHMS}")
    P = batch.num_pairs
    if P <= 0:
        raise ValueError("compute_preference_loss: batch has no pairs (use collate_pairs)")
    lp, ref_lp = policy["token_logps"], reference["token_logps"].detach()
    mask = batch.response_mask
    c, r = slice(0, P), slice(P, 2 * P)
    seq = losses.sequence_logps(lp, mask)  # [2P]
    ref_seq = losses.sequence_logps(ref_lp, mask)
    ntok = mask.sum(-1)
    avg = seq / ntok.clamp(min=1).to(seq.dtype)
    ref_avg = ref_seq / ntok.clamp(min=1).to(seq.dtype)
    beta = cfg.beta

    if algorithm in ("2d-dpo", "1d-dpo"):
        if batch.scores is None:
            raise ValueError(f"{algorithm} needs segment scores (collate_pairs)")
        w = one_d_weights(batch.aspects) if algorithm == "1d-dpo" else list(weights)
        ratios = (lp - ref_lp) * mask
        seg_args = (ratios[c], ratios[r], batch.segment_ids[c], batch.segment_ids[r], batch.scores[c], batch.scores[r], w)
        form = getattr(cfg, "two_d_dpo_form", "grouped")
        if form == "grouped":
            per = losses.two_d_dpo_loss(*seg_args, beta=beta)
        elif form == "ungrouped":
            # Eq. 5 applies one β to both sides; the per-side equalisation belongs to
            # the grouped form's segment selection, so it is off here.
            per = losses.two_d_dpo_ungrouped_loss(*seg_args, beta=beta, equalize_beta=False)
        else:
            raise ValueError(f"learner.two_d_dpo_form: {form!r} is not one of ['grouped', 'ungrouped']")
    elif algorithm == "adpo":
        from twodrl.masks import adpo_loss

        if batch.scores is None:
            raise ValueError("adpo needs segment scores (collate_pairs)")
        kept = adpo_masks(batch, weights, cfg)
        ratios = (lp - ref_lp) * mask
        per = adpo_loss(ratios[c], ratios[r], kept[c], kept[r], beta=beta)
    elif algorithm == "dpo":
        per = losses.dpo_loss(seq[c], seq[r], ref_seq[c], ref_seq[r], beta=beta, label_smoothing=cfg.label_smoothing)
    elif algorithm == "ipo":
        per = losses.ipo_loss(avg[c], avg[r], ref_avg[c], ref_avg[r], beta=beta)
    elif algorithm == "kto":
        per = losses.kto_loss(
            seq[c], seq[r], ref_seq[c], ref_seq[r], beta=beta,
            desirable_weight=cfg.kto_desirable_weight, undesirable_weight=cfg.kto_undesirable_weight,
        )
    elif algorithm == "orpo":
        per = losses.orpo_loss(avg[c], avg[r], lam=cfg.orpo_lambda)
    elif algorithm == "simpo":
        per = losses.simpo_loss(avg[c], avg[r], beta=beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing)
    else:  # tdpo1 / tdpo2
        if policy.get("logits") is None or reference.get("logits") is None:
            raise ValueError(f"{algorithm} needs policy and reference logits (per-token KL)")
        kl = losses.per_token_kl(policy["logits"], reference["logits"].detach(), mask)
        per = losses.tdpo_loss(
            seq[c], seq[r], ref_seq[c], ref_seq[r], kl[c], kl[r], beta=beta, alpha=cfg.tdpo_alpha,
            version=1 if algorithm == "tdpo1" else 2,
        )
    pref = per.mean()
    sft = losses.sft_loss(seq[c], ntok[c]).mean()
    loss = pref if algorithm in NO_SFT_TERM else pref + cfg.sft_coef * sft

    # TRL's rewards: reference-free methods report β × average log-prob.
    if algorithm in ("orpo", "simpo"):
        rc, rr = (beta * avg[c]).detach(), (beta * avg[r]).detach()
    else:
        rc = losses.implicit_rewards(seq[c], ref_seq[c], beta)
        rr = losses.implicit_rewards(seq[r], ref_seq[r], beta)
    metrics = losses.preference_metrics(rc, rr, seq[c], seq[r])
    metrics.update(
        loss=float(loss.detach()),
        pref_loss=float(pref.detach()),
        sft_loss=float(sft.detach()),
        kl=float((seq - ref_seq).detach().mean()),
    )
    if algorithm == "adpo":
        resp = (batch.segment_ids >= 0).sum().clamp(min=1)
        metrics["mask_fraction"] = float(kept.sum() / resp)
    return loss, metrics


def token_reward_view(batch: SequenceBatch, weights: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """``(token_rewards [N, T], rated [N, T] bool, sequence_rewards [N])``: each token of
    a segment carries the segment's weighted 0–4 score; a response's reward is the mean
    over its rated tokens, so a long answer does not outweigh a short one (the same
    definitions APPO's advantages use)."""
    from twodrl.masks import token_rewards_from_segments

    tok = token_rewards_from_segments(segment_rewards(batch, weights), batch.segment_ids)
    rated = batch.segment_ids >= 0
    seq = tok.sum(1) / rated.sum(1).clamp(min=1).to(tok.dtype)
    return tok, rated, seq


def adpo_masks(batch: SequenceBatch, weights: Sequence[float], cfg) -> Tensor:
    """ADPO's adaptive masks ``[2P, T]`` for a pair batch: the chosen response keeps the
    tokens the Schmitt trigger marks good, the rejected one those it marks bad.

    The baseline of a pair is the midpoint of its two sequence rewards: a pair record
    carries no other sample of its prompt, and the midpoint puts the chosen response
    above and the rejected one below it (with two samples per prompt it *is* the
    group mean APPO uses). Trigger: ``learner.schmitt_delta`` / ``schmitt_hysteresis``.
    """
    from twodrl.masks import adaptive_mask

    P = batch.num_pairs
    tok, rated, seq = token_reward_view(batch, weights)
    b = 0.5 * (seq[:P] + seq[P:])
    chosen = torch.arange(2 * P, device=tok.device) < P
    return adaptive_mask(tok, torch.cat([b, b]), cfg.schmitt_delta, chosen, hysteresis=cfg.schmitt_hysteresis,
                         mask=rated)


# --------------------------------------------------------------------------- SFT / RSF


def compute_sft_loss(token_logps: Tensor, response_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Token-averaged NLL per response, averaged over the batch (warm start, DPA-RSF)."""
    seq = losses.sequence_logps(token_logps, response_mask)
    n = response_mask.sum(-1)
    per = losses.sft_loss(seq, n)
    loss = per.mean()
    return loss, {"loss": float(loss.detach()), "sft_loss": float(loss.detach()), "logps/chosen": float(seq.detach().mean())}


# --------------------------------------------------------------------------- ARS


def select_rows(batch: SequenceBatch, rows: Tensor) -> SequenceBatch:
    """The rows ``rows`` of a (non-pair) batch, every per-row tensor indexed alike."""
    idx = rows.long()
    picked = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        picked[f.name] = v.index_select(0, idx.to(v.device)) if torch.is_tensor(v) else v
    picked["num_pairs"] = 0
    return SequenceBatch(**picked)


@dataclass
class ARSTargets:
    rows: Tensor  # [P] row of each prompt's selected sample in the rollout batch
    keep_mask: Tensor  # [P, T] LongTensor {0, 1}: the selected sample's good tokens
    baselines: Tensor  # [P] group baseline (mean sequence reward of the K samples)
    best_rewards: Tensor  # [P] sequence reward of the selected sample


def ars_targets(batch: SequenceBatch, weights: Sequence[float], group_size: int, cfg) -> ARSTargets:
    """Adaptive rejection sampling's data for a rollout batch of K consecutive samples
    per prompt: the best sample of each prompt (rejection sampling keeps one response
    per prompt, as F(x) = R·𝟙(R ≥ threshold) with the best-of-K), and its adaptive mask
    against the group baseline with ``chosen=True``.

    No separate threshold: a best sample that is no better than its group has every
    token inside the trigger's band (or below it), so its mask is empty and only the KL
    term of Eq. 16 acts on it.
    """
    from twodrl.masks import adaptive_mask, ars_select

    N = int(batch.input_ids.shape[0])
    if group_size < 1 or N % group_size:
        raise ValueError(f"ars_targets: {N} samples do not split into groups of {group_size}")
    tok, rated, seq = token_reward_view(batch, weights)
    groups = seq.view(-1, group_size)
    base = groups.mean(1)
    idx, _ = ars_select(groups)
    rows = torch.arange(groups.shape[0], device=idx.device) * group_size + idx
    keep = adaptive_mask(tok[rows], base, cfg.schmitt_delta, True, hysteresis=cfg.schmitt_hysteresis,
                         mask=rated[rows])
    return ARSTargets(rows, keep, base, groups.gather(1, idx[:, None])[:, 0])


def compute_ars_loss(
    logps: Tensor, ref_logps: Tensor, keep_mask: Tensor, response_mask: Tensor, cfg
) -> tuple[Tensor, dict[str, float]]:
    """ARS (seed 004 Eq. 16) on the selected samples: the NLL of their kept tokens plus
    ``learner.ars_kl_coef`` × the per-token KL to the reference over the whole response
    (:func:`twodrl.masks.ars_loss`); batch mean."""
    from twodrl.masks import ars_loss

    per = ars_loss(logps, ref_logps, keep_mask, response_mask, kl_coef=cfg.ars_kl_coef)
    loss = per.mean()
    with torch.no_grad():
        lp = losses._f(logps)
        m = keep_mask.to(lp.dtype)
        resp = response_mask.to(lp.dtype)
        nll = (-(lp * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
        metrics = {
            "loss": float(loss.detach()),
            "sft_loss": float(nll),
            "kl": float(((lp - losses._f(ref_logps)) * resp).sum(-1).mean()),
            "mask_fraction": float(m.sum() / resp.sum().clamp(min=1.0)),
            "logps/chosen": float((lp * resp).sum(-1).mean()),
        }
    return loss, metrics


# --------------------------------------------------------------------------- APPO


def segment_rewards(batch: SequenceBatch, weights: Sequence[float]) -> Tensor:
    """One scalar per segment, ``Σ_a w_a s_a`` on the 0–4 scale (0 on padding rows)."""
    if batch.scores is None:
        raise ValueError("segment_rewards: batch has no scores (use collate_rollouts)")
    w = torch.as_tensor(list(weights), dtype=batch.scores.dtype, device=batch.scores.device)
    return torch.nan_to_num((batch.scores * w).sum(-1), nan=0.0)


def appo_advantages(batch: SequenceBatch, weights: Sequence[float], group_size: int, cfg):
    """Token advantages and adaptive masks (:func:`twodrl.masks.appo_token_advantages`)
    from the batch's segment scores; rows are K consecutive samples per prompt."""
    from twodrl.masks import appo_token_advantages

    return appo_token_advantages(
        segment_rewards(batch, weights), batch.segment_ids, group_size,
        delta=cfg.schmitt_delta, hysteresis=cfg.schmitt_hysteresis,
    )


def compute_appo_loss(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    response_mask: Tensor,
    cfg,
) -> tuple[Tensor, dict[str, float]]:
    """APPO: the clipped surrogate over the adaptive ``mask`` plus ``kl_coef`` × the
    per-token KL to the reference over all response tokens.

    KL uses the k3 estimator ``e^{d} − d − 1`` with ``d = log π_ref − log π`` (unbiased
    for KL(π‖π_ref) on samples from π, always ≥ 0, low variance).
    """
    pg = losses.clipped_surrogate(logps, old_logps, advantages, mask, clip_eps=cfg.clip_eps)
    resp = response_mask.to(logps.dtype)
    d = (ref_logps.detach() - logps) * resp
    kl_tok = (torch.exp(d) - d - 1.0) * resp
    kl = kl_tok.sum() / resp.sum().clamp(min=1.0)
    loss = pg + cfg.kl_coef * kl
    with torch.no_grad():
        ratio = torch.exp(logps - old_logps)
        m = mask.to(logps.dtype)
        clipped = ((ratio - 1.0).abs() > cfg.clip_eps).to(logps.dtype)
        denom = m.sum().clamp(min=1.0)
        seq_kl = ((logps - ref_logps) * resp).sum(-1).mean()
        metrics = {
            "loss": float(loss.detach()),
            "pg_loss": float(pg.detach()),
            "kl": float(seq_kl),
            "kl_token": float(kl.detach()),
            "clipfrac": float((clipped * m).sum() / denom),
            "mask_fraction": float(m.sum() / resp.sum().clamp(min=1.0)),
            "advantage": float((advantages * m).sum() / denom),
        }
    return loss, metrics


__all__ = [
    "ARSTargets", "adpo_masks", "ars_targets", "compute_ars_loss", "select_rows", "token_reward_view",
    "NEEDS_REFERENCE_LOGITS", "NO_SFT_TERM", "PREFERENCE_ALGORITHMS", "SequenceBatch", "appo_advantages",
    "collate_pairs", "collate_rollouts", "collate_sequences", "collate_token_ids", "compute_appo_loss",
    "compute_preference_loss", "compute_sft_loss", "forward_token_logps", "one_d_weights", "rollout_items",
    "scores_tensor", "segment_rewards", "unpad_response",
]
