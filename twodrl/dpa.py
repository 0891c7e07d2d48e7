"""Directional Preference Alignment core (seed 003): preference directions, the
preference-conditioned system prompt, and best-of-n selection by ``vᵀr``.

A user preference is a unit vector ``v`` over k reward objectives; the scalar reward of
a response is ``vᵀ r`` (Eq. 2 of the paper). Rejection-sampling fine-tuning draws a
direction per prompt, samples n responses conditioned on it (through the system
prompt), keeps the one with the highest ``vᵀ r`` and fine-tunes on it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

Tensor = torch.Tensor


def _angle_constraint(v: Tensor, low: float, high: float) -> Tensor:
    ang = torch.atan2(v[:, 1], v[:, 0])
    return (v[:, 0] > 0) & (ang >= low) & (ang <= high)


def default_constraint(v: Tensor, angle_low: float = -math.pi / 4, angle_high: float = 0.0) -> Tensor:
    """Which rows of ``v [n, k]`` (k ≥ 3) are admissible directions.

    Combines both constraints the paper uses: the first two objectives (helpfulness,
    verbosity) keep the two-objective angular range ``arctan(v2/v1) ∈ [low, high]`` with
    ``v1 > 0``, and every further objective j ≥ 3 satisfies ``v1 > v_j ≥ 0`` (the paper's
    helpfulness/verbosity/harmlessness run samples with ``v1 > v3 ≥ 0``).
    """
    ok = _angle_constraint(v, angle_low, angle_high)
    if v.shape[1] > 2:
        rest = v[:, 2:]
        ok &= ((rest >= 0) & (rest < v[:, :1])).all(dim=1)
    return ok


def sample_directions(
    n: int,
    k: int = 2,
    generator: Optional[torch.Generator] = None,
    angle_low: float = -math.pi / 4,
    angle_high: float = 0.0,
    dtype: torch.dtype = torch.float32,
    constraint: Optional[Callable[[Tensor], Tensor]] = None,
    max_rounds: int = 1000,
) -> Tensor:
    """``n`` unit preference directions ``[n, k]``.

    * k = 2: ``θ = arctan(v2/v1) ~ U(angle_low, angle_high)``, ``v = (cos θ, sin θ)``; the
      default range ``[−π/4, 0]`` goes from pure helpfulness ``(1, 0)`` to
      ``(√2/2, −√2/2)`` (less verbosity), as in the paper.
    * k ≥ 3: uniform on the unit sphere (normalised Gaussian draws) *conditioned on*
      ``constraint`` (default :func:`default_constraint`), by vectorized rejection
      sampling; a constraint with (near) zero area raises after ``max_rounds`` batches.
    """
    if n < 0 or k < 2:
        raise ValueError(f"sample_directions: need n ≥ 0 and k ≥ 2, got n={n}, k={k}")
    if not angle_low <= angle_high:
        raise ValueError(f"sample_directions: angle_low {angle_low} > angle_high {angle_high}")
    if k == 2 and constraint is None:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        theta = angle_low + (angle_high - angle_low) * u
        return torch.stack([torch.cos(theta), torch.sin(theta)], dim=1).to(dtype)
    check = constraint or (lambda v: default_constraint(v, angle_low, angle_high))
    chunks: list[Tensor] = []
    have = 0
    batch = max(4 * n, 1024)
    for _ in range(max_rounds):
        if have >= n:
            break
        g = torch.randn(batch, k, generator=generator, dtype=torch.float64)
        v = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)
        v = v[check(v)]
        chunks.append(v)
        have += v.shape[0]
    if have < n:
        raise ValueError(
            f"sample_directions: only {have} of {n} directions satisfied the constraint after "
            f"{max_rounds} rounds of {batch} draws; is the admissible region empty?"
        )
    return torch.cat(chunks)[:n].to(dtype) if n else torch.zeros(0, k, dtype=dtype)


# --------------------------------------------------------------------------- system prompt

_PROMPT_HEAD = "Reply preferences"
_PROMPT_RE = re.compile(r"Reply preferences \(integer weights out of 100[^)]*\):\s*([^\n]*)")
_PAIR_RE = re.compile(r"([A-Za-z_][\w-]*)\s*=\s*([+-]?\d+)")


def direction_weights(v: Sequence[float] | Tensor) -> list[int]:
    """Integer weights ``round(100 · v_i)`` (halves away from zero, so ±v round alike)."""
    vals = [float(x) for x in (v.tolist() if torch.is_tensor(v) else v)]
    return [int(math.copysign(math.floor(abs(100.0 * x) + 0.5), x)) for x in vals]


def direction_system_prompt(v: Sequence[float] | Tensor, names: Sequence[str]) -> str:
    """The system prompt that tells the policy which direction to follow.

    Example for ``v = (0.8, −0.6)``, names (helpfulness, verbosity)::

        Reply preferences (integer weights out of 100; a negative weight asks for less):
        helpfulness=80, verbosity=-60. Aim for the reply whose weighted sum of these
        attribute ratings is highest.
    """
    weights = direction_weights(v)
    if len(weights) != len(names):
        raise ValueError(f"direction_system_prompt: {len(weights)} weights for {len(names)} names {list(names)}")
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][\w-]*", name):
            raise ValueError(f"direction_system_prompt: objective name {name!r} must be one word")
    pairs = ", ".join(f"{n}={w}" for n, w in zip(names, weights))
    return (
        f"{_PROMPT_HEAD} (integer weights out of 100; a negative weight asks for less): {pairs}. "
        "Aim for the reply whose weighted sum of these attribute ratings is highest."
    )


def parse_direction_system_prompt(text: str) -> dict[str, int]:
    """Inverse of :func:`direction_system_prompt`: ``{name: integer weight}``, in order.
    Raises ``ValueError`` when the text carries no preference line."""
    m = _PROMPT_RE.search(text)
    if not m:
        raise ValueError(f"no '{_PROMPT_HEAD} (integer weights out of 100 ...):' line in system prompt {text[:80]!r}")
    body = m.group(1).split(". ", 1)[0]
    pairs = _PAIR_RE.findall(body)
    if not pairs:
        raise ValueError(f"preference line without name=weight pairs: {m.group(0)[:120]!r}")
    return {name: int(w) for name, w in pairs}


def direction_from_weights(weights: dict[str, int], names: Sequence[str], dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit vector over ``names`` from parsed integer weights (missing names → 0)."""
    v = torch.tensor([float(weights.get(n, 0)) for n in names], dtype=torch.float64)
    norm = v.norm()
    if norm == 0:
        raise ValueError(f"direction_from_weights: all weights are zero for {list(names)}")
    return (v / norm).to(dtype)


# --------------------------------------------------------------------------- selection


def best_of_n(rewards: Tensor, v: Tensor) -> int:
    """Index of the response with the highest ``vᵀ r`` among ``rewards [N, k]`` (first on
    ties)."""
    r = torch.as_tensor(rewards)
    v = torch.as_tensor(v, dtype=r.dtype if r.is_floating_point() else torch.float32)
    if r.dim() != 2 or v.dim() != 1 or r.shape[1] != v.shape[0] or r.shape[0] == 0:
        raise ValueError(f"best_of_n: rewards must be [N>0, k] and v [k], got {tuple(r.shape)} and {tuple(v.shape)}")
    return int(torch.argmax(r.to(v.dtype) @ v))


class Winners(NamedTuple):
    index: Tensor  # [P] chosen sample per prompt (−1 where no sample is valid)
    score: Tensor  # [P] its vᵀr (−inf where none)
    scores: Tensor  # [P, N] vᵀr of every sample (−inf where invalid)


def select_winners(rewards: Tensor, directions: Tensor, valid: Optional[Tensor] = None) -> Winners:
    """Best-of-n for every prompt at once.

    ``rewards [P, N, k]`` multi-objective rewards of N samples per prompt, ``directions``
    ``[P, k]`` (one per prompt) or ``[k]`` (shared), optional ``valid [P, N]`` (e.g. samples
    that finished). One ``einsum`` and one ``max``; ties go to the first sample.
    """
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.float()
    d = torch.as_tensor(directions, dtype=r.dtype, device=r.device)
    if r.dim() != 3:
        raise ValueError(f"select_winners: rewards must be [P, N, k], got {tuple(r.shape)}")
    P, N, k = r.shape
    if d.dim() == 1:
        d = d.expand(P, k)
    if d.shape != (P, k):
        raise ValueError(f"select_winners: directions must be [{P}, {k}] or [{k}], got {tuple(d.shape)}")
    scores = torch.einsum("pnk,pk->pn", r, d)
    if valid is not None:
        if valid.shape != (P, N):
            raise ValueError(f"select_winners: valid must be [{P}, {N}], got {tuple(valid.shape)}")
        scores = scores.masked_fill(~valid.bool(), -math.inf)
    best, idx = scores.max(dim=1)
    idx = torch.where(torch.isneginf(best), torch.full_like(idx, -1), idx)
    return Winners(idx, best, scores)


# --------------------------------------------------------------------------- selected data


def read_selected(path: str | Path) -> list[dict]:
    """The rows of a selected-data file (``RUN_DIR/dpa/selected.jsonl``); none when it
    does not exist yet."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def record_selected(path: str | Path, round_idx: int, rows: Sequence[dict]) -> list[dict]:
    """Store round ``round_idx``'s selected ``rows`` (each gets ``"round"``) after the
    rows of earlier rounds, and return every row of rounds ≤ ``round_idx``.

    Rows of this round or later found in the file are the remains of an attempt that
    never reached its checkpoint (a crash, a resume, a rebuilt learner); they are
    replaced, so a redone round never counts its data twice. The file is rewritten
    whole and atomically: a crash leaves the old or the new file, never half of one.
    """
    from twodrl.checkpoint import atomic_write_text

    kept = [r for r in read_selected(path) if int(r["round"]) < round_idx]
    rows = kept + [dict(r, round=round_idx) for r in rows]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


__all__ = [
    "Winners",
    "best_of_n",
    "default_constraint",
    "direction_from_weights",
    "direction_system_prompt",
    "direction_weights",
    "parse_direction_system_prompt",
    "read_selected",
    "record_selected",
    "sample_directions",
    "select_winners",
]
