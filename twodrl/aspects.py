"""The aspects a response is rated on, their scales, and how segment ratings become
one score per response.

2D-DPO rates every segment on five aspects, 0–4 each (safety is pass/fail, stored as
4/0). To rank whole responses (iterative rounds, Appendix D of the paper) each aspect
is reduced over segments by its own rule, then the aspects are mixed with weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Reduction = Literal["mean", "min", "max", "last"]


@dataclass(frozen=True)
class Aspect:
    name: str
    reduction: Reduction  # how segment ratings become the response's rating
    low: int = 0
    high: int = 4
    binary: bool = False  # pass/fail: only `low` or `high` are valid
    monotone: bool = False  # must not decrease along the response (completeness)
    description: str = ""

    def valid(self, rating: float) -> bool:
        if self.binary:
            return rating in (self.low, self.high)
        return self.low <= rating <= self.high and float(rating).is_integer()


ASPECTS: dict[str, Aspect] = {
    a.name: a
    for a in (
        Aspect("helpfulness", "mean", description="serves what the user actually asked for"),
        Aspect("correctness", "mean", description="free of false, misleading or invented content"),
        Aspect("safety", "min", binary=True, description="no harmful, illegal, abusive or biased content"),
        Aspect("completeness", "last", monotone=True, description="how much of the task is done so far"),
        Aspect("clarity", "last", description="clear and concise, without repetition"),
        # HelpSteer(2) sequence-level attributes.
        Aspect("coherence", "mean", description="consistent and clearly expressed"),
        Aspect("complexity", "mean", description="intellectual depth needed to write it"),
        Aspect("verbosity", "last", description="amount of detail relative to what was asked"),
    )
}

DEFAULT_ASPECTS: tuple[str, ...] = ("helpfulness", "correctness", "safety", "completeness", "clarity")
DEFAULT_WEIGHTS: tuple[float, ...] = (0.3, 0.4, 0.1, 0.1, 0.1)
ONE_D_WEIGHTS: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 0.0)  # 1D-DPO: helpfulness only
HELPSTEER_ASPECTS: tuple[str, ...] = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
DPA_ASPECTS: tuple[str, ...] = ("helpfulness", "verbosity")

ASPECT_SETS: dict[str, tuple[str, ...]] = {
    "2d": DEFAULT_ASPECTS,
    "helpsteer": HELPSTEER_ASPECTS,
    "dpa": DPA_ASPECTS,
}


def get_aspects(names: Sequence[str] = DEFAULT_ASPECTS) -> list[Aspect]:
    missing = [n for n in names if n not in ASPECTS]
    if missing:
        raise KeyError(f"unknown aspect(s) {missing}; known: {sorted(ASPECTS)}")
    return [ASPECTS[n] for n in names]


def normalize_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aspect weights must have a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def _reduce(column: torch.Tensor, how: Reduction) -> torch.Tensor:
    if how == "mean":
        return column.mean()
    if how == "min":
        return column.min()
    if how == "max":
        return column.max()
    if how == "last":
        return column[-1]
    raise ValueError(f"unknown reduction {how!r}")


def representative_scores(scores: torch.Tensor, aspects: Sequence[str] = DEFAULT_ASPECTS) -> torch.Tensor:
    """One rating per aspect for a response, from its ``[S, A]`` segment ratings.

    Default aspects: helpfulness and correctness → mean over segments, safety → min,
    completeness and clarity → the last segment's rating (paper, Appendix D).
    """
    scores = torch.as_tensor(scores, dtype=torch.get_default_dtype() if not torch.is_tensor(scores) else None)
    if not scores.is_floating_point():
        scores = scores.float()
    if scores.dim() != 2 or scores.shape[1] != len(aspects):
        raise ValueError(f"expected scores of shape [S, {len(aspects)}], got {tuple(scores.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("a response needs at least one segment to be scored")
    return torch.stack([_reduce(scores[:, j], ASPECTS[name].reduction) for j, name in enumerate(aspects)])


def weighted_score(
    scores: torch.Tensor,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    aspects: Sequence[str] = DEFAULT_ASPECTS,
) -> float:
    """The weighted representative score used to rank responses (chosen = highest)."""
    rep = representative_scores(scores, aspects)
    w = torch.tensor(list(weights), dtype=rep.dtype)
    return float((rep * w).sum())
