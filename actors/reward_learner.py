"""Reward-model training on a group of DeepSpeed ranks (Ray actors ``rm_learner-<i>``),
behind one driver-side handle, :class:`RewardLearnerGroup`.

The ranks are the policy learner's machinery (:class:`actors.learner.DeepSpeedRank` /
:class:`actors.learner.DeepSpeedGroup`): the same placement group, rendezvous, engine
from :func:`actors.learner.build_ds_config` (ZeRO 0–3; bf16 on GPU with
``scorer.train_bf16``; gloo on CPU), atomic checkpoints and teardown. What differs is
the model (:func:`twodrl.models.loading.load_reward_model`: a token- or
sequence-classification model with one output per aspect) and the loss
(:func:`twodrl.models.reward_model.reward_loss`).

Data parallelism that keeps the objective: every optimizer step takes the same batch
of ``scorer.train_batch_size`` responses as one-process training
(:func:`twodrl.models.reward_model.epoch_batches`, same seed, same order), split into
one near-equal share per rank, each share into the same number of micro-batches on
every rank (DeepSpeed's gradient accumulation; a rank with nothing left runs a
zero-weighted filler so the collectives line up). Before the step the ranks add up
their labelled cells and LM tokens, and every micro-batch's squared errors are divided
by the whole batch's counts. DeepSpeed averages gradients over ranks and divides each
micro-batch's by the accumulation steps; the loss is scaled by both back, so the step's
gradient is that of the whole batch's masked MSE, exactly as in one process (up to
float summation order). Clipping (1.0), AdamW and the learning-rate schedule are the
one-process ones (:data:`~twodrl.models.reward_model.RM_ADAM_BETAS`,
:func:`~twodrl.models.reward_model.rm_lr_lambda`).

With dropout before the head (a backbone's default for a fresh token-classification
head) the random masks depend on how a batch is split, so only runs without it
(``classifier_dropout: 0``, as the tiny models have) match step for step.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import ray
import torch

from actors.common import redirect_actor_output, run_namespace, validate_placement
from actors.learner import DS_SUBDIR, DeepSpeedGroup, DeepSpeedRank, _setup_threads, _StateModel, gather
from twodrl.config import LearnerConfig, RunConfig, ScorerConfig
from twodrl.rounds import near_equal_parts

HF_SUBDIR = "reward_model"  # <checkpoint>/reward_model: Hugging Face format, safetensors


# --------------------------------------------------------------------------- pure helpers


def micro_layout(sc: ScorerConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch size, micro-batches per rank per step) for ``world_size`` ranks."""
    share = math.ceil(int(sc.train_batch_size) / world_size)
    micro = min(int(sc.train_micro_batch_size or share), share)
    return micro, math.ceil(share / micro)


def rm_learner_config(cfg: RunConfig, sc: ScorerConfig, world_size: int) -> LearnerConfig:
    """The :class:`LearnerConfig` the ranks' engines are built from
    (:func:`actors.learner.build_ds_config`): ``scorer.train_*`` in the learner's terms,
    with the one-process optimizer's clipping and no weight decay."""
    from twodrl.models.reward_model import RM_MAX_GRAD_NORM

    micro, accum = micro_layout(sc, world_size)
    return replace(
        cfg.learner, num_ranks=world_size, zero_stage=sc.train_zero_stage, lr=float(sc.train_lr), weight_decay=0.0,
        micro_batch_size=micro, grad_accum_steps=accum, max_grad_norm=RM_MAX_GRAD_NORM, bf16=sc.train_bf16,
        gradient_checkpointing=sc.train_gradient_checkpointing, num_gpus_per_rank=sc.train_num_gpus_per_rank,
        num_cpus_per_rank=sc.train_num_cpus_per_rank,
    )


def shard_batches(batches: Sequence[Sequence[int]], world_size: int, accum: int) -> list[list[list[list[int]]]]:
    """``[rank][step][micro]`` → example indices: each batch split into ``world_size``
    near-equal contiguous shares, each share into ``accum`` micro-batches. An empty
    micro-batch stands for a zero-weighted filler (the rank must still run its forward
    and backward: the collectives of every step are joined by all ranks)."""
    out: list[list[list[list[int]]]] = [[] for _ in range(world_size)]
    for batch in batches:
        for r, share in enumerate(near_equal_parts(list(batch), world_size)):
            out[r].append(near_equal_parts(share, accum))
    return out


# --------------------------------------------------------------------------- rank actor


class _RewardObjective(torch.nn.Module):
    """What the engine wraps: the reward model (``.model``, Hugging Face names below
    it) with the RM loss as its forward. Every micro-batch must pass through
    ``DeepSpeedEngine.forward``: that is where ZeRO starts a new accumulation micro-step
    (calling the model's submodules directly would let each micro-batch's gradients
    replace, not add to, the previous ones')."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, lm_loss_coef: float, mode: str, totals: tuple[float, float]):
        from twodrl.models.reward_model import reward_loss

        return reward_loss(self.model, batch, lm_loss_coef, mode, totals=totals)


class RewardLearnerRank(DeepSpeedRank):
    """One DeepSpeed rank of the reward-model trainer. Created by
    :class:`RewardLearnerGroup`; every method touching the engine is collective."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int):
        redirect_actor_output()
        self.sc = cfg.scorer
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if self.sc.train_num_gpus_per_rank == 0 else "cuda")
        _setup_threads()
        self.cfg = cfg
        self.lc = rm_learner_config(cfg, self.sc, world_size)
        self.rank = rank
        self.world_size = world_size
        self.on_gpu = self.sc.train_num_gpus_per_rank > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self.engine = None
        self.model = None  # the Hugging Face reward model inside the engine
        self.tokenizer = None
        self._round = 0
        self.examples: list = []
        self.encoded: list = []

    def setup(self, master_addr: str, master_port: int, total_steps: int, model_path: Optional[str] = None) -> dict:
        from twodrl.models.loading import load_reward_model, load_tokenizer
        from twodrl.models.reward_model import RM_ADAM_BETAS, rm_lr_lambda

        backend = self._init_process_group(master_addr, master_port)
        # fp32 master weights on every device; bf16 compute is DeepSpeed's job on GPU.
        mc = replace(self.sc.model, path=model_path or self.sc.model.path, dtype="float32")
        self.tokenizer = load_tokenizer(mc)
        # A fresh head is drawn from torch's RNG: the same seed on every rank (and in
        # one-process training) gives every rank the same initial model.
        torch.manual_seed(self.cfg.seed)
        model = load_reward_model(mc, device=self.device, mode=self.sc.mode, aspects=list(self.cfg.aspects.names))
        if self.lc.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        model.train()
        self.engine = self._init_engine(_RewardObjective(model), total_steps, schedule=rm_lr_lambda(total_steps),
                                        betas=RM_ADAM_BETAS)
        self.model = self.engine.module.model
        return {"rank": self.rank, "pid": os.getpid(), "backend": backend, "device": str(self.device)}

    def set_data(self, examples: list) -> int:
        """The training examples (:class:`twodrl.models.reward_model.RMExample`),
        tokenized once here; steps then name them by index."""
        from twodrl.models.reward_model import encode_examples

        self.examples = list(examples)
        self.encoded = encode_examples(self.tokenizer, self.examples)
        return len(self.examples)

    def _batch(self, idx: list[int], examples: list, encoded: list):
        from twodrl.models.reward_model import collate

        return collate(self.tokenizer, [examples[i] for i in idx], max_length=int(self.sc.model.max_length),
                       encoded=[encoded[i] for i in idx])

    def train_steps(self, steps: list[list[list[int]]]) -> list[dict[str, Any]]:
        """Optimizer steps ``steps[step][micro]`` (indices into :meth:`set_data`'s
        examples; ``[]`` is a filler); one entry of sums per step."""
        import torch.distributed as dist

        from twodrl.models.reward_model import reward_counts

        mode, coef = self.sc.mode, float(self.sc.lm_loss_coef)
        accum = self.lc.grad_accum_steps
        batches = [[self._batch(mb or [0], self.examples, self.encoded) for mb in step] for step in steps]
        counts = torch.tensor(
            [[float(sum(reward_counts(b, mode)[k] for b, mb in zip(bs, step) if mb)) for k in range(2)]
             for bs, step in zip(batches, steps)] or [[0.0, 0.0]],
            dtype=torch.float64, device=self.device,
        )
        # The whole batch's counts are what every part's loss is divided by: one
        # collective for all steps of this call.
        dist.all_reduce(counts)
        totals = counts.cpu().tolist()
        out = []
        for s, (bs, step) in enumerate(zip(batches, steps)):
            if len(step) != accum:
                raise ValueError(f"step {s} has {len(step)} micro-batches, the engine accumulates {accum}")
            sums = {"sq_sum": 0.0, "labels": 0.0, "lm_sum": 0.0, "lm_tokens": 0.0}
            for b, mb in zip(bs, step):
                loss, st = self.engine(b, coef, mode, (totals[s][0], totals[s][1]))
                # DeepSpeed averages over ranks and accumulation steps; undo both so the
                # step's gradient is the sum of the parts (see the module docstring).
                self._step(loss * (self.world_size * accum if mb else 0.0))
                if mb:
                    sums["sq_sum"] += st["rm/sq_sum"]
                    sums["labels"] += st["rm/labels"]
                    sums["lm_sum"] += st.get("rm/lm_sum", 0.0)
                    sums["lm_tokens"] += st.get("rm/lm_tokens", 0.0)
            out.append({**sums, "last": self._last()})
        return out

    @torch.no_grad()
    def predict(self, examples: list, batch_size: int) -> list[torch.Tensor]:
        """Clamped ratings of ``examples`` (``reward_model.score``), in eval mode.
        Every rank must get as many examples (ZeRO-3 forwards are collective)."""
        from twodrl.models import reward_model

        self.engine.eval()
        try:
            return reward_model.score(
                self.model, self.tokenizer, [e.prompt for e in examples], [e.text for e in examples],
                [e.history for e in examples], batch_size=batch_size, segments=[e.segments for e in examples],
                systems=[e.system for e in examples], max_length=int(self.sc.model.max_length), clamp=True,
            )
        finally:
            self.engine.train()

    # ------------------------------------------------------------------ saving

    def _full_state(self) -> dict[str, torch.Tensor]:
        """Full parameters on CPU (rank 0; every rank walks them under ZeRO-3, where
        each gather is collective)."""
        from actors.weight_sync import named_full_parameters

        if self.rank != 0 and self.lc.zero_stage != 3:
            return {}
        return {n: t.to("cpu", copy=True) for n, t in named_full_parameters(self.model)}

    def save_hf(self, directory: str, extra_files: Optional[dict[str, str]] = None) -> None:
        """The reward model in Hugging Face format (safetensors + tokenizer), written
        atomically by rank 0."""
        from twodrl.models.loading import save_pretrained_safe

        state = self._full_state()
        if self.rank == 0:
            save_pretrained_safe(_StateModel(self.model, state), self.tokenizer, directory,
                                 extra_files=extra_files)

    def save_checkpoint(self, directory: str) -> None:
        """Every rank's DeepSpeed shard in ``<dir>/deepspeed``; rank 0 also writes the
        model in ``<dir>/reward_model`` (loadable by the scorer and ``eval-rm``)."""
        d = Path(directory)
        self.engine.save_checkpoint(str(d / DS_SUBDIR), tag="latest_round", client_state={"round": self._round})
        self.save_hf(str(d / HF_SUBDIR))


# --------------------------------------------------------------------------- driver handle


class RewardLearnerGroup(DeepSpeedGroup):
    """Driver-side handle: trains the reward model on ``records`` (HelpSteer-2D) with
    ``scorer.train_*`` over ``scorer.train_ranks`` DeepSpeed ranks (or ``world_size``).

    ``sc`` replaces ``cfg.scorer`` (the online updates' epochs and learning rate);
    ``model_path`` the model to start from (default ``scorer.model.path``: a reward
    model, or a causal-LM backbone that gets a fresh aspect head)."""

    role = "rm_learner"

    def __init__(
        self,
        cfg: RunConfig,
        records: Sequence[Any],
        sc: Optional[ScorerConfig] = None,
        model_path: Optional[str] = None,
        world_size: Optional[int] = None,
        namespace: Optional[str] = None,
        validate: bool = True,
    ):
        from twodrl.models.reward_model import epoch_batches, examples_from_records

        # The ranks read scorer.* from the config they are started with.
        self.cfg = cfg if sc is None else replace(cfg, scorer=sc)
        self.sc = self.cfg.scorer
        self.namespace = namespace or run_namespace(cfg)
        self.world_size = int(world_size or self.sc.train_ranks)
        self.lc = rm_learner_config(cfg, self.sc, self.world_size)
        self.aspects = list(cfg.aspects.names)
        self.examples = examples_from_records(records, self.aspects, self.sc.mode)
        if not self.examples:
            raise ValueError("RewardLearnerGroup: no training examples")
        self.plan = epoch_batches(len(self.examples), int(self.sc.train_batch_size), int(self.sc.train_epochs), cfg.seed)
        self.total_steps = sum(len(e) for e in self.plan)
        self._round = 0  # epochs done (what a checkpoint records)
        self.step = 0
        self.step_metrics: list[dict[str, float]] = []
        if validate:
            validate_placement(self.cfg, roles=(self.role,))
        self._start_ranks(RewardLearnerRank, self.world_size,
                          "scorer.train_num_gpus_per_rank × scorer.train_ranks")
        self.info = self._setup_ranks(self.total_steps, model_path)
        data = ray.put(self.examples)
        gather([r.set_data.remote(data) for r in self.ranks])

    @property
    def epochs_done(self) -> int:
        return self._round

    def load_checkpoint(self, directory: str) -> dict:
        out = super().load_checkpoint(directory)
        self.step = sum(len(e) for e in self.plan[: self._round])
        return out

    def train_epoch(self, progress: Optional[Callable[[int], None]] = None) -> dict[str, float]:
        """The next epoch; returns the one-process loop's epoch metrics (``rm/epoch``,
        ``rm/epoch_mse``, ``rm/step``, and the last step's ``rm/mse``, ``rm/loss``,
        ``rm/lr``, ``rm/grad_norm`` …). Per-step metrics land in ``step_metrics``."""
        epoch = self._round
        if epoch >= len(self.plan):
            raise ValueError(f"all {len(self.plan)} epochs are trained")
        _, accum = micro_layout(self.sc, self.world_size)
        shards = shard_batches(self.plan[epoch], self.world_size, accum)
        parts = gather([r.train_steps.remote(shards[k]) for k, r in enumerate(self.ranks)])
        coef = float(self.sc.lm_loss_coef)
        stats: dict[str, float] = {}
        mses = []
        for s in range(len(self.plan[epoch])):
            sq = sum(p[s]["sq_sum"] for p in parts)
            n = sum(p[s]["labels"] for p in parts)
            mse = sq / max(n, 1.0)
            stats = {"rm/mse": mse, "rm/labels": n}
            loss = mse
            if coef > 0:
                tokens = sum(p[s]["lm_tokens"] for p in parts)
                lm = sum(p[s]["lm_sum"] for p in parts) / max(tokens, 1.0)
                stats["rm/lm_loss"] = lm
                loss = mse + coef * lm
            last = parts[0][s]["last"]
            stats.update({"rm/loss": loss, "rm/lr": last["lr"]})
            if "grad_norm" in last:
                stats["rm/grad_norm"] = last["grad_norm"]
            mses.append(mse)
            self.step += 1
            self.step_metrics.append({**stats, "rm/step": self.step})
            if progress is not None:
                progress(1)
        self._round += 1
        stats.update({"rm/epoch": self._round, "rm/epoch_mse": sum(mses) / max(len(mses), 1), "rm/step": self.step})
        return stats

    def evaluate(self, records: Sequence[Any], batch_size: int = 32) -> dict[str, dict[str, float]]:
        """:func:`twodrl.models.reward_model.evaluate`'s table, the predictions made on
        the ranks (each scores an equal share; the last shares are padded with repeats,
        whose predictions are dropped)."""
        from twodrl.models.reward_model import evaluation_metrics, examples_from_records

        examples = examples_from_records(records, self.aspects, self.sc.mode)
        if not examples:
            return {}
        per = math.ceil(len(examples) / self.world_size)
        shards = [examples[k * per:(k + 1) * per] for k in range(self.world_size)]
        shards = [s + [examples[0]] * (per - len(s)) for s in shards]
        outs = gather([r.predict.remote(shards[k], batch_size) for k, r in enumerate(self.ranks)])
        preds = [p for out in outs for p in out][: len(examples)]
        return evaluation_metrics(examples, preds, self.aspects)

    def save_pretrained(self, directory: str, extra_files: Optional[dict[str, str]] = None) -> str:
        """The reward model in Hugging Face format (safetensors + tokenizer), written
        atomically: it loads with ``AutoModelForTokenClassification`` (segment mode)
        and in the scorer actor."""
        gather([r.save_hf.remote(str(directory), extra_files) for r in self.ranks])
        return str(directory)

