"""The main job: ``twodrl run CONFIG`` and, for clusters,
``ray job submit --working-dir . -- python -m jobs.online CONFIG``.

Joins the Ray cluster named by ``RAY_ADDRESS`` (or ``ray.address``), else starts a
local one. Everything that can be checked before an actor starts is checked first:
the config (unknown keys, types, aspect weights) and the prompt dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from twodrl.config import ConfigError, RunConfig, load_config


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set learner.beta=0.5 (repeatable)")
    parser.add_argument("--run-dir", help="where metrics, checkpoints and plots go (default: runs/<name>)")
    parser.add_argument("--resume", action="store_true", help="continue after the last completed round in --run-dir")
    return parser


def preflight(cfg: RunConfig, source: str) -> None:
    """Checks that need no actor: a prompt dataset that does not load is reported now,
    naming its file, line and field."""
    if cfg.task.dataset:
        from twodrl.data import load_records

        load_records(cfg.task.dataset, aspects=cfg.aspects.names, strict=True)


def main(argv: list[str] | None = None, prog: str = "twodrl run") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg, args.config)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or Path("runs") / (cfg.run_name or f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if args.resume and not run_dir.is_dir():
        print(f"error: --resume: run directory {run_dir} does not exist", file=sys.stderr)
        return 2
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cfg.learner.num_gpus_per_rank == 0 else "cuda")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from jobs.driver import OnlineDriver

    driver = OnlineDriver(cfg, run_dir, resume=args.resume)
    try:
        driver.setup()
        rows = driver.run()
    finally:
        driver.shutdown()
    if rows:
        last = rows[-1]
        print(f"[twodrl] done: {len(rows)} round(s) in {run_dir}; last eval/reward/weighted = {last.get('eval/reward/weighted')}")
    print(f"[twodrl] metrics: {run_dir / 'metrics.jsonl'}  plot: {run_dir / 'plots' / 'rewards.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m jobs.online"))
