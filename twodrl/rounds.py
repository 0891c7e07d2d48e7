"""Pure pieces of an online round: which prompts to use, which samples become the
chosen/rejected pair, and the per-round reward statistics.

The driver (``jobs/driver.py``) only moves data between actors and calls these.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from twodrl.aspects import representative_scores


# ----------------------------------------------------------------------------- prompts


@dataclass
class PromptCursor:
    """Walks through a prompt pool epoch by epoch: each epoch is a fresh seeded
    permutation, so no prompt is reused within an epoch, and the whole state is two
    integers (resuming a run restores them)."""

    pool_size: int
    seed: int
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.pool_size))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[tuple[int, int]]:
        """The next ``n`` prompts as ``(epoch, pool index)``; crosses into the next
        epoch when this one is used up."""
        if self.pool_size <= 0:
            raise ValueError("the prompt pool is empty")
        out: list[tuple[int, int]] = []
        while len(out) < n:
            order = self._order(self.epoch)
            k = min(n - len(out), self.pool_size - self.position)
            out.extend((self.epoch, i) for i in order[self.position : self.position + k])
            self.position += k
            if self.position >= self.pool_size:
                self.epoch += 1
                self.position = 0
        return out

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "PromptCursor":
        return cls(**state)


def disjoint_parts(pool_size: int, parts: int, seed: int) -> list[list[int]]:
    """The pool's indices in ``parts`` disjoint sets of near-equal size (sizes differ by
    at most one), after one seeded shuffle: the same seed always gives the same split."""
    if parts < 1:
        raise ValueError(f"disjoint_parts: need ≥ 1 part, got {parts}")
    if pool_size < parts:
        raise ValueError(f"disjoint_parts: {pool_size} prompts cannot fill {parts} disjoint parts")
    order = list(range(pool_size))
    random.Random(f"{seed}:parts:{parts}").shuffle(order)
    return near_equal_parts(order, parts)


def near_equal_parts(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` cut in order into ``parts`` contiguous runs whose sizes differ by at
    most one (the first ones take the remainder)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (1 if k < extra else 0)
        out.append(list(items[start : start + size]))
        start += size
    return out


def part_picks(pool_size: int, parts: int, part: int, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` prompts of part ``part`` (of :func:`disjoint_parts`) as ``(epoch, pool
    index)``, in the order of a :class:`PromptCursor` over that part alone. A function of
    its arguments only: a resumed or redone round draws the same prompts with no cursor
    state to restore. ``n`` larger than the part cycles through it again (next epoch)."""
    if not 0 <= part < parts:
        raise ValueError(f"part_picks: part {part} is not in [0, {parts})")
    members = disjoint_parts(pool_size, parts, seed)[part]
    cursor = PromptCursor(len(members), seed=seed * 1_000_003 + part)
    return [(epoch, members[i]) for epoch, i in cursor.take(n)]


# ------------------------------------------------------------------------------- pairs


@dataclass
class ScoredSample:
    """One sampled response with its segment × aspect ratings (0–4)."""

    prompt_id: str
    prompt: str
    text: str
    segments: list[str]
    scores: list[list[float]]  # [S][A]
    history: list[dict] | None = None
    system: str | None = None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    weights_version: int | None = None  # of the policy that generated it (staleness)


def sample_rating(sample: ScoredSample, weights: Sequence[float], aspects: Sequence[str]) -> tuple[float, list[float]]:
    """(weighted representative score, representative score per aspect); a sample
    without segments (empty text) rates 0 on every aspect."""
    if not sample.scores:
        return 0.0, [0.0] * len(aspects)
    rep = representative_scores(torch.tensor(sample.scores, dtype=torch.float64), aspects)
    w = torch.tensor(list(weights), dtype=torch.float64)
    return float((rep * w).sum()), rep.tolist()


def objective_values(sample: ScoredSample, objectives: Sequence[str], aspects: Sequence[str]) -> list[float]:
    """A sample's value on each DPA objective (0–4). A scored aspect gives its
    representative score; ``verbosity``, when the reward model does not rate it, is
    read off the length: one point per segment after the first, capped at 4."""
    _, rep = sample_rating(sample, [0.0] * len(aspects), aspects)
    out = []
    for name in objectives:
        if name in aspects:
            out.append(rep[list(aspects).index(name)])
        elif name == "verbosity":
            out.append(float(min(4, max(0, len(sample.segments) - 1))))
        else:
            raise KeyError(f"DPA objective {name!r} is neither a scored aspect {list(aspects)} nor 'verbosity'")
    return out


def _side(sample: ScoredSample, aspects: Sequence[str]) -> dict:
    return {
        "text": sample.text,
        "segments": list(sample.segments),
        "scores": {a: [row[j] for row in sample.scores] for j, a in enumerate(aspects)},
    }


def select_pairs(
    groups: Sequence[Sequence[ScoredSample]],
    weights: Sequence[float],
    aspects: Sequence[str],
    min_margin: float = 1e-9,
) -> list[dict]:
    """For every prompt's group of K samples: chosen = highest weighted representative
    score, rejected = lowest (2D-DPO Appendix D). Groups whose best and worst tie are
    skipped — they carry no preference. Returns HelpSteer-2D-shaped pair records."""
    pairs = []
    for group in groups:
        rated = [(sample_rating(s, weights, aspects)[0], i, s) for i, s in enumerate(group) if s.segments]
        if len(rated) < 2:
            continue
        best = max(rated, key=lambda t: (t[0], -t[1]))
        worst = min(rated, key=lambda t: (t[0], t[1]))
        if best[0] - worst[0] <= min_margin:
            continue
        chosen, rejected = best[2], worst[2]
        record: dict[str, Any] = {
            "prompt": chosen.prompt,
            "chosen": _side(chosen, aspects),
            "rejected": _side(rejected, aspects),
            "margin": best[0] - worst[0],
        }
        if chosen.history:
            record["history"] = chosen.history
        if chosen.system:
            record["system"] = chosen.system
        pairs.append(record)
    return pairs


def reward_summary(samples: Sequence[ScoredSample], weights: Sequence[float], aspects: Sequence[str], prefix: str = "reward") -> dict[str, float]:
    """Mean weighted and per-aspect representative scores over samples (0–4 scale)."""
    if not samples:
        return {f"{prefix}/weighted": math.nan, **{f"{prefix}/{a}": math.nan for a in aspects}}
    rated = [sample_rating(s, weights, aspects) for s in samples]
    out = {f"{prefix}/weighted": sum(r[0] for r in rated) / len(rated)}
    for j, a in enumerate(aspects):
        out[f"{prefix}/{a}"] = sum(r[1][j] for r in rated) / len(rated)
    return out


def agreement(
    model_scores: Sequence[Sequence[Sequence[float]]],
    judge_scores: Sequence[Sequence[Sequence[float]]],
    aspects: Sequence[str],
) -> dict[str, float]:
    """Per-aspect share of segments where the reward model, rounded to the nearest
    label and clamped to 0–4, equals the judge (the paper's Table 4 accuracy)."""
    hits = [0] * len(aspects)
    total = 0
    for ms, js in zip(model_scores, judge_scores):
        if len(ms) != len(js):
            continue
        for mrow, jrow in zip(ms, js):
            total += 1
            for j in range(len(aspects)):
                if min(4, max(0, round(mrow[j]))) == round(jrow[j]):
                    hits[j] += 1
    return {f"rm/agreement/{a}": (hits[j] / total if total else math.nan) for j, a in enumerate(aspects)}


# ----------------------------------------------------------------------------- scheduling


def audited(seed: int, round_idx: int, request_id: str, k: int, fraction: float) -> bool:
    """Whether the judge rates sample ``k`` of request ``request_id``: a seeded draw of
    its own, so the audit is the same whatever order samples finish in (stream
    scheduling scores them as they arrive) and a resumed round audits the same ones."""
    if fraction <= 0:
        return False
    return random.Random(f"audit:{seed}:{round_idx}:{request_id}:{k}").random() < fraction


def staleness_summary(versions: Sequence[int | None], learner_version: int) -> dict[str, float]:
    """``rollout/staleness_mean`` and ``_max``: how many weight versions behind the
    learner's (the one it trains from) the samples were generated; 0 is on-policy."""
    lags = [max(0, learner_version - v) for v in versions if v is not None]
    return {
        "rollout/staleness_mean": sum(lags) / len(lags) if lags else 0.0,
        "rollout/staleness_max": float(max(lags)) if lags else 0.0,
    }


def rounds_to_prefetch(round_idx: int, total_rounds: int, max_staleness: int, launched: Sequence[int]) -> list[int]:
    """Rounds whose collection (rollout, scoring, judging) may start once round
    ``round_idx``'s samples are in and before it trains: up to ``max_staleness`` rounds
    ahead. Each round's training and sync moves the weights on by one version, so a
    sample of round ``round_idx + j`` drawn now is at most ``j`` versions old when it
    is trained on."""
    return [q for q in range(round_idx + 1, min(total_rounds, round_idx + 1 + max_staleness)) if q not in launched]

