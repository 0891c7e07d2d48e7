"""Vectorized 2D-DPO vs a per-example Python loop.

The loop follows the structure of the paper's reference implementation (Appendix B.3):
for each example, find the segment boundaries by scanning the tokens one position at a
time with a tensor comparison (as the reference code finds its chunks), build each
segment's weighted score one segment at a time, sort, then walk the N selected pairs and
sum each segment's token log-ratios by slicing. A *lean* variant of the same loop scans
a Python list instead of the tensor (a stronger baseline); both are reported. The
vectorized version is :func:`twodrl.losses.two_d_dpo_loss` (one scatter_add per side,
one sort, gathers).

Workload: B=16 pairs, T=1024 tokens, 8–40 segments per response (rows of S_max=40 past a
response's count are NaN, as the API allows), five aspects, default weights.

    python benchmarks/bench_losses.py [--json PATH] [--repeats 15] [--threads 1]

Prints the times, the ratios, and max |Δ| between loop and vectorized losses in float64
(must be ≤ 1e-6; exit status 1 otherwise). JSON keys: ``loop_ms``, ``vectorized_ms``,
``speedup`` (paper-shaped loop, forward), the ``lean_loop_*`` and ``*_fwd_bwd_*``
variants, ``max_abs_diff_float64``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twodrl.aspects import DEFAULT_WEIGHTS  # noqa: E402
from twodrl.losses import RANK_GRID, two_d_dpo_loss  # noqa: E402


def make_batch(B: int = 16, T: int = 1024, s_min: int = 8, s_max: int = 40, A: int = 5, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> dict:
    """Random pairs shaped like real ones: a prompt prefix (id −1), contiguous segments of
    random lengths covering the response, right padding (id −1)."""
    g = torch.Generator().manual_seed(seed)

    def side():
        ids = torch.full((B, T), -1, dtype=torch.long)
        for b in range(B):
            S = int(torch.randint(s_min, s_max + 1, (1,), generator=g))
            prompt = int(torch.randint(16, 128, (1,), generator=g))
            length = int(torch.randint(max(S * 4, T // 2), T - prompt + 1, (1,), generator=g))
            cuts = torch.randperm(length - 1, generator=g)[: S - 1].add(1).sort().values.tolist()
            edges = [0, *cuts, length]
            for k in range(S):
                ids[b, prompt + edges[k]: prompt + edges[k + 1]] = k
        ratios = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
        ratios = torch.where(ids >= 0, ratios, torch.zeros((), dtype=torch.float64))
        scores = torch.randint(0, 5, (B, s_max, A), generator=g).double()
        n = ids.amax(1) + 1
        scores[torch.arange(s_max)[None, :].expand(B, -1) >= n[:, None]] = float("nan")
        return ratios.to(dtype), ids, scores.to(dtype)

    lr_c, ids_c, sc = side()
    lr_r, ids_r, sr = side()
    return dict(chosen_logratios=lr_c, rejected_logratios=lr_r, chosen_segments=ids_c, rejected_segments=ids_r,
                chosen_scores=sc, rejected_scores=sr)


def loop_two_d_dpo(chosen_logratios, rejected_logratios, chosen_segments, rejected_segments,
                   chosen_scores, rejected_scores, weights, beta=0.2, scan: str = "tensor"):
    """Per-example loop with the structure of the paper's reference code (same semantics
    as the vectorized loss, same tie rule).

    ``scan="tensor"`` finds segment boundaries the way the reference code finds its
    chunks: one tensor comparison per token position. ``scan="list"`` is a leaner
    variant that scans a Python list instead (reported separately, for transparency).
    """
    W = torch.as_tensor(weights, dtype=chosen_logratios.dtype)

    def spans(ids_row):
        # [start, end) of each segment in token order (segments are contiguous).
        out, start = [], 0
        if scan == "list":
            row = ids_row.tolist()
            for t in range(1, len(row) + 1):
                if t == len(row) or row[t] != row[t - 1]:
                    if row[start] >= 0:
                        out.append((start, t))
                    start = t
            return out
        prev = ids_row[0]
        for t in range(1, ids_row.shape[0]):
            if bool(ids_row[t] != prev):
                if int(prev) >= 0:
                    out.append((start, t))
                start, prev = t, ids_row[t]
        if int(prev) >= 0:
            out.append((start, ids_row.shape[0]))
        return out

    losses = []
    for b in range(chosen_logratios.shape[0]):
        c_spans, r_spans = spans(chosen_segments[b]), spans(rejected_segments[b])
        if not c_spans or not r_spans:
            losses.append(chosen_logratios.new_zeros(()))
            continue
        # Weighted score of each segment, one segment at a time.
        c_total = torch.stack([(W * (chosen_scores[b, k] / 4 + 1)).sum() for k in range(len(c_spans))])
        r_total = torch.stack([(W * (rejected_scores[b, k] / 4 + 1)).sum() for k in range(len(r_spans))])
        n = min(len(c_spans), len(r_spans))
        # Same ranking rule as the library: g rounded to RANK_GRID, stable on ties.
        top_c = torch.sort(torch.round(c_total.double() / RANK_GRID), descending=True, stable=True).indices[:n]
        top_r = torch.sort(torch.round(r_total.double() / RANK_GRID), stable=True).indices[:n]
        beta_c = beta / (c_total[top_c].sum() / n)
        beta_r = beta / (r_total[top_r].sum() / n)
        loss = chosen_logratios.new_zeros(())
        for i in range(n):
            kc, kr = int(top_c[i]), int(top_r[i])
            rc = chosen_logratios[b, c_spans[kc][0]: c_spans[kc][1]].sum()
            rr = rejected_logratios[b, r_spans[kr][0]: r_spans[kr][1]].sum()
            logits = beta_c * c_total[kc] * rc - beta_r * r_total[kr] * rr
            loss = loss - F.logsigmoid(logits)
        losses.append(loss)
    return torch.stack(losses)


def _time_pair(slow, fast, rounds: int, inner: int, desc: str) -> tuple[float, float]:
    """Median ms per call of ``slow`` and ``fast``, measured *interleaved* (each round
    times one ``slow`` call, then ``inner`` ``fast`` calls) so that both see the same
    conditions. The clock is this process's CPU time (``time.process_time``), not wall
    time: on a shared machine, time spent descheduled would otherwise be charged to
    whichever side happened to be running."""
    clock = time.process_time
    for _ in range(2):
        slow()
        for _ in range(inner):
            fast()
    slow_t, fast_t = [], []
    for _ in tqdm(range(rounds), desc=desc, leave=False):
        t0 = clock()
        slow()
        t1 = clock()
        for _ in range(inner):
            fast()
        t2 = clock()
        slow_t.append(t1 - t0)
        fast_t.append((t2 - t1) / inner)
    return 1e3 * statistics.median(slow_t), 1e3 * statistics.median(fast_t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per comparison")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for both)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = list(DEFAULT_WEIGHTS)

    # Exactness in float64, against both loop variants.
    b64 = make_batch(seed=args.seed, dtype=torch.float64)
    vec = two_d_dpo_loss(**b64, weights=w)
    max_abs_diff = max(float((loop_two_d_dpo(**b64, weights=w, scan=scan) - vec).abs().max())
                       for scan in ("tensor", "list"))

    # Speed in float32 (the training dtype on CPU), forward and forward+backward.
    b32 = make_batch(seed=args.seed, dtype=torch.float32)

    def fwd(fn, **kw):
        return lambda: fn(**b32, weights=w, **kw)

    def fwd_bwd(fn, **kw):
        def run():
            lc = b32["chosen_logratios"].detach().requires_grad_(True)
            lr = b32["rejected_logratios"].detach().requires_grad_(True)
            fn(**{**b32, "chosen_logratios": lc, "rejected_logratios": lr}, weights=w, **kw).sum().backward()
        return run

    res = {}
    for mode, wrap in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        for scan in ("tensor", "list"):
            res[mode, scan] = _time_pair(wrap(loop_two_d_dpo, scan=scan), wrap(two_d_dpo_loss), args.repeats, 20,
                                         f"{mode} vs loop({scan})")

    def ratio(key):
        return res[key][0] / res[key][1]

    result = {
        "B": 16, "T": 1024, "segments": "8-40", "threads": args.threads, "clock": "process CPU time",
        "loop_ms": round(res["fwd", "tensor"][0], 3),
        "vectorized_ms": round(res["fwd", "tensor"][1], 4),
        "speedup": round(ratio(("fwd", "tensor")), 1),
        "lean_loop_ms": round(res["fwd", "list"][0], 3),
        "vectorized_ms_vs_lean": round(res["fwd", "list"][1], 4),
        "speedup_vs_lean_loop": round(ratio(("fwd", "list")), 1),
        "loop_fwd_bwd_ms": round(res["fwd_bwd", "tensor"][0], 3),
        "vectorized_fwd_bwd_ms": round(res["fwd_bwd", "tensor"][1], 4),
        "speedup_fwd_bwd": round(ratio(("fwd_bwd", "tensor")), 1),
        "lean_loop_fwd_bwd_ms": round(res["fwd_bwd", "list"][0], 3),
        "speedup_fwd_bwd_vs_lean_loop": round(ratio(("fwd_bwd", "list")), 1),
        "max_abs_diff_float64": max_abs_diff,
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(f"2D-DPO loss, B=16 T=1024, 8-40 segments/response, float32, {args.threads} thread(s); "
          "CPU time, median of interleaved runs")
    for mode, label in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        for scan, name in (("tensor", "paper-shaped loop"), ("list", "lean loop")):
            slow, fast = res[mode, scan]
            print(f"  {label:16s} {name:17s} {slow:9.3f} ms   vectorized {fast:7.3f} ms   "
                  f"speedup {slow / fast:7.1f}x")
    print(f"  max |loop - vectorized| in float64: {max_abs_diff:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if max_abs_diff > 1e-6:
        print("ERROR: vectorized and loop losses differ by more than 1e-6", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
