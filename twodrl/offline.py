"""The pure parts of offline preference training (``twodrl train``): data loading and
the held-out split, the step plan (which pairs every rank trains on at every optimizer
step), the reference log-prob cache, per-aspect reward margins and metrics-file
bookkeeping for resumes. No Ray, no DeepSpeed: ``jobs/train.py`` drives the learner
group with these, and the unit tests call them directly.

Step plan. An optimizer step consumes ``B = micro_batch_size × grad_accum_steps ×
num_ranks`` pairs. Every epoch visits the train pairs in a fresh order that depends only
on ``(seed, epoch)``; the last step of an epoch that does not fill ``B`` wraps around to
the start of the same order (a few pairs seen twice rather than ranks that disagree on
the number of steps, which would hang DeepSpeed's collectives). The position in the run
is therefore one integer, the optimizer step, and a resume recomputes everything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from twodrl import losses

Tensor = torch.Tensor

REFERENCE_DIR = "reference_logps"
FINAL_DIR = "final"


# --------------------------------------------------------------------------- data


def load_offline_data(cfg, progress: bool = False) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """``(train, eval, info)`` record dicts for an :class:`twodrl.config.OfflineConfig`.
    ``data.train == "synthetic"`` draws rule-labelled records (``data.synthetic_pairs``)
    from :mod:`twodrl.synthetic`. Without ``data.eval`` a seeded ``data.eval_fraction``
    of train is held out (at least one record when the fraction is > 0)."""
    from twodrl.convert import check_aspects, load_preference_data
    from twodrl.data import records_from_dicts

    d = cfg.data
    aspects = list(cfg.aspects.names)
    if d.train == "synthetic":
        from twodrl.synthetic import make_preference_records

        train = records_from_dicts(make_preference_records(d.synthetic_pairs, seed=cfg.seed), aspects, "synthetic")
    else:
        train = load_preference_data(d.train, d.format, d.split).records
    check_aspects(train, aspects, str(d.train))
    info: dict[str, Any] = {"data/train_source": d.train}
    if d.eval is not None:
        if d.eval == "synthetic":
            from twodrl.synthetic import make_preference_records

            # Another seed: prompts of the synthetic task repeat, pairs differ.
            held = records_from_dicts(make_preference_records(max(8, d.synthetic_pairs // 8), seed=cfg.seed + 7919),
                                      aspects, "synthetic-eval")
        else:
            held = load_preference_data(d.eval, d.format, d.eval_split).records
        check_aspects(held, aspects, str(d.eval))
        train_dicts, eval_dicts = [r.to_json() for r in train], [r.to_json() for r in held]
    else:
        dicts = [r.to_json() for r in train]
        order = list(range(len(dicts)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = min(len(dicts) - 1, max(1, round(d.eval_fraction * len(dicts)))) if d.eval_fraction > 0 else 0
        held_idx = set(order[:n_eval])
        eval_dicts = [dicts[i] for i in sorted(held_idx)]
        train_dicts = [dicts[i] for i in range(len(dicts)) if i not in held_idx]
    if d.max_train_records is not None:
        train_dicts = train_dicts[: d.max_train_records]
    if not train_dicts:
        raise ValueError(f"data.train {d.train}: no training records")
    info.update({"data/train_pairs": len(train_dicts), "data/eval_pairs": len(eval_dicts)})
    return train_dicts, eval_dicts, info


def records_fingerprint(records: Sequence[dict]) -> str:
    """SHA-256 of the records in order: a resume or a reference cache made for other
    data is refused rather than silently mixed."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- step plan


@dataclasses.dataclass(frozen=True)
class StepPlan:
    num_records: int
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    epochs: int
    max_steps: Optional[int]
    seed: int

    @property
    def pairs_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_records / self.pairs_per_step))

    @property
    def total_steps(self) -> int:
        full = self.steps_per_epoch * self.epochs
        return min(full, self.max_steps) if self.max_steps is not None else full

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_records))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` optimizer steps (fractional)."""
        return step / self.steps_per_epoch

    def step_indices(self, step: int) -> list[list[list[int]]]:
        """Record indices of optimizer step ``step`` (0-based): ``[rank][micro][pair]``,
        ``grad_accum_steps`` micro-batches of ``micro_batch_size`` pairs per rank."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the plan's {self.total_steps} steps")
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        B = self.pairs_per_step
        tiled = order * math.ceil(B * self.steps_per_epoch / max(1, len(order)))
        chosen = tiled[within * B: (within + 1) * B]
        per_rank = self.micro_batch_size * self.grad_accum_steps
        out = []
        for r in range(self.world_size):
            mine = chosen[r * per_rank: (r + 1) * per_rank]
            out.append([mine[m * self.micro_batch_size: (m + 1) * self.micro_batch_size]
                        for m in range(self.grad_accum_steps)])
        return out


def eval_indices(n: int, world_size: int, micro_batch_size: int) -> tuple[list[list[list[int]]], list[list[bool]]]:
    """Eval pairs over the ranks: ``(plan[rank][micro] = indices, real[rank][micro])``.
    Every rank runs the same number of micro-batches (ZeRO-3 forwards are collective);
    a rank short of pairs runs filler micro-batches (``real`` False) whose metrics the
    caller drops, so every pair counts exactly once."""
    if n == 0:
        return [[] for _ in range(world_size)], [[] for _ in range(world_size)]
    per_rank = math.ceil(n / world_size)
    steps = math.ceil(per_rank / micro_batch_size)
    plan, real = [], []
    for r in range(world_size):
        mine = list(range(r * per_rank, min(n, (r + 1) * per_rank)))
        batches = [b for b in (mine[s * micro_batch_size:(s + 1) * micro_batch_size] for s in range(steps)) if b]
        flags = [True] * len(batches)
        while len(batches) < steps:
            batches.append([n - 1])
            flags.append(False)
        plan.append(batches)
        real.append(flags)
    return plan, real


# --------------------------------------------------------------------------- reference cache


def save_reference_cache(path: str | Path, logps: Sequence[tuple[Sequence[float], Sequence[float]]],
                         fingerprint: str) -> Path:
    """Per-pair reference log-probs of the response tokens (chosen, rejected) as one
    flat float32 tensor plus offsets, in safetensors, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat: list[float] = []
    offsets = [0]
    for c, r in logps:
        for side in (c, r):
            flat.extend(float(x) for x in side)
            offsets.append(len(flat))
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    save_file({"values": torch.tensor(flat, dtype=torch.float32), "offsets": torch.tensor(offsets, dtype=torch.int64)},
              str(tmp), metadata={"fingerprint": fingerprint, "pairs": str(len(logps))})
    os.replace(tmp, path)
    return path


def load_reference_cache(path: str | Path, fingerprint: str) -> Optional[list[tuple[list[float], list[float]]]]:
    """The cached log-probs, or None when there is no cache or it was made for other
    data or another reference (its fingerprint differs)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != fingerprint:
            return None
        values, offsets = f.get_tensor("values"), f.get_tensor("offsets").tolist()
    sides = [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    return [(sides[2 * i], sides[2 * i + 1]) for i in range(len(sides) // 2)]


def reference_fingerprint(records_fp: str, reference_path: str, max_length: int, tokenizer_path: str) -> str:
    """What the cached values depend on: the data, the reference weights' source, the
    policy tokenizer and the truncation length."""
    return hashlib.sha256(f"{records_fp}|{reference_path}|{tokenizer_path}|{max_length}".encode()).hexdigest()


def fill_reference(response_mask: Tensor, num_pairs: int,
                   per_pair: Sequence[tuple[Sequence[float], Sequence[float]]]) -> Tensor:
    """Cached per-pair values → ``[2P, T]`` token log-probs aligned with a collated
    batch (chosen rows first), 0 off the response. A length mismatch means the cache
    belongs to another tokenization and is an error, never a silent misalignment."""
    out = torch.zeros(response_mask.shape, dtype=torch.float32)
    rows = [c for c, _ in per_pair] + [r for _, r in per_pair]
    if len(rows) != 2 * num_pairs or response_mask.shape[0] != 2 * num_pairs:
        raise ValueError(f"reference cache: {len(rows)} rows for a batch of {num_pairs} pairs")
    for i, values in enumerate(rows):
        m = response_mask[i].bool()
        if int(m.sum()) != len(values):
            raise ValueError(f"reference cache: row {i} has {len(values)} values for {int(m.sum())} response "
                             "tokens (the cache was made with another tokenizer or max_length)")
        out[i, m] = torch.tensor(values, dtype=torch.float32)
    return out


# --------------------------------------------------------------------------- metrics


def aspect_margins(logratios: Tensor, segment_ids: Tensor, scores: Tensor, num_pairs: int, beta: float,
                   aspects: Sequence[str]) -> dict[str, Tensor]:
    """Per-aspect implicit reward margins of a 2D pair batch, ``{aspect: [P]}``.

    For aspect ``a`` the reward of a response is ``β Σ_k (1 + s_{k,a}/4) R_k`` (``R_k``
    the summed token log-ratio of segment k): 2D-DPO's segment reward with all the
    weight on ``a``. Its chosen − rejected difference says whether the policy has moved
    towards what that aspect rates well, aspect by aspect."""
    S = scores.shape[1]
    R = losses.segment_sums(logratios.float(), segment_ids, S)  # [2P, S]
    valid = torch.arange(S, device=scores.device)[None, :] < (segment_ids.max(dim=1).values + 1)[:, None]
    g = torch.nan_to_num(scores.float(), nan=0.0) / 4.0 + 1.0  # [2P, S, A]
    g = g * valid[..., None]
    reward = beta * (g * R[..., None]).sum(1)  # [2P, A]
    margin = reward[:num_pairs] - reward[num_pairs:]
    return {a: margin[:, j].detach() for j, a in enumerate(aspects)}


def truncate_metrics_by_step(path: str | Path, last_step: int) -> int:
    """Keep only rows with ``step ≤ last_step`` (the checkpoint a resume starts from),
    so each step is logged once even after a crash between logging and saving.
    Returns the rows kept."""
    from twodrl.checkpoint import atomic_write_text
    from twodrl.tracking import read_metrics

    p = Path(path)
    if not p.exists():
        return 0
    keep = [r for r in read_metrics(p) if int(r.get("step", -1)) <= last_step]
    atomic_write_text(p, "".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)


def to_run_config(cfg):
    """The :class:`twodrl.config.RunConfig` the learner group and Ray helpers take: the
    offline config's shared sections, the online-only ones at their defaults."""
    from twodrl.config import RunConfig

    return RunConfig(seed=cfg.seed, algorithm=cfg.algorithm, run_name=cfg.run_name, policy=cfg.policy,
                     reference=cfg.reference, aspects=cfg.aspects, learner=cfg.learner, logging=cfg.logging,
                     ray=cfg.ray, rounds=1)


__all__ = [
    "FINAL_DIR", "REFERENCE_DIR", "StepPlan", "aspect_margins", "eval_indices", "fill_reference",
    "load_offline_data", "load_reference_cache", "records_fingerprint", "reference_fingerprint",
    "save_reference_cache", "to_run_config", "truncate_metrics_by_step",
]
