"""The one config system: typed dataclasses, YAML files, ``--set a.b=c`` overrides.

Every job reads its settings through :func:`load_config`. Errors name the file, the
line and the dotted field, so a user can fix a typo without reading a traceback, and
they are raised before any actor starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration mistake; the message names where it is."""


# --------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """Where a model comes from: a Hugging Face path/name, or ``tiny:<name>`` for an
    offline random-init model built by :mod:`twodrl.models.tiny`."""

    path: str = "tiny:policy"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    max_length: int = 512


@dataclass
class TaskConfig:
    """The prompt source. ``synthetic`` is the embedded default task."""

    name: str = "synthetic"
    train_prompts: int = 512
    eval_prompts: int = 32
    dataset: Optional[str] = None  # JSONL / Parquet / hub name for real prompts
    sft_examples: int = 384  # warm-start responses the task builds for round 0
    sft_epochs: int = 2
    sft_warmup_lr: float = 3e-3


@dataclass
class AspectsConfig:
    names: list[str] = field(
        default_factory=lambda: ["helpfulness", "correctness", "safety", "completeness", "clarity"]
    )
    weights: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.1, 0.1, 0.1])


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    num_workers: int = 1
    prompts_per_round: int = 64
    samples_per_prompt: int = 4
    temperature: float = 0.7
    top_p: float = 0.8
    max_new_tokens: int = 96
    num_gpus: float = 0.0
    num_cpus: float = 0.25
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    max_restarts: int = 2
    system_prompt: Optional[str] = None
    # Learner → rollout weight sync (actors/weight_sync.py): "shared_memory" (learner
    # rank 0 and the workers on one node), "object_store" (any Ray cluster),
    # "collective" (gloo on CPU / NCCL on GPU). "auto": NCCL on GPU clusters, else
    # shared_memory when on one node, else object_store.
    weight_sync: Literal["auto", "shared_memory", "object_store", "collective"] = "auto"
    weight_sync_bucket_mb: float = 64.0
    # vLLM on CPU only: let its oneDNN kernels repack the linear weights. Generation is a
    # few percent faster, but every weight sync then rebuilds the packed copies (a full
    # reload instead of an in-place copy: ~4x slower sync, benchmarks/bench_weight_sync).
    cpu_prepack_weights: bool = False


@dataclass
class ScorerConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="tiny:reward"))
    backend: Literal["hf", "vllm"] = "hf"
    num_workers: int = 1
    batch_size: int = 16
    num_gpus: float = 0.0
    num_cpus: float = 0.25
    tensor_parallel_size: int = 1
    max_restarts: int = 2
    # Reward-model training (round 0 and `twodrl train-rm`).
    train_epochs: int = 3
    train_lr: float = 1e-3
    train_batch_size: int = 16
    lm_loss_coef: float = 0.0
    mode: Literal["segment", "sequence"] = "segment"
    rm_train_responses: int = 384  # round 0: judge-annotated responses the RM learns from
    # `twodrl train-rm` / `eval-rm` data and output.
    train_synthetic_pairs: int = 2000  # rule-labelled synthetic records to train on
    eval_synthetic_pairs: int = 300  # held-out synthetic records (other seed, deduplicated)
    train_data: list[str] = field(default_factory=list)  # extra HelpSteer-2D files to train on
    eval_data: list[str] = field(default_factory=list)  # extra held-out HelpSteer-2D files
    include_sample_data: bool = True  # add the shipped HelpSteer-2D sample to training
    output_dir: Optional[str] = None  # default: runs/<run_name or "rm">/reward_model


@dataclass
class AnnotatorConfig:
    base_url: Optional[str] = None  # None: the job starts the local judge server
    model: str = "twodrl-synthetic-judge"
    api_key_env: str = "OPENAI_API_KEY"
    fraction: float = 0.25  # share of samples also sent to the judge each round
    judge_overrides_rm: bool = True  # judged samples train with the judge's ratings
    pairwise: bool = True
    concurrency: int = 8
    timeout_s: float = 30.0
    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    requests_per_minute: Optional[float] = None
    tokens_per_minute: Optional[float] = None
    max_requests: Optional[int] = None
    max_tokens: Optional[int] = None
    max_cost_usd: Optional[float] = None
    cache_path: Optional[str] = None  # default: RUN_DIR/judge_cache.sqlite
    num_actors: int = 1
    num_cpus: float = 0.05  # per annotator actor (it only waits on HTTP)
    max_completion_tokens: Optional[int] = None  # sent as max_tokens; None: server default
    price_input_per_mtok: Optional[float] = None  # USD per 1M tokens; None: pricing table
    price_output_per_mtok: Optional[float] = None


@dataclass
class LearnerConfig:
    num_ranks: int = 2
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = 5e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    epochs_per_round: int = 2
    max_grad_norm: float = 1.0
    beta: float = 0.2
    sft_coef: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    tdpo_alpha: float = 0.5
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    orpo_lambda: float = 0.1
    # APPO
    clip_eps: float = 0.2
    kl_coef: float = 0.05
    schmitt_delta: float = 0.1
    schmitt_hysteresis: bool = True
    ppo_epochs: int = 2
    # Placement
    num_gpus_per_rank: float = 0.0
    num_cpus_per_rank: float = 0.25
    colocate_reference: bool = True
    bf16: bool = False
    gradient_checkpointing: bool = False


@dataclass
class DPAConfig:
    objectives: list[str] = field(default_factory=lambda: ["helpfulness", "verbosity"])
    directions_per_prompt: int = 1
    replay_fraction: float = 0.15
    angle_low: float = -math.pi / 4
    angle_high: float = 0.0


@dataclass
class EvalConfig:
    every_rounds: int = 1
    num_prompts: int = 32
    max_new_tokens: int = 96


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "twodrl"
    metrics_port: Optional[int] = None  # Ray metrics export port (Prometheus)
    progress: bool = True
    plots: bool = True
    keep_checkpoints: int = 2  # newest round checkpoints kept on disk


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS, else a local cluster
    num_cpus: Optional[int] = 8  # logical slots for a local cluster
    namespace: Optional[str] = None  # default: twodrl-<run name>
    dashboard: bool = False  # start the dashboard with a local cluster (127.0.0.1)


@dataclass
class RunConfig:
    seed: int = 0
    rounds: int = 4
    algorithm: Literal[
        "2d-dpo", "1d-dpo", "dpo", "ipo", "kto", "orpo", "simpo", "tdpo1", "tdpo2", "appo", "dpa-rsf"
    ] = "2d-dpo"
    scheduling: Literal["sync", "overlap"] = "sync"
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


# --------------------------------------------------------------------------- loading


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = {}
    lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
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
        raise ConfigError(f"{where}: {dotted}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {dotted}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, dotted, where_source=where.rsplit(":", 1)[0] if ":" in where else where,
                      base=base if isinstance(base, tp) else None)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {dotted}: expected a list, got {type(value).__name__} {value!r}")
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
            return float(value)
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
    raise ConfigError(f"{where}: {dotted}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


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


def _parse_scalar(text: str) -> Any:
    """Values given with ``--set`` are parsed as YAML scalars/lists: ``0.1``, ``true``,
    ``[0.2, 0.8]``, ``null``."""
    return yaml.safe_load(text) if text.strip() else ""


def _apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = _LinedDict({}, {})
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = _parse_scalar(raw)
    if isinstance(node, _LinedDict):
        node.lines[parts[-1]] = "--set"


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cls: type = RunConfig,
    validate: bool = True,
) -> Any:
    """Load a YAML file into ``cls`` (default :class:`RunConfig`), apply overrides,
    validate. Raises :class:`ConfigError` naming file, line and field."""
    source = str(path) if path else "<defaults>"
    data: dict = _LinedDict({}, {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.load(p.read_text(), Loader=_LineLoader)
        except ConfigError as e:
            raise ConfigError(f"{source}:{str(e).removeprefix('line ')}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{source}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = _LinedDict({}, {})
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
        data = loaded
    for assignment in overrides:
        _apply_override(data, assignment)
    cfg = _build(cls, data, "", source)
    if validate and cls is RunConfig:
        validate_run_config(cfg, source)
    return cfg


def validate_run_config(cfg: RunConfig, source: str = "<config>") -> None:
    """Cross-field checks the types cannot express."""
    names, weights = cfg.aspects.names, cfg.aspects.weights
    if len(names) != len(weights):
        raise ConfigError(
            f"{source}: aspects.weights has {len(weights)} values for {len(names)} aspects.names {names}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: aspects.names has duplicates: {names}")
    if any(w < 0 for w in weights):
        raise ConfigError(f"{source}: aspects.weights must be non-negative, got {weights}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ConfigError(f"{source}: aspects.weights must sum to 1, got {sum(weights):.6g} ({weights})")
    from twodrl.aspects import ASPECTS

    unknown = [n for n in names if n not in ASPECTS]
    if unknown:
        raise ConfigError(f"{source}: aspects.names: unknown aspect(s) {unknown}; known: {sorted(ASPECTS)}")
    positive = {
        "rounds": cfg.rounds,
        "rollout.num_workers": cfg.rollout.num_workers,
        "rollout.prompts_per_round": cfg.rollout.prompts_per_round,
        "rollout.samples_per_prompt": cfg.rollout.samples_per_prompt,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "learner.num_ranks": cfg.learner.num_ranks,
        "learner.micro_batch_size": cfg.learner.micro_batch_size,
        "scorer.num_workers": cfg.scorer.num_workers,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{source}: {key} must be ≥ 1, got {value}")
    if cfg.rollout.samples_per_prompt < 2 and cfg.algorithm != "dpa-rsf":
        raise ConfigError(f"{source}: rollout.samples_per_prompt must be ≥ 2 to form chosen/rejected pairs")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"{source}: rollout.top_p must be in (0, 1], got {cfg.rollout.top_p}")
    if not 0.0 <= cfg.annotator.fraction <= 1.0:
        raise ConfigError(f"{source}: annotator.fraction must be in [0, 1], got {cfg.annotator.fraction}")
    if cfg.learner.beta <= 0:
        raise ConfigError(f"{source}: learner.beta must be > 0, got {cfg.learner.beta}")
    for name, model in (("policy", cfg.policy), ("scorer.model", cfg.scorer.model)):
        if model.trust_remote_code:
            # Allowed, but never silently: remote code runs with the job's privileges.
            import warnings

            warnings.warn(f"{source}: {name}.trust_remote_code is on; remote model code will run", stacklevel=2)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
