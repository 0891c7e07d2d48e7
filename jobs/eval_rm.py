"""``twodrl eval-rm CONFIG``: evaluate a trained reward model per aspect on held-out data.

    twodrl eval-rm configs/rm-quickstart.yaml [--checkpoint DIR] [--json OUT.json]

The held-out set is the one ``train-rm`` builds from the same config (synthetic
records from another seed, minus anything in training, plus ``scorer.eval_data``).
Prints, per aspect: rounded accuracy (the 2D-DPO paper's metric), the majority-label
baseline accuracy beside it, MSE and Spearman correlation. Exit status 0; 1 when an
aspect does not beat its majority baseline and ``--require-above-baseline`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from twodrl.config import ConfigError, ModelConfig, load_config


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Evaluate the 2D reward model per aspect.")
    p.add_argument("config", metavar="CONFIG", help="RunConfig YAML (the scorer section is used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (dotted key), repeatable")
    p.add_argument("--checkpoint", help="reward model directory (default: where train-rm saves it)")
    p.add_argument("--json", help="also write the per-aspect results to this JSON file")
    p.add_argument("--require-above-baseline", action="store_true",
                   help="exit 1 unless every aspect's accuracy beats its majority baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str], prog: str = "twodrl eval-rm") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    from jobs.train_rm import build_datasets, output_dir
    from twodrl.models.loading import load_reward_model, load_tokenizer
    from twodrl.models.reward_model import aspect_names, evaluate, format_eval_table

    ckpt = Path(args.checkpoint) if args.checkpoint else output_dir(cfg)
    if not (ckpt / "config.json").is_file():
        print(f"{prog}: no reward model checkpoint at {ckpt} (run `twodrl train-rm {args.config}` or pass --checkpoint)",
              file=sys.stderr)
        return 2
    mcfg = ModelConfig(path=str(ckpt), dtype=cfg.scorer.model.dtype, trust_remote_code=cfg.scorer.model.trust_remote_code,
                       max_length=cfg.scorer.model.max_length)
    model = load_reward_model(mcfg, mode=cfg.scorer.mode, aspects=list(cfg.aspects.names))
    tok = load_tokenizer(mcfg)
    try:
        _, held = build_datasets(cfg, aspect_names(model))
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    progress = cfg.logging.progress and not args.no_progress
    result = evaluate(model, tok, held, progress=progress, max_length=mcfg.max_length)
    print(f"reward model {ckpt} on {len(held)} held-out records:")
    print(format_eval_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    below = [a for a, d in result.items() if not d["accuracy"] > d["majority_accuracy"]]
    if below:
        print(f"not above the majority baseline: {', '.join(below)}")
        if args.require_above_baseline:
            return 1
    return 0
