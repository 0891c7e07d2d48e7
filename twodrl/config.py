"""The one config system: typed dataclasses, YAML files, ``--set a.b=c`` overrides.

Every job reads its settings through :func:`load_config`. Errors name the file, the
line and the dotted field, so a user can fix a typo without reading a traceback, and
they are raised before any actor starts.

Value ranges. Every numeric field (``int``, ``float``, their ``Optional`` forms and
lists of them) declares its valid range where it is defined, with :func:`ranged`::

    lr: float = ranged(5e-4, 0, 1, "(]")        # 0 < lr <= 1
    rounds: int = ranged(4, 1)                  # rounds >= 1, no upper bound
    weights: list[float] = ranged(low=0, high=1, default_factory=list)  # each item

``low``/``high`` of ``None`` leave that side open; ``bounds`` says which ends are
included. NaN is always refused and so is +-inf unless ``allow_inf=True``; ``None`` in
an ``Optional`` field always passes. :func:`check_ranges` checks every declared range
in one pass over the loaded config, so a new field only needs its ``ranged(...)``;
``tests/unit/test_config_values.py`` fails for a numeric field that has none.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration mistake; the message names where it is."""


@dataclass(frozen=True)
class Range:
    """The valid values of one numeric field (see the module docstring)."""

    low: Optional[float] = None
    high: Optional[float] = None
    bounds: str = "[]"  # "[]", "[)", "(]" or "()": which ends are included
    allow_inf: bool = False

    def __post_init__(self) -> None:
        if self.bounds not in ("[]", "[)", "(]", "()"):
            raise ValueError(f"Range bounds must be one of [], [), (], (), got {self.bounds!r}")

    def describe(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {self.bounds[0]}{_fmt_num(lo)}, {_fmt_num(hi)}{self.bounds[1]}"
        if lo is not None:
            return f"{'≥' if self.bounds[0] == '[' else '>'} {_fmt_num(lo)}"
        if hi is not None:
            return f"{'≤' if self.bounds[1] == ']' else '<'} {_fmt_num(hi)}"
        return "a number"

    def problem(self, value: float) -> Optional[str]:
        """Why ``value`` is out of range (``None`` when it is fine)."""
        if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and not self.allow_inf)):
            return f"must be a finite number {self.describe()}"
        lo, hi = self.low, self.high
        too_low = lo is not None and (value < lo if self.bounds[0] == "[" else value <= lo)
        too_high = hi is not None and (value > hi if self.bounds[1] == "]" else value >= hi)
        return f"must be {self.describe()}" if too_low or too_high else None


def _fmt_num(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def ranged(
    default: Any = dataclasses.MISSING,
    low: Optional[float] = None,
    high: Optional[float] = None,
    bounds: str = "[]",
    *,
    allow_inf: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its valid range: ``ranged(default, low, high, bounds)``."""
    return field(default=default, default_factory=default_factory,
                 metadata={"range": Range(low, high, bounds, allow_inf)})


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """Where a model comes from: a Hugging Face path/name, or ``tiny:<name>`` for an
    offline random-init model built by :mod:`twodrl.models.tiny`."""

    path: str = "tiny:policy"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    max_length: int = ranged(512, 1)  # prompt + response tokens


@dataclass
class TaskConfig:
    """Where a run's prompts (and optional warm-start data) come from: ``synthetic`` is
    the embedded quickstart task; ``dataset`` reads a team's own prompt files
    (:mod:`twodrl.tasks`)."""

    name: Literal["synthetic", "dataset"] = "synthetic"
    # Prompt datasets (task ``dataset``): a JSONL / Parquet file, a saved `datasets`
    # directory, or a hub name with its split.
    dataset: Optional[str] = None
    split: str = "train"
    eval_dataset: Optional[str] = None  # None: a seeded held-out split of `dataset`
    eval_split: str = "test"
    prompt_field: str = "prompt"  # a plain prompt string column (UltraFeedback: instruction)
    messages_field: str = "messages"  # chat turns; the last user turn is the prompt
    train_prompts: Optional[int] = ranged(None, 1)  # cap on the train pool; None: every prompt
    eval_prompts: int = ranged(32, 1)  # size of the held-out split when there is no eval_dataset
    # Round-0 warm start: SFT data (messages, or prompt + response) for a dataset task;
    # the synthetic task builds its own mixed-quality responses.
    sft_dataset: Optional[str] = None
    sft_split: str = "train"
    sft_examples: int = ranged(384, 0)  # warm-start examples used in round 0 (0: no warm start)
    sft_epochs: int = ranged(2, 1)
    sft_warmup_lr: float = ranged(3e-3, 0, 1, "(]")


@dataclass
class AspectsConfig:
    names: list[str] = field(
        default_factory=lambda: ["helpfulness", "correctness", "safety", "completeness", "clarity"]
    )
    weights: list[float] = ranged(low=0, high=1, default_factory=lambda: [0.3, 0.4, 0.1, 0.1, 0.1])


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    num_workers: int = ranged(1, 1)
    prompts_per_round: int = ranged(64, 1, 1_000_000)
    samples_per_prompt: int = ranged(4, 1)  # ≥ 2 unless dpa-rsf (validate_run_config)
    temperature: float = ranged(0.7, 0, 10)
    top_p: float = ranged(0.8, 0, 1, "(]")
    max_new_tokens: int = ranged(96, 1)  # < policy.max_length (validate_run_config)
    num_gpus: float = ranged(0.0, 0)
    num_cpus: float = ranged(0.25, 0)
    tensor_parallel_size: int = ranged(1, 1)
    gpu_memory_utilization: float = ranged(0.5, 0, 1, "(]")
    max_restarts: int = ranged(2, 0)
    system_prompt: Optional[str] = None
    # Learner → rollout weight sync (actors/weight_sync.py): "shared_memory" (learner
    # rank 0 and the workers on one node), "object_store" (any Ray cluster),
    # "collective" (gloo on CPU / NCCL on GPU). "auto": NCCL on GPU clusters, else
    # shared_memory when on one node, else object_store.
    weight_sync: Literal["auto", "shared_memory", "object_store", "collective"] = "auto"
    weight_sync_bucket_mb: float = ranged(64.0, 0, None, "()")
    # vLLM on CPU only: let its oneDNN kernels repack the linear weights. Generation is a
    # few percent faster, but every weight sync then rebuilds the packed copies (a full
    # reload instead of an in-place copy: ~4x slower sync, benchmarks/bench_weight_sync).
    cpu_prepack_weights: bool = False
    # Deadlines (seconds). A generate chunk that runs longer than call_timeout_s is
    # taken for a hung engine: the work queue kills the worker (Ray restarts it) and
    # re-queues its requests. A weight sync fails a worker that makes no progress on
    # its buckets for sync_timeout_s (actors/weight_sync.py).
    call_timeout_s: float = ranged(1800.0, 0, None, "()")
    sync_timeout_s: float = ranged(600.0, 0, None, "()")


@dataclass
class ScorerConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="tiny:reward"))
    # "auto": vLLM's pooling runner on GPU when the run never trains the RM and the RM is
    # a segment one, else the HF model (training needs its weights; CPU always uses it).
    # See resolved_backend.
    backend: Literal["auto", "hf", "vllm"] = "auto"
    num_workers: int = ranged(1, 1)
    batch_size: int = ranged(16, 1)
    num_gpus: float = ranged(0.0, 0)
    num_cpus: float = ranged(0.25, 0)
    tensor_parallel_size: int = ranged(1, 1)
    max_restarts: int = ranged(2, 0)
    # A score chunk running longer than this is taken for a hung scorer: it is killed
    # (Ray restarts it) and its items re-queued (actors/workqueue.py).
    call_timeout_s: float = ranged(900.0, 0, None, "()")
    # Reward-model training (round 0 and `twodrl train-rm`).
    train_epochs: int = ranged(3, 1)
    train_lr: float = ranged(1e-3, 0, 1, "(]")
    train_batch_size: int = ranged(16, 1)
    lm_loss_coef: float = ranged(0.0, 0)
    mode: Literal["segment", "sequence"] = "segment"
    rm_train_responses: int = ranged(384, 0)  # round 0: judge-annotated responses the RM learns from
    # `twodrl train-rm` / `eval-rm` data and output.
    train_synthetic_pairs: int = ranged(2000, 0)  # rule-labelled synthetic records to train on
    eval_synthetic_pairs: int = ranged(300, 0)  # held-out synthetic records (other seed, deduplicated)
    train_data: list[str] = field(default_factory=list)  # extra HelpSteer-2D files to train on
    eval_data: list[str] = field(default_factory=list)  # extra held-out HelpSteer-2D files
    include_sample_data: bool = True  # add the shipped HelpSteer-2D sample to training
    output_dir: Optional[str] = None  # default: runs/<run_name or "rm">/reward_model
    # Online runs: every this many rounds the judge-rated samples gathered so far
    # fine-tune the RM before the next round's scoring (0: never; the RM of round 0 stays).
    update_every_rounds: int = ranged(0, 0)
    update_epochs: int = ranged(3, 1)  # epochs over the gathered judge-rated samples per update
    update_lr: Optional[float] = ranged(None, 0, 1, "(]")  # None: train_lr
    # Reward-model training on a group of DeepSpeed ranks (`twodrl train-rm`, and the
    # online updates): 1 trains in one process; N > 1 starts ranks `rm_learner-<i>`
    # that split every train_batch_size batch N ways (same loss curve as one process).
    train_ranks: int = ranged(1, 1)
    train_zero_stage: Literal[0, 1, 2, 3] = 2
    train_num_gpus_per_rank: float = ranged(0.0, 0)
    train_num_cpus_per_rank: float = ranged(0.25, 0)
    # Each rank's share of a batch is cut into micro-batches of at most this many
    # responses (gradient accumulation); None: the whole share in one micro-batch.
    train_micro_batch_size: Optional[int] = ranged(None, 1)
    train_bf16: bool = False  # bf16 compute on GPU (ignored on CPU)
    train_gradient_checkpointing: bool = False

    def resolved_backend(self) -> str:
        """The backend the scorer actors really run: ``auto`` is vLLM on GPU unless the
        reward model is trained in the run (round 0 or updates), which needs the HF copy."""
        if self.backend != "auto":
            return self.backend
        trains = self.rm_train_responses > 0 or self.update_every_rounds > 0
        # The vLLM path reads per-token outputs of a token-classification RM only.
        return "vllm" if self.num_gpus > 0 and not trains and self.mode == "segment" else "hf"


@dataclass
class AnnotatorConfig:
    base_url: Optional[str] = None  # None: the job starts the local judge server
    model: str = "twodrl-synthetic-judge"
    api_key_env: str = "OPENAI_API_KEY"
    fraction: float = ranged(0.25, 0, 1)  # share of samples also sent to the judge each round
    judge_overrides_rm: bool = True  # judged samples train with the judge's ratings
    pairwise: bool = True
    concurrency: int = ranged(8, 1)
    timeout_s: float = ranged(30.0, 0, None, "()")
    max_retries: int = ranged(5, 0)
    max_repairs: int = ranged(2, 0)  # re-asks after a malformed reply before the aspect fails
    backoff_base_s: float = ranged(0.5, 0)
    backoff_max_s: float = ranged(20.0, 0)
    requests_per_minute: Optional[float] = ranged(None, 0, None, "()")
    tokens_per_minute: Optional[float] = ranged(None, 0, None, "()")
    max_requests: Optional[int] = ranged(None, 0)
    max_tokens: Optional[int] = ranged(None, 0)
    max_cost_usd: Optional[float] = ranged(None, 0)
    cache_path: Optional[str] = None  # default: RUN_DIR/judge_cache.sqlite
    num_actors: int = ranged(1, 1)
    num_cpus: float = ranged(0.05, 0)  # per annotator actor (it only waits on HTTP)
    max_restarts: int = ranged(2, 0, 1000)  # Ray restarts of an annotator actor that died
    max_completion_tokens: Optional[int] = ranged(None, 1)  # sent as max_tokens; None: server default
    price_input_per_mtok: Optional[float] = ranged(None, 0)  # USD per 1M tokens; None: pricing table
    price_output_per_mtok: Optional[float] = ranged(None, 0)


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) on the policy, trained instead of the full weights; off
    while ``r`` is 0. The reference is then the base model with the adapter switched
    off (no second copy), rollouts get the merged weights, checkpoints hold the adapter.
    """

    r: int = ranged(0, 0, 4096)  # adapter rank; 0: LoRA off (full fine-tuning)
    alpha: float = ranged(16.0, 0, None, "()")  # the update is scaled by alpha / r
    dropout: float = ranged(0.0, 0, 1, "[)")
    # Module names (suffixes) that get an adapter; ["all-linear"]: every linear layer but
    # the output head.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class LearnerConfig:
    num_ranks: int = ranged(2, 1)
    # How long the ranks wait for each other when the group forms (and for any later
    # collective of the learner's process group) before failing instead of hanging.
    init_timeout_s: float = ranged(600.0, 0, None, "()")
    # A rank that dies ends the group (its collective is broken): the driver rebuilds the
    # group from the last round checkpoint, at most this many times per run.
    max_failures: int = ranged(2, 0, 100)
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = ranged(5e-4, 0, 1, "(]")
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = ranged(0.0, 0, 1)
    weight_decay: float = ranged(0.0, 0)
    micro_batch_size: int = ranged(8, 1)
    grad_accum_steps: int = ranged(1, 1)
    epochs_per_round: int = ranged(2, 1)
    max_grad_norm: float = ranged(1.0, 0)  # 0: no clipping (DeepSpeed gradient_clipping)
    beta: float = ranged(0.2, 0, None, "()")
    sft_coef: float = ranged(0.1, 0)
    label_smoothing: float = ranged(0.0, 0, 0.5, "[)")  # ≥ 0.5 would flip the preference
    simpo_gamma: float = ranged(0.5, 0)
    tdpo_alpha: float = ranged(0.5, 0)
    kto_desirable_weight: float = ranged(1.0, 0)
    kto_undesirable_weight: float = ranged(1.0, 0)
    orpo_lambda: float = ranged(0.1, 0)
    # 2D-DPO: "grouped" is Eq. 6 (paired segments, per-side β equalisation); "ungrouped"
    # is Eq. 5 (one term over all segments, plain β on both sides, as the paper writes it).
    two_d_dpo_form: Literal["grouped", "ungrouped"] = "grouped"
    # ARS: factor of the KL term; Eq. 16 writes it without one (1), no tuned value given.
    ars_kl_coef: float = ranged(1.0, 0)
    # APPO
    clip_eps: float = ranged(0.2, 0, 1, "(]")  # the ratio is clamped to [1 - eps, 1 + eps]
    kl_coef: float = ranged(0.05, 0)
    schmitt_delta: float = ranged(0.1, 0)
    # true: the trigger keeps its state inside the band (default: a one-token dip must not
    # split a good run, the trigger's purpose); false: seed 004 Eq. 18 exactly (0 in band).
    schmitt_hysteresis: bool = True
    ppo_epochs: int = ranged(2, 1)
    # Placement
    num_gpus_per_rank: float = ranged(0.0, 0)
    num_cpus_per_rank: float = ranged(0.25, 0)
    colocate_reference: bool = True
    bf16: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DPAConfig:
    objectives: list[str] = field(default_factory=lambda: ["helpfulness", "verbosity"])
    directions_per_prompt: int = ranged(1, 1)
    replay_fraction: float = ranged(0.15, 0, 1, "[)")  # the driver divides by 1 - fraction
    angle_low: float = ranged(-math.pi / 4, -math.pi, math.pi)  # < angle_high (validate_run_config)
    angle_high: float = ranged(0.0, -math.pi, math.pi)
    # Each round fine-tunes the round-0 policy (after any warm-start SFT), weights,
    # optimizer and a fresh lr schedule, on every example selected so far (all rounds'
    # winners and replay, RUN_DIR/dpa/selected.jsonl), instead of fine-tuning the last
    # policy on this round's winners only; rollouts still sample from the last policy.
    restart_from_sft: bool = True
    # Round k draws its prompts only from the k-th of (rounds + 1) seeded disjoint parts
    # of the train prompts, so no round samples a prompt an earlier round trained on.
    disjoint_prompts: bool = False


@dataclass
class EvalConfig:
    every_rounds: int = ranged(1, 1)
    num_prompts: int = ranged(32, 1)
    max_new_tokens: int = ranged(96, 1)  # < policy.max_length (validate_run_config)
    # Segment-credit diagnostic (twodrl.diagnostics): at most this many of the first
    # round's pairs are held out of training, and the per-segment change of their
    # log-probs is logged every round as credit/*. 0: off.
    credit_probe_pairs: int = ranged(32, 0, 10_000)


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "twodrl"
    metrics_port: Optional[int] = ranged(None, 1, 65535)  # Ray metrics export port (Prometheus)
    progress: bool = True
    plots: bool = True
    keep_checkpoints: int = ranged(2, 1)  # newest round checkpoints kept on disk


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS, else a local cluster
    num_cpus: Optional[int] = ranged(8, 1)  # logical slots for a local cluster
    namespace: Optional[str] = None  # default: twodrl-<run name>
    dashboard: bool = False  # start the dashboard with a local cluster (127.0.0.1)


@dataclass
class RunConfig:
    seed: int = ranged(0, 0, 2**32 - 1)  # what numpy's seeding accepts
    rounds: int = ranged(4, 1)
    algorithm: Literal[
        "2d-dpo", "1d-dpo", "dpo", "ipo", "kto", "orpo", "simpo", "tdpo1", "tdpo2", "appo", "dpa-rsf",
        "adpo", "ars",
    ] = "2d-dpo"
    # sync: stage after stage. overlap: the next round's rollout runs while this round
    # scores, annotates and trains. stream: samples flow rollout → score → judge per
    # prompt as they finish, and the next rounds' whole collection runs beside training.
    scheduling: Literal["sync", "overlap", "stream"] = "sync"
    # stream: how many weight versions older than the learner's a training sample may be
    # (0: exactly on-policy, only the stages of one round overlap).
    max_staleness: int = ranged(1, 0, 8)
    run_name: Optional[str] = None
    policy: ModelConfig = field(default_factory=ModelConfig)
    reference: Optional[ModelConfig] = None  # None: a frozen copy of the policy
    task: TaskConfig = field(default_factory=TaskConfig)
    aspects: AspectsConfig = field(default_factory=AspectsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    dpa: DPAConfig = field(default_factory=DPAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class OfflineDataConfig:
    """Offline training data (``twodrl train``): a preference dataset read through
    :mod:`twodrl.convert`, so every layout ``twodrl convert`` reads works here too."""

    # JSONL / Parquet / saved `datasets` directory / hub name, or "synthetic" for
    # rule-labelled records from twodrl.synthetic (`synthetic_pairs` of them).
    train: Optional[str] = None
    eval: Optional[str] = None  # None: a seeded `eval_fraction` of train is held out
    eval_fraction: float = ranged(0.1, 0, 1, "[)")
    format: Literal["auto", "helpsteer2d", "helpsteer2", "preference"] = "auto"
    split: str = "train"
    eval_split: str = "test"
    synthetic_pairs: int = ranged(256, 1)
    max_train_records: Optional[int] = ranged(None, 1)  # cap after loading; None: all


@dataclass
class OfflineTrainConfig:
    epochs: int = ranged(1, 1)
    max_steps: Optional[int] = ranged(None, 1)  # optimizer steps; None: `epochs` full passes
    eval_every_steps: int = ranged(0, 0)  # 0: eval only at the end
    save_every_steps: int = ranged(0, 0)  # 0: no intermediate checkpoints
    log_every_steps: int = ranged(1, 1)
    # True: reference log-probs computed once and cached in RUN_DIR/reference_logps/
    # (the reference model is then freed); False: the reference runs beside the policy
    # every step. TDPO needs reference logits every step and always keeps it.
    precompute_reference: bool = True


@dataclass
class OfflineConfig:
    """``twodrl train``: offline preference training on the DeepSpeed learner group."""

    seed: int = ranged(0, 0, 2**32 - 1)
    algorithm: Literal["2d-dpo", "1d-dpo", "dpo", "ipo", "kto", "orpo", "simpo", "tdpo1", "tdpo2"] = "2d-dpo"
    run_name: Optional[str] = None
    policy: ModelConfig = field(default_factory=ModelConfig)
    reference: Optional[ModelConfig] = None  # None: a frozen copy of the policy
    aspects: AspectsConfig = field(default_factory=AspectsConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    data: OfflineDataConfig = field(default_factory=OfflineDataConfig)
    train: OfflineTrainConfig = field(default_factory=OfflineTrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# --------------------------------------------------------------------------- loading


# A config is a few levels deep (run → scorer → model → field) and a few hundred values
# big; these limits are far above that yet refuse hostile input cheaply and before
# anything recursive (PyYAML's composer, the constructor) hits Python's stack limit.
_MAX_DEPTH = 32
_MAX_NODES = 100_000  # after alias expansion: an alias bomb is tiny on disk, huge here
_MAX_FILE_BYTES = 4 << 20


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than ``_MAX_DEPTH`` with a ConfigError
    (``line N: ...``) instead of recursing until a RecursionError."""

    _depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"line {mark.line + 1}: nested more than {_MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _LineLoader(_LimitedLoader):
    """SafeLoader that remembers the line of every mapping key."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = {}
    lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, typing.Hashable):
            # `? [a, b] : 1` would otherwise end in a TypeError from the dict below.
            kind = "mapping" if isinstance(key, dict) else type(key).__name__
            raise ConfigError(f"line {key_node.start_mark.line + 1}: a key must be a plain name, got a {kind}")
        if key in mapping:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    return _LinedDict(mapping, lines)


class _LinedDict(dict):
    def __init__(self, data: dict, lines: dict):
        super().__init__(data)
        self.lines = lines


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


_YAML11_MISSED_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _where(source: str, line: Optional[int | str]) -> str:
    if isinstance(line, str):  # a value set on the command line, not in the file
        return line
    return f"{source}:{line}" if line else source


class _ShortRepr(reprlib.Repr):
    """Bounded repr for error messages: a value built from aliases can be enormous
    once expanded, and a message should stay one readable line."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 80
        self.maxlevel = 3

    def repr__LinedDict(self, x: dict, level: int) -> str:  # a mapping read from YAML
        return self.repr_dict(x, level)


_short_repr = _ShortRepr().repr


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())


def _walk_size(obj: Any, depth: int, memo: dict, active: set) -> tuple[int, int]:
    """(nodes, depth) of a loaded YAML value with its aliases expanded, computed once
    per shared object so an alias bomb costs linear time to detect."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if not isinstance(obj, (list, dict)):
        return 1, 0
    if key in active:
        raise ConfigError("a value refers to itself (recursive alias)")
    active.add(key)
    children = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else obj
    size, height = 1, 0
    for child in children:
        if depth + 1 > _MAX_DEPTH:
            raise ConfigError(f"nested more than {_MAX_DEPTH} levels deep (aliases included)")
        n, h = _walk_size(child, depth + 1, memo, active)
        size, height = size + n, max(height, h + 1)
        if size > _MAX_NODES or depth + height > _MAX_DEPTH:
            what = f"more than {_MAX_NODES} values" if size > _MAX_NODES else f"more than {_MAX_DEPTH} levels"
            raise ConfigError(f"expands to {what} (aliases included); not a config")
    active.discard(key)
    memo[key] = (size, height)
    return size, height


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, dotted: str, where: str, base: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it, converted where
    the conversion is lossless (int → float). ``base`` is the default a nested section
    starts from (so ``scorer.model.max_length`` alone keeps the scorer's model path)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, dotted, where, base)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        # Compare types too: YAML `true` == 1 and `2.0` == 2 would otherwise pass.
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{where}: {dotted}: {_short_repr(value)} is not one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {dotted}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, dotted, where_source=where.rsplit(":", 1)[0] if ":" in where else where,
                      base=base if isinstance(base, tp) else None)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {dotted}: expected a list, got {type(value).__name__} {_short_repr(value)}")
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{dotted}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {dotted}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int with hundreds of digits
                raise ConfigError(f"{where}: {dotted}: {_short_repr(value)} is too large for a float") from None
        # PyYAML follows YAML 1.1, where `1e-6` (no dot) is a string; accept it.
        if isinstance(value, str) and _YAML11_MISSED_FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: {dotted}: expected {_type_name(tp)}, got {type(value).__name__} {_short_repr(value)}")


def _build(cls: type, data: dict, prefix: str, where_source: str, base: Any = None) -> Any:
    base = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    lines = getattr(data, "lines", {})
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        where = _where(where_source, lines.get(key))
        if key not in names:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {dotted!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted, where, getattr(base, key))
    return dataclasses.replace(base, **kwargs)


def _parse_scalar(text: str, assignment: str = "") -> Any:
    """Values given with ``--set`` are parsed as YAML scalars/lists: ``0.1``, ``true``,
    ``[0.2, 0.8]``, ``null``. A value that is not YAML is a ConfigError naming the flag."""
    if not text.strip():
        return ""
    flag = f"--set {_short_repr(assignment)}"
    try:
        value = yaml.load(text, Loader=_LimitedLoader)
    except ConfigError as e:
        raise ConfigError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag}: invalid YAML value: {_one_line(getattr(e, 'problem', None) or e)}") from None
    try:
        _walk_size(value, 0, {}, set())
    except ConfigError as e:
        raise ConfigError(f"{flag}: {e}") from None
    return value


def _apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {_short_repr(assignment)}: expected dotted.key=value")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) for part in parts):
        # `=3`, `a..b=1`, ` =x`: no field is named like that; say so before parsing.
        raise ConfigError(f"--set {_short_repr(assignment)}: expected dotted.key=value, got key {key.strip()!r}")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = _LinedDict({}, {})
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = _parse_scalar(raw, assignment)
    if isinstance(node, _LinedDict):
        node.lines[parts[-1]] = "--set"


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cls: Optional[type] = None,
    validate: bool = True,
) -> Any:
    """Load a YAML file into ``cls`` (default :class:`RunConfig`), apply overrides,
    validate. Raises :class:`ConfigError` naming file, line and field. Without ``cls``
    a file with the offline job's own sections (``data``, ``train``) loads as an
    :class:`OfflineConfig`, every other one as a :class:`RunConfig`."""
    source = str(path) if path else "<defaults>"
    data: dict = _LinedDict({}, {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        loaded = _read_yaml(p, source)
        if loaded is None:
            loaded = _LinedDict({}, {})
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        data = loaded
    for assignment in overrides:
        _apply_override(data, assignment)
    if cls is None:
        cls = OfflineConfig if any(k in data for k in _OFFLINE_ONLY_SECTIONS) else RunConfig
    cfg = _build(cls, data, "", source)
    where = _locations(data, source)
    if validate and cls is RunConfig:
        validate_run_config(cfg, source, where)  # checks the ranges first
    elif validate and cls is OfflineConfig:
        validate_offline_config(cfg, source, where)  # checks the ranges first
    else:
        check_ranges(cfg, source, where)
    return cfg


def _read_yaml(p: Path, source: str) -> Any:
    """Parse a config file; every way it can be unreadable is a one-line ConfigError."""
    try:
        if p.stat().st_size > _MAX_FILE_BYTES:
            raise ConfigError(f"{source}: {p.stat().st_size} bytes is too large for a config file")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        loaded = yaml.load(text, Loader=_LineLoader)
        _walk_size(loaded, 0, {}, set())
    except ConfigError as e:
        msg = str(e)
        if msg.startswith("line "):
            raise ConfigError(f"{source}:{msg.removeprefix('line ')}") from None
        raise ConfigError(f"{source}: {msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        if isinstance(e, yaml.reader.ReaderError):  # a control character; it has no mark
            line = f":{text[: e.position].count(chr(10)) + 1}"
            code = e.character if isinstance(e.character, int) else ord(e.character)
            problem = f"control character #x{code:04x} is not allowed"
        else:
            problem = getattr(e, "problem", None) or e
        raise ConfigError(f"{source}{line}: invalid YAML: {_one_line(problem)}") from None
    except RecursionError:  # a backstop; _MAX_DEPTH should stop nesting well before
        raise ConfigError(f"{source}: nested too deeply to be a config") from None
    return loaded


def _locations(data: Any, source: str, prefix: str = "", inherited: Optional[str] = None) -> dict[str, str]:
    """``dotted.field → "file:line"`` (or ``--set``) for every value the file or an
    override gave; a key without a line of its own (inside a ``--set`` mapping) takes
    its parent's. Fields left at their defaults are absent."""
    out: dict[str, str] = {}
    if not isinstance(data, dict):
        return out
    lines = getattr(data, "lines", {})
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        line = lines.get(key)
        here = _where(source, line) if line is not None else inherited
        if here is not None:
            out[dotted] = here
        out.update(_locations(value, source, dotted, here))
    return out


def check_ranges(cfg: Any, source: str = "<config>", where: Optional[dict[str, str]] = None, prefix: str = "") -> None:
    """Check every field's declared :class:`Range` (module docstring) in one pass. The
    message names the value's line when ``where`` knows it, else just ``source``."""
    where = where or {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, source, where, dotted)
            continue
        rng = f.metadata.get("range")
        if rng is None or value is None:
            continue
        items = [(f"{dotted}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(dotted, value)]
        for name, v in items:
            problem = rng.problem(v)
            if problem:
                raise ConfigError(f"{where.get(dotted, source)}: {name} {problem}, got {_short_repr(v)}")


_SAFE_RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def validate_run_config(cfg: RunConfig, source: str = "<config>", where: Optional[dict[str, str]] = None) -> None:
    """Every field's range (:func:`check_ranges`), then the cross-field checks the types
    cannot express. ``where`` maps dotted fields to ``file:line`` (see load_config)."""
    where = where or {}
    check_ranges(cfg, source, where)

    def at(*dotted: str) -> str:
        """Where the first of these fields that the file or a --set gave is."""
        return next((where[d] for d in dotted if d in where), source)

    names, weights = cfg.aspects.names, cfg.aspects.weights
    if len(names) != len(weights):
        raise ConfigError(
            f"{source}: aspects.weights has {len(weights)} values for {len(names)} aspects.names {names}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: aspects.names has duplicates: {names}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ConfigError(f"{source}: aspects.weights must sum to 1, got {sum(weights):.6g} ({weights})")
    from twodrl.aspects import ASPECTS

    unknown = [n for n in names if n not in ASPECTS]
    if unknown:
        raise ConfigError(f"{source}: aspects.names: unknown aspect(s) {unknown}; known: {sorted(ASPECTS)}")
    if cfg.rollout.samples_per_prompt < 2 and cfg.algorithm != "dpa-rsf":
        raise ConfigError(f"{at('rollout.samples_per_prompt')}: rollout.samples_per_prompt must be ≥ 2 "
                          "to form chosen/rejected pairs")
    # A prompt needs room next to its response inside the policy's training sequence.
    for key in ("rollout.max_new_tokens", "eval.max_new_tokens"):
        section, _, field_name = key.partition(".")
        value = getattr(getattr(cfg, section), field_name)
        if value >= cfg.policy.max_length:
            raise ConfigError(
                f"{at(key, 'policy.max_length')}: {key} must be < policy.max_length ({cfg.policy.max_length}), "
                f"got {value}"
            )
    if cfg.run_name and not _SAFE_RUN_NAME.fullmatch(cfg.run_name):
        # It names the run directory and the Ray namespace: one plain path component.
        raise ConfigError(
            f"{at('run_name')}: run_name must be 1-128 characters of letters, digits, '.', '_', '-' "
            f"and not start with '.', got {_short_repr(cfg.run_name)}"
        )
    dpa = cfg.dpa
    if not dpa.angle_low < dpa.angle_high:
        raise ConfigError(f"{at('dpa.angle_low', 'dpa.angle_high')}: dpa.angle_low must be < dpa.angle_high, "
                          f"got {dpa.angle_low} ≥ {dpa.angle_high}")
    # DPA objectives are read by rounds.objective_values: a scored aspect or verbosity.
    # Other algorithms never read them, so there only a name no aspect has is refused
    # (a typo), not one that merely is not scored in this run.
    valid = [*names, "verbosity"] if cfg.algorithm == "dpa-rsf" else sorted({*ASPECTS, "verbosity"})
    unknown = [o for o in dpa.objectives if o not in valid]
    if unknown:
        raise ConfigError(f"{at('dpa.objectives', 'aspects.names')}: dpa.objectives: unknown objective(s) {unknown}; "
                          f"valid: {sorted(set(valid))}")
    if cfg.algorithm == "dpa-rsf":
        if len(dpa.objectives) < 2 or len(set(dpa.objectives)) != len(dpa.objectives):
            raise ConfigError(f"{at('dpa.objectives')}: dpa.objectives must be ≥ 2 distinct names, "
                          f"got {dpa.objectives}")
    sc = cfg.scorer
    if sc.backend == "vllm" and sc.num_gpus > 0 and (sc.rm_train_responses > 0 or sc.update_every_rounds > 0):
        # vLLM serves a fixed checkpoint: there is no trainable copy to update.
        raise ConfigError(
            f"{at('scorer.backend', 'scorer.rm_train_responses', 'scorer.update_every_rounds')}: scorer.backend=vllm "
            f"cannot train the reward model (scorer.rm_train_responses={sc.rm_train_responses}, "
            f"scorer.update_every_rounds={sc.update_every_rounds}); use backend hf or auto, or set both to 0"
        )
    if sc.train_ranks > 1 and sc.train_zero_stage == 3 and sc.lm_loss_coef > 0:
        # The LM regulariser reads the embedding matrix outside a module call, where
        # ZeRO-3 holds only this rank's partition of it.
        raise ConfigError(
            f"{at('scorer.lm_loss_coef', 'scorer.train_zero_stage')}: scorer.lm_loss_coef > 0 needs "
            f"scorer.train_zero_stage ≤ 2 when scorer.train_ranks > 1; set one of them"
        )
    lora = cfg.learner.lora
    if lora.enabled:
        targets = [t for t in lora.target_modules if t.strip()]
        if not targets or len(targets) != len(lora.target_modules):
            raise ConfigError(f"{at('learner.lora.target_modules', 'learner.lora.r')}: learner.lora.target_modules "
                              f"must name at least one module and no empty names when learner.lora.r > 0, "
                              f"got {lora.target_modules}")
        if "all-linear" in targets and len(targets) > 1:
            raise ConfigError(f"{at('learner.lora.target_modules')}: learner.lora.target_modules: 'all-linear' "
                              f"stands alone, got {lora.target_modules}")
        if cfg.learner.zero_stage == 3:
            # The merged export and the adapter-off reference need each adapted layer's
            # full base weight next to its adapter; ZeRO-3 shards the frozen base weights
            # too, and the adapter alone is too small to be worth partitioning.
            raise ConfigError(f"{at('learner.zero_stage', 'learner.lora.r')}: learner.lora needs "
                              "learner.zero_stage 0, 1 or 2 (ZeRO-3 is not supported with LoRA)")
        if cfg.reference is not None:
            raise ConfigError(f"{at('reference', 'learner.lora.r')}: with learner.lora the reference is the "
                              "policy's base weights with the adapter off; remove the reference section")
    if sc.backend == "vllm" and sc.num_gpus > 0 and sc.mode == "sequence":
        raise ConfigError(
            f"{at('scorer.backend', 'scorer.mode')}: scorer.backend=vllm serves token-classification (segment) "
            "reward models only; use backend hf or auto with scorer.mode=sequence"
        )
    models = [("policy", cfg.policy), ("reference", cfg.reference), ("scorer.model", cfg.scorer.model)]
    for name, model in models:
        if model is None:
            continue
        if model.trust_remote_code:
            # Allowed, but never silently: remote code runs with the job's privileges.
            import warnings

            warnings.warn(f"{source}: {name}.trust_remote_code is on; remote model code will run", stacklevel=2)


_OFFLINE_ONLY_SECTIONS = ("data", "train")  # sections only OfflineConfig has


def validate_offline_config(cfg: "OfflineConfig", source: str = "<config>", where: Optional[dict[str, str]] = None) -> None:
    """Ranges, then the offline job's cross-field checks; the shared sections (aspects,
    run name, models) are checked by the online rules on an equivalent RunConfig."""
    where = where or {}
    check_ranges(cfg, source, where)
    if cfg.data.train is None:
        raise ConfigError(f"{where.get('data', source)}: data.train names no dataset "
                          "(a JSONL/Parquet file, a saved datasets directory, a hub name, or 'synthetic')")
    shared = RunConfig(seed=cfg.seed, algorithm=cfg.algorithm, run_name=cfg.run_name, policy=cfg.policy,
                       reference=cfg.reference, aspects=cfg.aspects, learner=cfg.learner, logging=cfg.logging,
                       ray=cfg.ray)
    # The online-only sections keep their defaults, which pass; only the shared fields can fail.
    validate_run_config(shared, source, where)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
