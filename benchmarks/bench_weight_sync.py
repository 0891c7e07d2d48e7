"""Learner → rollout weight sync: bucketed vs one RPC per tensor vs a plain memory copy.

Model: a ~52M-parameter offline Qwen2 built by :mod:`twodrl.models.tiny` (hidden 768,
8 layers, 12 heads / 4 KV heads, MLP 2048, float32, ~208 MB). Sender: a weight-source
actor holding the Hugging Face model (the learner's sync code path,
:class:`actors.weight_sync.WeightSenderMixin`). Receiver: a real vLLM rollout worker
(:class:`actors.rollout.RolloutWorker`) that loads the weights in place.

- ``bucketed_s``: :func:`actors.weight_sync.sync_weights` with the transport
  ``rollout.weight_sync: auto`` picks on this one-node layout (``shared_memory``):
  buckets streamed from the sender and loaded as they arrive. Median of the repeats.
- ``per_tensor_s``: the same transport and receiver with one tensor per bucket, i.e.
  one generator item and one actor call (RPC) per tensor.
- ``copy_s``: one ``copy_`` of every parameter into preallocated buffers (the floor).
- ``per_tensor_object_store_s``: one RPC per tensor with the tensor in Ray's object
  store (a Ray system without bucketing), pipelined like the rest.
- ``object_store_s`` / ``collective_s``: the other transports, bucketed, for reference.
- ``reload_bucketed_s``: the bucketed sync into a vLLM worker that lets vLLM's CPU
  oneDNN kernels repack their weights (``rollout.cpu_prepack_weights: true``): there
  an update has to go through vLLM's ``reload_weights``. Measured afterwards, alone.

Targets: ``per_tensor_s / bucketed_s ≥ 5`` and ``bucketed_s / copy_s ≤ 3``. After the
timed runs a final bucketed sync of perturbed weights is checked for parity (max
|Δ log-prob| against the sender's own forward pass) on both receivers.

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
ONE_TENSOR_PER_BUCKET_MB = 1 / (1 << 20)  # 1 byte: every tensor gets a bucket of its own


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-prepacked", action="store_true",
                        help="skip the second phase with a oneDNN-prepacked receiver")
    args = parser.parse_args(argv)

    import dataclasses
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
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 1000) for _ in range(8)] for _ in range(2)]
        responses = [[rng.randrange(3, 1000) for _ in range(8)] for _ in range(2)]

        cases = {
            "bucketed": ("shared_memory", args.bucket_mb),
            "per_tensor": ("shared_memory", ONE_TENSOR_PER_BUCKET_MB),
            "object_store": ("object_store", args.bucket_mb),
            "per_tensor_object_store": ("object_store", ONE_TENSOR_PER_BUCKET_MB),
            "collective": ("collective", args.bucket_mb),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        parts: dict[str, list[float]] = {"send": [], "load": []}
        last: dict[str, dict] = {}

        def once(name: str, receiver) -> float:
            transport, bucket_mb = cases.get(name, cases["bucketed"])
            stats = sync_weights([source], [receiver], transport=transport, bucket_mb=bucket_mb)
            last[name] = stats
            if name == "bucketed":
                parts["send"].append(stats["send_s"])
                parts["load"].append(stats["load_s"])
            return stats["total_s"]

        def parity_after_change(receiver, seed: int) -> float:
            """Perturb the source, sync (bucketed), compare log-probs."""
            ray.get(source.perturb.remote(0.02, seed))
            want = ray.get(source.sequence_logprobs.remote(prompts, responses))
            once("bucketed", receiver)
            got = ray.get(receiver.sequence_logprobs.remote(prompts, responses))
            return max(abs(a - b) for xs, ys in zip(want, got) for a, b in zip(xs, ys))

        # Warm-up: the segment's first mapping, the gloo group, the engine's first load
        # (which records its copy plan).
        for name in cases:
            once(name, worker)
        for _ in tqdm(range(args.repeats), desc="weight sync", unit="rep"):
            for name in cases:
                times[name].append(once(name, worker))
        copy_s = ray.get(source.copy_time.remote(max(3, args.repeats)))
        round_trips = []
        for _ in range(20):  # one empty actor call: the floor of any per-tensor RPC
            t = time.perf_counter()
            ray.get(worker.weights_version.remote())
            round_trips.append(time.perf_counter() - t)
        parity = {"in_place": parity_after_change(worker, 1)}

        # The reload path, alone on the machine (an idle second engine slows the first).
        if not args.no_prepacked:
            ray.kill(worker)
            packed_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, cpu_prepack_weights=True))
            packed = RolloutWorker.options(num_cpus=1).remote(packed_cfg, 1, "vllm")
            ray.get(packed.ready.remote())
            times["reload_bucketed"] = []
            once("reload_bucketed", packed)
            for _ in tqdm(range(args.repeats), desc="weight sync, prepacked engine", unit="rep"):
                times["reload_bucketed"].append(once("reload_bucketed", packed))
            parity["reload"] = parity_after_change(packed, 2)

        med = {name: statistics.median(ts) for name, ts in times.items()}
        result = {
            "model": args.model,
            "parameters": n_params,
            "bytes": n_params * 4,
            "bucket_mb": args.bucket_mb,
            "repeats": args.repeats,
            "transport": "shared_memory",
            "tensors": last["bucketed"]["tensors"],
            "buckets": last["bucketed"]["buckets"],
            "rpc_round_trip_s": statistics.median(round_trips),
            "bucketed_s": med["bucketed"],
            "per_tensor_s": med["per_tensor"],
            "copy_s": copy_s,
            # bucketed split: until the sender's last bucket, and the receiver's load time
            "send_s": statistics.median(parts["send"][-args.repeats:]),
            "load_s": statistics.median(parts["load"][-args.repeats:]),
            "per_tensor_object_store_s": med["per_tensor_object_store"],
            "object_store_s": med["object_store"],
            "collective_s": med["collective"],
            "reload_bucketed_s": med.get("reload_bucketed"),
            "speedup_vs_per_tensor": med["per_tensor"] / med["bucketed"],
            "ratio_to_copy": med["bucketed"] / copy_s,
            # one RPC per tensor with the tensor itself in Ray's object store (what a Ray
            # system without bucketing does), against the default bucketed sync
            "speedup_vs_per_tensor_object_store": med["per_tensor_object_store"] / med["bucketed"],
            "parity_max_abs_diff": max(parity.values()),
            "parity_by_load_path": parity,
            "targets_met": med["per_tensor"] / med["bucketed"] >= 5.0 and med["bucketed"] / copy_s <= 3.0,
            "load_average_1min": os.getloadavg()[0],
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
