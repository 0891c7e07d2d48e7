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


def _head_kind(archs: list[str]) -> str | None:
    """``"sequence"`` / ``"segment"`` for a checkpoint that already has a classification
    head, None for a causal LM or a bare backbone (a fresh head is added)."""
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence"
    if any(a.endswith("ForTokenClassification") for a in archs):
        return "segment"
    return None


def _saved_labels(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(int(config.num_labels))]


def _pad_token_id(config, path: str, model_cfg: ModelConfig) -> int | None:
    """The pad id a classification model needs (sequence pooling finds the last real
    token through it): the config's, else the tokenizer's (which falls back to eos, as
    :func:`load_tokenizer` does), else the config's first eos id."""
    if getattr(config, "pad_token_id", None) is not None:
        return config.pad_token_id
    try:
        pad = load_tokenizer(model_cfg).pad_token_id
    except Exception:  # noqa: BLE001 - a backbone without tokenizer files: use the config's eos
        pad = None
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return pad


def load_reward_model(
    model_cfg: ModelConfig,
    device: str | torch.device = "cpu",
    mode: str | None = None,
    aspects: list[str] | None = None,
    device_map: str | dict | None = None,
):
    """The reward model: token classification (2D segment RM, ``mode="segment"``) or
    sequence classification (DPA multi-objective RM, ``mode="sequence"``). Without
    ``mode`` the checkpoint's architecture decides.

    ``aspects`` (the config's ``aspects.names``) are the outputs the head must have:

    * a checkpoint with a classification head must rate exactly these aspects, in this
      order (else a ValueError naming both lists: reading one aspect as another would
      go unnoticed);
    * a causal LM or bare backbone (Qwen2, Llama, Mistral …) gets a fresh head with one
      output per aspect, ``id2label`` named after them and a small normal init, so
      ``twodrl train-rm`` can start from any base model.

    ``device_map`` (e.g. ``"auto"``) shards the model over the visible GPUs instead of
    moving it to ``device``: the ``hf`` scorer backend with ``tensor_parallel_size`` > 1.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    path = resolve_model_path(model_cfg.path)
    if mode not in (None, "segment", "sequence"):
        raise ValueError(f"scorer.mode: {mode!r} is not one of ['segment', 'sequence']")
    config = AutoConfig.from_pretrained(path, trust_remote_code=bool(model_cfg.trust_remote_code))
    archs = list(getattr(config, "architectures", None) or [])
    saved = _head_kind(archs)
    if mode is None:
        mode = saved or "segment"
    elif saved is not None and saved != mode:
        # Loading one head type as the other would silently re-initialise the head.
        raise ValueError(
            f"scorer.mode is {mode!r} but {model_cfg.path} is a {archs[0]} ({saved} mode); "
            f"use {'tiny:reward-seq' if mode == 'sequence' else 'tiny:reward'} or a matching checkpoint"
        )
    kwargs = _common_kwargs(model_cfg)
    fresh_head = saved is None
    if fresh_head:
        # Without these, transformers builds its default two-output head (LABEL_0,
        # LABEL_1), which no aspect list matches.
        names = list(aspects) if aspects else list(_default_aspects())
        kwargs.update(
            num_labels=len(names),
            id2label={i: a for i, a in enumerate(names)},
            label2id={a: i for i, a in enumerate(names)},
            problem_type="regression",  # ratings are regressed (MSE), not classified
        )
        pad = _pad_token_id(config, path, model_cfg)
        if pad is not None:
            kwargs["pad_token_id"] = pad
    elif aspects is not None and _saved_labels(config) != list(aspects):
        raise ValueError(
            f"{model_cfg.path} is a {archs[0]} whose head rates {_saved_labels(config)}, "
            f"but aspects.names is {list(aspects)}; train a reward model for these aspects "
            f"(twodrl train-rm from its causal-LM backbone) or set aspects.names to match"
        )
    cls = AutoModelForTokenClassification if mode == "segment" else AutoModelForSequenceClassification
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = cls.from_pretrained(path, **kwargs)
    if fresh_head:
        _init_head(model)
    if getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification finds the last real token through pad_token_id.
        model.config.pad_token_id = _pad_token_id(model.config, path, model_cfg)
    if device_map is None:
        model = model.to(device)
    return model.eval()


def _default_aspects() -> list[str]:
    from twodrl.aspects import DEFAULT_ASPECTS

    return list(DEFAULT_ASPECTS)


@torch.no_grad()
def _init_head(model) -> None:
    """A new head's initial weights: normal with std 1/sqrt(hidden) capped at the
    backbone's initializer_range, zero bias. Small, so the first ratings are near the
    bias and training, not the random projection, decides them; the cap keeps wide
    backbones (whose hidden states have large norms) from starting with huge outputs."""
    head = model.score
    hidden = head.weight.shape[1]
    std = min(float(getattr(model.config, "initializer_range", 0.02) or 0.02), hidden ** -0.5)
    head.weight.normal_(mean=0.0, std=std)
    if head.bias is not None:
        head.bias.zero_()


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
