"""Rollout workers on a local Ray cluster with the tiny policy: the vLLM (CPU build) and
Hugging Face backends generate n samples per prompt with consistent ids / log-probs /
text, DPA's system prompt reaches the rendered prompt, and the workers are named
``rollout-<i>`` in the run's namespace."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

REQUESTS = [
    {"id": "a", "prompt": "Tell me about the otter."},
    {"id": "b", "prompt": "Tell me about the camel.", "history": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    {"id": "c", "prompt": "Tell me about the owl.",
     "system": "Preference weights: helpfulness 71, verbosity -71."},
]


@pytest.fixture(scope="module")
def cfg(tiny_policy_path):
    from twodrl.config import RunConfig

    cfg = RunConfig(run_name="rollout-test")
    cfg.policy.path = tiny_policy_path
    cfg.rollout.num_cpus = 0.5
    cfg.rollout.max_new_tokens = 12
    return cfg


@pytest.fixture(scope="module")
def workers(ray_cluster, cfg):
    """The module's two workers, made by the public helper (names, namespace, restarts)."""
    import dataclasses

    from actors.rollout import create_rollout_workers

    ray = ray_cluster
    vllm_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, backend="vllm", num_workers=1))
    (vllm_worker,) = create_rollout_workers(vllm_cfg, namespace="rollout-test-vllm")
    (hf_worker,) = create_rollout_workers(cfg, namespace="rollout-test-hf", backend="hf")
    yield {"vllm": vllm_worker, "hf": hf_worker}
    for h in (vllm_worker, hf_worker):
        ray.kill(h)


def test_workers_are_named_in_their_namespace(ray_cluster, workers):
    ray = ray_cluster
    assert ray.get_actor("rollout-0", namespace="rollout-test-vllm")._actor_id == workers["vllm"]._actor_id
    info = ray.get(ray.get_actor("rollout-0", namespace="rollout-test-hf").info.remote())
    assert info["backend"] == "hf" and info["weights_version"] == 0


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_generate_consistent_ids_logprobs_text(ray_cluster, workers, cfg, tiny_policy_path, backend):
    from twodrl.config import ModelConfig
    from twodrl.models.loading import load_tokenizer

    ray = ray_cluster
    worker = workers[backend]
    tok = load_tokenizer(ModelConfig(path=tiny_policy_path))
    out = ray.get(worker.generate.remote(REQUESTS, n=3, seed=11))
    assert [r["id"] for r in out] == ["a", "b", "c"]
    for res in out:
        assert len(res["samples"]) == 3
        for s in res["samples"]:
            ids, lps = s["token_ids"], s["logprobs"]
            assert 1 <= len(ids) <= cfg.rollout.max_new_tokens
            assert len(lps) == len(ids) and all(lp <= 0.0 for lp in lps)
            assert s["text"] == tok.decode(ids, skip_special_tokens=True)
            assert s["finish_reason"] in ("stop", "length")
            if s["finish_reason"] == "length":
                assert len(ids) == cfg.rollout.max_new_tokens
        # the samples are different draws, not one sample copied n times
        assert len({tuple(s["token_ids"]) for s in res["samples"]}) > 1
    # per-token log-probs returned by generate are the model's own (raw) log-probs:
    # scoring the same tokens again gives the same numbers
    prompts = [r["prompt_token_ids"] for r in out for _ in r["samples"]]
    responses = [s["token_ids"] for r in out for s in r["samples"]]
    again = ray.get(worker.sequence_logprobs.remote(prompts, responses))
    sampled = [s["logprobs"] for r in out for s in r["samples"]]
    assert max(abs(a - b) for xs, ys in zip(sampled, again) for a, b in zip(xs, ys)) < 1e-4
    # same seed → same samples, here in a smaller batch: the same tokens, text and
    # finish reasons; log-probs equal up to float32 rounding (a different batch size
    # changes how the matrix products are blocked, hence the last bits)
    alone = ray.get(worker.generate.remote(REQUESTS[:1], n=3, seed=11))[0]["samples"]
    for a, b in zip(alone, out[0]["samples"], strict=True):
        assert {k: v for k, v in a.items() if k != "logprobs"} == {k: v for k, v in b.items() if k != "logprobs"}
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) < 1e-5
    # defaults from the config (4 samples per prompt)
    assert len(ray.get(worker.generate.remote(REQUESTS[:1]))[0]["samples"]) == cfg.rollout.samples_per_prompt


def test_system_prompt_and_history_reach_the_rendered_prompt(ray_cluster, workers, tiny_policy_path):
    from twodrl.config import ModelConfig
    from twodrl.models.loading import load_tokenizer

    ray = ray_cluster
    tok = load_tokenizer(ModelConfig(path=tiny_policy_path))
    out = ray.get(workers["vllm"].generate.remote(REQUESTS, n=1, greedy=True))
    rendered = {r["id"]: tok.decode(r["prompt_token_ids"]) for r in out}
    assert "Preference weights: helpfulness 71, verbosity -71." in rendered["c"]
    assert "<|im_start|>system" in rendered["c"] and "<|im_start|>system" not in rendered["a"]
    assert "Hello." in rendered["b"]
    assert all(text.endswith("<|im_start|>assistant\n") for text in rendered.values())
    # the system prompt changes what the policy is conditioned on, hence its output
    plain = dict(REQUESTS[2])
    plain.pop("system")
    with_sys = ray.get(workers["vllm"].sequence_logprobs.remote([out[2]["prompt_token_ids"]], [[5, 6, 7]]))
    without = ray.get(workers["vllm"].generate.remote([plain], n=1, greedy=True))[0]["prompt_token_ids"]
    assert len(without) < len(out[2]["prompt_token_ids"])
    assert with_sys[0] != ray.get(workers["vllm"].sequence_logprobs.remote([without], [[5, 6, 7]]))[0]


def test_vllm_and_hf_backends_agree_on_logprobs(ray_cluster, workers):
    ray = ray_cluster
    prompts = [[10, 20, 30, 40], [7, 8]]
    responses = [[50, 60, 70], [9, 10, 11, 12, 13]]
    a = ray.get(workers["vllm"].sequence_logprobs.remote(prompts, responses))
    b = ray.get(workers["hf"].sequence_logprobs.remote(prompts, responses))
    assert max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)) < 1e-4


def test_bad_requests_fail_clearly(ray_cluster, workers):
    ray = ray_cluster
    with pytest.raises(ray.exceptions.RayTaskError, match="expected a dict with 'id' and 'prompt'"):
        ray.get(workers["hf"].generate.remote([{"prompt": "no id"}]))
    with pytest.raises(ray.exceptions.RayTaskError, match="exceeds policy.max_length"):
        ray.get(workers["hf"].generate.remote(REQUESTS[:1], max_new_tokens=10_000))
