"""Wall time, peak memory (all processes of the job together) and the reward gain of
the quickstart run.

    python -m benchmarks.bench_demo [--config configs/quickstart.yaml] [--set k=v ...] [--json PATH]

The job runs as a child process that starts its own local Ray cluster, so the Ray
daemons and every actor are descendants of it: memory is the sum of their proportional
set sizes (PSS — shared pages counted once across processes), sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

GiB = 1024**3


def _tree_pss(root: psutil.Process) -> int:
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            continue
    return total


def run_and_measure(cmd: list[str], env: dict | None = None, interval: float = 0.5) -> dict:
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    root = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_pss(root))
            stop.wait(interval)

    t0 = time.perf_counter()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rc = proc.wait()
    stop.set()
    thread.join()
    return {"returncode": rc, "wall_s": time.perf_counter() - t0, "peak_pss_gib": peak / GiB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="twodrl-bench-demo-"))
    cmd = [sys.executable, "-m", "jobs.online", args.config, "--run-dir", str(run_dir)]
    for o in args.overrides:
        cmd += ["--set", o]
    env = {**os.environ, "RAY_ADDRESS": ""}  # always a fresh local cluster we can measure
    env.pop("RAY_ADDRESS")
    result = run_and_measure(cmd, env=env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = rows[0]["eval/reward/weighted"], rows[-1]["eval/reward/weighted"]
    result.update({
        "config": args.config,
        "overrides": args.overrides,
        "rounds": len(rows),
        "eval_weighted_round0": first,
        "eval_weighted_last": last,
        "eval_gain": last - first,
        "run_dir": str(run_dir),
    })
    print(f"demo: rc={result['returncode']}  wall {result['wall_s']:.0f} s  peak memory {result['peak_pss_gib']:.2f} GiB "
          f"(all processes, PSS)  eval/reward/weighted {first:.3f} → {last:.3f} (gain {last - first:+.3f})")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0 if result["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
