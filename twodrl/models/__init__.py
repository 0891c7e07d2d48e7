"""Models: offline tiny checkpoints, the one loading path, per-token log-probs, and the
2D segment reward model. Submodules import torch/transformers lazily on use."""

from __future__ import annotations

__all__ = ["tokenizer", "tiny", "loading", "logprobs", "reward_model"]
