"""Cluster planner: where every actor of a run goes and how much GPU memory it needs.

Pure arithmetic over a :class:`twodrl.config.RunConfig` and a cluster shape (nodes ×
GPUs per node × GPU memory). Nothing is downloaded or allocated, so a plan for a
4 × 8 A100 cluster can be made on a laptop before the job is submitted. ``twodrl plan``
(:mod:`jobs.plan`) prints it.

Placement follows Ray's rules, because that is what the job will actually get: every
GPU actor asks for a *share* of a GPU (``learner.num_gpus_per_rank``,
``rollout.num_gpus``, ``scorer.num_gpus``; at most 1.0), and a tensor-parallel engine
holds ``tensor_parallel_size`` whole GPUs on one node (vLLM's STRICT_PACK placement
group, or an HF scorer process holding them all). Every actor's numbers come from
:func:`actors.common.actor_request`, the function the actors are started with. Groups are bin-packed largest first, best fit (the node
with the fewest free GPUs that still holds the group), so big tensor-parallel groups
find whole nodes and small actors fill the gaps. Ray schedules by shares, not bytes, so
memory is checked afterwards, per GPU, summing every tenant — exactly how an
over-subscribed GPU would fail at run time (CUDA OOM).

Memory model (GiB = 2**30 bytes; Ψ = parameter count, N = learner data-parallel ranks)

* Learner rank, mixed precision (``learner.bf16``) with Adam:
  bf16 parameters 2Ψ, bf16 gradients 2Ψ, optimizer states 12Ψ (fp32 master copy, m, v).
  ZeRO stage 1 partitions the optimizer states over N ranks, stage 2 also the
  gradients, stage 3 also the parameters (ZeRO paper, Rajbhandari et al. 2020).
  Full fp32 training: parameters 4Ψ, gradients 4Ψ, optimizer 8Ψ (m, v; no master copy).
  Stage 3 adds a gather buffer for the parameters being used, 2 bytes × min(Ψ, 1e9)
  (DeepSpeed's default ``stage3_max_live_parameters``).
* Learner activations (bf16, FlashAttention/SDPA, so no s×s score matrices): the bytes
  autograd keeps per token for one Hugging Face Llama/Qwen2/Mistral decoder layer,
  ``A_layer = 22h + 4·h_kv + 8i`` — each of the two RMSNorms keeps its fp32 input, its
  normalised bf16 copy and the scaled output (8h); attention keeps Q and K after rotary,
  V, the attention output and its contiguous copy for the output projection
  (6h + 4·h_kv); the gated MLP keeps gate, up, act(gate) and their product (8i).
  (tests/unit/test_planner.py measures this with saved-tensor hooks on a real layer.)
  Without gradient checkpointing: ``tokens × (L × A_layer + 8h)`` (8h: the final norm).
  With it, each layer keeps only its bf16 input and one layer is recomputed at a time:
  ``tokens × (L × 2h + A_layer + 8h)``. The output head adds ``tokens × V × 10`` bytes
  at its peak (bf16 logits, their fp32 copy, the fp32 log-softmax kept for backward).
  ``tokens = micro_batch × sequences_per_example × policy.max_length``, with two
  sequences (chosen + rejected, concatenated in one forward) for the pairwise losses and
  one for APPO/DPA-RSF.
  ``--activation-gb`` replaces the estimate with a measured number.
* Reference model: frozen weights in the training precision (2Ψ in bf16, 4Ψ in fp32).
  Colocated (``learner.colocate_reference``) every learner rank holds it, partitioned over
  the N ranks under ZeRO-3; otherwise it is one forward-only actor with a learner rank's
  GPU share holding the whole model.
* vLLM rollout engine: vLLM pre-allocates ``gpu_memory_utilization × GPU memory`` on
  each of its GPUs and fills what its weights (2Ψ/TP), runtime (CUDA context, CUDA
  graphs and the profiling forward over 8192 batched tokens) leave with KV cache. The
  plan reports the KV cache and fails when it cannot hold one ``policy.max_length``
  sequence. KV bytes per token per GPU = 2 (K, V) × L × ceil(kv_heads / TP) × head_dim × 2.
* Reward scorer: weights 2Ψ/TP (the language-model head replaced by one linear output per
  aspect) plus one forward's transient activations for ``scorer.batch_size`` sequences:
  ``tokens × 2 bytes × (4h + 3i/TP)`` (residual stream, norm output, attention output
  and the MLP shard's gate/up/product).
* Every GPU process also pays a fixed runtime overhead (CUDA context, NCCL buffers,
  allocator fragmentation), ``--overhead-gb`` (default 2 GiB).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

GIB = float(2**30)

# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Architecture:
    """The shape numbers the memory model needs (the ``config.json`` fields)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    head_dim: Optional[int] = None

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        """Width of K (and of V): kv_heads × head_dim (< hidden with grouped-query attention)."""
        return self.num_kv_heads * self.head_size

    def layer_params(self) -> int:
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_size, self.kv_size, self.intermediate_size
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * i  # gate, up, down
        return attn + mlp + 2 * h  # two RMSNorm weights

    def lora_params(self, r: int, target_modules: Sequence[str]) -> int:
        """Adapter parameters of rank ``r`` on the decoder's linear layers that
        ``target_modules`` names (``all-linear``: every one): ``r × (in + out)`` each."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_size, self.kv_size, self.intermediate_size
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        names = set(shapes) if "all-linear" in target_modules else {t.rsplit(".", 1)[-1] for t in target_modules}
        return r * self.num_layers * sum(a + b for name, (a, b) in shapes.items() if name in names)

    def num_params(self, lm_head: bool = True, value_outputs: int = 0) -> int:
        """Parameter count. ``lm_head=False`` with ``value_outputs=A`` is a reward model
        whose vocabulary head is replaced by a linear layer with A outputs."""
        h = self.hidden_size
        total = self.vocab_size * h + self.num_layers * self.layer_params() + h
        if lm_head and not self.tie_word_embeddings:
            total += self.vocab_size * h
        total += value_outputs * (h + 1)
        return total

    def kv_bytes_per_token(self, tp: int = 1, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token occupies on each GPU of a TP group (KV heads are
        replicated when there are fewer of them than GPUs)."""
        return 2 * self.num_layers * math.ceil(self.num_kv_heads / tp) * self.head_size * dtype_bytes


# Built-in shapes (from the models' published config.json files), because a plan must be
# possible without downloading anything.
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("qwen2-7b", 28, 3584, 28, 4, 152064, 18944, 32768, qkv_bias=True),
        Architecture("qwen2-72b", 80, 8192, 64, 8, 152064, 29568, 32768, qkv_bias=True),
        Architecture("llama-3-8b", 32, 4096, 32, 8, 128256, 14336, 8192),
        Architecture("mistral-7b", 32, 4096, 32, 8, 32000, 14336, 32768),
    )
}

# Lower-cased model path/name fragments → table entry. Checked in order, so the more
# specific pattern (72b before 7b) wins. Zephyr-β's SFT checkpoint is a Mistral-7B.
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"qwen2(\.0)?-72b", "qwen2-72b"),
    (r"qwen2(\.0)?-7b", "qwen2-7b"),
    (r"(meta-)?llama-?3(\.0)?-8b", "llama-3-8b"),
    (r"mistral-7b|zephyr-7b", "mistral-7b"),
]


class PlanError(ValueError):
    """A model the planner cannot size, or a cluster shape that makes no sense."""


def architecture_from_config_json(path: str | Path, name: str | None = None) -> Architecture:
    cfg = json.loads(Path(path).read_text())
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the LM under text_config
    try:
        heads = int(cfg["num_attention_heads"])
        return Architecture(
            name=name or str(cfg.get("_name_or_path") or Path(path).parent.name),
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            intermediate_size=int(cfg.get("intermediate_size") or 4 * int(cfg["hidden_size"])),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            head_dim=cfg.get("head_dim"),
        )
    except KeyError as e:
        raise PlanError(f"{path}: config.json has no {e.args[0]!r}; cannot size this model") from None


def resolve_architecture(model_path: str) -> Architecture:
    """Shapes for a model path: ``config.json`` of a local directory (or of a tiny
    offline model), else the built-in table matched by name."""
    local = Path(model_path).expanduser()
    if model_path.startswith("tiny:"):
        try:
            from twodrl.models.tiny import parse_tiny_spec, tiny_model_path
        except ImportError as e:
            raise PlanError(f"{model_path}: tiny models are not available here ({e})") from None
        kind, overrides = parse_tiny_spec(model_path)  # "tiny:reward,num_hidden_layers=4"
        local = Path(tiny_model_path(kind, **overrides))
    if (local / "config.json").is_file():
        return architecture_from_config_json(local / "config.json", name=model_path)
    lowered = model_path.lower()
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, lowered):
            return KNOWN_ARCHITECTURES[key]
    raise PlanError(
        f"unknown model {model_path!r}: not a local directory with config.json and not one of the "
        f"built-in architectures {sorted(KNOWN_ARCHITECTURES)} (matched by name)"
    )


def dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def format_params(n: float) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


# --------------------------------------------------------------------------- plan objects


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    cpus_per_node: Optional[float] = None  # None: CPU slots are not checked

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 0 or self.gpu_memory_gb <= 0:
            raise PlanError(
                f"cluster must have ≥1 node, ≥0 GPUs per node and positive GPU memory; got "
                f"{self.nodes} × {self.gpus_per_node} × {self.gpu_memory_gb} GiB"
            )

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class PlanOptions:
    overhead_gb: float = 2.0  # CUDA context + NCCL + fragmentation per GPU process
    activation_gb: Optional[float] = None  # measured learner activations; None: estimate
    vllm_profile_tokens: int = 8192  # tokens of vLLM's profiling forward (max_num_batched_tokens)
    vllm_cuda_graph_gb: float = 0.5


@dataclass
class Actor:
    """One Ray actor (or one tensor-parallel engine) and what it asks for."""

    name: str
    role: str  # learner | reference | rollout | scorer | annotator | driver
    bundles: int  # GPU bundles, all on one node (tensor-parallel size); 0 for CPU actors
    share: float  # GPU share per bundle
    cpus: float
    memory: dict[str, float]  # per-GPU breakdown in GiB (identical on each bundle)
    detail: str = ""
    node: Optional[int] = None
    gpus: list[int] = field(default_factory=list)

    @property
    def gpu_memory_gb(self) -> float:
        return sum(self.memory.values())

    @property
    def on_gpu(self) -> bool:
        return self.bundles > 0


@dataclass
class Plan:
    config_name: str
    cluster: Cluster
    actors: list[Actor]
    models: list[str]
    problems: list[str]
    notes: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def gpus_used(self) -> int:
        return len(self.gpu_tenants())

    def gpu_tenants(self) -> dict[tuple[int, int], list[Actor]]:
        """(node, gpu) → the actors placed on it."""
        return gpu_tenants(self.actors)

    def gpu_requests(self) -> dict[str, float]:
        """GPUs each role asks Ray for (shares summed)."""
        req: dict[str, float] = {}
        for a in self.actors:
            if a.on_gpu:
                req[a.role] = req.get(a.role, 0.0) + a.bundles * a.share
        return req

    def format(self) -> str:
        return format_plan(self)


def gpu_tenants(actors: list[Actor]) -> dict[tuple[int, int], list[Actor]]:
    out: dict[tuple[int, int], list[Actor]] = {}
    for a in actors:
        if a.node is not None:
            for g in a.gpus:
                out.setdefault((a.node, g), []).append(a)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- memory


def _gib(nbytes: float) -> float:
    return nbytes / GIB


def learner_memory(cfg: Any, arch: Architecture, ref_arch: Optional[Architecture], opts: PlanOptions) -> dict[str, float]:
    """Per-GPU GiB of one learner rank (see the module docstring for the formulas)."""
    lc = cfg.learner
    n = lc.num_ranks
    psi = arch.num_params()
    stage = lc.zero_stage
    if lc.bf16:
        p_b, g_b, o_b = 2, 2, 12
    else:
        p_b, g_b, o_b = 4, 4, 8
    # LoRA: gradients and optimizer states of the adapter only; no reference copy (the
    # base weights with the adapter off are the reference).
    trained = arch.lora_params(lc.lora.r, lc.lora.target_modules) if lc.lora.enabled else psi
    mem = {
        "params": _gib(p_b * psi / (n if stage >= 3 else 1) + (p_b * trained if lc.lora.enabled else 0)),
        "grads": _gib(g_b * trained / (n if stage >= 2 else 1)),
        "optim": _gib(o_b * trained / (n if stage >= 1 else 1)),
    }
    if stage >= 3:
        mem["gather"] = _gib(p_b * min(psi, 1e9))
    mem["activations"] = opts.activation_gb if opts.activation_gb is not None else learner_activation_gb(cfg, arch)
    if lc.colocate_reference and ref_arch is not None and not lc.lora.enabled:
        # The frozen reference is held in the training precision (bf16, or fp32 without it).
        mem["reference"] = _gib((2 if lc.bf16 else 4) * ref_arch.num_params() / (n if stage >= 3 else 1))
    mem["runtime"] = opts.overhead_gb
    return mem


def sequences_per_example(algorithm: str) -> int:
    """Pairwise losses forward chosen and rejected together; APPO/DPA-RSF one sequence."""
    return 1 if algorithm in ("appo", "dpa-rsf", "kto") else 2


def activation_bytes_per_token(arch: Architecture, gradient_checkpointing: bool) -> tuple[int, int]:
    """(decoder body, output head) activation bytes per token at the backward peak."""
    h, kv, i, L = arch.hidden_size, arch.kv_size, arch.intermediate_size, arch.num_layers
    layer = 22 * h + 4 * kv + 8 * i
    final_norm = 8 * h
    body = (L * 2 * h + layer if gradient_checkpointing else L * layer) + final_norm
    return body, arch.vocab_size * 10


def learner_activation_gb(cfg: Any, arch: Architecture) -> float:
    tokens = cfg.learner.micro_batch_size * sequences_per_example(cfg.algorithm) * cfg.policy.max_length
    body, head = activation_bytes_per_token(arch, cfg.learner.gradient_checkpointing)
    return _gib(tokens * (body + head))


def rollout_memory(cfg: Any, arch: Architecture, gpu_gb: float, opts: PlanOptions) -> tuple[dict[str, float], float]:
    """(per-GPU breakdown, KV-cache tokens) of one vLLM engine."""
    tp = cfg.rollout.tensor_parallel_size
    budget = cfg.rollout.gpu_memory_utilization * gpu_gb
    weights = _gib(dtype_bytes(cfg.policy.dtype) * arch.num_params() / tp)
    runtime = opts.overhead_gb + opts.vllm_cuda_graph_gb + _gib(
        opts.vllm_profile_tokens * 2 * (4 * arch.hidden_size + 3 * arch.intermediate_size / tp)
    )
    kv = budget - weights - runtime
    tokens = max(kv, 0.0) * GIB / arch.kv_bytes_per_token(tp)
    return {"weights": weights, "runtime": runtime, "kv_cache": max(kv, 0.0)}, tokens


def rm_learner_memory(cfg: Any, arch: Architecture, opts: PlanOptions) -> dict[str, float]:
    """Per-GPU GiB of one reward-model trainer rank (``scorer.train_*``): the learner's
    ZeRO arithmetic over the RM's parameters (backbone + aspect head), activations of
    one micro-batch of responses at ``scorer.model.max_length`` tokens."""
    sc = cfg.scorer
    n = sc.train_ranks
    psi = arch.num_params(lm_head=False, value_outputs=len(cfg.aspects.names))
    stage = sc.train_zero_stage
    p_b, g_b, o_b = (2, 2, 12) if sc.train_bf16 else (4, 4, 8)
    mem = {
        "params": _gib(p_b * psi / (n if stage >= 3 else 1)),
        "grads": _gib(g_b * psi / (n if stage >= 2 else 1)),
        "optim": _gib(o_b * psi / (n if stage >= 1 else 1)),
    }
    if stage >= 3:
        mem["gather"] = _gib(p_b * min(psi, 1e9))
    micro = sc.train_micro_batch_size or math.ceil(sc.train_batch_size / max(n, 1))
    body, head = activation_bytes_per_token(arch, sc.train_gradient_checkpointing)
    # The aspect head reads a few positions; only the LM regulariser has a vocab-wide head.
    mem["activations"] = _gib(micro * sc.model.max_length * (body + (head if sc.lm_loss_coef > 0 else 0)))
    mem["runtime"] = opts.overhead_gb
    return mem


def scorer_memory(cfg: Any, arch: Architecture, opts: PlanOptions) -> dict[str, float]:
    sc = cfg.scorer
    tp = sc.tensor_parallel_size
    outputs = len(cfg.aspects.names)
    weights = _gib(dtype_bytes(sc.model.dtype) * arch.num_params(lm_head=False, value_outputs=outputs) / tp)
    tokens = sc.batch_size * sc.model.max_length
    act = _gib(tokens * 2 * (4 * arch.hidden_size + 3 * arch.intermediate_size / tp))
    return {"weights": weights, "activations": act, "runtime": opts.overhead_gb}


# --------------------------------------------------------------------------- placement


def _check_tp(role: str, field_name: str, arch: Architecture, tp: int, cluster: Cluster, problems: list[str]) -> None:
    if tp < 1:
        problems.append(f"{field_name} must be ≥ 1, got {tp}")
        return
    if arch.num_heads % tp:
        problems.append(
            f"{role}: {field_name}={tp} does not divide the {arch.num_heads} attention heads of {arch.name}"
        )
    if arch.num_kv_heads < tp and tp % arch.num_kv_heads:
        problems.append(f"{role}: {field_name}={tp} is not a multiple of the {arch.num_kv_heads} KV heads of {arch.name}")
    if tp > cluster.gpus_per_node:
        problems.append(
            f"{role}: {field_name}={tp} needs {tp} GPUs on one node, but nodes have {cluster.gpus_per_node}"
        )


def _share(value: float, field_name: str, problems: list[str]) -> float:
    if value > 1.0:
        problems.append(
            f"{field_name}={value}: a bundle uses at most one GPU; use tensor_parallel_size for more GPUs per engine"
        )
        return 1.0
    return value


def ray_request(cfg: Any, role: str, index: int = 0) -> tuple[int, float, float]:
    """(GPU bundles, GPU share per bundle, CPUs) of actor ``role-index``, from the same
    function the actors are started with (:func:`actors.common.actor_request`), so the
    plan places exactly what Ray will be asked for."""
    from actors.common import actor_request

    req = actor_request(cfg, role, index)
    gpus = req.gpus
    if gpus <= 0:
        return 0, 0.0, req.cpus
    if len(req.bundles) > 1:  # a placement group of whole-GPU bundles (vLLM TP)
        return len(req.bundles), float(req.bundles[0].get("GPU", 1.0)), req.cpus
    if gpus > 1:  # one process holding several whole GPUs (HF scorer sharded over them)
        return math.ceil(gpus), 1.0, req.cpus
    return 1, gpus, req.cpus


def build_actors(cfg: Any, cluster: Cluster, opts: PlanOptions, problems: list[str], notes: list[str], models: list[str]) -> list[Actor]:
    actors: list[Actor] = []
    lc, rc, sc, ac = cfg.learner, cfg.rollout, cfg.scorer, cfg.annotator
    gpu_gb = cluster.gpu_memory_gb

    policy_arch = resolve_architecture(cfg.policy.path)
    psi = policy_arch.num_params()
    models.append(f"policy     {cfg.policy.path} ({policy_arch.name}, {format_params(psi)} params, {cfg.policy.dtype})")
    if cfg.policy.max_length > policy_arch.max_position_embeddings > 0:
        problems.append(
            f"policy.max_length={cfg.policy.max_length} exceeds the {policy_arch.max_position_embeddings} "
            f"positions of {policy_arch.name}"
        )
    needs_reference = cfg.algorithm not in ("dpa-rsf", "simpo", "orpo")
    ref_arch = None
    if needs_reference:
        ref_arch = resolve_architecture(cfg.reference.path) if cfg.reference else policy_arch
        ref_name = cfg.reference.path if cfg.reference else "frozen copy of the policy"
        ref_dtype = "bfloat16" if lc.bf16 else "float32"
        models.append(f"reference  {ref_name} ({ref_arch.name}, {format_params(ref_arch.num_params())} params, {ref_dtype})")
    scorer_arch = resolve_architecture(sc.model.path)
    models.append(
        f"scorer     {sc.model.path} ({scorer_arch.name} + {len(cfg.aspects.names)}-aspect head, "
        f"{format_params(scorer_arch.num_params(lm_head=False))} params, {sc.model.dtype})"
    )

    # Learner ranks (+ the colocated reference).
    share = _share(lc.num_gpus_per_rank, "learner.num_gpus_per_rank", problems)
    lmem = learner_memory(cfg, policy_arch, ref_arch, opts) if share > 0 else {}
    ckpt = "on" if lc.gradient_checkpointing else "off"
    detail = (
        f"ZeRO-{lc.zero_stage} over {lc.num_ranks} rank{'s' if lc.num_ranks != 1 else ''}, micro-batch {lc.micro_batch_size}"
        f"×{sequences_per_example(cfg.algorithm)} seq × {cfg.policy.max_length} tok, grad ckpt {ckpt}"
    )
    if lc.lora.enabled:
        detail += f", LoRA r={lc.lora.r} (the reference is the base, adapter off)"
    elif lc.colocate_reference and ref_arch is not None:
        detail += ", reference colocated"
    for r in range(lc.num_ranks):
        bundles, rshare, cpus = ray_request(cfg, "learner", r)
        actors.append(Actor(f"learner-{r}", "learner", bundles, rshare, cpus, dict(lmem), detail))
    global_batch = lc.num_ranks * lc.micro_batch_size * lc.grad_accum_steps
    notes.append(
        f"learner global batch = {lc.num_ranks} ranks × {lc.micro_batch_size} micro-batch × "
        f"{lc.grad_accum_steps} accumulation = {global_batch} examples per step"
    )
    from actors.common import role_resources

    if role_resources(cfg, "reference").count:
        # One forward-only actor holding the whole frozen model (actors/common.py asks Ray
        # for one reference actor with a learner rank's GPU share), started exactly when
        # that shared count says so.
        held = ref_arch or policy_arch
        rmem = {"weights": _gib((2 if lc.bf16 else 4) * held.num_params()), "runtime": opts.overhead_gb}
        rdetail = "frozen, forward only" if ref_arch is not None else (
            f"frozen copy of the policy, unused by {cfg.algorithm} (learner.colocate_reference: true drops it)")
        bundles, rshare, cpus = ray_request(cfg, "reference", 0)
        actors.append(Actor("reference-0", "reference", bundles, rshare, cpus, rmem if bundles else {}, rdetail))

    # Rollout engines.
    share = _share(rc.num_gpus, "rollout.num_gpus", problems)
    if share > 0 and rc.backend == "vllm":
        _check_tp("rollout", "rollout.tensor_parallel_size", policy_arch, rc.tensor_parallel_size, cluster, problems)
        rmem, kv_tokens = rollout_memory(cfg, policy_arch, gpu_gb, opts)
        kv_detail = (
            f"vLLM TP={rc.tensor_parallel_size}, gpu_memory_utilization {rc.gpu_memory_utilization}, "
            f"KV cache {rmem['kv_cache']:.1f} GiB ≈ {kv_tokens / 1e3:.0f}k tokens"
        )
        if kv_tokens < cfg.policy.max_length:
            problems.append(
                f"rollout: vLLM KV cache {rmem['kv_cache']:.1f} GiB holds {int(kv_tokens)} tokens, fewer than one "
                f"policy.max_length={cfg.policy.max_length} sequence ({policy_arch.name} weights "
                f"{rmem['weights']:.1f} GiB per GPU in a {rc.gpu_memory_utilization} × {gpu_gb:g} GiB budget); "
                f"raise rollout.gpu_memory_utilization or rollout.tensor_parallel_size"
            )
    elif share > 0:  # HF generate on GPU: no pre-allocation; its KV cache grows with the batch
        rmem = {"weights": _gib(dtype_bytes(cfg.policy.dtype) * psi), "runtime": opts.overhead_gb}
        kv_detail = "HF generate on one GPU (KV cache of a batch not estimated)"
    else:
        rmem, kv_detail = {}, f"{rc.backend} on CPU"
    for w in range(rc.num_workers):
        bundles, wshare, cpus = ray_request(cfg, "rollout", w)
        actors.append(Actor(f"rollout-{w}", "rollout", bundles, wshare, cpus, dict(rmem) if bundles else {}, kv_detail))

    # Reward scorer.
    share = _share(sc.num_gpus, "scorer.num_gpus", problems)
    backend = sc.resolved_backend()
    if share > 0:
        _check_tp("scorer", "scorer.tensor_parallel_size", scorer_arch, sc.tensor_parallel_size, cluster, problems)
        smem = scorer_memory(cfg, scorer_arch, opts)
        # hf with TP > 1: one process holding the TP GPUs, the model spread over them.
        sdetail = f"{backend} TP={sc.tensor_parallel_size}, batch {sc.batch_size} × {sc.model.max_length} tok"
    else:
        smem, sdetail = {}, f"{backend} on CPU"
    for w in range(sc.num_workers):
        bundles, wshare, cpus = ray_request(cfg, "scorer", w)
        actors.append(Actor(f"scorer-{w}", "scorer", bundles, wshare, cpus, dict(smem) if bundles else {}, sdetail))

    # Reward-model trainer ranks (scorer.train_ranks > 1: `twodrl train-rm` and the
    # online RM updates run them as their own DeepSpeed group).
    rm_ranks = role_resources(cfg, "rm_learner").count
    if rm_ranks:
        share = _share(sc.train_num_gpus_per_rank, "scorer.train_num_gpus_per_rank", problems)
        rm_mem = rm_learner_memory(cfg, scorer_arch, opts) if share > 0 else {}
        rm_detail = (
            f"RM training, ZeRO-{sc.train_zero_stage} over {rm_ranks} ranks, batch {sc.train_batch_size} × "
            f"{sc.model.max_length} tok, grad ckpt {'on' if sc.train_gradient_checkpointing else 'off'}"
        )
        for r in range(rm_ranks):
            bundles, rshare, cpus = ray_request(cfg, "rm_learner", r)
            actors.append(Actor(f"rm_learner-{r}", "rm_learner", bundles, rshare, cpus,
                                dict(rm_mem) if bundles else {}, rm_detail))

    # Annotation pool and driver: CPU only.
    judge = ac.base_url or "local judge server"
    for w in range(ac.num_actors):
        _, _, cpus = ray_request(cfg, "annotator", w)
        actors.append(Actor(f"annotator-{w}", "annotator", 0, 0.0, cpus, {}, f"judge {ac.model} @ {judge}, {ac.concurrency} concurrent"))
    # The driver is the job's own process (the Ray job entrypoint on the head), not an actor.
    actors.append(Actor("driver", "driver", 0, 0.0, 0.0, {}, "job process: round loop, metrics, checkpoints"))
    return actors


def place(actors: list[Actor], cluster: Cluster, problems: list[str]) -> None:
    """Bin-pack GPU actors (whole TP groups on one node), then CPU actors."""
    free = [[1.0] * cluster.gpus_per_node for _ in range(cluster.nodes)]
    eps = 1e-9

    def fitting(node: int, n: int, share: float) -> list[int]:
        return [g for g in range(cluster.gpus_per_node) if free[node][g] + eps >= share][:n]

    # Largest groups first; stable on the configured order so learner ranks stay together.
    gpu_actors = sorted((a for a in actors if a.on_gpu), key=lambda a: -(a.bundles * a.share))
    unplaced: list[Actor] = []
    for a in gpu_actors:
        if a.share <= 0:
            continue
        candidates = []
        for node in range(cluster.nodes):
            gpus = fitting(node, a.bundles, a.share)
            if len(gpus) == a.bundles:
                # Best fit: the node with the least free capacity that still holds the group.
                candidates.append((sum(free[node]), node, gpus))
        if not candidates:
            unplaced.append(a)
            continue
        _, node, gpus = min(candidates)
        for g in gpus:
            free[node][g] -= a.share
        a.node, a.gpus = node, gpus

    # One message per role: "rollout: 8 of 8 engines (1 GPU each) not placed".
    by_role: dict[str, list[Actor]] = {}
    for a in unplaced:
        by_role.setdefault(a.role, []).append(a)
    for role, missing in by_role.items():
        total = sum(1 for a in actors if a.role == role)
        a = missing[0]
        what = f"{a.bundles} GPUs on one node" if a.bundles > 1 else "1 GPU"
        names = ", ".join(m.name for m in missing[:3]) + (", …" if len(missing) > 3 else "")
        room = ", ".join(f"node{n} {sum(1 for g in free[n] if g + eps >= a.share)}" for n in range(cluster.nodes))
        problems.append(
            f"{role}: {len(missing)} of {total} actor(s) not placed ({names}): each needs {what} "
            f"(share {a.share:g}); GPUs with room left: {room}. All actors together ask for "
            f"{sum(b.bundles * b.share for b in actors):g} GPUs, the cluster has {cluster.num_gpus}"
        )

    # CPU slots (only with Cluster.cpus_per_node): GPU actors' own num_cpus count on the
    # node they landed on; CPU-only actors go to the node with the most CPU left. Without
    # a CPU count they can run anywhere (on Kubernetes: the GPU-less head pod).
    if cluster.cpus_per_node is None:
        return
    cpu_free = [float(cluster.cpus_per_node)] * cluster.nodes
    for a in actors:
        if a.node is not None:
            cpu_free[a.node] -= a.cpus
    for a in actors:
        if a.on_gpu:
            continue
        node = max(range(cluster.nodes), key=lambda n: (cpu_free[n], -n))
        if cpu_free[node] < a.cpus:
            problems.append(f"{a.name}: needs {a.cpus:g} CPUs, no node has them left")
            continue
        cpu_free[node] -= a.cpus
        a.node = node
    fields = {"learner": "learner.num_cpus_per_rank", "reference": "learner.num_cpus_per_rank",
              "rollout": "rollout.num_cpus", "scorer": "scorer.num_cpus", "annotator": "annotator.num_cpus",
              "rm_learner": "scorer.train_num_cpus_per_rank"}
    for n, c in enumerate(cpu_free):
        if c < -eps:
            roles = sorted({a.role for a in actors if a.node == n and a.cpus > 0})
            problems.append(
                f"node{n}: its actors ask for {cluster.cpus_per_node - c:g} CPUs > {cluster.cpus_per_node:g}; "
                f"lower {', '.join(fields[r] for r in roles if r in fields)}"
            )


def plan(cfg: Any, cluster: Cluster, options: Optional[PlanOptions] = None, config_name: str = "<config>") -> Plan:
    """Place every actor of ``cfg`` on ``cluster`` and estimate per-GPU memory.
    ``Plan.problems`` lists everything that does not fit (empty: it fits)."""
    opts = options or PlanOptions()
    problems: list[str] = []
    notes: list[str] = []
    models: list[str] = []
    actors = build_actors(cfg, cluster, opts, problems, notes, models)

    # An actor too big for any GPU on its own, independent of where it lands. Replicas of a
    # role are the same size, so one message per role.
    too_big: set[str] = set()
    for a in actors:
        if a.on_gpu and a.gpu_memory_gb > cluster.gpu_memory_gb and a.role not in too_big:
            too_big.add(a.role)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in a.memory.items())
            problems.append(
                f"{a.name}: needs {a.gpu_memory_gb:.1f} GiB per GPU > {cluster.gpu_memory_gb:g} GiB ({parts}); "
                + _advice(a.role, cfg)
            )

    place(actors, cluster, problems)

    # Ray packs by shares, not bytes: co-tenants of a GPU (fractional shares) can still
    # add up to more memory than it has.
    for (node, gpu), tenants in gpu_tenants(actors).items():
        total = sum(t.gpu_memory_gb for t in tenants)
        if len(tenants) > 1 and total > cluster.gpu_memory_gb:
            names = " + ".join(f"{t.name} {t.gpu_memory_gb:.1f}" for t in tenants)
            problems.append(f"node{node} gpu{gpu}: {names} = {total:.1f} GiB > {cluster.gpu_memory_gb:g} GiB")
    return Plan(config_name, cluster, actors, models, problems, notes)


def _advice(role: str, cfg: Any) -> str:
    """What to change, leaving out what the config already does."""
    lc = cfg.learner
    if role == "learner":
        tips = []
        if lc.zero_stage < 3:
            tips.append("raise learner.zero_stage")
        tips.append("raise learner.num_ranks" if lc.zero_stage >= 1 else "use learner.zero_stage ≥ 1")
        if not lc.gradient_checkpointing:
            tips.append("turn on learner.gradient_checkpointing")
        if not lc.bf16:
            tips.append("turn on learner.bf16")
        if lc.colocate_reference:
            tips.append("set learner.colocate_reference: false")
        tips.append("lower learner.micro_batch_size or policy.max_length")
        return ", ".join(tips[:-1]) + " or " + tips[-1]
    return {
        "reference": "raise learner.zero_stage to 3 to partition it",
        "rollout": "raise rollout.tensor_parallel_size",
        "scorer": "raise scorer.tensor_parallel_size or lower scorer.batch_size",
        "rm_learner": "raise scorer.train_zero_stage or scorer.train_ranks, turn on scorer.train_gradient_checkpointing "
                      "or lower scorer.train_micro_batch_size",
    }.get(role, "use GPUs with more memory")


# --------------------------------------------------------------------------- printing


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _span(items: list[int]) -> str:
    """[0, 1, 2, 3] → '0-3'; [0, 2] → '0,2'."""
    if not items:
        return "-"
    if items == list(range(items[0], items[-1] + 1)) and len(items) > 1:
        return f"{items[0]}-{items[-1]}"
    return ",".join(map(str, items))


def _names(group: list[Actor]) -> str:
    if len(group) == 1:
        return group[0].name
    return f"{group[0].name}..{group[-1].name.rsplit('-', 1)[-1]}"


def _breakdown(a: Actor) -> str:
    return " + ".join(f"{k} {v:.1f}" for k, v in a.memory.items())


def _group_actors(actors: list[Actor]) -> list[list[Actor]]:
    """Runs of replicas that differ only in their index and GPUs, one table row each."""
    groups: list[list[Actor]] = []
    for a in actors:
        prev = groups[-1][-1] if groups else None
        same = (
            prev is not None
            and prev.role == a.role
            and prev.node == a.node
            and (prev.node is not None or not prev.on_gpu)
            and (prev.bundles, prev.share, prev.memory, prev.detail) == (a.bundles, a.share, a.memory, a.detail)
        )
        if same:
            groups[-1].append(a)
        else:
            groups.append([a])
    return groups


def format_plan(p: Plan) -> str:
    """The plan as text: models, one row per run of identical actors, per-GPU memory."""
    c = p.cluster
    lines = [
        f"Plan for {p.config_name} on {c.nodes} node(s) × {c.gpus_per_node} GPU(s) × {c.gpu_memory_gb:g} GiB",
        "",
        "Models",
    ]
    lines += [f"  {m}" for m in p.models]
    lines += ["", "Actors"]
    rows = []
    for group in _group_actors(p.actors):
        a = group[0]
        if not a.on_gpu:
            node, gpus, share, mem = ("any" if a.node is None else str(a.node)), "cpu", "-", "-"
        elif a.node is None:
            node, gpus, share, mem = "-", "UNPLACED", f"{a.bundles * a.share:g}", f"{a.gpu_memory_gb:.1f}"
        else:
            node = str(a.node)
            if a.bundles == 1:
                gpus = _span([g.gpus[0] for g in group])
            else:
                gpus = " | ".join(_span(g.gpus) for g in group)
            share, mem = f"{a.bundles * a.share:g}", f"{a.gpu_memory_gb:.1f}"
        rows.append([_names(group), str(len(group)), node, gpus, share, mem, a.detail])
    lines += ["  " + r for r in _table(rows, ["actors", "n", "node", "gpus", "gpus each", "GiB/gpu", "notes"])]

    lines += ["", f"Per-GPU memory (GiB of {c.gpu_memory_gb:g})"]
    rows = []
    tenants = p.gpu_tenants()
    for node in range(c.nodes):
        # Consecutive GPUs whose tenants have the same roles and breakdowns share one row.
        runs: list[tuple[list[int], list[list[Actor]]]] = []
        for gpu in range(c.gpus_per_node):
            ts = tenants.get((node, gpu), [])
            key = [(t.role, _breakdown(t)) for t in ts]
            if runs and [(t.role, _breakdown(t)) for t in runs[-1][1][-1]] == key:
                runs[-1][0].append(gpu)
                runs[-1][1].append(ts)
            else:
                runs.append(([gpu], [ts]))
        for gpus, per_gpu in runs:
            ts = per_gpu[0]
            if not ts:
                rows.append([str(node), _span(gpus), "(idle)", "", "0.0"])
                continue
            total = sum(t.gpu_memory_gb for t in ts)
            flag = "" if total <= c.gpu_memory_gb else "  OVER"
            for i, t in enumerate(ts):
                names = sorted({g[i].name for g in per_gpu}, key=lambda n: (len(n), n))
                who = names[0] if len(names) == 1 else f"{names[0]}..{names[-1].rsplit('-', 1)[-1]}"
                rows.append(
                    [str(node) if i == 0 else "", _span(gpus) if i == 0 else "", who, _breakdown(t),
                     f"{total:.1f}{flag}" if i == len(ts) - 1 else ""]
                )
    lines += ["  " + r for r in _table(rows, ["node", "gpus", "tenant", "breakdown", "total"])]

    req = p.gpu_requests()
    lines += ["", "Summary"]
    lines.append(
        "  GPUs requested: "
        + (", ".join(f"{role} {n:g}" for role, n in req.items()) or "none")
        + f" = {sum(req.values()):g} of {c.num_gpus}; GPUs in use {p.gpus_used}"
    )
    lines += [f"  {n}" for n in p.notes]
    if p.fits:
        peak = max((sum(t.gpu_memory_gb for t in ts) for ts in tenants.values()), default=0.0)
        lines.append(f"  fits: yes (peak {peak:.1f} GiB of {c.gpu_memory_gb:g} GiB per GPU)")
    else:
        lines.append(f"  fits: NO — {len(p.problems)} problem(s):")
        lines += [f"    - {msg}" for msg in p.problems]
    return "\n".join(lines)
