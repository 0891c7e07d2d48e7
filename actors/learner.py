"""The policy learner: N DeepSpeed ranks (Ray actors ``learner-<i>``) and a frozen
reference model, behind one driver-side handle, :class:`PolicyLearnerGroup`.

Layout
- Rank actors run one DeepSpeed engine each (ZeRO stage ``learner.zero_stage``; fp32 on
  CPU, bf16 on GPU when ``learner.bf16``), joined in one torch.distributed group (gloo
  on CPU, NCCL on GPU) whose rendezvous address is rank 0's node IP and a free port
  found there.
- The reference model is frozen. Colocated (``learner.colocate_reference``, default) each
  rank holds one (under ZeRO-3 it is partitioned like the policy, as an inference-only
  DeepSpeed engine), else one ``reference-0`` actor serves log-probs for all ranks.
  Reference log-probs are computed once per round, not once per epoch: they do not
  change while the policy trains.
- With ``learner.lora`` (ZeRO 0-2) the policy is a peft adapter on frozen base weights:
  only the adapter is in the optimizer, the reference is the same module with the
  adapter off (no reference copy or actor), weight syncs and saved models carry the
  merged weights under the base names, and checkpoints hold the adapter
  (:mod:`twodrl.models.lora`).

A round's data is cut on the driver into the same number of micro-batches for every
rank (:func:`plan_micro_batches`): DeepSpeed all-reduces gradients on every backward,
and ZeRO-3 gathers parameters on every forward, so ranks that disagree on the number of
steps would hang. Every rank tokenizes its micro-batches once per round and visits them
in a fresh seeded order each epoch.

Precision note: on CPU everything is float32; ``learner.bf16`` is ignored there.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import ray
import torch

from actors.common import (
    actor_options,
    ceil_div,
    free_port,
    get_or_create_actor,
    learner_group,
    node_ip,
    redirect_actor_output,
    role_resources,
    run_namespace,
    validate_placement,
    wait_placement_group,
)
from actors.weight_sync import WeightSenderMixin, stream_from_learners
from twodrl.config import ConfigError, LearnerConfig, ModelConfig, RunConfig
from twodrl.objectives import PREFERENCE_ALGORITHMS

HF_SUBDIR = "policy"  # <checkpoint>/policy: Hugging Face format, safetensors
LORA_SUBDIR = "adapter"  # learner.lora: <checkpoint>/adapter (peft format) instead of policy/
DS_SUBDIR = "deepspeed"  # <checkpoint>/deepspeed: DeepSpeed engine, optimizer, scheduler


# --------------------------------------------------------------------------- pure helpers


def build_ds_config(lc: LearnerConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for a policy engine, from ``learner.*`` only."""
    stage = int(lc.zero_stage)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu, reduce_bucket_size=5e7)
    if stage == 3:
        zero.update(
            stage3_param_persistence_threshold=1e4,
            stage3_prefetch_bucket_size=5e7,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "gradient_accumulation_steps": lc.grad_accum_steps,
        "train_batch_size": lc.micro_batch_size * lc.grad_accum_steps * world_size,
        "gradient_clipping": lc.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(lc.bf16 and on_gpu)},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # torch AdamW as client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_reference_ds_config(lc: LearnerConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """Inference-only ZeRO-3 engine for a partitioned reference model."""
    return {
        "train_micro_batch_size_per_gpu": lc.micro_batch_size,
        "train_batch_size": lc.micro_batch_size * world_size,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4},
        "bf16": {"enabled": bool(lc.bf16 and on_gpu)},
        "steps_per_print": 10**9,
    }


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``step``: linear warmup from 0, then
    constant or cosine decay to 0 at ``total_steps`` (and 0 after)."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def fn(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            span = max(1, total_steps - warmup_steps)
            progress = min(1.0, (step - warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"learner.lr_schedule: unknown schedule {schedule!r}")

    return fn


def estimate_total_steps(cfg: RunConfig) -> int:
    """Optimizer steps of a whole run (for the cosine schedule): rounds × epochs ×
    steps per epoch, one pair per prompt (APPO: K sequences per prompt)."""
    lc = cfg.learner
    per_step = lc.micro_batch_size * lc.grad_accum_steps * lc.num_ranks
    if cfg.algorithm == "appo":
        items, epochs = cfg.rollout.prompts_per_round * cfg.rollout.samples_per_prompt, lc.ppo_epochs
    else:
        items, epochs = cfg.rollout.prompts_per_round, lc.epochs_per_round
    return max(1, cfg.rounds * epochs * ceil_div(items, per_step))


def plan_micro_batches(
    n: int, world_size: int, micro_batch_size: int, grad_accum_steps: int = 1, seed: int = 0, unit: int = 1
) -> list[list[list[int]]]:
    """Assign ``n`` items (in units of ``unit`` consecutive items, e.g. the K samples of
    a prompt) to ``world_size`` ranks: ``plan[rank][step]`` is a list of item indices.

    Every rank gets the same number of micro-batches, a multiple of
    ``grad_accum_steps``, each non-empty and at most ``micro_batch_size`` units. When
    units do not divide evenly, a few units are visited twice (wrapping around the
    shuffled order) rather than dropped.
    """
    if n <= 0:
        return [[] for _ in range(world_size)]
    if n % unit:
        raise ValueError(f"{n} items do not split into units of {unit}")
    units = n // unit
    per_rank = ceil_div(units, world_size)
    steps = ceil_div(per_rank, micro_batch_size)
    steps = ceil_div(steps, grad_accum_steps) * grad_accum_steps
    per_rank = max(per_rank, steps)
    order = list(range(units))
    random.Random(seed).shuffle(order)
    needed = per_rank * world_size
    tiled = (order * ceil_div(needed, units))[:needed]
    plan = []
    for r in range(world_size):
        mine = tiled[r * per_rank : (r + 1) * per_rank]
        # Near-equal split into exactly `steps` micro-batches (sizes differ by ≤ 1).
        q, rem = divmod(len(mine), steps)
        batches, start = [], 0
        for s in range(steps):
            size = q + (1 if s < rem else 0)
            chunk = mine[start : start + size]
            start += size
            batches.append([u * unit + j for u in chunk for j in range(unit)])
        plan.append(batches)
    return plan


@contextlib.contextmanager
def _weights_only_loads():
    """DeepSpeed unpickles its checkpoint files with ``weights_only=False`` (hard-coded).
    Force torch's restricted unpickler for those loads, allowing only the few DeepSpeed
    types its optimizer states hold, so a tampered file cannot run code on a rank."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def gather(refs: list, poll_s: float = 1.0) -> list:
    """``ray.get`` of every rank's result that fails as soon as one rank fails: when a
    rank dies, the others block in a collective (until its timeout) and a plain
    ``ray.get`` of all of them would wait that long before reporting anything."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
        for ref in ready:
            ray.get(ref)  # raises the rank's error (RayActorError for a dead rank) now
    return ray.get(list(refs))


def merge_metrics(parts: Sequence[dict[str, Any]], prefix: str = "train/") -> dict[str, float]:
    """Combine the ranks' ``{"sums": {...}, "count": n, ...}`` into weighted means."""
    sums: dict[str, float] = {}
    count = 0.0
    extra: dict[str, float] = {}
    for p in parts:
        count += p["count"]
        for k, v in p["sums"].items():
            sums[k] = sums.get(k, 0.0) + v
        for k, v in p.get("last", {}).items():
            extra[k] = v  # identical across ranks (lr, steps, grad norm)
    out = {f"{prefix}{k}": v / max(count, 1e-12) for k, v in sums.items()}
    out.update({f"{prefix}{k}": v for k, v in extra.items()})
    return out


def winner_example(record: dict) -> dict:
    """SFT example from a pair record's chosen side (keeps system prompt and history),
    or the example itself if it already is ``{"prompt", "response"}``."""
    if "response" in record:
        return record
    out = {"prompt": record["prompt"], "response": record["chosen"]["text"]}
    for key in ("system", "history"):
        if record.get(key):
            out[key] = record[key]
    return out


# --------------------------------------------------------------------------- rank actor


def _setup_threads() -> None:
    # Ranks share a 2-core machine in tests; oversubscribed OpenMP threads thrash.
    n = int(os.environ.get("TWODRL_TORCH_THREADS", "1"))
    torch.set_num_threads(n)
    import warnings

    # DeepSpeed's ZeRO calls a torch.distributed alias that torch now flags on every step.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def _shuffled_epochs(n: int, epochs: int, seed: int):
    """Micro-batch indices for ``epochs`` passes, each pass in a fresh seeded order."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(n))
        rng.shuffle(order)
        yield from order


class DeepSpeedRank:
    """What every DeepSpeed rank actor shares, whatever it trains: the policy learner
    (:class:`LearnerRank`) and the reward-model trainer
    (:class:`actors.reward_learner.RewardLearnerRank`). The process group, the engine
    (ZeRO stage, precision and clipping from :func:`build_ds_config`), the optimizer
    step, loading a checkpoint and publishing one atomically, teardown.

    A subclass sets ``lc`` (the :class:`LearnerConfig` the engine is built from),
    ``rank``, ``world_size``, ``on_gpu``, ``device``, ``engine`` and ``_round``."""

    def ready(self) -> int:
        return os.getpid()

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: its node IP and a free port for the process group."""
        return node_ip(), free_port()

    def _init_process_group(self, master_addr: str, master_port: int) -> str:
        """Join the group's torch.distributed process group (NCCL on GPU, gloo on CPU);
        returns the backend."""
        import deepspeed

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0" if not self.on_gpu else str(torch.cuda.current_device()),
        )
        backend = "nccl" if self.on_gpu else "gloo"
        # A rank that never arrives (its node died during start-up) must fail the group,
        # not leave the others waiting forever; the timeout also bounds every later
        # collective of this group.
        from datetime import timedelta

        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, rank=self.rank, world_size=self.world_size, verbose=False,
            timeout=timedelta(seconds=float(self.lc.init_timeout_s)),
        )
        return backend

    def _init_engine(self, model: torch.nn.Module, total_steps: int,
                     schedule: Optional[Callable[[int], float]] = None, betas: tuple[float, float] = (0.9, 0.95)):
        """The DeepSpeed engine around ``model``: AdamW on its trainable parameters at
        ``lc.lr``, stepped through ``schedule`` (default: ``lc.lr_schedule`` over
        ``total_steps``), under :func:`build_ds_config`."""
        import deepspeed

        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=self.lc.lr, weight_decay=self.lc.weight_decay,
            betas=betas,
        )
        if schedule is None:
            schedule = lr_lambda(self.lc.lr_schedule, int(self.lc.warmup_ratio * total_steps), total_steps)
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=build_ds_config(self.lc, self.world_size, self.on_gpu),
        )
        return engine

    def _step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def _last(self) -> dict[str, float]:
        lr = self.engine.get_lr()[0] if self.engine.get_lr() else self.lc.lr
        norm = self.engine.get_global_grad_norm()
        out = {"lr": float(lr), "optimizer_steps": float(self.engine.global_steps)}
        if norm is not None:
            out["grad_norm"] = float(norm)
        return out

    def rng_state(self) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        torch.set_rng_state(state)

    def set_round(self, r: int) -> None:
        self._round = int(r)

    def load_checkpoint(self, directory: str) -> dict:
        d = Path(directory) / DS_SUBDIR
        with _weights_only_loads():
            path, client = self.engine.load_checkpoint(
                str(d), tag="latest_round", load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {d}")
        self._round = int((client or {}).get("round", 0))
        return {"path": path, **(client or {})}

    def finalize(self, tmp: str, final: str) -> None:
        """Rank 0: move a finished checkpoint into place (atomic rename)."""
        from twodrl.checkpoint import replace_directory

        replace_directory(tmp, final, manifest=True)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class LearnerRank(DeepSpeedRank, WeightSenderMixin):
    """One DeepSpeed rank. Created by :class:`PolicyLearnerGroup`; every method that
    touches the engine is collective and must be called on all ranks together."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int):
        redirect_actor_output()  # DeepSpeed's logs go to RUN_DIR/logs/learner-N.log
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if cfg.learner.num_gpus_per_rank == 0 else "cuda")
        _setup_threads()
        self.cfg = cfg
        self.lc = cfg.learner
        self.rank = rank
        self.world_size = world_size
        self.on_gpu = cfg.learner.num_gpus_per_rank > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.engine = None
        self.ref_model = None
        self.tokenizer = None
        self.weights = list(cfg.aspects.weights)
        self.aspects = list(cfg.aspects.names)
        self._round = 0
        self._lora = cfg.learner.lora.enabled
        self._lora_folds: list[dict[str, torch.Tensor]] = []  # see twodrl.models.lora (folds)

    def setup(self, master_addr: str, master_port: int, total_steps: int) -> dict[str, Any]:
        from twodrl.models.loading import load_causal_lm, load_tokenizer

        backend = self._init_process_group(master_addr, master_port)
        policy_cfg = self._model_cfg(self.cfg.policy)
        self.tokenizer = load_tokenizer(policy_cfg)
        # The full model is loaded, then deepspeed.initialize partitions it (ZeRO-3).
        # transformers' zero.Init loading path would avoid the full copy per rank but
        # needs `accelerate`, which the install does not bring; for models too large for
        # one host's memory, add it and wrap this call in HfDeepSpeedConfig.
        model = load_causal_lm(policy_cfg, device=self.device)
        if self.lc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if self._lora:
            from twodrl.models import lora

            # The base weights are frozen by peft; only the adapter reaches the optimizer.
            model = lora.wrap(model, self.lc.lora, self.lc.gradient_checkpointing)
        model.train()
        self.engine = self._init_engine(model, total_steps)
        if self._lora:
            from twodrl.models import lora

            # The base weights are the reference: the same module with the adapter off.
            self.ref_model = lora.AdapterOffReference(self.engine.module)
        elif self.lc.colocate_reference:
            self.ref_model = self._load_reference(partitioned=self.lc.zero_stage == 3)
        return {"rank": self.rank, "pid": os.getpid(), "backend": backend, "device": str(self.device)}

    def _model_cfg(self, m: ModelConfig) -> ModelConfig:
        from dataclasses import replace

        # fp32 master weights on every device; bf16 compute is DeepSpeed's job on GPU.
        return replace(m, dtype="float32")

    def _load_reference(self, partitioned: bool, state: Optional[dict[str, torch.Tensor]] = None):
        import deepspeed

        from twodrl.models.loading import load_causal_lm

        ref_cfg = self._model_cfg(self.cfg.reference or self.cfg.policy)
        ref = load_causal_lm(ref_cfg, device=self.device)
        if state is not None:
            _load_full_state(ref, state)
        for p in ref.parameters():
            p.requires_grad_(False)
        if partitioned:
            ds_config = build_reference_ds_config(self.lc, self.world_size, self.on_gpu)
            engine, *_ = deepspeed.initialize(model=ref, config=ds_config)
            engine.eval()
            return engine
        return ref.eval()

    def reset_reference_to_policy(self) -> bool:
        """Make the reference a frozen copy of the current policy. The driver calls it
        after the SFT warm start, so KL and implicit rewards are measured against the
        policy the online rounds start from, not the random init. Collective under
        ZeRO-3 (every rank gathers the full parameters). With LoRA the adapter is
        folded into the base weights instead (:meth:`_fold_adapter`)."""
        if self._lora:
            self._fold_adapter()
            return True
        state = self._full_state_dict()
        if self.ref_model is None:
            return False
        self.ref_model = self._load_reference(partitioned=self.lc.zero_stage == 3, state=state)
        return True

    def _fold_adapter(self) -> None:
        """LoRA: move the adapter's update into the base weights and zero ``B`` (and the
        adapter's Adam moments): the policy is unchanged and the adapter-off reference is
        now the current policy. Recorded, so a loaded checkpoint can rebuild the base."""
        from twodrl.models import lora

        module = self.engine.module
        if lora.adapter_is_zero(module):
            return  # nothing to fold (e.g. a resume re-running the reset)
        fold = lora.adapter_state(module)
        lora.apply_fold(module, fold)
        self._lora_folds.append(fold)
        with torch.no_grad():
            for p in lora.lora_b_parameters(module):
                p.zero_()
                _set_master_param(p, torch.zeros_like(p))
            for p in lora.adapter_parameters(module):
                _zero_adam_moments(self.engine.optimizer, p)

    def _sync_lora_folds(self, directory: str) -> None:
        """Bring the base weights to the folds a checkpoint was saved with: apply the
        ones this model lacks. The base cannot be unfolded, so a model with folds the
        checkpoint does not list is an error (start a new learner group)."""
        from twodrl.models import lora

        saved = lora.load_folds(directory)
        have = self._lora_folds
        if len(have) > len(saved) or not all(lora.same_fold(a, b) for a, b in zip(have, saved)):
            raise RuntimeError(f"{directory}: the LoRA folds of this learner ({len(have)}) are not a prefix of the "
                               f"checkpoint's ({len(saved)}); load it into a freshly started learner group")
        for fold in saved[len(have):]:
            lora.apply_fold(self.engine.module, fold)
            self._lora_folds.append(fold)

    # ------------------------------------------------------------------ forward passes

    @torch.no_grad()
    def reference_logps(self, micro_batches: list[list[dict]], kind: str = "pairs") -> list[torch.Tensor]:
        """Reference token log-probs ``[rows, T]`` per micro-batch (CPU tensors)."""
        if self.ref_model is None:
            raise RuntimeError("this rank has no colocated reference (learner.colocate_reference is false)")
        return [_token_logps(self.ref_model, self._collate(mb, kind), self.device)[0].cpu() for mb in micro_batches]

    @torch.no_grad()
    def policy_logps(self, micro_batches: list[list[dict]], kind: str = "sequences") -> list[list[list[float]]]:
        """Per-token log-probs of each item's response tokens under the current policy."""
        from twodrl.objectives import unpad_response

        self.engine.eval()
        out = []
        try:
            for mb in micro_batches:
                batch = self._collate(mb, kind)
                lp, _ = _token_logps(self.engine, batch, self.device)
                out.extend(unpad_response(lp.cpu(), batch.response_mask))
        finally:
            self.engine.train()
        return out

    @torch.no_grad()
    def segment_logps(self, micro_batches: list[list[dict]]) -> list[dict]:
        """Per-token log-probs and segment ids of both responses of each pair record,
        under the current policy: ``{"chosen"|"rejected": {"token_logps", "segment_ids"}}``
        per pair, in micro-batch order. Collated exactly like ``train_pairs`` batches, so
        tokens and segments are the ones training sees. Collective under ZeRO-3."""
        from twodrl.objectives import unpad_response

        self.engine.eval()
        out = []
        try:
            for mb in micro_batches:
                batch = self._collate(mb, "pairs")
                lp, _ = _token_logps(self.engine, batch, self.device)
                logps = unpad_response(lp.cpu(), batch.response_mask)
                segs = [row[m].tolist() for row, m in zip(batch.segment_ids, batch.response_mask)]
                P = batch.num_pairs  # rows [0, P) chosen, [P, 2P) rejected
                for i in range(P):
                    out.append({
                        "chosen": {"token_logps": logps[i], "segment_ids": segs[i]},
                        "rejected": {"token_logps": logps[P + i], "segment_ids": segs[P + i]},
                    })
        finally:
            self.engine.train()
        return out

    def _collate(self, items: list[dict], kind: str):
        from twodrl import objectives

        max_length = self.cfg.policy.max_length
        if kind == "pairs":
            return objectives.collate_pairs(self.tokenizer, items, self.aspects, max_length)
        if kind == "sequences":
            return objectives.collate_sequences(self.tokenizer, items, max_length)
        if kind == "appo":
            return objectives.collate_rollouts(self.tokenizer, items, self.aspects, max_length)
        raise ValueError(f"unknown batch kind {kind!r}")

    # ------------------------------------------------------------------ training

    def train_pairs(
        self,
        micro_batches: list[list[dict]],
        algorithm: str,
        ref_logps: Optional[list[torch.Tensor]],
        epochs: int,
        seed: int,
    ) -> dict[str, Any]:
        from twodrl import objectives

        needs_logits = algorithm in objectives.NEEDS_REFERENCE_LOGITS
        batches = [self._collate(mb, "pairs") for mb in micro_batches]
        if ref_logps is None:
            with torch.no_grad():
                ref_logps = [_token_logps(self.ref_model, b, self.device)[0] for b in batches]
        sums: dict[str, float] = {}
        count = 0
        for i in _shuffled_epochs(len(batches), epochs, seed + 7919 * self.rank):
            batch = batches[i].to(self.device)
            lp, logits = _token_logps(self.engine, batch, self.device, return_logits=needs_logits)
            reference = {"token_logps": ref_logps[i].to(self.device)}
            if needs_logits:
                with torch.no_grad():
                    _, ref_logits = _token_logps(self.ref_model, batch, self.device, return_logits=True)
                reference["logits"] = ref_logits
            loss, metrics = objectives.compute_preference_loss(
                algorithm, {"token_logps": lp, "logits": logits}, reference, batch, self.lc, self.weights
            )
            self._step(loss)
            n = batch.size
            count += n
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
        return {"sums": sums, "count": count, "last": self._last()}

    def train_sft(self, micro_batches: list[list[dict]], epochs: int, seed: int, lr: Optional[float] = None) -> dict:
        """NLL on responses (warm start with its own constant lr; DPA-RSF with the
        learner's schedule)."""
        from twodrl import objectives

        batches = [self._collate(mb, "sequences") for mb in micro_batches]
        saved = None
        if lr is not None:
            # A fixed lr for this call: park the scheduler (DeepSpeed steps it on every
            # optimizer step) and restore both afterwards.
            saved = (self.engine.lr_scheduler, [g["lr"] for g in self.engine.optimizer.param_groups])
            self.engine.lr_scheduler = None
            for g in self.engine.optimizer.param_groups:
                g["lr"] = lr
        sums: dict[str, float] = {}
        count = 0
        try:
            for i in _shuffled_epochs(len(batches), epochs, seed + 7919 * self.rank):
                batch = batches[i].to(self.device)
                lp, _ = _token_logps(self.engine, batch, self.device)
                loss, metrics = objectives.compute_sft_loss(lp, batch.response_mask)
                self._step(loss)
                count += batch.size
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * batch.size
            last = self._last()
        finally:
            if saved is not None:
                self.engine.lr_scheduler = saved[0]
                for g, old in zip(self.engine.optimizer.param_groups, saved[1]):
                    g["lr"] = old
        return {"sums": sums, "count": count, "last": last}

    def train_appo(
        self,
        micro_batches: list[list[dict]],
        ref_logps: Optional[list[torch.Tensor]],
        epochs: int,
        seed: int,
        group_size: int,
        weights: Optional[Sequence[float]] = None,
    ) -> dict[str, Any]:
        from twodrl import objectives

        weights = list(weights) if weights is not None else self.weights

        batches = [self._collate(mb, "appo") for mb in micro_batches]
        prepared = []
        with torch.no_grad():
            self.engine.eval()
            for i, b in enumerate(batches):
                # The behaviour policy's log-probs, recomputed here so that they come
                # from exactly the weights being trained (sampler log-probs differ by
                # kernel and temperature).
                old, _ = _token_logps(self.engine, b, self.device)
                ref = ref_logps[i].to(self.device) if ref_logps is not None else _token_logps(self.ref_model, b, self.device)[0]
                adv = objectives.appo_advantages(b, weights, group_size, self.lc)
                prepared.append((old, ref, adv))
            self.engine.train()
        sums: dict[str, float] = {}
        count = 0
        for i in _shuffled_epochs(len(batches), epochs, seed + 7919 * self.rank):
            batch = batches[i].to(self.device)
            old, ref, adv = prepared[i]
            lp, _ = _token_logps(self.engine, batch, self.device)
            loss, metrics = objectives.compute_appo_loss(
                lp, old, ref, adv.advantages, adv.mask, batch.response_mask, self.lc
            )
            self._step(loss)
            count += batch.size
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * batch.size
        return {"sums": sums, "count": count, "last": self._last()}

    def train_ars(
        self,
        micro_batches: list[list[dict]],
        ref_logps: Optional[list[torch.Tensor]],
        epochs: int,
        seed: int,
        group_size: int,
        weights: Optional[Sequence[float]] = None,
    ) -> dict[str, Any]:
        """Adaptive rejection sampling: each micro-batch holds whole groups of K samples;
        only the selected sample of each prompt is run through the model (selection needs
        the tokenization and scores, not a forward pass)."""
        from twodrl import objectives

        weights = list(weights) if weights is not None else self.weights
        prepared = []
        for i, mb in enumerate(micro_batches):
            full = self._collate(mb, "appo")
            t = objectives.ars_targets(full, weights, group_size, self.lc)
            sub = objectives.select_rows(full, t.rows)
            if ref_logps is not None:
                ref = ref_logps[i].index_select(0, t.rows.cpu())
            else:
                with torch.no_grad():
                    ref = _token_logps(self.ref_model, sub, self.device)[0]
            prepared.append((sub, ref, t.keep_mask))
        sums: dict[str, float] = {}
        count = 0
        for i in _shuffled_epochs(len(prepared), epochs, seed + 7919 * self.rank):
            sub, ref, keep = prepared[i]
            batch = sub.to(self.device)
            lp, _ = _token_logps(self.engine, batch, self.device)
            loss, metrics = objectives.compute_ars_loss(
                lp, ref.to(self.device), keep.to(self.device), batch.response_mask, self.lc
            )
            self._step(loss)
            count += batch.size
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * batch.size
        return {"sums": sums, "count": count, "last": self._last()}

    # ------------------------------------------------------------------ offline, step by step

    def _offline_reference(self, batch, ref: Optional[list], i: int, needs_logits: bool) -> dict[str, torch.Tensor]:
        """Reference outputs for micro-batch ``i``: token log-probs from the offline
        cache (per-pair lists) or the reference actor (a padded tensor) when given, else
        from the colocated model, which also gives TDPO its logits."""
        from twodrl.offline import fill_reference

        reference: dict[str, torch.Tensor] = {}
        given = ref[i] if ref is not None else None
        if given is not None:
            lp = given if torch.is_tensor(given) else fill_reference(batch.response_mask.cpu(), batch.num_pairs, given)
            reference["token_logps"] = lp.to(self.device)
        if needs_logits or given is None:
            if self.ref_model is None:
                raise RuntimeError("no reference log-probs were given and this rank holds no reference model")
            with torch.no_grad():
                lp, logits = _token_logps(self.ref_model, batch, self.device, return_logits=needs_logits)
            reference.setdefault("token_logps", lp)
            reference["logits"] = logits
        return reference

    def offline_steps(self, micro_batches: list[list[dict]], algorithm: str, ref: Optional[list],
                      accum: int) -> list[dict[str, Any]]:
        """Train on the micro-batches in the order given (the driver owns the data
        order, so a resume can continue it exactly); one entry of metrics per optimizer
        step, i.e. per ``accum`` micro-batches (DeepSpeed steps the optimizer on the
        accumulation boundary and scales each micro-batch's loss by 1/accum)."""
        from twodrl import objectives

        needs_logits = algorithm in objectives.NEEDS_REFERENCE_LOGITS
        out: list[dict[str, Any]] = []
        sums: dict[str, float] = {}
        count = tokens = 0
        for i, mb in enumerate(micro_batches):
            batch = self._collate(mb, "pairs").to(self.device)
            reference = self._offline_reference(batch, ref, i, needs_logits)
            lp, logits = _token_logps(self.engine, batch, self.device, return_logits=needs_logits)
            loss, metrics = objectives.compute_preference_loss(
                algorithm, {"token_logps": lp, "logits": logits}, reference, batch, self.lc, self.weights
            )
            self._step(loss)
            n = batch.size
            count += n
            tokens += int(batch.attention_mask.sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            if (i + 1) % accum == 0:
                out.append({"sums": sums, "count": count, "tokens": tokens, "last": self._last()})
                sums, count, tokens = {}, 0, 0
        return out

    @torch.no_grad()
    def offline_eval(self, micro_batches: list[list[dict]], algorithm: str, ref: Optional[list]) -> list[dict]:
        """Eval-mode loss and reward metrics per micro-batch, plus per-aspect margins
        (``rewards/margins/<aspect>``, see ``twodrl.offline.aspect_margins``)."""
        from twodrl import objectives
        from twodrl.offline import aspect_margins

        needs_logits = algorithm in objectives.NEEDS_REFERENCE_LOGITS
        self.engine.eval()
        out = []
        try:
            for i, mb in enumerate(micro_batches):
                batch = self._collate(mb, "pairs").to(self.device)
                reference = self._offline_reference(batch, ref, i, needs_logits)
                lp, logits = _token_logps(self.engine, batch, self.device, return_logits=needs_logits)
                _, metrics = objectives.compute_preference_loss(
                    algorithm, {"token_logps": lp, "logits": logits}, reference, batch, self.lc, self.weights
                )
                ratios = (lp - reference["token_logps"]) * batch.response_mask
                margins = aspect_margins(ratios, batch.segment_ids, batch.scores, batch.num_pairs, self.lc.beta,
                                         self.aspects)
                metrics.update({f"rewards/margins/{a}": float(m.mean()) for a, m in margins.items()})
                out.append({"metrics": metrics, "count": batch.size})
        finally:
            self.engine.train()
        return out

    @torch.no_grad()
    def pair_reference_logps(self, micro_batches: list[list[dict]]) -> list[tuple[list[float], list[float]]]:
        """(chosen, rejected) response-token log-probs of every pair under the colocated
        reference, for the offline cache. Collective under ZeRO-3."""
        from twodrl.objectives import unpad_response

        if self.ref_model is None:
            raise RuntimeError("this rank has no colocated reference (learner.colocate_reference is false)")
        out = []
        for mb in micro_batches:
            batch = self._collate(mb, "pairs")
            lp, _ = _token_logps(self.ref_model, batch, self.device)
            rows = unpad_response(lp.float().cpu(), batch.response_mask.cpu())
            P = batch.num_pairs
            out.extend((rows[i], rows[P + i]) for i in range(P))
        return out

    def release_reference(self) -> bool:
        """Free the colocated reference once its log-probs are cached."""
        had = self.ref_model is not None
        self.ref_model = None
        import gc

        gc.collect()
        return had

    def save_hf(self, directory: str) -> None:
        """The policy alone in Hugging Face format (rank 0 writes; ZeRO-3 gathers are
        collective, so every rank takes part)."""
        from twodrl.models.loading import save_pretrained_safe

        state = self._full_state_dict() if (self.rank == 0 or self.lc.zero_stage == 3) else {}
        if self.rank == 0:
            if self._lora:
                from twodrl.models import lora
                from twodrl.models.loading import resolve_model_path

                # The merged weights under the base names: a plain model for any loader;
                # the adapter beside it (relative to the base with any folds applied).
                module = self.engine.module
                save_pretrained_safe(_StateModel(module.get_base_model(), state), self.tokenizer, directory)
                lora.save_adapter(module, Path(directory) / LORA_SUBDIR, resolve_model_path(self.cfg.policy.path))
            else:
                save_pretrained_safe(_StateModel(self.engine.module, state), self.tokenizer, directory)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, directory: str) -> None:
        """Collective: every rank writes its DeepSpeed shard; rank 0 also writes the
        Hugging Face policy (full weights, gathered under ZeRO-3)."""
        from twodrl.models.loading import save_pretrained_safe

        d = Path(directory)
        # With LoRA the frozen base weights stay out (they are the policy's own files,
        # plus the recorded folds): the checkpoint is the adapter and its optimizer.
        self.engine.save_checkpoint(str(d / DS_SUBDIR), tag="latest_round", client_state={"round": self._round},
                                    exclude_frozen_parameters=self._lora)
        if self._lora:
            if self.rank == 0:
                from twodrl.models import lora
                from twodrl.models.loading import resolve_model_path

                lora.save_adapter(self.engine.module, d / LORA_SUBDIR, resolve_model_path(self.cfg.policy.path))
                if self._lora_folds:
                    lora.save_folds(self._lora_folds, d)
            return
        # ZeRO-3 gathers are collective: every rank walks the parameters; otherwise
        # rank 0 already holds them all.
        state = self._full_state_dict() if (self.rank == 0 or self.lc.zero_stage == 3) else {}
        if self.rank == 0:
            model = self.engine.module
            save_pretrained_safe(_StateModel(model, state), self.tokenizer, d / HF_SUBDIR)

    def load_checkpoint(self, directory: str) -> dict:
        if self._lora:
            self._sync_lora_folds(directory)
        d = Path(directory) / DS_SUBDIR
        with _weights_only_loads():
            path, client = self.engine.load_checkpoint(
                str(d), tag="latest_round", load_optimizer_states=True, load_lr_scheduler_states=True,
                load_module_strict=not self._lora,  # LoRA: the adapter only (see save_checkpoint)
            )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {d}")
        self._round = int((client or {}).get("round", 0))
        return {"path": path, **(client or {})}

    def restart_lr_schedule(self, total_steps: int) -> None:
        """A fresh lr schedule (``learner.lr_schedule`` with its warm-up) over the next
        ``total_steps`` optimizer steps, for a fine-tune that starts over (DPA's rounds
        from the SFT policy). The run-long schedule built in :meth:`setup` would leave
        every restarted round at its start."""
        warmup = int(self.lc.warmup_ratio * total_steps)
        optimizer = getattr(self.engine, "basic_optimizer", None) or self.engine.optimizer
        for g in optimizer.param_groups:
            g["lr"] = g.get("initial_lr", self.lc.lr)
        self.engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(self.lc.lr_schedule, warmup, total_steps)
        )

    # ------------------------------------------------------------------ weights

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unpartitioned) parameters on CPU. Collective under ZeRO-3."""
        return dict(self.named_full_parameters())

    def named_full_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """(HF name, full tensor copied to CPU) for every parameter, in module order.
        Under ZeRO-3 each parameter is gathered in turn (collective on all ranks)."""
        from actors.weight_sync import named_full_parameters

        return [(n, t.to("cpu", copy=True)) for n, t in named_full_parameters(self.weight_sync_model())]

    # WeightSenderMixin hooks (actors/weight_sync.py): the mixin's
    # stream_weights / weight_sync_endpoint / init_weight_group /
    # broadcast_weights run on every rank (ZeRO-3 gathers are collective); rank 0 sends.
    def weight_sync_model(self) -> torch.nn.Module:
        if self._lora:
            from twodrl.models.lora import MergedView

            # Rollouts serve the merged model under the base names (no adapter tensors).
            return MergedView(self.engine.module)
        return self.engine.module

    def weight_sync_rank(self) -> int:
        return self.rank

    def weight_sync_dtype(self) -> Optional[torch.dtype]:
        # Rollout engines run in the policy's configured dtype; fp32 master weights are
        # cast once per bucket on the learner, halving the bytes moved for bf16.
        from twodrl.models.loading import torch_dtype

        return torch_dtype(self.cfg.policy) if self.on_gpu else None

    def shutdown(self) -> None:
        self.close_weight_segment()  # the actor is killed next: atexit would not run
        super().shutdown()


class _StateModel:
    """Lets ``save_pretrained_safe`` write a model whose parameters are partitioned:
    save_pretrained is called with an explicit full state dict."""

    def __init__(self, model, state_dict):
        self._model = model
        self._state = state_dict
        self.generation_config = getattr(model, "generation_config", None)

    def save_pretrained(self, path, safe_serialization: bool = True):
        self._model.save_pretrained(path, state_dict=self._state, safe_serialization=safe_serialization)


def _token_logps(model, batch, device, return_logits: bool = False):
    from twodrl.objectives import forward_token_logps

    return forward_token_logps(model, batch.to(device), return_logits=return_logits)


def _set_master_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write a trained parameter where the optimizer will read it: ZeRO-1/2 keeps its own
    fp32 partition of every trained parameter and copies it back after each step, so
    writing the module's parameter alone would be undone. A no-op without ZeRO."""
    from deepspeed.utils import safe_set_full_fp32_param

    if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
        safe_set_full_fp32_param(p, value)


def _zero_adam_moments(optimizer: Any, p: torch.nn.Parameter) -> None:
    """Clear a parameter's Adam moments (ZeRO partitions or the plain torch optimizer)."""
    from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    for key in ("exp_avg", "exp_avg_sq"):
        if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
            state = safe_get_full_optimizer_state(p, key)
            if state is not None:
                safe_set_full_optimizer_state(p, torch.zeros_like(state), key)
        else:
            state = getattr(optimizer, "state", {}).get(p, {})
            if key in state:
                state[key].zero_()


def _load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full (gathered) parameters by name; every parameter of ``model`` must be
    covered (tied weights may appear once)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"reference reset: missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")


class ReferenceServer:
    """The frozen reference model as its own actor (``reference-0``), used when
    ``learner.colocate_reference`` is false: log-probs for every rank's micro-batches."""

    def __init__(self, cfg: RunConfig):
        redirect_actor_output()  # RUN_DIR/logs/reference-0.log
        _setup_threads()
        from dataclasses import replace

        from twodrl.models.loading import load_causal_lm, load_tokenizer

        self.cfg = cfg
        on_gpu = cfg.learner.num_gpus_per_rank > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda") if on_gpu else torch.device("cpu")
        mc = replace(cfg.reference or cfg.policy, dtype="bfloat16" if on_gpu and cfg.learner.bf16 else "float32")
        self.model = load_causal_lm(mc, device=self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = load_tokenizer(replace(cfg.policy))
        self.aspects = list(cfg.aspects.names)

    def ready(self) -> int:
        return os.getpid()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the reference weights (see ``LearnerRank.reset_reference_to_policy``)."""
        _load_full_state(self.model, state)

    @torch.no_grad()
    def logps(self, micro_batches: list[list[dict]], kind: str = "pairs") -> list[torch.Tensor]:
        from twodrl import objectives

        out = []
        for mb in micro_batches:
            if kind == "pairs":
                b = objectives.collate_pairs(self.tokenizer, mb, self.aspects, self.cfg.policy.max_length)
            elif kind == "appo":
                b = objectives.collate_rollouts(self.tokenizer, mb, self.aspects, self.cfg.policy.max_length)
            else:
                b = objectives.collate_sequences(self.tokenizer, mb, self.cfg.policy.max_length)
            out.append(objectives.forward_token_logps(self.model, b.to(self.device))[0].float().cpu())
        return out


    @torch.no_grad()
    def pair_logps(self, micro_batches: list[list[dict]]) -> list[tuple[list[float], list[float]]]:
        """(chosen, rejected) response-token log-probs of every pair (offline cache)."""
        from twodrl import objectives

        out = []
        for mb in micro_batches:
            b = objectives.collate_pairs(self.tokenizer, mb, self.aspects, self.cfg.policy.max_length)
            lp = objectives.forward_token_logps(self.model, b.to(self.device))[0].float().cpu()
            rows = objectives.unpad_response(lp, b.response_mask.cpu())
            P = b.num_pairs
            out.extend((rows[i], rows[P + i]) for i in range(P))
        return out


# --------------------------------------------------------------------------- driver handle


class DeepSpeedGroup:
    """Driver side of a group of DeepSpeed rank actors (:class:`DeepSpeedRank`): the
    placement group, the rank actors ``<role>-<i>``, their rendezvous and setup,
    atomic checkpoints and teardown. :class:`PolicyLearnerGroup` and
    :class:`actors.reward_learner.RewardLearnerGroup` are the two; ``role`` names the
    actors and selects their resources (:func:`actors.common.actor_request`)."""

    role = "learner"

    def _start_ranks(self, rank_cls: type, world_size: int, field_hint: str) -> None:
        """Reserve the ranks' placement group and start (or re-attach) the rank actors,
        each constructed as ``rank_cls(cfg, rank, world_size)``."""
        self._pg = learner_group(self.cfg, role=self.role)
        wait_placement_group(self._pg, field_hint=field_hint)
        remote_cls = ray.remote(rank_cls)
        self.ranks = []
        for i in range(world_size):
            opts = actor_options(self.role, i, self.cfg, self.namespace, placement=self._pg,
                                 bundle_index=i if self._pg else -1)
            # A rank that dies breaks the collective; the driver resumes from the last
            # checkpoint instead of restarting a rank into a dead process group.
            opts["max_restarts"] = 0
            self.ranks.append(get_or_create_actor(remote_cls, opts, self.cfg, i, world_size))

    def _setup_ranks(self, *args: Any) -> list:
        """Rendezvous at rank 0, then every rank's ``setup(addr, port, *args)``."""
        addr, port = ray.get(self.ranks[0].rendezvous.remote())
        return gather([r.setup.remote(addr, port, *args) for r in self.ranks])

    def save_checkpoint(self, directory: str) -> str:
        """Every rank's DeepSpeed state (optimizer, scheduler) in ``<dir>/deepspeed``
        and the model in Hugging Face format beside it (the rank class decides where).
        Written to a temporary sibling and renamed, so ``directory`` is either absent,
        the old or the complete new one. Multi-node clusters need ``directory`` on
        shared storage."""
        final = Path(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{final.name}.tmp.", dir=final.parent)
        try:
            gather([r.set_round.remote(self._round) for r in self.ranks])
            gather([r.save_checkpoint.remote(tmp) for r in self.ranks])
            ray.get(self.ranks[0].finalize.remote(tmp, str(final)))
        finally:
            if Path(tmp).exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return str(final)

    def load_checkpoint(self, directory: str) -> dict:
        from twodrl.checkpoint import verify_manifest

        # Every file is the one that was written, before any rank unpickles a byte of it.
        verify_manifest(directory)
        outs = gather([r.load_checkpoint.remote(directory) for r in self.ranks])
        self._round = int(outs[0].get("round", 0))
        return outs[0]

    def _other_actors(self) -> list:
        """Actors besides the ranks that :meth:`shutdown` ends."""
        return []

    def shutdown(self) -> None:
        try:
            ray.get([r.shutdown.remote() for r in self.ranks], timeout=30)
        except Exception:  # noqa: BLE001 - best effort on teardown
            pass
        for a in self.ranks + self._other_actors():
            ray.kill(a, no_restart=True)
        if self._pg is not None:
            ray.util.remove_placement_group(self._pg)


class PolicyLearnerGroup(DeepSpeedGroup):
    """Driver-side handle of the learner ranks (a plain class, not an actor).

    Methods block until every rank is done and return plain Python values; metrics are
    weighted means over ranks under TRL names with a ``train/`` prefix.
    """

    def __init__(
        self,
        cfg: RunConfig,
        namespace: Optional[str] = None,
        total_steps: Optional[int] = None,
        validate: bool = True,
    ):
        self.cfg = cfg
        self.lc = cfg.learner
        self.namespace = namespace or run_namespace(cfg)
        self.world_size = cfg.learner.num_ranks
        self.total_steps = total_steps or estimate_total_steps(cfg)
        self._round = 0
        if validate:
            validate_placement(cfg, roles=("learner", "reference"))
        self._start_ranks(LearnerRank, self.world_size, "learner.num_gpus_per_rank × learner.num_ranks")
        self.reference = None
        if role_resources(cfg, "reference").count:  # the one count the planner reads too
            ref_opts = actor_options("reference", 0, cfg, self.namespace)
            self.reference = get_or_create_actor(ray.remote(ReferenceServer), ref_opts, cfg)
        self.info = self._setup_ranks(self.total_steps)

    # ------------------------------------------------------------------ helpers

    def _plan(self, n: int, unit: int = 1, micro: Optional[int] = None) -> list[list[list[int]]]:
        seed = self.cfg.seed * 1_000_003 + self._round
        return plan_micro_batches(
            n, self.world_size, micro or self.lc.micro_batch_size, self.lc.grad_accum_steps, seed=seed, unit=unit
        )

    def _reference_logps(self, shards: list[list[list[dict]]], kind: str) -> list[Optional[list[torch.Tensor]]]:
        if self.reference is None:
            return [None] * len(shards)
        return ray.get([self.reference.logps.remote(s, kind) for s in shards])

    # ------------------------------------------------------------------ public API

    def train_round(self, pairs: Sequence[dict], algorithm: str) -> dict[str, float]:
        """Train ``learner.epochs_per_round`` epochs on HelpSteer-2D pair records with
        ``algorithm``; returns ``train/loss``, ``train/rewards/*``, ``train/logps/*``,
        ``train/kl`` … averaged over all steps and ranks."""
        from twodrl.objectives import NEEDS_REFERENCE_LOGITS

        if algorithm == "dpa-rsf":
            # Rejection-sampling fine-tuning: NLL on the winners (records' chosen side or
            # plain {"prompt", "response"} examples), with the learner's schedule.
            examples = [winner_example(p) for p in pairs]
            return self.train_sft(examples, epochs=self.lc.epochs_per_round)
        if algorithm not in PREFERENCE_ALGORITHMS:
            hint = " (APPO trains on scored groups: use train_appo)" if algorithm == "appo" else ""
            raise ConfigError(
                f"algorithm: {algorithm!r} is not one of {PREFERENCE_ALGORITHMS + ('dpa-rsf',)}{hint}"
            )
        if algorithm in NEEDS_REFERENCE_LOGITS and self.reference is not None:
            raise ConfigError(
                f"algorithm {algorithm!r} needs the reference model's full distribution on every rank: "
                "set learner.colocate_reference=true"
            )
        if not pairs:
            return {}
        t0 = time.perf_counter()
        plan = self._plan(len(pairs))
        shards = [[[pairs[i] for i in mb] for mb in rank_plan] for rank_plan in plan]
        refs = self._reference_logps(shards, "pairs")
        parts = gather([
            r.train_pairs.remote(shards[k], algorithm, refs[k], self.lc.epochs_per_round, self._seed())
            for k, r in enumerate(self.ranks)
        ])
        self._round += 1
        out = merge_metrics(parts)
        out["train/pairs"] = float(len(pairs))
        out["time/learner_s"] = time.perf_counter() - t0
        return out

    def train_sft(
        self, examples: Sequence[dict], lr: Optional[float] = None, epochs: int = 1
    ) -> dict[str, float]:
        """Supervised fine-tuning on ``{"prompt", "response", "system"?, "history"?}``:
        the warm start (with its own ``lr``) and DPA-RSF (winners, learner schedule)."""
        if not examples:
            return {}
        plan = self._plan(len(examples))
        shards = [[[examples[i] for i in mb] for mb in rank_plan] for rank_plan in plan]
        parts = gather([r.train_sft.remote(shards[k], epochs, self._seed(), lr) for k, r in enumerate(self.ranks)])
        self._round += 1
        return merge_metrics(parts)

    def train_appo(self, groups: Sequence[Sequence[Any]], weights: Optional[Sequence[float]] = None,
                   aspects: Optional[Sequence[str]] = None) -> dict[str, float]:
        """APPO on K scored samples per prompt (``groups[p][k]``: objects or dicts with
        ``prompt``, ``text``, ``segments``, ``scores`` [S][A], optional ``history``/
        ``system``). Micro-batches hold whole groups so the group baseline is exact."""
        from twodrl.objectives import rollout_items

        if aspects is not None and list(aspects) != list(self.cfg.aspects.names):
            raise ConfigError(
                f"train_appo: samples are rated on {list(aspects)} but aspects.names is {self.cfg.aspects.names}"
            )
        weights = list(weights) if weights is not None else list(self.cfg.aspects.weights)
        if len(weights) != len(self.cfg.aspects.names):
            raise ConfigError(f"train_appo: {len(weights)} weights for aspects {self.cfg.aspects.names}")
        items, k = rollout_items(groups)
        if not items:
            return {}
        micro_groups = max(1, self.lc.micro_batch_size // k)
        plan = self._plan(len(items), unit=k, micro=micro_groups)
        shards = [[[items[i] for i in mb] for mb in rank_plan] for rank_plan in plan]
        refs = self._reference_logps(shards, "appo")
        parts = gather([
            r.train_appo.remote(shards[j], refs[j], self.lc.ppo_epochs, self._seed(), k, weights)
            for j, r in enumerate(self.ranks)
        ])
        self._round += 1
        return merge_metrics(parts)

    def train_ars(self, groups: Sequence[Sequence[Any]], weights: Optional[Sequence[float]] = None,
                  aspects: Optional[Sequence[str]] = None) -> dict[str, float]:
        """Adaptive rejection sampling (seed 004 Eq. 16) on K scored samples per prompt
        (``groups`` as for :meth:`train_appo`): NLL on the good tokens of each prompt's
        best sample plus ``learner.ars_kl_coef`` × KL to the reference, for
        ``learner.epochs_per_round`` epochs. Micro-batches hold whole groups (the
        baseline is the group's); ``learner.micro_batch_size`` counts selected samples."""
        from twodrl.objectives import rollout_items

        if aspects is not None and list(aspects) != list(self.cfg.aspects.names):
            raise ConfigError(
                f"train_ars: samples are rated on {list(aspects)} but aspects.names is {self.cfg.aspects.names}"
            )
        weights = list(weights) if weights is not None else list(self.cfg.aspects.weights)
        items, k = rollout_items(groups)
        if not items:
            return {}
        plan = self._plan(len(items), unit=k)
        shards = [[[items[i] for i in mb] for mb in rank_plan] for rank_plan in plan]
        refs = self._reference_logps(shards, "appo")
        parts = gather([
            r.train_ars.remote(shards[j], refs[j], self.lc.epochs_per_round, self._seed(), k, weights)
            for j, r in enumerate(self.ranks)
        ])
        self._round += 1
        out = merge_metrics(parts)
        out["train/selected"] = float(len(groups))
        return out

    def compute_logprobs(self, items: Sequence[dict]) -> list[list[float]]:
        """Per-token log-probs of each item's response under the current policy.
        Items: ``{"prompt", "response"}`` texts (chat template applied) or
        ``{"prompt_token_ids", "response_token_ids"}`` (used as given)."""
        if not items:
            return []
        plan = self._plan(len(items))
        # Results come back per rank in plan order; undo the plan's shuffle.
        shards = [[[items[i] for i in mb] for mb in rank_plan] for rank_plan in plan]
        outs = gather([r.policy_logps.remote(shards[k]) for k, r in enumerate(self.ranks)])
        result: list[Optional[list[float]]] = [None] * len(items)
        for rank_plan, out in zip(plan, outs):
            flat = [i for mb in rank_plan for i in mb]
            for i, lp in zip(flat, out):
                result[i] = lp
        return result  # type: ignore[return-value]

    def segment_logprobs(self, pairs: Sequence[dict]) -> list:
        """Per pair record, a :class:`twodrl.diagnostics.PairSegmentLogps`: per-token
        log-probs of the chosen and rejected responses with each token's segment id,
        under the current policy (eval mode, no grad), for the segment-credit
        diagnostic. Split over all ranks like ``compute_logprobs``: under ZeRO-3 every
        forward is collective, so rank 0 alone could not run it."""
        from twodrl.diagnostics import PairSegmentLogps

        if not pairs:
            return []
        plan = self._plan(len(pairs))
        shards = [[[pairs[i] for i in mb] for mb in rank_plan] for rank_plan in plan]
        outs = gather([r.segment_logps.remote(shards[k]) for k, r in enumerate(self.ranks)])
        result: list = [None] * len(pairs)
        for rank_plan, out in zip(plan, outs):
            flat = [i for mb in rank_plan for i in mb]
            for i, d in zip(flat, out):
                # The plan may visit a pair twice to even out the ranks; same weights, same values.
                result[i] = PairSegmentLogps.from_dict(d)
        return result

    def reset_reference(self) -> None:
        """Freeze the current policy as the reference model (after the warm start)."""
        states = gather([r.reset_reference_to_policy.remote() for r in self.ranks])
        if self.reference is not None:
            ray.get(self.reference.load_state.remote(dict(self.named_full_parameters())))
        elif not all(states):
            raise RuntimeError("reset_reference: a rank has no colocated reference model")

    # save_checkpoint / load_checkpoint: DeepSpeedGroup's, with the policy (HF format,
    # safetensors) in <dir>/policy and the DeepSpeed state in <dir>/deepspeed.

    def reset_to(self, directory: str, total_steps: Optional[int] = None) -> dict:
        """Put the policy back to the checkpoint in ``directory`` (weights, optimizer and
        scheduler state as saved there), e.g. the round-0 policy DPA fine-tunes afresh
        each round. Unlike :meth:`load_checkpoint` the group's round counter (which
        seeds batching and shuffles) keeps counting. ``total_steps``: also start a new
        lr schedule over that many optimizer steps."""
        kept = self._round
        out = self.load_checkpoint(directory)
        self._round = kept
        if total_steps is not None:
            gather([r.restart_lr_schedule.remote(max(1, int(total_steps))) for r in self.ranks])
        return out

    def export_weights_object_store(self, bucket_bytes: int = 64 << 20) -> list:
        """Refs to the buckets of the full policy weights in the object store, packed by
        rank 0 (every rank takes part: ZeRO-3 gathers are collective); read them with
        ``actors.weight_sync.iter_object_store_buckets``. For pushing weights into
        rollout workers use ``actors.weight_sync.sync_weights(group, workers)``."""
        return list(stream_from_learners(self.ranks, "object_store", bucket_bytes))

    def close_weight_segments(self, timeout_s: float = 30.0) -> None:
        """Remove the shared-memory weight-sync segment (best effort, for teardown)."""
        try:
            ray.get([r.close_weight_segment.remote() for r in self.ranks], timeout=timeout_s)
        except Exception:  # noqa: BLE001 - a dead rank's segment is swept by the next sync
            pass

    def broadcast_weights(self, bucket_bytes: int = 64 << 20) -> dict:
        """Broadcast from rank 0 over a weight group set up by ``sync_weights``
        (transport ``collective``); all ranks take part."""
        outs = gather([r.broadcast_weights.remote(bucket_bytes) for r in self.ranks])
        return outs[0]

    def named_full_parameters(self) -> list[tuple[str, torch.Tensor]]:
        outs = gather([r.named_full_parameters.remote() for r in self.ranks])
        return outs[0]

    # ------------------------------------------------------------------ offline, step by step

    def _offline_refs(self, shards: list[list[list[dict]]], index_shards: list[list[list[int]]],
                      algorithm: str, ref_cache: Optional[Sequence]) -> list[Optional[list]]:
        from twodrl.objectives import NEEDS_REFERENCE_LOGITS

        if ref_cache is not None:
            return [[[ref_cache[i] for i in mb] for mb in rank] for rank in index_shards]
        if self.reference is not None and algorithm not in NEEDS_REFERENCE_LOGITS:
            return self._reference_logps(shards, "pairs")
        return [None] * len(shards)

    def offline_train_steps(self, records: Sequence[dict], steps: Sequence[Sequence[Sequence[Sequence[int]]]],
                            algorithm: str, ref_cache: Optional[Sequence] = None) -> list[dict[str, float]]:
        """Train the optimizer steps ``steps[s][rank][micro] = record indices`` in that
        order; returns one merged ``train/*`` metrics dict per step (with
        ``train/tokens``). ``ref_cache[i]``: cached (chosen, rejected) reference
        log-probs of record i, or None to compute them now."""
        if algorithm not in PREFERENCE_ALGORITHMS:
            raise ConfigError(f"algorithm: {algorithm!r} is not one of {PREFERENCE_ALGORITHMS}")
        index_shards = [[list(mb) for step in steps for mb in step[k]] for k in range(self.world_size)]
        shards = [[[records[i] for i in mb] for mb in rank] for rank in index_shards]
        refs = self._offline_refs(shards, index_shards, algorithm, ref_cache)
        parts = gather([
            r.offline_steps.remote(shards[k], algorithm, refs[k], self.lc.grad_accum_steps)
            for k, r in enumerate(self.ranks)
        ])
        out = []
        for s in range(len(steps)):
            merged = merge_metrics([p[s] for p in parts])
            merged["train/tokens"] = float(sum(p[s]["tokens"] for p in parts))
            out.append(merged)
        return out

    def offline_eval(self, records: Sequence[dict], algorithm: str, ref_cache: Optional[Sequence] = None) -> dict[str, float]:
        """``eval/*`` metrics over ``records`` (every pair counted once), under the
        current policy in eval mode."""
        from twodrl.offline import eval_indices

        if not records:
            return {}
        plan, real = eval_indices(len(records), self.world_size, self.lc.micro_batch_size)
        shards = [[[records[i] for i in mb] for mb in rank] for rank in plan]
        refs = self._offline_refs(shards, plan, algorithm, ref_cache)
        outs = gather([r.offline_eval.remote(shards[k], algorithm, refs[k]) for k, r in enumerate(self.ranks)])
        sums: dict[str, float] = {}
        count = 0
        for rank_out, flags in zip(outs, real):
            for part, ok in zip(rank_out, flags):
                if not ok:
                    continue
                count += part["count"]
                for k, v in part["metrics"].items():
                    sums[k] = sums.get(k, 0.0) + float(v) * part["count"]
        return {f"eval/{k}": v / max(count, 1) for k, v in sums.items()}

    def offline_reference_logps(self, records: Sequence[dict], chunk: int = 16,
                                progress: Optional[Callable[[int], None]] = None) -> list[tuple[list[float], list[float]]]:
        """Reference log-probs of every record's two responses, computed once (by the
        colocated references, or the reference actor), ``chunk`` micro-batches per rank
        per call so ``progress(pairs_done)`` can report."""
        from twodrl.offline import eval_indices

        if not records:
            return []
        plan, _ = eval_indices(len(records), self.world_size, self.lc.micro_batch_size)
        result: list = [None] * len(records)
        steps = len(plan[0])
        for start in range(0, steps, chunk):
            part = [rank[start:start + chunk] for rank in plan]
            shards = [[[records[i] for i in mb] for mb in rank] for rank in part]
            if self.reference is not None:
                outs = ray.get([self.reference.pair_logps.remote(s) for s in shards])
            else:
                outs = gather([r.pair_reference_logps.remote(shards[k]) for k, r in enumerate(self.ranks)])
            for rank_part, out in zip(part, outs):
                for i, v in zip([i for mb in rank_part for i in mb], out):
                    result[i] = v  # a filler repeat carries the same values
            if progress is not None:
                progress(sum(len(mb) for rank in part for mb in rank))
        return result

    def release_reference(self) -> None:
        """Free the reference models (their log-probs are cached)."""
        gather([r.release_reference.remote() for r in self.ranks])
        if self.reference is not None:
            ray.kill(self.reference, no_restart=True)
            self.reference = None

    def rank_rng_states(self) -> list[torch.Tensor]:
        return gather([r.rng_state.remote() for r in self.ranks])

    def set_rank_rng_states(self, states: Sequence[torch.Tensor]) -> None:
        gather([r.set_rng_state.remote(s) for r, s in zip(self.ranks, states)])

    def save_pretrained(self, directory: str) -> str:
        """The policy in Hugging Face format (safetensors + tokenizer), written atomically."""
        gather([r.save_hf.remote(str(directory)) for r in self.ranks])
        return str(directory)

    def _seed(self) -> int:
        return self.cfg.seed * 1_000_003 + self._round

    def _other_actors(self) -> list:
        return [self.reference] if self.reference is not None else []
