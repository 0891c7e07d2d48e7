"""Learner → rollout weight sync: bucketed vs one RPC per tensor vs a plain memory copy.

Model: a ~52M-parameter offline Qwen2 built by :mod:`twodrl.models.tiny` (hidden 768,
8 layers, 12 heads / 4 KV heads, MLP 2048, float32, ~208 MB). Sender: a weight-source actor holding the Hugging Face model
(the learner's sync code path, :class:`actors.weight_sync.WeightSenderMixin`).
Receiver: a real vLLM rollout worker (:class:`actors.rollout.RolloutWorker`) that loads
the weights in place.

- ``bucketed_s``: :func:`actors.weight_sync.sync_weights` over the object store
  (pack → ``ray.put`` → zero-copy views → one in-place reload), median of the repeats.
- ``per_tensor_s``: the same transport with one tensor per message: one ``ray.put``
  and one actor call per tensor, each loaded in place on arrival.
- ``copy_s``: one ``copy_`` of every parameter into preallocated buffers (the floor).
- ``collective_s``: the bucketed sync over the gloo group, for reference.

Targets: ``per_tensor_s / bucketed_s ≥ 5`` and ``bucketed_s / copy_s ≤ 3``. After the
timed runs a final bucketed sync is checked for parity (max |Δ log-prob|).

    python benchmarks/bench_weight_sync.py [--json PATH] [--repeats 5] [--bucket-mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._setup import prepare_environment  # noqa: E402

prepare_environment()


DEFAULT_MODEL = (
    "tiny:policy,hidden_size=768,intermediate_size=2048,num_hidden_layers=8,"
    "num_attention_heads=12,num_key_value_heads=4"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)

    import random

    import ray
    from tqdm import tqdm

    from actors.rollout import RolloutWorker
    from actors.weight_sync import WeightSourceActor, sync_weights
    from twodrl.config import RunConfig
    from twodrl.models.loading import resolve_model_path

    path = resolve_model_path(args.model)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, namespace="twodrl-bench")
    try:
        cfg = RunConfig()
        cfg.policy.path = path
        source = WeightSourceActor.options(num_cpus=1).remote(path)
        worker = RolloutWorker.options(num_cpus=1).remote(cfg, 0, "vllm")
        n_params = ray.get(source.num_parameters.remote())
        ray.get(worker.ready.remote())
        bucket_bytes = int(args.bucket_mb * (1 << 20))

        def per_tensor_once() -> float:
            # Same packing and transport, but one tensor per message: bucket_bytes=1
            # gives every tensor its own bucket, and each one is its own actor call.
            t = time.perf_counter()
            export = ray.get(source.export_weights_object_store.remote(1))
            calls = [worker.update_weights_from_buckets.remote({"refs": [ref]}) for ref in export["refs"]]
            ray.get(calls)
            return time.perf_counter() - t

        parts: dict[str, list[float]] = {"send": [], "load": []}

        def bucketed_once(transport: str) -> float:
            stats = sync_weights([source], [worker], transport=transport, bucket_mb=args.bucket_mb)
            if transport == "object_store":
                parts["send"].append(stats["send_s"])
                parts["load"].append(stats["load_s"])
            return stats["total_s"]

        # Warm-up: first-touch page faults, the gloo group, vLLM's first reload.
        bucketed_once("object_store")
        bucketed_once("collective")
        per_tensor_once()

        times: dict[str, list[float]] = {"bucketed": [], "per_tensor": [], "collective": []}
        for _ in tqdm(range(args.repeats), desc="weight sync", unit="rep"):
            times["bucketed"].append(bucketed_once("object_store"))
            times["collective"].append(bucketed_once("collective"))
            times["per_tensor"].append(per_tensor_once())
        copy_s = ray.get(source.copy_time.remote(max(3, args.repeats)))

        # Parity after a real change: perturb, sync (bucketed), compare log-probs.
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 1000) for _ in range(8)] for _ in range(2)]
        responses = [[rng.randrange(3, 1000) for _ in range(8)] for _ in range(2)]
        ray.get(source.perturb.remote(0.02, 1))
        sync_weights([source], [worker], transport="object_store", bucket_mb=args.bucket_mb)
        want = ray.get(source.sequence_logprobs.remote(prompts, responses))
        got = ray.get(worker.sequence_logprobs.remote(prompts, responses))
        parity = max(abs(a - b) for xs, ys in zip(want, got) for a, b in zip(xs, ys))

        bucketed_s = statistics.median(times["bucketed"])
        per_tensor_s = statistics.median(times["per_tensor"])
        result = {
            "model": args.model,
            "parameters": n_params,
            "bytes": n_params * 4,
            "bucket_mb": args.bucket_mb,
            "repeats": args.repeats,
            "bucketed_s": bucketed_s,
            "per_tensor_s": per_tensor_s,
            "copy_s": copy_s,
            "collective_s": statistics.median(times["collective"]),
            # object-store sync split: learner pack + ray.put, and the rollout side
            # (fetch views + vLLM's in-place reload incl. its CPU weight re-packing)
            "send_s": statistics.median(parts["send"][-args.repeats:]),
            "load_s": statistics.median(parts["load"][-args.repeats:]),
            "speedup_vs_per_tensor": per_tensor_s / bucketed_s,
            "ratio_to_copy": bucketed_s / copy_s,
            "parity_max_abs_diff": parity,
            "targets_met": per_tensor_s / bucketed_s >= 5.0 and bucketed_s / copy_s <= 3.0,
        }
    finally:
        ray.shutdown()
    print(json.dumps(result, indent=2))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
