"""LoRA on the policy (``learner.lora``): wrapping, the merged export, adapter folds.

The learner trains a peft adapter on frozen base weights. Everything outside the
learner sees a plain Hugging Face model, never peft's wrapper:

- rollouts and saved models get the *merged* weights ``W + scaling * B @ A`` under the
  base model's own parameter names (:class:`MergedView`, merged bucket by bucket during
  a weight sync; :func:`merged_named_parameters`), so vLLM and ``AutoModelForCausalLM``
  load them like any checkpoint;
- the reference model is the same module with the adapter switched off
  (:class:`AdapterOffReference`), so no second copy of the weights is held.

Folds. Online runs reset the reference to the warm-started policy. With LoRA that
moves the adapter's update into the base weights and zeroes ``B`` (the policy is
unchanged, the adapter-off model is now the warm-started one). The base weights are
not in the adapter-only checkpoints, so each fold's ``(A, B)`` is recorded and saved
beside them and re-applied, in order, when a checkpoint is loaded into a fresh model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

ADAPTER_NAME = "default"
FOLDS_FILE = "lora_folds.safetensors"
_BASE = ".base_layer."


def wrap(model: torch.nn.Module, lora_cfg: Any, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """``model`` with a fresh adapter (a peft ``PeftModel``): only the adapter's
    parameters require grad. ``lora_cfg`` is a :class:`twodrl.config.LoraConfig`."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.target_modules)
    config = LoraConfig(
        r=int(lora_cfg.r), lora_alpha=float(lora_cfg.alpha), lora_dropout=float(lora_cfg.dropout),
        target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none", task_type="CAUSAL_LM",
    )
    if gradient_checkpointing:
        # Checkpointed blocks only backpropagate into inputs that require grad; with the
        # embeddings frozen nothing would reach the adapters.
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def lora_layers(peft_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module name (relative to the base model, e.g. ``model.layers.0.self_attn.q_proj``)
    → peft LoRA layer, for every adapted layer."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


def _is_adapter_param(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def base_name(name: str) -> str:
    """peft's name of a base parameter → the plain model's (``q_proj.base_layer.weight``
    → ``q_proj.weight``); names relative to the base model."""
    owner, sep, leaf = name.rpartition(_BASE)
    return f"{owner}.{leaf}" if sep else name


class MergedView(torch.nn.Module):
    """What the weight sync walks when the policy has an adapter: ``named_parameters``
    lists the base model's parameters under their plain names (no adapter tensors), and
    :meth:`sync_tensor` turns an adapted weight into ``W + delta`` when its bucket is
    packed (actors.weight_sync), so a sync never holds a merged copy of the model. The
    base weights are never modified. Built per sync, so it follows training."""

    def __init__(self, peft_model: torch.nn.Module):
        super().__init__()
        base = peft_model.get_base_model()
        layers = lora_layers(peft_model)
        self._named: list[tuple[str, torch.Tensor]] = []
        self._adapted: dict[str, torch.nn.Module] = {}
        for name, p in base.named_parameters():
            if _is_adapter_param(name):
                continue
            owner, sep, leaf = name.rpartition(_BASE)
            plain = base_name(name)
            if sep and leaf == "weight" and owner in layers:
                self._adapted[plain] = layers[owner]
            self._named.append((plain, p))

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self._named:
            yield (f"{prefix}.{name}" if prefix else name), t

    def parameters(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        for _, t in self._named:
            yield t

    @torch.no_grad()
    def sync_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The merged value of parameter ``name`` (``tensor``: its base value)."""
        layer = self._adapted.get(name)
        if layer is None:
            return tensor
        out = tensor
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
                out = out + layer.get_delta_weight(adapter).to(tensor.dtype)
        return out


def merged_named_parameters(peft_model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the merged model in the base model's parameter order and
    names, without adapter tensors. Adapted weights are new tensors ``W + delta``; the
    others are the live parameters (not copies)."""
    view = MergedView(peft_model)
    return [(n, view.sync_tensor(n, t.detach())) for n, t in view.named_parameters()]


class AdapterOffReference:
    """The reference model: the policy's module with the adapter switched off, in eval
    mode and without grad; called like a model."""

    def __init__(self, peft_model: torch.nn.Module):
        self.model = peft_model

    def __call__(self, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)


def adapter_state(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{module_name: (A, B)}`` flattened to ``module/A``, ``module/B`` CPU copies."""
    out = {}
    for name, layer in lora_layers(peft_model).items():
        out[f"{name}/A"] = layer.lora_A[ADAPTER_NAME].weight.detach().to("cpu", copy=True)
        out[f"{name}/B"] = layer.lora_B[ADAPTER_NAME].weight.detach().to("cpu", copy=True)
    return out


@torch.no_grad()
def apply_fold(peft_model: torch.nn.Module, fold: dict[str, torch.Tensor]) -> None:
    """Add the update of the adapter weights ``fold`` (see :func:`adapter_state`) to the
    base weights, with peft's own delta arithmetic (the live adapter is restored)."""
    for name, layer in lora_layers(peft_model).items():
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        saved = a.detach().clone(), b.detach().clone()
        a.copy_(fold[f"{name}/A"].to(a.device, a.dtype))
        b.copy_(fold[f"{name}/B"].to(b.device, b.dtype))
        try:
            delta = layer.get_delta_weight(ADAPTER_NAME)
        finally:
            a.copy_(saved[0])
            b.copy_(saved[1])
        w = layer.get_base_layer().weight
        w.add_(delta.to(w.dtype))


def adapter_is_zero(peft_model: torch.nn.Module) -> bool:
    return all(not bool(layer.lora_B[ADAPTER_NAME].weight.detach().any()) for layer in lora_layers(peft_model).values())


def lora_b_parameters(peft_model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [layer.lora_B[ADAPTER_NAME].weight for layer in lora_layers(peft_model).values()]


def adapter_parameters(peft_model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in peft_model.named_parameters() if _is_adapter_param(n)]


def save_folds(folds: Sequence[dict[str, torch.Tensor]], directory: str | Path) -> None:
    from safetensors.torch import save_file

    flat = {f"{i}/{k}": v.contiguous() for i, fold in enumerate(folds) for k, v in fold.items()}
    save_file(flat, str(Path(directory) / FOLDS_FILE), metadata={"folds": str(len(folds))})


def load_folds(directory: str | Path) -> list[dict[str, torch.Tensor]]:
    """The folds saved in a checkpoint directory (none when it has no folds file)."""
    from safetensors import safe_open

    path = Path(directory) / FOLDS_FILE
    if not path.is_file():
        return []
    with safe_open(str(path), framework="pt") as f:
        n = int((f.metadata() or {}).get("folds", 0))
        folds: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
        for key in f.keys():
            i, _, rest = key.partition("/")
            folds[int(i)][rest] = f.get_tensor(key)
    return folds


def same_fold(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_adapter(peft_model: torch.nn.Module, directory: str | Path, base_path: Optional[str] = None) -> None:
    """The adapter alone in peft's format (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained``."""
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    if base_path:
        import json

        cfg_path = Path(directory) / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_path
        cfg_path.write_text(json.dumps(cfg, indent=2))


def merge_checkpoint(learner_dir: str | Path, out_dir: str | Path, base_path: Optional[str] = None) -> Path:
    """A LoRA learner checkpoint (``adapter/`` and any folds) as a merged Hugging Face
    model directory, written atomically to ``out_dir``. The base is the adapter's
    ``base_model_name_or_path`` unless ``base_path`` names it."""
    import json

    from peft import PeftModel

    from twodrl.config import ModelConfig
    from twodrl.models.loading import load_causal_lm, load_tokenizer, save_pretrained_safe

    adapter = Path(learner_dir) / "adapter"
    base_path = base_path or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    mc = ModelConfig(path=base_path)
    model = PeftModel.from_pretrained(load_causal_lm(mc), str(adapter))
    for fold in load_folds(learner_dir):  # the base weights the adapter was trained on
        apply_fold(model, fold)
    merged = dict(merged_named_parameters(model))
    plain = load_causal_lm(mc)
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")} if plain.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{learner_dir}: merged weights do not fit {base_path}: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    return Path(save_pretrained_safe(plain, load_tokenizer(mc), out_dir))
