"""``twodrl validate CONFIG_OR_DATASET``: check a run config or a HelpSteer-2D dataset
without starting anything.

A ``.yaml``/``.yml`` file is read as a :class:`twodrl.config.RunConfig` (with
``--set`` overrides); the prompt, eval and SFT datasets its task names are read row by
row too (a hub name this machine cannot reach is reported as not checked, plainly). Anything else is read as a dataset (JSONL, Parquet, a
saved ``datasets`` directory or a hub name). The command prints ``OK: ...`` and exits 0,
or prints the one error (file:line and field) and exits 1. ``--all`` reports every bad
record instead of stopping at the first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twodrl.aspects import ASPECT_SETS

CONFIG_SUFFIXES = (".yaml", ".yml")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Check a run config or a HelpSteer-2D dataset without starting anything."
    )
    p.add_argument("target", metavar="CONFIG_OR_DATASET", help="a RunConfig YAML file, or a dataset path / hub name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (dotted key), repeatable")
    p.add_argument("--kind", choices=("auto", "config", "dataset"), default="auto",
                   help="what TARGET is (default: by file extension)")
    p.add_argument("--layout", choices=("helpsteer2d", "seed004"), default="helpsteer2d",
                   help="dataset layout: HelpSteer-2D records, or per-aspect sentence lists (seed-004 appendix)")
    p.add_argument("--aspects", default=None,
                   help=f"aspects every response must rate: a set name ({', '.join(ASPECT_SETS)}) or a comma list")
    p.add_argument("--split", default="train", help="split for saved/hub datasets (default: train)")
    p.add_argument("--skip-dataset", action="store_true",
                   help="for a config: do not load its task.dataset (e.g. it lives on the cluster)")
    p.add_argument("--all", action="store_true", help="check every record and list all errors")
    p.add_argument("--max-errors", type=int, default=20, help="errors to print with --all (default: 20)")
    return p


def _aspects(spec: str | None, layout: str) -> tuple[str, ...]:
    if spec is None:
        return ASPECT_SETS["helpsteer" if layout == "seed004" else "2d"]
    if spec in ASPECT_SETS:
        return ASPECT_SETS[spec]
    return tuple(a.strip() for a in spec.split(",") if a.strip())


def _check_dataset(target: str, aspects, layout: str, split: str, report_all: bool, max_errors: int) -> int:
    from twodrl.data import DataError, load_records, load_seed004_layout

    try:
        if layout == "seed004":
            result = load_seed004_layout(target, aspects=aspects, strict=not report_all, progress=sys.stderr.isatty())
        else:
            result = load_records(target, aspects=aspects, strict=not report_all, split=split, progress=sys.stderr.isatty())
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.skipped:
        for msg in result.errors[:max_errors]:
            print(f"error: {msg}", file=sys.stderr)
        more = len(result.errors) - max_errors
        if more > 0:
            print(f"... and {more} more", file=sys.stderr)
        print(f"FAILED: {target}: {result.skipped} bad record(s), {len(result.records)} good", file=sys.stderr)
        return 1
    if not result.records:
        print(f"error: {target}: no records", file=sys.stderr)
        return 1
    segs = [r.chosen.num_segments for r in result.records] + [r.rejected.num_segments for r in result.records]
    print(
        f"OK: {target}: {len(result.records)} records, aspects {list(aspects)}, "
        f"{sum(segs) / len(segs):.1f} segments per response (max {max(segs)})"
    )
    return 0


def main(argv: list[str], prog: str = "twodrl validate") -> int:
    args = _parser(prog).parse_args(argv)
    target = args.target
    kind = args.kind
    if kind == "auto":
        kind = "config" if Path(target).suffix.lower() in CONFIG_SUFFIXES else "dataset"
    if kind == "dataset" and args.overrides:
        print("error: --set applies to configs only", file=sys.stderr)
        return 2
    if kind == "dataset":
        aspects = _aspects(args.aspects, args.layout)
        return _check_dataset(target, aspects, args.layout, args.split, args.all, args.max_errors)

    from twodrl.config import ConfigError, load_config

    try:
        cfg = load_config(target, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from twodrl.config import OfflineConfig

    if isinstance(cfg, OfflineConfig):
        print(f"OK: {target}: offline training config (twodrl train), algorithm {cfg.algorithm}, "
              f"data {cfg.data.train}, policy {cfg.policy.path}")
        return 0
    print(
        f"OK: {target}: algorithm {cfg.algorithm}, {cfg.rounds} rounds, policy {cfg.policy.path}, "
        f"aspects {dict(zip(cfg.aspects.names, cfg.aspects.weights))}"
    )
    if not args.skip_dataset:
        return _check_task_data(cfg)
    return 0


def _check_task_data(cfg) -> int:
    """Every dataset a config's task names, read with the config's field names."""
    from twodrl.data import DataError
    from twodrl.tasks import load_prompts, load_sft_examples

    t = cfg.task
    if t.name == "synthetic":
        if t.dataset or t.eval_dataset or t.sft_dataset:
            print("error: task.dataset / eval_dataset / sft_dataset are set but task.name is 'synthetic'; "
                  "set task.name=dataset to use them", file=sys.stderr)
            return 1
        return 0
    if not t.dataset:
        print("error: task.name is 'dataset' but task.dataset names no prompt dataset", file=sys.stderr)
        return 1
    status = 0
    for field, source, split in (("task.dataset", t.dataset, t.split), ("task.eval_dataset", t.eval_dataset, t.eval_split),
                                 ("task.sft_dataset", t.sft_dataset, t.sft_split)):
        if not source:
            continue
        local = Path(source).expanduser().exists()
        try:
            if field == "task.sft_dataset":
                n, what = len(load_sft_examples(source, split, t.prompt_field, t.messages_field)), "SFT examples"
            else:
                prompts = load_prompts(source, split, t.prompt_field, t.messages_field)
                n = len(prompts)
                what = f"prompts ({sum(1 for p in prompts if p.history)} multi-turn)"
            print(f"OK: {field} {source}[{split}]: {n} {what}")
        except DataError as e:
            if not local and "cannot load with datasets" in str(e):
                # A hub name: nothing here says whether it exists or what its columns are.
                print(f"NOT CHECKED: {field} {source}[{split}] is not a local path and could not be loaded from "
                      f"here ({e}); its columns ({t.prompt_field!r} or {t.messages_field!r}) are checked when the "
                      "job loads it on the cluster")
            else:
                print(f"error: {e}", file=sys.stderr)
                status = 1
    return status
