"""Generation and a weight sync never interleave on a rollout engine (real vLLM CPU
engine, tiny policy). The test drives the streamed sync itself, slowly, the way
``sync_weights`` does (buckets in order, then finish) but with pauses in between:

- generate asked for after the first bucket landed waits for the finish and reports the
  new version;
- generate already running when the sync starts ends before the first bucket is loaded
  and reports the old version.

Either way the log-probs of the returned tokens are those of a fresh Hugging Face model
holding the claimed weights (a mix of two versions would match neither)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration

TOL = 1e-3


@pytest.fixture(scope="module")
def setup(ray_cluster, tiny_policy_path):
    from actors.rollout import RolloutWorker
    from actors.weight_sync import WeightSourceActor
    from twodrl.config import RunConfig

    ray = ray_cluster
    cfg = RunConfig()
    cfg.policy.path = tiny_policy_path
    cfg.rollout.num_cpus = 0.5
    worker = RolloutWorker.options(num_cpus=0.5, name="excl-rollout-vllm").remote(cfg, 0, "vllm")
    # Two versions of the policy: v1 = base + noise(1), v2 = v1 + noise(2).
    v1 = WeightSourceActor.options(num_cpus=0.25).remote(tiny_policy_path)
    v2 = WeightSourceActor.options(num_cpus=0.25).remote(tiny_policy_path)
    ray.get([v1.perturb.remote(scale=0.05, seed=1), v2.perturb.remote(scale=0.05, seed=1)])
    ray.get(v2.perturb.remote(scale=0.05, seed=2))
    nbytes = 4 * ray.get(v1.num_parameters.remote())
    ray.get(worker.ready.remote())
    yield ray, worker, v1, v2, nbytes / 6 / (1 << 20)  # about six buckets
    for h in (worker, v1, v2):
        ray.kill(h)


def _buckets(source, bucket_mb):
    from actors.weight_sync import stream_from_learners

    return list(stream_from_learners([source], "object_store", max(1, int(bucket_mb * (1 << 20)))))


def _check_logprobs(ray, results, source, other):
    """The samples' log-probs are ``source``'s, and measurably not ``other``'s."""
    prompts, responses, sampled = [], [], []
    for r in results:
        for s in r["samples"]:
            prompts.append(r["prompt_token_ids"])
            responses.append(s["token_ids"])
            sampled.append(s["logprobs"])
    claimed, wrong = ray.get([source.sequence_logprobs.remote(prompts, responses),
                              other.sequence_logprobs.remote(prompts, responses)])
    flat = lambda xs: [x for row in xs for x in row]  # noqa: E731
    assert max(abs(a - b) for a, b in zip(flat(sampled), flat(claimed), strict=True)) < TOL
    assert max(abs(a - b) for a, b in zip(flat(sampled), flat(wrong), strict=True)) > 10 * TOL


def _events(ray, worker, kind, since):
    return [e for e in ray.get(worker.timeline.remote()) if e["event"] == kind and e["start"] >= since]


def test_generate_asked_mid_sync_waits_for_the_finish(setup):
    ray, worker, v1, v2, bucket_mb = setup
    reqs = [{"id": f"a{i}", "prompt": f"Tell me about topic {i}."} for i in range(3)]
    t_mark = ray.get(worker.timeline.remote())
    since = t_mark[-1]["end"] if t_mark else 0.0
    refs = _buckets(v1, bucket_mb)
    assert len(refs) >= 3
    ray.get(worker.load_weight_bucket.remote(refs[0]))  # the first bucket has landed
    gen = worker.generate.remote(reqs, n=2, max_new_tokens=16, seed=0)
    ready, _ = ray.wait([gen], timeout=1.5)
    assert not ready, "generate ran while the weight update was open"
    state = ray.get(worker.engine_state.remote())
    assert state["updating"] and state["engine_calls"] == 0
    loads = []
    for ref in refs[1:]:
        loads.append(worker.load_weight_bucket.remote(ref))
        time.sleep(0.2)  # a slow sync: generate must keep waiting
    done = ray.get(worker.finish_weight_update.remote(1))
    ray.get(loads)
    results = ray.get(gen, timeout=300)

    assert done["version"] == 1 and done["buckets"] == len(refs)
    assert {r["weights_version"] for r in results} == {1}
    (g,) = _events(ray, worker, "generate", since)
    (finish,) = _events(ray, worker, "finish", since)
    buckets = _events(ray, worker, "bucket", since)
    assert len(buckets) == len(refs)
    assert g["asked"] < finish["start"] and g["start"] >= finish["end"] and g["version"] == 1
    _check_logprobs(ray, results, v1, v2)


def test_generate_running_when_the_sync_starts_ends_first(setup):
    ray, worker, v1, v2, bucket_mb = setup
    assert ray.get(worker.weights_version.remote()) == 1  # the test above ran first
    since = ray.get(worker.timeline.remote())[-1]["end"]
    refs = _buckets(v2, bucket_mb)
    reqs = [{"id": f"b{i}", "prompt": f"Write a long story number {i}."} for i in range(4)]
    gen = worker.generate.remote(reqs, n=4, max_new_tokens=64, seed=1)
    deadline = time.monotonic() + 120
    while ray.get(worker.engine_state.remote())["engine_calls"] == 0:  # generation is running
        assert time.monotonic() < deadline, "generate never started"
        time.sleep(0.05)
    loads = [worker.load_weight_bucket.remote(ref) for ref in refs]
    finish = worker.finish_weight_update.remote(2)
    results = ray.get(gen, timeout=300)
    assert ray.get(finish, timeout=300)["version"] == 2
    ray.get(loads)

    assert {r["weights_version"] for r in results} == {1}
    (g,) = _events(ray, worker, "generate", since)
    first_bucket = min(_events(ray, worker, "bucket", since), key=lambda e: e["start"])
    assert g["version"] == 1 and g["end"] <= first_bucket["start"]
    _check_logprobs(ray, results, v1, v2)

    # And the engine now samples from v2, reporting it.
    after = ray.get(worker.generate.remote(reqs[:2], n=1, max_new_tokens=8, seed=2))
    assert {r["weights_version"] for r in after} == {2}
    _check_logprobs(ray, after, v2, v1)


def test_abandoned_sync_does_not_leave_generation_waiting(setup):
    """A sender that fails mid-sync (the driver aborts the open update): generation goes
    on, and since buckets were loaded in place it refuses to sample from mixed weights
    until a complete sync."""
    from actors.rollout import PartialWeightsError
    from actors.weight_sync import sync_weights

    ray, worker, v1, v2, bucket_mb = setup
    refs = _buckets(v1, bucket_mb)
    ray.get(worker.load_weight_bucket.remote(refs[0]))
    gen = worker.generate.remote([{"id": "c", "prompt": "Hi"}], n=1, max_new_tokens=4)
    assert ray.get(worker.abort_weight_update.remote("test: sender gone"))["aborted"]
    with pytest.raises(PartialWeightsError):
        try:
            ray.get(gen, timeout=120)
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause()
    stats = sync_weights([v1], [worker], transport="object_store", bucket_mb=bucket_mb, version=3)
    assert stats["restarted"] == [] and ray.get(worker.weights_version.remote()) == 3
    out = ray.get(worker.generate.remote([{"id": "d", "prompt": "Hi"}], n=1, max_new_tokens=4))
    assert out[0]["weights_version"] == 3
