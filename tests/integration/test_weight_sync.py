"""Learner → rollout weight sync: after a change of weights and a sync, the rollout
engines' per-token log-probs of fixed sequences equal the source's (float32, 1e-4), for
every transport, for three receivers at once: vLLM loading in place (the default),
vLLM with oneDNN-prepacked CPU weights (loaded through a full reload) and the Hugging
Face backend."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

pytestmark = pytest.mark.integration

TOL = 1e-4


@pytest.fixture(scope="module")
def setup(ray_cluster, tiny_policy_path):
    from actors.rollout import RolloutWorker
    from actors.weight_sync import WeightSourceActor
    from twodrl.config import RunConfig

    ray = ray_cluster
    cfg = RunConfig()
    cfg.policy.path = tiny_policy_path
    cfg.rollout.num_cpus = 0.5
    source = WeightSourceActor.options(num_cpus=0.5).remote(tiny_policy_path)
    vllm_worker = RolloutWorker.options(num_cpus=0.5, name="ws-rollout-vllm").remote(cfg, 0, "vllm")
    packed_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, cpu_prepack_weights=True))
    packed_worker = RolloutWorker.options(num_cpus=0.5, name="ws-rollout-vllm-packed").remote(packed_cfg, 2, "vllm")
    hf_worker = RolloutWorker.options(num_cpus=0.5, name="ws-rollout-hf", max_restarts=1).remote(cfg, 1, "hf")
    ray.get([source.num_parameters.remote(), vllm_worker.ready.remote(), hf_worker.ready.remote(),
             packed_worker.ready.remote()])
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(3, 9))] for _ in range(4)]
    responses = [[rng.randrange(3, 1000) for _ in range(rng.randint(2, 12))] for _ in range(4)]
    yield ray, source, [vllm_worker, hf_worker, packed_worker], prompts, responses
    for h in (source, vllm_worker, hf_worker, packed_worker):
        ray.kill(h)


def _max_diff(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def test_weight_load_modes(setup):
    """The default vLLM engine on CPU keeps plain weights and loads each bucket in
    place; after its first sync it replays the recorded copies of vLLM's loader. With
    cpu_prepack_weights its oneDNN kernels hold repacked copies, so it reloads. (Each
    mode is then proven by the parity tests below.)"""
    from actors.weight_sync import sync_weights

    ray, source, workers, _, _ = setup
    infos = ray.get([w.info.remote() for w in workers])
    assert [i["weight_load"] for i in infos] == ["in_place", "in_place", "reload"]
    sync_weights([source], workers, transport="shared_memory", bucket_mb=0.25)
    infos = ray.get([w.info.remote() for w in workers])
    assert [i["weight_load"] for i in infos] == ["in_place/replay", "in_place", "reload"]


@pytest.mark.parametrize("transport", ["shared_memory", "object_store", "collective"])
def test_parity_after_sync(setup, transport):
    from actors.weight_sync import sync_weights

    ray, source, workers, prompts, responses = setup
    before = ray.get([w.sequence_logprobs.remote(prompts, responses) for w in workers])
    ray.get(source.perturb.remote(scale=0.05, seed=hash(transport) % 1000))
    expected = ray.get(source.sequence_logprobs.remote(prompts, responses))
    # the perturbation must be visible, or the parity check below would prove nothing
    assert all(_max_diff(b, expected) > 1e-2 for b in before)

    stats = sync_weights([source], workers, transport=transport, bucket_mb=0.25)
    assert stats["buckets"] > 1  # several buckets, not one
    assert stats["tensors"] == 2 + 2 * 12 + 1  # embed, norm, lm_head + 12 per layer (2 layers)

    after = ray.get([w.sequence_logprobs.remote(prompts, responses) for w in workers])
    for got in after:
        assert _max_diff(got, expected) < TOL
    versions = ray.get([w.weights_version.remote() for w in workers])
    assert versions == [stats["version"]] * 3
    assert stats["transport"] == transport


def test_collective_group_rebuilt_after_worker_restart(setup):
    """A second collective sync reuses the group; when a rollout worker is killed and
    restarted by Ray (fresh process, initial weights, no group) the driver notices and
    rebuilds the group, and the sync lands on every worker."""
    from actors.weight_sync import sync_weights

    ray, source, workers, prompts, responses = setup
    sync_weights([source], workers, transport="collective")
    again = sync_weights([source], workers, transport="collective")
    assert again["setup_s"] < 1.0  # group reused: only a token check

    hf = workers[1]
    ray.kill(hf, no_restart=False)  # asynchronous: poll until the new process answers
    deadline = time.monotonic() + 120
    token = None
    while time.monotonic() < deadline:
        try:
            token = ray.get(hf.weight_group_token.remote(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            token = None
        if token == "":
            break
        time.sleep(0.2)
    assert token == "", "the rollout worker was not restarted with a fresh state"
    ray.get(source.perturb.remote(scale=0.05, seed=7))
    expected = ray.get(source.sequence_logprobs.remote(prompts, responses))
    stats = sync_weights([source], workers, transport="collective", version=42)
    for got in ray.get([w.sequence_logprobs.remote(prompts, responses) for w in workers]):
        assert _max_diff(got, expected) < TOL
    assert ray.get([w.weights_version.remote() for w in workers]) == [42, 42, 42]
    assert stats["version"] == 42


@pytest.mark.parametrize("zero_stage", [3])
def test_parity_with_deepspeed_learner_after_training_step(setup, tiny_policy_path, zero_stage):
    """The real learner group (2 DeepSpeed ranks, ZeRO-3: every parameter is partitioned
    and gathered bucket by bucket during the export) takes an optimizer step; after each
    sync the rollout engines score fixed sequences exactly like the learner does."""
    from actors.learner import PolicyLearnerGroup
    from actors.weight_sync import sync_weights
    from twodrl.config import RunConfig

    ray, _, workers, prompts, responses = setup
    cfg = RunConfig(run_name=f"ws-learner-z{zero_stage}")
    cfg.policy.path = tiny_policy_path
    cfg.learner.num_ranks = 2
    cfg.learner.zero_stage = zero_stage
    cfg.learner.micro_batch_size = 2
    learner = PolicyLearnerGroup(cfg)
    try:
        items = [{"prompt_token_ids": p, "response_token_ids": r} for p, r in zip(prompts, responses)]
        for step, transport in enumerate(["shared_memory", "object_store", "collective"]):
            before = ray.get([w.sequence_logprobs.remote(prompts, responses) for w in workers])
            learner.train_sft(
                [{"prompt": "Tell me about the otter.", "response": "Otters live in rivers. They eat fish."}] * 4,
                lr=1e-2,
            )
            expected = learner.compute_logprobs(items)
            assert all(_max_diff(b, expected) > 1e-3 for b in before)  # the step changed the policy
            stats = sync_weights(learner, workers, transport=transport, bucket_mb=0.25)
            assert stats["buckets"] > 1
            for got in ray.get([w.sequence_logprobs.remote(prompts, responses) for w in workers]):
                assert _max_diff(got, expected) < TOL, (transport, step)
    finally:
        learner.shutdown()


def test_auto_transport_and_one_tensor_per_bucket(setup):
    """On one node ``auto`` picks shared memory; with a 1-byte bucket size every tensor
    is its own bucket and its own call (the benchmark's per-tensor baseline) and the
    result is the same weights."""
    from actors.weight_sync import sync_weights

    ray, source, workers, prompts, responses = setup
    ray.get(source.perturb.remote(scale=0.05, seed=11))
    expected = ray.get(source.sequence_logprobs.remote(prompts, responses))
    stats = sync_weights([source], workers, transport="auto", bucket_mb=1 / (1 << 20))
    assert stats["transport"] == "shared_memory"
    assert stats["buckets"] == stats["tensors"] == 27
    for got in ray.get([w.sequence_logprobs.remote(prompts, responses) for w in workers]):
        assert _max_diff(got, expected) < TOL
    with pytest.raises(ValueError, match="rollout.weight_sync"):
        sync_weights([source], workers, transport="carrier_pigeon")
