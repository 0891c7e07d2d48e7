"""Segment-level credit: how much each rated segment's likelihood moved under training.

2D-DPO weights every segment of a pair by its ratings, so a badly rated sentence of the
chosen response is pushed up less than a well rated one (and the reverse on the
rejected side); DPO pushes every token of a response alike. Whether that happens in
practice is measured here on a fixed probe set of preference pairs with known segment
ratings: the per-token log-probabilities of each response under two policy versions
(*before* and *after*) are compared segment by segment, and the changes are grouped by
side (chosen / rejected) and by the segment's weighted rating.

Definitions
- A segment's weighted rating is ``Σ_a w_a · rating_a`` on the 0–4 scale, clamped to
  [0, 4] (reward-model ratings are real numbers and may fall slightly outside).
- Its Δ is the mean over its tokens of ``log π_after − log π_before``: a per-token
  change, so long and short segments count alike.
- Bins: ``0-1`` = [0, 1), ``1-2`` = [1, 2), ``2-3`` = [2, 3), ``3-4`` = [3, 4] (4 is in
  the top bin).
- ``credit/<side>/<bin>`` is the mean Δ over the segments of that group (each segment
  once, whatever its length); ``credit/<side>/<bin>_n`` their number. A group without
  segments gives NaN and n = 0.
- ``credit/selectivity`` = mean Δ of chosen segments in the top bin − mean Δ of chosen
  segments in the two bottom bins (pooled, rating < 2): how much more the good
  sentences of preferred responses rose than the bad ones. DPO gives about 0; the
  promise of 2D supervision is a clearly positive value. NaN when either side is empty.
- ``credit/slope`` = least-squares slope of Δ on the weighted rating over all chosen
  segments (Δ per rating point): the same question asked of every chosen segment, not
  only the extreme bins, so it is defined far more often. NaN with fewer than two
  distinct ratings.

Segments without any token (cut off by truncation) or without a finite rating take no
part. Since every group mean is linear in the *after* log-probs, the difference of two
rounds' values measured against the same *before* is exactly the change during the
rounds in between.

Token-level inputs use the representation of :mod:`twodrl.models.logprobs`: each
response's token log-probs in sequence order with, for every token, the index of its
segment within the response (the end-of-turn token belongs to the last segment).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

SIDES = ("chosen", "rejected")
BINS = ("0-1", "1-2", "2-3", "3-4")
TOP_BIN = len(BINS) - 1
BOTTOM_BINS = (0, 1)  # rating < 2
MAX_RATING = 4.0


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SegmentLogps:
    """Per-token log-probs of one response and the segment index of every token."""

    token_logps: list[float]
    segment_ids: list[int]

    def __post_init__(self):
        if len(self.token_logps) != len(self.segment_ids):
            raise ValueError(f"{len(self.token_logps)} log-probs for {len(self.segment_ids)} segment ids")

    def as_dict(self) -> dict[str, list]:
        return {"token_logps": list(self.token_logps), "segment_ids": list(self.segment_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "SegmentLogps":
        return cls([float(x) for x in d["token_logps"]], [int(x) for x in d["segment_ids"]])


@dataclass(frozen=True)
class PairSegmentLogps:
    """Both responses of a preference pair (as :class:`SegmentLogps`)."""

    chosen: SegmentLogps
    rejected: SegmentLogps

    def side(self, name: str) -> SegmentLogps:
        return self.chosen if name == "chosen" else self.rejected

    def as_dict(self) -> dict[str, dict]:
        """JSON-ready form (the driver keeps the *before* values across a resume)."""
        return {"chosen": self.chosen.as_dict(), "rejected": self.rejected.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "PairSegmentLogps":
        return cls(SegmentLogps.from_dict(d["chosen"]), SegmentLogps.from_dict(d["rejected"]))


# --------------------------------------------------------------------------- probe set


def split_probe_pairs(pairs: Sequence[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(probe, rest)``: ``n`` pair records drawn at random (deterministic by ``seed``)
    and the others, both in their original order. Holding the probe out of training
    makes its Δ a measure of what the policy learned, not of what it memorised."""
    if n < 0:
        raise ValueError(f"probe size must be ≥ 0, got {n}")
    picked = set(random.Random(seed).sample(range(len(pairs)), min(n, len(pairs))))
    probe = [pairs[i] for i in range(len(pairs)) if i in picked]
    rest = [pairs[i] for i in range(len(pairs)) if i not in picked]
    return probe, rest


def draw_probe_pairs(pairs: Sequence[dict], n: int, seed: int) -> list[dict]:
    """The probe half of :func:`split_probe_pairs`: ``min(n, len(pairs))`` records."""
    return split_probe_pairs(pairs, n, seed)[0]


# --------------------------------------------------------------------------- pure core


def segment_ratings(side: dict, aspects: Sequence[str], weights: Sequence[float]) -> list[float]:
    """Weighted rating ``Σ_a w_a · rating_a`` of each segment of a record's side
    (``{"segments", "scores"}``, scores as ``{aspect: [per segment]}`` or ``[S][A]``)."""
    from twodrl.objectives import _side_scores

    if len(weights) != len(aspects):
        raise ValueError(f"{len(weights)} weights for aspects {list(aspects)}")
    rows = _side_scores(side, aspects, "probe pair")
    return [sum(float(w) * float(r) for w, r in zip(weights, row)) for row in rows]


def rating_bin(rating: float) -> int:
    """Index into :data:`BINS` of a weighted rating (clamped to [0, 4]; 4 is in the top bin)."""
    r = min(max(float(rating), 0.0), MAX_RATING)
    return min(int(math.floor(r)), TOP_BIN)


def segment_deltas(before: SegmentLogps, after: SegmentLogps, num_segments: int) -> torch.Tensor:
    """``[num_segments]`` mean per-token change of log-prob of each segment, NaN for a
    segment with no token. Both must come from the same encoding."""
    if list(before.segment_ids) != list(after.segment_ids):
        raise ValueError(
            f"before and after are not aligned ({len(before.segment_ids)} vs {len(after.segment_ids)} tokens "
            "or different segment ids): both must come from the same tokenizer and max_length"
        )
    ids = torch.tensor(before.segment_ids, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_segments):
        raise ValueError(f"segment ids {sorted(set(before.segment_ids))} outside 0..{num_segments - 1}")
    diff = torch.tensor(after.token_logps, dtype=torch.float64) - torch.tensor(before.token_logps, dtype=torch.float64)
    sums = torch.zeros(num_segments, dtype=torch.float64).index_add_(0, ids, diff)
    counts = torch.bincount(ids, minlength=num_segments).to(torch.float64)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))


def credit_segments(
    pairs: Sequence[dict],
    before: Sequence[PairSegmentLogps],
    after: Sequence[PairSegmentLogps],
    aspects: Sequence[str],
    weights: Sequence[float],
) -> list[tuple[str, float, float]]:
    """``(side, weighted rating, Δ)`` of every segment that has tokens and a finite rating."""
    if not (len(pairs) == len(before) == len(after)):
        raise ValueError(f"{len(pairs)} pairs, {len(before)} before and {len(after)} after log-probs")
    out: list[tuple[str, float, float]] = []
    for rec, b, a in zip(pairs, before, after):
        for side in SIDES:
            ratings = segment_ratings(rec[side], aspects, weights)
            deltas = segment_deltas(b.side(side), a.side(side), max(len(ratings), 1)).tolist()
            for rating, delta in zip(ratings, deltas):
                if math.isfinite(rating) and math.isfinite(delta):
                    out.append((side, rating, delta))
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = _mean(xs), _mean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if len(xs) < 2 or var <= 1e-12:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def credit_metrics(
    pairs: Sequence[dict],
    before: Sequence[PairSegmentLogps],
    after: Sequence[PairSegmentLogps],
    aspects: Sequence[str],
    weights: Sequence[float],
    prefix: str = "credit/",
) -> dict[str, float]:
    """The flat ``credit/*`` dict described in the module docstring: per side and bin
    the mean Δ and its segment count, then ``selectivity`` and ``slope``."""
    groups: dict[tuple[str, int], list[float]] = {(s, k): [] for s in SIDES for k in range(len(BINS))}
    chosen_r: list[float] = []
    chosen_d: list[float] = []
    for side, rating, delta in credit_segments(pairs, before, after, aspects, weights):
        groups[(side, rating_bin(rating))].append(delta)
        if side == "chosen":
            chosen_r.append(min(max(rating, 0.0), MAX_RATING))
            chosen_d.append(delta)
    out: dict[str, Any] = {}
    for side in SIDES:
        for k, label in enumerate(BINS):
            out[f"{prefix}{side}/{label}"] = _mean(groups[(side, k)])
            out[f"{prefix}{side}/{label}_n"] = len(groups[(side, k)])
    bottom = [d for k in BOTTOM_BINS for d in groups[("chosen", k)]]
    out[f"{prefix}selectivity"] = _mean(groups[("chosen", TOP_BIN)]) - _mean(bottom)
    out[f"{prefix}slope"] = _slope(chosen_r, chosen_d)
    return out


def credit_metric_keys(prefix: str = "credit/") -> list[str]:
    """Every key :func:`credit_metrics` returns."""
    keys = [f"{prefix}{s}/{b}{n}" for s in SIDES for b in BINS for n in ("", "_n")]
    return keys + [f"{prefix}selectivity", f"{prefix}slope"]
