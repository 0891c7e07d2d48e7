"""Offline tiny models: random-init Qwen2 checkpoints in Hugging Face format.

Tests, the quickstart and the benchmarks never download weights. They ask for
``tiny_model_path(kind)`` (or the config path ``tiny:<kind>``), which builds the model
once and caches it on disk under ``$TWODRL_CACHE`` (default ``<repo>/.cache/twodrl``),
keyed by a hash of (kind, model config, tokenizer). The result is an ordinary HF
directory (config.json, model.safetensors, tokenizer files, generation_config.json)
that transformers and vLLM load like any hub checkpoint.

Kinds
- ``policy`` / ``reference``: ``Qwen2ForCausalLM`` (the reference is the same
  checkpoint: a frozen copy of the initial policy).
- ``reward``: the 2D segment reward model, ``Qwen2ForTokenClassification`` with one
  label per aspect (read at segment-final tokens, see :mod:`twodrl.models.reward_model`).
- ``reward-seq``: sequence-level multi-objective RM for DPA,
  ``Qwen2ForSequenceClassification`` with one label per objective.

Sizes: ``size="tiny"`` (default, ~0.8M parameters, head_dim 64 because vLLM's CPU
attention rejects head_dim 16) or ``size="bench"`` (~50M parameters); any
``Qwen2Config`` field can be overridden, e.g. ``tiny_model_path("policy",
num_hidden_layers=2)``; ``aspects=[...]`` sets the reward labels, ``seed=`` the init.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from twodrl.aspects import DEFAULT_ASPECTS, DPA_ASPECTS

KINDS = ("policy", "reference", "reward", "reward-seq")
_ARCH = {
    "policy": "Qwen2ForCausalLM",
    "reward": "Qwen2ForTokenClassification",
    "reward-seq": "Qwen2ForSequenceClassification",
}
# Bump when the build recipe changes in a way the config hash cannot see.
_RECIPE_VERSION = 2

SIZES: dict[str, dict[str, Any]] = {
    # head_dim = hidden / heads = 64: vLLM's CPU attention needs head_dim ≥ 32.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    ),
    # ~50M parameters: big enough that kernels, not Python, dominate benchmark time.
    "bench": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
    ),
}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    return Path(os.environ.get("TWODRL_CACHE") or repo_root() / ".cache" / "twodrl")


def _tokenizer_fingerprint(tokenizer) -> str:
    state = tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256((state + (tokenizer.chat_template or "")).encode()).hexdigest()[:16]


def tiny_config(kind: str = "policy", tokenizer=None, **overrides: Any):
    """The ``Qwen2Config`` a tiny model of ``kind`` is built from (no weights)."""
    from transformers import Qwen2Config

    from twodrl.models.tokenizer import IM_END, build_tokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {list(KINDS)}")
    kind = "policy" if kind == "reference" else kind
    tokenizer = tokenizer or build_tokenizer()
    overrides = dict(overrides)
    size = overrides.pop("size", "tiny")
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose from {list(SIZES)}")
    aspects: Sequence[str] = overrides.pop("aspects", DPA_ASPECTS if kind == "reward-seq" else DEFAULT_ASPECTS)
    overrides.pop("seed", None)
    pad = tokenizer.pad_token_id
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.02,
        use_sliding_window=False,
        bos_token_id=pad,
        eos_token_id=im_end,
        pad_token_id=pad,
        torch_dtype="float32",
        architectures=[_ARCH[kind]],
        **SIZES[size],
    )
    if kind in ("reward", "reward-seq"):
        fields["num_labels"] = len(aspects)
        fields["id2label"] = {i: a for i, a in enumerate(aspects)}
        fields["label2id"] = {a: i for i, a in enumerate(aspects)}
        # Scores are regressed (MSE), not classified.
        fields["problem_type"] = "regression"
        # No dropout before the head: tiny models fit the rules faster without it.
        fields["classifier_dropout"] = 0.0
    unknown = [k for k in overrides if k not in Qwen2Config().to_dict() and k not in ("head_dim",)]
    if unknown:
        raise ValueError(f"tiny_model_path({kind!r}): unknown override(s) {unknown} (not Qwen2Config fields)")
    fields.update(overrides)
    if fields["hidden_size"] // fields["num_attention_heads"] < 32:
        raise ValueError(
            f"tiny model head_dim {fields['hidden_size'] // fields['num_attention_heads']} < 32: "
            "vLLM's CPU attention rejects it; use fewer heads or a wider hidden size"
        )
    return Qwen2Config(**fields)


def _model_class(kind: str):
    import transformers

    return getattr(transformers, _ARCH["policy" if kind == "reference" else kind])


def _lock(path: Path):
    from filelock import FileLock

    return FileLock(str(path) + ".lock", timeout=600)


def tiny_model_path(kind: str = "policy", **overrides: Any) -> Path:
    """Directory of the tiny model ``kind`` (built on first use, then cached).

    Concurrent callers (test workers, Ray actors) are safe: one builds under a file
    lock into a temporary directory that is renamed into place atomically, so nobody
    ever sees a half-written checkpoint.
    """
    import torch

    from twodrl.models.tokenizer import build_tokenizer

    seed = int(overrides.get("seed", 0))
    tokenizer = build_tokenizer()
    config = tiny_config(kind, tokenizer, **overrides)
    key_src = json.dumps(
        {
            "kind": "policy" if kind == "reference" else kind,
            "config": config.to_diff_dict(),
            "tokenizer": _tokenizer_fingerprint(tokenizer),
            "seed": seed,
            "recipe": _RECIPE_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{'policy' if kind == 'reference' else kind}-{digest}"
    if (final / "config.json").is_file():
        return final
    with _lock(final):
        if (final / "config.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            # Seeded init on CPU in float32, independent of the caller's RNG state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = _model_class(kind)(config)
            model.eval()
            model.save_pretrained(tmp, safe_serialization=True)
            _write_generation_config(model, tokenizer, tmp)
            tokenizer.save_pretrained(tmp)
            if final.exists():  # a stale partial directory from a crashed build
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_generation_config(model, tokenizer, path: Path) -> None:
    from transformers import GenerationConfig

    from twodrl.models.tokenizer import IM_END

    if not getattr(model, "can_generate", lambda: False)():
        return
    # Like chat checkpoints: a turn ends at <|im_end|>; <|endoftext|> also stops.
    GenerationConfig(
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(path)


def parse_tiny_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``tiny:<kind>[,key=value...]`` → (kind, overrides); values parse as YAML
    scalars, e.g. ``tiny:policy,size=bench`` or ``tiny:reward,num_hidden_layers=4``."""
    import yaml

    if not spec.startswith("tiny:"):
        raise ValueError(f"not a tiny model spec: {spec!r}")
    kind, *parts = spec[len("tiny:"):].split(",")
    overrides: dict[str, Any] = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"{spec!r}: expected key=value after ',', got {part!r}")
        k, _, v = part.partition("=")
        overrides[k.strip()] = yaml.safe_load(v)
    if kind not in KINDS:
        raise ValueError(f"{spec!r}: unknown tiny model kind {kind!r}; choose from {list(KINDS)}")
    return kind, overrides
