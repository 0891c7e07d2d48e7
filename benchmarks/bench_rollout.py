"""Rollout throughput: the vLLM backend vs the Hugging Face ``generate`` backend.

Both backends of :mod:`actors.rollout` run in this process on the same model, the same
prompts (synthetic-task prompts rendered with the chat template, as the rollout worker
renders them) and the same sampling settings as the quickstart rollout (n samples per
prompt, temperature 0.7, top-p 0.8, up to ``--max-new-tokens``). Each backend does the
whole job a rollout worker asks of it, including the sampled tokens' log-probs (vLLM
returns them from sampling; the HF backend runs one extra forward pass). Torch runs with
``--threads`` intra-op threads for both (the rollout worker's default is 1).

    python -m benchmarks.bench_rollout [--json PATH] [--repeats 3] [--prompts 32]
        [--samples 4] [--max-new-tokens 64] [--model tiny:policy] [--threads 1] [--compare-prepack]

Tokens/s = generated tokens (EOS included, prompts excluded) / wall seconds, median over
``--repeats`` timed calls after one warm-up call. JSON keys: ``vllm_tokens_per_s``,
``hf_tokens_per_s``, ``speedup`` and the settings. ``--compare-prepack`` also times
vLLM with ``rollout.cpu_prepack_weights: true`` (the CPU kernels' repacked weights,
faster GEMMs, slower weight syncs): ``vllm_prepacked_tokens_per_s``,
``plain_over_prepacked``.
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


def tokens_per_second(token_counts: list[int], seconds: list[float]) -> float:
    """Throughput of the median-time call (each call generates about the same number
    of tokens; the median resists a call slowed down by other load)."""
    if not seconds or len(token_counts) != len(seconds):
        raise ValueError("tokens_per_second: need one token count per timed call")
    i = sorted(range(len(seconds)), key=seconds.__getitem__)[len(seconds) // 2]
    return token_counts[i] / seconds[i]


def _measure(backend, prompt_ids, args, desc: str) -> dict:
    from tqdm import tqdm

    def call():
        t0 = time.perf_counter()
        out = backend.generate(prompt_ids, args.samples, 0.7, 0.8, args.max_new_tokens, None)
        dt = time.perf_counter() - t0
        return sum(len(s["token_ids"]) for group in out for s in group), dt

    call()  # warm-up: first-call allocations, kernel selection
    counts, secs = [], []
    for _ in tqdm(range(args.repeats), desc=desc, leave=False):
        n, dt = call()
        counts.append(n)
        secs.append(dt)
    return {"tokens_per_s": tokens_per_second(counts, secs), "median_s": statistics.median(secs),
            "tokens_per_call": statistics.median(counts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_path", help="write the results here")
    ap.add_argument("--model", default="tiny:policy")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare-prepack", action="store_true",
                    help="also time vLLM with rollout.cpu_prepack_weights=true (oneDNN-repacked weights)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from actors.rollout import HFBackend, VLLMBackend
    from twodrl import synthetic
    from twodrl.config import load_config
    from twodrl.models.loading import load_tokenizer, resolve_model_path
    from twodrl.models.logprobs import render_prompt

    cfg = load_config(None, [f"policy.path={args.model}"])
    path = resolve_model_path(cfg.policy.path)
    tok = load_tokenizer(cfg.policy.__class__(path=path))
    prompts = synthetic.split_prompts(0)[0][: args.prompts]
    prompt_ids = [tok(render_prompt(tok, p.text), add_special_tokens=False)["input_ids"] for p in prompts]

    import dataclasses

    packed_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, cpu_prepack_weights=True))
    runs = [("hf", HFBackend, cfg)]
    if args.compare_prepack:
        # Before the default engine: keeping plain weights is a process-wide switch.
        runs.append(("vllm_prepacked", VLLMBackend, packed_cfg))
    runs.append(("vllm", VLLMBackend, cfg))
    res = {}
    # HF first, then vLLM: each backend is dropped before the next one loads.
    for name, cls, run_cfg in runs:
        backend = cls(path, run_cfg, seed=0)
        res[name] = _measure(backend, prompt_ids, args, f"{name} generate")
        del backend
    result = {
        "model": args.model, "prompts": args.prompts, "samples_per_prompt": args.samples,
        "max_new_tokens": args.max_new_tokens, "threads": args.threads, "repeats": args.repeats,
        "vllm_tokens_per_s": round(res["vllm"]["tokens_per_s"], 1),
        "hf_tokens_per_s": round(res["hf"]["tokens_per_s"], 1),
        "speedup": round(res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"], 2),
        "vllm_call_s": round(res["vllm"]["median_s"], 3), "hf_call_s": round(res["hf"]["median_s"], 3),
        "vllm_tokens_per_call": res["vllm"]["tokens_per_call"], "hf_tokens_per_call": res["hf"]["tokens_per_call"],
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if "vllm_prepacked" in res:
        result["vllm_prepacked_tokens_per_s"] = round(res["vllm_prepacked"]["tokens_per_s"], 1)
        result["plain_over_prepacked"] = round(res["vllm"]["tokens_per_s"] / res["vllm_prepacked"]["tokens_per_s"], 3)
    print(f"rollout {args.model}: {args.prompts} prompts x {args.samples} samples, ≤{args.max_new_tokens} new tokens, "
          f"{args.threads} thread(s)")
    for name in [n for n in ("vllm", "vllm_prepacked", "hf") if n in res]:
        r = res[name]
        print(f"  {name:14s} {r['tokens_per_s']:9.1f} tokens/s   ({r['tokens_per_call']:.0f} tokens in {r['median_s']:.2f} s)")
    print(f"  vLLM / HF: {result['speedup']:.2f}x")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
