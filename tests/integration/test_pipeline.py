"""One online round end to end on a local Ray cluster with the tiny models:
generate (vLLM rollout) → score (2D reward scorer) → pick pairs → train one 2D-DPO
round (2 DeepSpeed ranks) → sync weights → generate again with the new weights."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration


def test_generate_score_train_sync_generate(ray_cluster, tiny_policy_path, tiny_reward_path):
    from actors.learner import PolicyLearnerGroup
    from actors.rollout import create_rollout_workers
    from actors.scorer import create_scorers
    from actors.weight_sync import sync_weights
    from twodrl.config import RunConfig
    from twodrl.rounds import ScoredSample, select_pairs
    from twodrl.synthetic import make_prompts

    ray = ray_cluster
    cfg = RunConfig(run_name="pipeline-test", algorithm="2d-dpo")
    cfg.policy.path = tiny_policy_path
    cfg.scorer.model.path = tiny_reward_path
    cfg.rollout.num_cpus = 0.5
    cfg.rollout.max_new_tokens = 16
    cfg.rollout.samples_per_prompt = 3
    cfg.learner.num_ranks = 2
    cfg.learner.micro_batch_size = 2
    cfg.learner.epochs_per_round = 1
    cfg.learner.lr = 1e-2  # large enough that one round visibly moves a random policy

    workers = create_rollout_workers(cfg)
    scorers = create_scorers(cfg)
    learner = PolicyLearnerGroup(cfg)
    try:
        requests = [{"id": f"p{i}", "prompt": p.text} for i, p in enumerate(make_prompts(6, seed=1))]
        first = ray.get(workers[0].generate.remote(requests, seed=0))
        assert all(r["weights_version"] == 0 for r in first)

        items = [
            {"id": f"{r['id']}/{k}", "prompt": req["prompt"], "response": s["text"]}
            for req, r in zip(requests, first) for k, s in enumerate(r["samples"])
        ]
        scored = {s["id"]: s for s in ray.get(scorers[0].score.remote(items))}
        assert set(scored) == {it["id"] for it in items}
        groups = [
            [
                ScoredSample(prompt_id=r["id"], prompt=req["prompt"], text=s["text"],
                             segments=scored[f"{r['id']}/{k}"]["segments"], scores=scored[f"{r['id']}/{k}"]["scores"],
                             token_ids=s["token_ids"], logprobs=s["logprobs"])
                for k, s in enumerate(r["samples"])
            ]
            for req, r in zip(requests, first)
        ]
        pairs = select_pairs(groups, cfg.aspects.weights, cfg.aspects.names)
        assert pairs, "no prompt produced a preference pair"
        metrics = learner.train_round(pairs, cfg.algorithm)
        assert math.isfinite(metrics["train/loss"])

        # fixed sequences: the first round's samples, scored before and after the sync
        prompts = [r["prompt_token_ids"] for r in first for _ in r["samples"]]
        responses = [s["token_ids"] for r in first for s in r["samples"]]
        before = ray.get(workers[0].sequence_logprobs.remote(prompts, responses))
        stats = sync_weights(learner, workers, transport="object_store")
        after = ray.get(workers[0].sequence_logprobs.remote(prompts, responses))
        want = learner.compute_logprobs(
            [{"prompt_token_ids": p, "response_token_ids": r} for p, r in zip(prompts, responses)]
        )
        diff = max(abs(a - b) for xs, ys in zip(after, want) for a, b in zip(xs, ys))
        moved = max(abs(a - b) for xs, ys in zip(before, after) for a, b in zip(xs, ys))
        assert diff < 1e-4 and moved > 1e-3

        second = ray.get(workers[0].generate.remote(requests, seed=0))
        assert all(r["weights_version"] == stats["version"] for r in second)
        # same seed, new weights: the policy now samples differently
        assert [s["token_ids"] for r in second for s in r["samples"]] != responses
    finally:
        learner.shutdown()
        for h in workers + scorers:
            ray.kill(h)
