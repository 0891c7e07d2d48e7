"""Shared test set-up: CPU environment for DeepSpeed/vLLM, offline wandb, and one local
Ray cluster per test session (integration tests ask for the ``ray_cluster`` fixture)."""

from __future__ import annotations

import os

# Before anything imports deepspeed / vllm.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with enough logical CPU slots for a handful of actors on a
    2-core machine (Ray CPUs are logical; actors ask for fractions)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="twodrl-tests")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_policy_path():
    """HF-format directory of the tiny offline policy (built once, cached by config hash)."""
    from twodrl.models.tiny import tiny_model_path

    return str(tiny_model_path("policy"))


@pytest.fixture(scope="session")
def tiny_reward_path():
    from twodrl.models.tiny import tiny_model_path

    return str(tiny_model_path("reward"))
