"""LoRA on the learner (``learner.lora``), 2 DeepSpeed ranks (ZeRO-2, gloo) on a local
Ray cluster: training moves the adapter only, the reference is the base model (adapter
off), the rollout engine serves exactly the merged model after a weight sync, the
online reference reset folds the adapter without changing the policy, and checkpoints
hold the adapter (not the base weights)."""

from __future__ import annotations

import random

import pytest
import torch

from twodrl.synthetic import make_preference_records

pytestmark = pytest.mark.integration

TOL = 1e-4
PAIRS = make_preference_records(8, seed=5)
SFT = [{"prompt": "Tell me about the otter.", "response": "Otters live in rivers. They eat fish."}] * 4


def _raw_parameters(rank) -> dict[str, torch.Tensor]:
    """Rank 0's peft-named parameters (base and adapter), copied to CPU."""
    import ray

    def read(self):
        return {n: p.detach().to("cpu", copy=True) for n, p in self.engine.module.named_parameters()}

    return ray.get(rank.__ray_call__.remote(read))


@pytest.fixture(scope="module")
def lora_group(ray_cluster, tiny_policy_path):
    from actors.learner import PolicyLearnerGroup
    from twodrl.config import load_config

    cfg = load_config(None, [
        "run_name=lora-learner", f"policy.path={tiny_policy_path}", "learner.num_ranks=2", "learner.zero_stage=2",
        "learner.micro_batch_size=2", "learner.epochs_per_round=1", "learner.lr=1e-2", "learner.lora.r=4",
        "learner.lora.alpha=8", "learner.colocate_reference=false",  # LoRA needs no reference actor either way
    ])
    group = PolicyLearnerGroup(cfg)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def vllm_worker(ray_cluster, tiny_policy_path):
    from actors.rollout import RolloutWorker
    from twodrl.config import RunConfig

    cfg = RunConfig()
    cfg.policy.path = tiny_policy_path
    cfg.rollout.num_cpus = 0.5
    worker = RolloutWorker.options(num_cpus=0.5, name="lora-rollout-vllm").remote(cfg, 0, "vllm")
    ray_cluster.get(worker.ready.remote())
    yield worker
    ray_cluster.kill(worker)


def _plain_pair_logps(path: str, records: list[dict]) -> list[tuple[list[float], list[float]]]:
    from twodrl import objectives
    from twodrl.config import ModelConfig
    from twodrl.models.loading import load_causal_lm, load_tokenizer

    mc = ModelConfig(path=path)
    model, tok = load_causal_lm(mc), load_tokenizer(mc)
    batch = objectives.collate_pairs(tok, records, ["helpfulness", "correctness", "safety", "completeness",
                                                    "clarity"], mc.max_length)
    with torch.no_grad():
        lp, _ = objectives.forward_token_logps(model, batch)
    rows = objectives.unpad_response(lp, batch.response_mask)
    P = batch.num_pairs
    return [(rows[i], rows[P + i]) for i in range(P)]


def _max_diff(a, b) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def test_no_reference_actor_and_only_the_adapter_is_trainable(lora_group):
    assert lora_group.reference is None
    import ray

    def trainable(self):
        names = [n for n, p in self.engine.module.named_parameters() if p.requires_grad]
        in_optimizer = sum(p.numel() for g in self.engine.optimizer.param_groups for p in g["params"])
        return names, in_optimizer

    names, _ = ray.get(lora_group.ranks[0].__ray_call__.remote(trainable))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)


def test_training_changes_only_the_adapter(lora_group):
    before = _raw_parameters(lora_group.ranks[0])
    metrics = lora_group.train_round(PAIRS, "2d-dpo")
    assert metrics["train/optimizer_steps"] >= 2
    after = _raw_parameters(lora_group.ranks[0])
    base = [n for n in before if "lora_" not in n]
    adapter = [n for n in before if "lora_" in n]
    assert base and adapter
    for n in base:
        assert torch.equal(before[n], after[n]), f"base weight {n} changed"
    assert any(not torch.equal(before[n], after[n]) for n in adapter if ".lora_B." in n)
    # Both ranks hold the same adapter (ZeRO-2 all-gathers the updated partitions).
    other = _raw_parameters(lora_group.ranks[1])
    assert all(torch.equal(after[n], other[n]) for n in adapter)


def test_reference_is_the_base_model(lora_group, tiny_policy_path):
    """After training, the adapter-off reference still scores like the untouched base
    model, while the policy does not."""
    expected = _plain_pair_logps(tiny_policy_path, PAIRS[:4])
    got = lora_group.offline_reference_logps(PAIRS[:4])
    flat = lambda pairs: [side for pair in pairs for side in pair]  # noqa: E731
    assert _max_diff(flat(got), flat(expected)) < 1e-5
    items = [{"prompt": p["prompt"], "response": side["text"]} for p in PAIRS[:4] for side in (p["chosen"], p["rejected"])]
    policy = lora_group.compute_logprobs(items)
    assert _max_diff(policy, flat(expected)) > 1e-4


def test_merged_weights_under_base_names(lora_group, tiny_policy_path):
    from transformers import AutoModelForCausalLM

    named = lora_group.named_full_parameters()
    plain = AutoModelForCausalLM.from_pretrained(tiny_policy_path)
    assert [n for n, _ in named] == [n for n, _ in plain.named_parameters()]
    assert not any("lora_" in n or "base_layer" in n for n, _ in named)


@pytest.mark.parametrize("transport", ["shared_memory", "object_store", "collective"])
def test_rollout_serves_the_merged_model_after_sync(lora_group, vllm_worker, transport):
    import ray

    from actors.weight_sync import sync_weights

    rng = random.Random(1)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(3, 9))] for _ in range(4)]
    responses = [[rng.randrange(3, 1000) for _ in range(rng.randint(2, 12))] for _ in range(4)]
    items = [{"prompt_token_ids": p, "response_token_ids": r} for p, r in zip(prompts, responses)]
    before = ray.get(vllm_worker.sequence_logprobs.remote(prompts, responses))
    lora_group.train_sft(SFT, lr=1e-2)
    expected = lora_group.compute_logprobs(items)  # the peft model's forward (W x + s B A x)
    assert _max_diff(before, expected) > 1e-3  # the step changed the policy
    stats = sync_weights(lora_group, [vllm_worker], transport=transport, bucket_mb=0.25)
    assert stats["buckets"] > 1
    got = ray.get(vllm_worker.sequence_logprobs.remote(prompts, responses))
    assert _max_diff(got, expected) < TOL


def test_reference_reset_folds_the_adapter_and_checkpoints_hold_it(lora_group, tmp_path):
    """The online warm start makes the reference the current policy: with LoRA the
    adapter is folded into the base weights; the policy does not change, the reference
    now equals it, and the checkpoint holds the adapter and the fold, no full model."""
    items = [{"prompt": p["prompt"], "response": p["chosen"]["text"]} for p in PAIRS[:4]]
    policy = lora_group.compute_logprobs(items)
    lora_group.reset_reference()
    assert _max_diff(lora_group.compute_logprobs(items), policy) < 1e-5
    ref = lora_group.offline_reference_logps(PAIRS[:4])
    assert _max_diff([r[0] for r in ref], policy) < 1e-5
    raw = _raw_parameters(lora_group.ranks[0])
    assert all(not t.any() for n, t in raw.items() if ".lora_B." in n)
    path = lora_group.save_checkpoint(str(tmp_path / "ckpt"))
    from pathlib import Path

    names = {p.name for p in Path(path).iterdir()}
    assert {"adapter", "deepspeed", "lora_folds.safetensors"} <= names and "policy" not in names
    model_states = max(Path(path, "deepspeed").rglob("mp_rank_00_model_states.pt"), key=lambda p: p.stat().st_size)
    full_bytes = sum(t.numel() * t.element_size() for n, t in raw.items() if "lora_" not in n)
    assert model_states.stat().st_size < full_bytes / 2  # the base weights are not in it
