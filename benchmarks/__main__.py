"""All performance benchmarks, one summary table, one JSON.

    python -m benchmarks [--json PATH] [--quick] [--only losses,weight_sync,...]

Each benchmark runs as its own child process (``python -m benchmarks.<module> --json
TMP ...``), so Ray clusters and vLLM engines never leak from one into the next; its own
output streams through. The runner then prints one table of the headline figures with
their targets and writes every benchmark's full JSON under one file:
``{"benchmarks": {name: {...}}, "summary": [rows], "failed": [names]}``.

``--quick`` runs each with fewer repeats / a smaller workload (a smoke run; the
figures are noisier).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Figure:
    """One headline figure: where it is in a benchmark's JSON and what it must meet."""

    label: str
    key: str
    unit: str = ""
    # A check on the benchmark's whole JSON, and the target as the table shows it.
    target: Optional[str] = None
    check: Optional[Callable[[dict], bool]] = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    module: str
    args: tuple[str, ...]
    quick_args: tuple[str, ...]
    figures: tuple[Figure, ...]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("losses", "benchmarks.bench_losses", (), ("--repeats", "5"), (
        Figure("2D-DPO loss, loop (fwd)", "loop_ms", "ms"),
        Figure("2D-DPO loss, vectorized (fwd)", "vectorized_ms", "ms"),
        Figure("speedup vs loop (fwd)", "speedup", "x"),
        Figure("speedup vs loop (fwd+bwd)", "speedup_fwd_bwd", "x"),
        Figure("max |loop - vectorized| (f64)", "max_abs_diff_float64", "", "≤ 1e-6",
               lambda r: r["max_abs_diff_float64"] <= 1e-6),
    )),
    Benchmark("weight_sync", "benchmarks.bench_weight_sync", (), ("--repeats", "2"), (
        Figure("bucketed sync (shared memory)", "bucketed_s", "s"),
        Figure("per-tensor sync (shared memory)", "per_tensor_s", "s"),
        Figure("per-tensor sync (object store)", "per_tensor_object_store_s", "s"),
        Figure("copy bound", "copy_s", "s"),
        Figure("reload path (prepacked CPU)", "reload_bucketed_s", "s"),
        Figure("per-tensor / bucketed", "speedup_vs_per_tensor", "x", "≥ 5", lambda r: r["speedup_vs_per_tensor"] >= 5),
        Figure("per-tensor obj. store / bucketed", "speedup_vs_per_tensor_object_store", "x", "≥ 5",
               lambda r: r["speedup_vs_per_tensor_object_store"] >= 5),
        Figure("bucketed / copy", "ratio_to_copy", "x", "≤ 3", lambda r: r["ratio_to_copy"] <= 3),
    )),
    Benchmark("rollout", "benchmarks.bench_rollout", (), ("--repeats", "1", "--prompts", "8"), (
        Figure("vLLM backend", "vllm_tokens_per_s", "tok/s"),
        Figure("HF backend", "hf_tokens_per_s", "tok/s"),
        Figure("vLLM / HF", "speedup", "x"),
    )),
    Benchmark("rounds", "benchmarks.bench_rounds", (), ("--rounds", "1"), (
        Figure("round, sync", "sync_round_s", "s"),
        Figure("round, overlap", "overlap_round_s", "s"),
        Figure("round, stream", "stream_round_s", "s"),
        Figure("longest stage (sync)", "max_stage_s", "s"),
        Figure("stream / longest stage", "stream_over_max_stage", "x", "≤ 1.15",
               lambda r: r["stream_round_s"] <= 1.15 * r["max_stage_s"]),
        Figure("sync / stream, judge +200 ms", "stream_speedup_slow_judge", "x", "≥ 1.5",
               lambda r: r["stream_speedup_slow_judge"] >= 1.5),
        Figure("driver overhead / round", "driver_overhead_frac", "", "< 0.05", lambda r: r["driver_overhead_frac"] < 0.05),
    )),
    Benchmark("annotate", "benchmarks.bench_annotate", (), ("--seconds", "1"), (
        Figure("judge pool, concurrency 1", "rps_c1", "req/s"),
        Figure("judge pool, concurrency 16", "rps_c16", "req/s"),
        Figure("c16 / c1", "speedup", "x", "≥ 10", lambda r: r["speedup"] >= 10),
    )),
)


def format_value(value: Any) -> str:
    """Compact numbers for the table: 3 significant digits, scientific when tiny."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.2e}"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(value)


def summary_rows(results: dict[str, dict], benchmarks: tuple[Benchmark, ...] = BENCHMARKS) -> list[dict]:
    """One row per headline figure of each benchmark that produced a result:
    ``{benchmark, figure, key, value, unit, target, status}``; status is ``ok``/``MISS``
    for figures with a target, ``-`` otherwise, ``missing`` when the key is absent."""
    rows = []
    for b in benchmarks:
        res = results.get(b.name)
        if res is None:
            continue
        for f in b.figures:
            value = res.get(f.key)
            if value is None:
                status = "missing"
            elif f.check is None:
                status = "-"
            else:
                status = "ok" if f.check(res) else "MISS"
            rows.append({"benchmark": b.name, "figure": f.label, "key": f.key, "value": value, "unit": f.unit,
                         "target": f.target or "", "status": status})
    return rows


def render_table(rows: list[dict]) -> str:
    """Fixed-width text table of :func:`summary_rows` output."""
    header = ("benchmark", "figure", "value", "unit", "target", "status")
    cells = [(r["benchmark"], r["figure"], format_value(r["value"]), r["unit"], r["target"], r["status"]) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    right = {2}  # numbers right-aligned

    def line(c):
        return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))).rstrip()

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *(line(c) for c in cells)])


def run_one(b: Benchmark, quick: bool, out_dir: Path) -> tuple[Optional[dict], float, int]:
    path = out_dir / f"{b.name}.json"
    cmd = [sys.executable, "-m", b.module, "--json", str(path), *(b.quick_args if quick else b.args)]
    print(f"\n=== {b.name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    result = json.loads(path.read_text()) if path.exists() else None
    return result, elapsed, rc


def main(argv: list[str] | None = None) -> int:
    names = [b.name for b in BENCHMARKS]
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_path", help="write every figure here")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller workloads")
    ap.add_argument("--only", help=f"comma list of {names}")
    args = ap.parse_args(argv)
    chosen = names if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {unknown}; choose from {names}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    results: dict[str, dict] = {}
    failed, seconds = [], {}
    with tempfile.TemporaryDirectory(prefix="twodrl-bench-") as tmp:
        for b in BENCHMARKS:
            if b.name not in chosen:
                continue
            res, elapsed, rc = run_one(b, args.quick, Path(tmp))
            seconds[b.name] = round(elapsed, 1)
            if res is None:
                failed.append(b.name)
                print(f"!!! {b.name} wrote no result (exit status {rc})", flush=True)
                continue
            if rc != 0:
                failed.append(b.name)  # its figures are still reported (e.g. a failed check)
            results[b.name] = res
    rows = summary_rows(results)
    print("\n" + render_table(rows))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        payload = {"quick": args.quick, "benchmarks": results, "summary": rows, "failed": failed,
                   "wall_s": seconds, "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        Path(args.json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
