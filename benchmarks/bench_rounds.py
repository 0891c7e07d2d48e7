"""Round time with synchronous vs overlapped scheduling, and the driver's own overhead.

One driver, one set of actors (the quickstart: vLLM rollout worker, 2D reward scorer,
judge pool, 2-rank DeepSpeed learner), one warm start (round 0, not timed). Then
``--rounds`` rounds with ``scheduling: sync`` followed by ``--rounds`` rounds with
``scheduling: overlap`` (the rollout of round k+1 runs while round k scores, trains,
syncs and evaluates), so both modes run on the same actors and a comparable policy.
The first overlapped round only fills the pipeline (its rollout is not overlapped) and
is left out of the overlap mean.

    python -m benchmarks.bench_rounds [--json PATH] [--rounds 3] [--set k=v ...]

Figures (means over the timed rounds):
- ``sync_round_s``, ``overlap_round_s``: wall time per round.
- ``stages_s``: per-stage time in the sync rounds (rollout, score, annotate, train,
  sync, eval, checkpoint); ``max_stage_s`` is the longest. Target:
  ``overlap_round_s ≤ 1.15 × max_stage_s``.
- ``overlap_bound_s``: what this overlap can reach at best, per overlapped round
  max(rollout, the other stages together), since only the rollout runs beside the rest.
- ``driver_overhead_frac``: in the sync rounds, the share of the round spent outside
  the stage calls (``time/driver_overhead_s`` / ``time/round_s``). Target < 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._setup import prepare_environment  # noqa: E402

prepare_environment()

STAGES = ("rollout", "score", "annotate", "train", "sync", "eval", "checkpoint")
# Small quickstart: a shorter warm start (its quality does not matter for timing).
SMALL = ["task.sft_examples=128", "scorer.rm_train_responses=128", "eval.num_prompts=12"]


def round_figures(sync_rows: list[dict], overlap_rows: list[dict]) -> dict:
    """The benchmark's figures from the driver's per-round metrics rows (pure)."""
    if not sync_rows or not overlap_rows:
        raise ValueError("round_figures: need at least one sync and one overlapped round")
    stages = {s: statistics.fmean(r.get(f"time/{s}_s") or 0.0 for r in sync_rows) for s in STAGES}
    sync_round = statistics.fmean(r["time/round_s"] for r in sync_rows)
    overlap_round = statistics.fmean(r["time/round_s"] for r in overlap_rows)
    overhead = statistics.fmean(r["time/driver_overhead_s"] for r in sync_rows)
    max_stage = max(stages.values())
    # Per overlapped round: the rollout (of the next round, in the background) against
    # everything else of this round, which still runs one stage after another.
    bound = statistics.fmean(
        max(r.get("time/rollout_s") or 0.0, sum(r.get(f"time/{s}_s") or 0.0 for s in STAGES if s != "rollout"))
        for r in overlap_rows
    )
    return {
        "sync_round_s": sync_round,
        "overlap_round_s": overlap_round,
        "max_stage_s": max_stage,
        "longest_stage": max(stages, key=stages.get),
        "stages_s": stages,
        "overlap_bound_s": bound,
        "overlap_over_max_stage": overlap_round / max_stage,
        "overlap_target_met": overlap_round <= 1.15 * max_stage,
        "overlap_speedup": sync_round / overlap_round,
        "driver_overhead_s": overhead,
        "driver_overhead_frac": overhead / sync_round,
        "driver_overhead_target_met": overhead / sync_round < 0.05,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_path", help="write the results here")
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (overlap runs one more to fill)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--run-dir", default=None)
    args = ap.parse_args(argv)

    import ray

    from jobs.driver import OnlineDriver
    from twodrl.config import load_config

    n_sync, n_overlap = args.rounds, args.rounds + 1
    # cfg.rounds sets how far the driver prefetches in overlap mode: never past the end.
    overrides = ["scheduling=sync", f"rounds={n_sync + n_overlap + 1}", "logging.wandb=false", "logging.plots=false",
                 "logging.progress=false", "logging.keep_checkpoints=1", *SMALL, *args.overrides]
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="twodrl-bench-rounds-"))
    driver = OnlineDriver(cfg, run_dir, progress=False)
    try:
        driver.setup()
        driver.run_round(0)
        sync_rows = [driver.run_round(r) for r in range(1, n_sync + 1)]
        driver.cfg.scheduling = "overlap"
        driver._pending = None
        overlap_rows = []
        for r in range(n_sync + 1, n_sync + n_overlap + 1):
            overlap_rows.append(driver.run_round(r, pending=driver._pending))
        if driver._pending is not None:
            driver._pending.result()  # the prefetched rollout of a round that will not run
    finally:
        driver.shutdown()
        ray.shutdown()
    fig = round_figures(sync_rows, overlap_rows[1:])
    result = {
        "config": args.config, "overrides": overrides, "rounds_per_mode": args.rounds, "run_dir": str(run_dir),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in fig.items()},
        "stages_s": {k: round(v, 4) for k, v in fig["stages_s"].items()},
        "sync_rounds_s": [round(r["time/round_s"], 3) for r in sync_rows],
        "overlap_rounds_s": [round(r["time/round_s"], 3) for r in overlap_rows],
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(f"rounds (quickstart, small): sync {fig['sync_round_s']:.2f} s   overlap {fig['overlap_round_s']:.2f} s   "
          f"(speedup {fig['overlap_speedup']:.2f}x)")
    print("  stages (sync): " + "  ".join(f"{k}={v:.2f}" for k, v in fig["stages_s"].items()))
    print(f"  longest stage {fig['longest_stage']} {fig['max_stage_s']:.2f} s; overlap / longest = "
          f"{fig['overlap_over_max_stage']:.2f} (target ≤ 1.15: {'met' if fig['overlap_target_met'] else 'missed'}); "
          f"best possible for this overlap {fig['overlap_bound_s']:.2f} s")
    print(f"  driver overhead {fig['driver_overhead_s'] * 1e3:.1f} ms/round = {100 * fig['driver_overhead_frac']:.2f}% "
          f"(target < 5%: {'met' if fig['driver_overhead_target_met'] else 'missed'})")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
