"""The one place models and tokenizers are loaded and saved.

Every actor, job, test and benchmark goes through these functions, so the rules hold
everywhere: weights only from safetensors, ``trust_remote_code`` only when the config
turns it on, dtype from the config, and ``tiny:<kind>`` paths resolved to the offline
models of :mod:`twodrl.models.tiny`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from twodrl.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """``tiny:<kind>[,key=value...]`` → the cached offline model's directory; anything
    else (a local directory or a hub name) is returned unchanged."""
    if path.startswith("tiny:"):
        from twodrl.models.tiny import parse_tiny_spec, tiny_model_path

        kind, overrides = parse_tiny_spec(path)
        return str(tiny_model_path(kind, **overrides))
    return path


def torch_dtype(model_cfg: ModelConfig) -> torch.dtype:
    try:
        return _DTYPES[model_cfg.dtype]
    except KeyError:
        raise ValueError(f"model.dtype: {model_cfg.dtype!r} is not one of {list(_DTYPES)}") from None


def _common_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        dtype=torch_dtype(model_cfg),
        trust_remote_code=bool(model_cfg.trust_remote_code),
        use_safetensors=True,  # never unpickle a .bin checkpoint
    )


def load_tokenizer(model_cfg: ModelConfig):
    """The model's tokenizer, right-padded, with a pad token (eos if it has none)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_cfg.path)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(model_cfg.trust_remote_code))
    if tok.pad_token_id is None:
        # Llama-style tokenizers ship without one; padding positions are masked anyway.
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_causal_lm(model_cfg: ModelConfig, device: str | torch.device = "cpu"):
    """A causal LM (policy / reference) in ``model_cfg.dtype`` on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_cfg.path)
    model = AutoModelForCausalLM.from_pretrained(path, **_common_kwargs(model_cfg))
    return model.to(device).eval()


def load_reward_model(model_cfg: ModelConfig, device: str | torch.device = "cpu", mode: str | None = None):
    """The reward model: token classification (2D segment RM, ``mode="segment"``) or
    sequence classification (DPA multi-objective RM, ``mode="sequence"``). Without
    ``mode`` the checkpoint's architecture decides."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    path = resolve_model_path(model_cfg.path)
    if mode not in (None, "segment", "sequence"):
        raise ValueError(f"scorer.mode: {mode!r} is not one of ['segment', 'sequence']")
    config = AutoConfig.from_pretrained(path, trust_remote_code=bool(model_cfg.trust_remote_code))
    archs = getattr(config, "architectures", None) or []
    saved = (
        "sequence" if any(a.endswith("ForSequenceClassification") for a in archs)
        else "segment" if any(a.endswith("ForTokenClassification") for a in archs)
        else None  # a causal LM / bare backbone: a fresh head is added for `mode`
    )
    if mode is None:
        mode = saved or "segment"
    elif saved is not None and saved != mode:
        # Loading one head type as the other would silently re-initialise the head.
        raise ValueError(
            f"scorer.mode is {mode!r} but {model_cfg.path} is a {archs[0]} ({saved} mode); "
            f"use {'tiny:reward-seq' if mode == 'sequence' else 'tiny:reward'} or a matching checkpoint"
        )
    cls = AutoModelForTokenClassification if mode == "segment" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path, **_common_kwargs(model_cfg))
    if getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification finds the last real token through pad_token_id.
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device).eval()


def save_pretrained_safe(model, tokenizer, path: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Save model (safetensors) and tokenizer to ``path`` atomically: written into a
    temporary sibling directory, then renamed over ``path``, so a reader (vLLM reload,
    another actor) never sees a half-written checkpoint. ``extra_files`` (name → text)
    are written into the same directory before the rename, e.g. the marker by which
    ``twodrl train-rm`` recognises a directory it may replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The ".tmp." infix is what twodrl.checkpoint.recover_directory sweeps after a crash.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and not (tmp / "generation_config.json").exists():
            try:
                gen.save_pretrained(tmp)
            except Exception:  # non-generative heads carry an unused default config
                pass
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        from twodrl.checkpoint import replace_directory

        replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
