"""Pure pieces of evaluation: a pairwise win rate judged in both orders, with a
bootstrap confidence interval.

A judge that sees two responses side by side tends to favour one position. Each pair
is therefore rated twice, once as (candidate, baseline) and once as (baseline,
candidate); a response's score is the mean of its two weighted ratings, and the
candidate wins a prompt when its mean is higher (a tie counts one half). The interval
resamples prompts with replacement, so it says how much the rate could move on another
draw of prompts of the same kind.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence


def pair_outcome(candidate_scores: Sequence[float], baseline_scores: Sequence[float], tie_eps: float = 1e-9) -> float:
    """1 (candidate better), 0.5 (tie) or 0, from each side's weighted ratings in the
    orders it was judged in."""
    c = sum(candidate_scores) / len(candidate_scores)
    b = sum(baseline_scores) / len(baseline_scores)
    if abs(c - b) <= tie_eps:
        return 0.5
    return 1.0 if c > b else 0.0


def bootstrap_ci(outcomes: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``outcomes``."""
    if not outcomes:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    n = len(outcomes)
    means = sorted(sum(outcomes[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * (resamples - 1))]
    hi = means[int((1 + level) / 2 * (resamples - 1))]
    return lo, hi


def win_rate(outcomes: Sequence[Optional[float]], prefix: str = "eval", seed: int = 0) -> dict[str, float]:
    """``<prefix>/win_rate`` with its 95% interval over the pairs that were judged;
    ``None`` outcomes (a failed judgement) are counted in ``<prefix>/win_rate_failures``."""
    judged = [o for o in outcomes if o is not None]
    out = {f"{prefix}/win_rate_pairs": float(len(judged)), f"{prefix}/win_rate_failures": float(len(outcomes) - len(judged))}
    if not judged:
        out.update({f"{prefix}/win_rate": float("nan"), f"{prefix}/win_rate_ci_low": float("nan"),
                    f"{prefix}/win_rate_ci_high": float("nan")})
        return out
    lo, hi = bootstrap_ci(judged, seed=seed)
    out.update({f"{prefix}/win_rate": sum(judged) / len(judged), f"{prefix}/win_rate_ci_low": lo,
                f"{prefix}/win_rate_ci_high": hi})
    return out


# --------------------------------------------------------------------------- shared by the
# online job's eval and ``twodrl eval``: what is sent to the judge and how its answers
# become outcomes, so both report the same number for the same judgements.


def both_order_items(pairs: Sequence[tuple[str, Optional[list], Sequence[str], Sequence[str]]]) -> list[dict]:
    """Judge items for ``(prompt, history, candidate_segments, baseline_segments)``
    pairs: two per pair, candidate first then baseline first (items ``2k`` and ``2k+1``),
    in the annotators' ``{"prompt", "history", "responses": [segs, segs]}`` layout."""
    items = []
    for prompt, history, cand, base in pairs:
        items.append({"prompt": prompt, "history": history, "responses": [list(cand), list(base)]})
        items.append({"prompt": prompt, "history": history, "responses": [list(base), list(cand)]})
    return items


def both_order_outcomes(rated: Sequence[Optional[Sequence[dict]]], rate: Callable[[dict], float]) -> list[Optional[float]]:
    """One outcome per pair from the judge's answers to :func:`both_order_items` (each
    ``[{aspect: [rating per segment]}, {…}]`` in the order shown, or None where the judge
    failed); ``rate`` turns one response's ratings into its weighted score. A pair with
    either order missing has outcome None."""
    outcomes: list[Optional[float]] = []
    for k in range(len(rated) // 2):
        first, second = rated[2 * k], rated[2 * k + 1]
        if first is None or second is None:
            outcomes.append(None)
            continue
        outcomes.append(pair_outcome([rate(first[0]), rate(second[1])], [rate(first[1]), rate(second[0])]))
    return outcomes


def weighted_rating(by_aspect: dict, weights: Sequence[float], aspects: Sequence[str]) -> float:
    """A response's weighted score (0–4) from the judge's ``{aspect: [rating per
    segment]}``: the representative score of each aspect mixed by ``weights``, as the
    online job rates samples."""
    from twodrl.rounds import ScoredSample, sample_rating

    rows = [list(r) for r in zip(*(by_aspect[a] for a in aspects))]
    return sample_rating(ScoredSample("", "", "", [], rows), weights, aspects)[0]
