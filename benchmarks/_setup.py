"""Environment the benchmarks set before they import vLLM, DeepSpeed or Ray, so that
each runs the same way as a script (``python benchmarks/bench_x.py``) and as a module
(``python -m benchmarks.bench_x``) on a CPU machine. Values already in the environment
win."""

from __future__ import annotations

import os

CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine in the actor: in-place weight updates reach it
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache for tiny models
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "DS_ACCELERATOR": "cpu",
}


def prepare_environment() -> None:
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
