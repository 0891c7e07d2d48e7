"""``twodrl train-rm CONFIG``: train the 2D segment reward model (or DPA's sequence-level
multi-objective RM with ``scorer.mode=sequence``) and save it in Hugging Face format.

    twodrl train-rm configs/rm-quickstart.yaml [--set scorer.train_epochs=4] [--out DIR]

Data: ``scorer.train_synthetic_pairs`` records labelled by the synthetic task's rules,
the shipped HelpSteer-2D sample (``scorer.include_sample_data``) and any
``scorer.train_data`` files. Held out: ``scorer.eval_synthetic_pairs`` records drawn
with another seed, minus any response also in the training set, plus
``scorer.eval_data`` files. Writes ``OUT/`` (the checkpoint: config.json,
model.safetensors, tokenizer), ``OUT/train_metrics.jsonl`` (one line per epoch) and
``OUT/eval.json``, and prints the per-aspect evaluation table.

``scorer.model.path`` is a reward model to continue training, or any causal-LM
directory or hub name (Qwen2, Llama, Mistral …): the backbone then gets a fresh head
with one output per ``aspects.names`` entry (token classification, or sequence
classification with ``scorer.mode=sequence``), so what is saved loads with
``AutoModelForTokenClassification`` and rates the run's aspects by name.

``OUT`` is replaced whole, so it must be absent, empty or a reward model this command
wrote (it leaves ``twodrl_reward_model.json`` there); anything else is refused before
the model loads, unless ``--overwrite``, which moves it aside to ``OUT.previous-<time>``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from twodrl.config import ConfigError, RunConfig, load_config


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train the 2D segment reward model.")
    p.add_argument("config", metavar="CONFIG", help="RunConfig YAML (the scorer section is used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (dotted key), repeatable")
    p.add_argument("--out", help="checkpoint directory (default: scorer.output_dir or runs/<run_name>/reward_model)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out may be a non-empty directory train-rm did not write: it is moved aside to OUT.previous-<time>")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def output_dir(cfg: RunConfig) -> Path:
    if cfg.scorer.output_dir:
        return Path(cfg.scorer.output_dir)
    return Path("runs") / (cfg.run_name or "rm") / "reward_model"


def _weights_for(cfg: RunConfig, aspects: list[str]) -> list[float]:
    if list(cfg.aspects.names) == aspects:
        return list(cfg.aspects.weights)
    return [1.0 / len(aspects)] * len(aspects)


def _load_files(paths: list[str], aspects: list[str], what: str) -> list[Any]:
    from twodrl.data import load_records

    out = []
    for path in paths:
        try:
            out.extend(load_records(path, aspects=aspects).records)
        except Exception as e:  # DataError names file:line:field
            raise ConfigError(f"scorer.{what}: {e}") from None
    return out


def _key(rec: Any) -> set[tuple[str, str]]:
    d = rec.to_json() if hasattr(rec, "to_json") else rec
    return {(d["prompt"], d[side]["text"]) for side in ("chosen", "rejected")}


def build_datasets(cfg: RunConfig, aspects: list[str], log=print) -> tuple[list[Any], list[Any]]:
    """(train records, held-out records) for the RM, as described in the module doc."""
    from twodrl import synthetic
    from twodrl.data import SAMPLE_PATH, DataError, load_records

    sc = cfg.scorer
    weights = _weights_for(cfg, aspects)
    train: list[Any] = synthetic.make_preference_records(sc.train_synthetic_pairs, seed=cfg.seed, aspects=aspects, weights=weights)
    n_syn = len(train)
    n_sample = 0
    if sc.include_sample_data and SAMPLE_PATH.is_file():
        try:
            sample = load_records(SAMPLE_PATH, aspects=aspects).records
            train += sample
            n_sample = len(sample)
        except DataError as e:  # the sample does not rate these aspects
            log(f"note: shipped sample not used ({e})")
    extra = _load_files(list(sc.train_data), aspects, "train_data")
    train += extra
    seen = set().union(*(_key(r) for r in train)) if train else set()
    held = synthetic.make_preference_records(
        sc.eval_synthetic_pairs, seed=cfg.seed + 1000, aspects=aspects, weights=weights
    )
    held = [r for r in held if not (_key(r) & seen)]
    held += _load_files(list(sc.eval_data), aspects, "eval_data")
    random.Random(cfg.seed).shuffle(train)
    log(
        f"data: train {len(train)} records ({n_syn} synthetic, {n_sample} sample, {len(extra)} from files), "
        f"held-out {len(held)} records"
    )
    return train, held


def main(argv: list[str], prog: str = "twodrl train-rm") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    from twodrl.rundir import RunDirError, check_output_dir

    out = Path(args.out) if args.out else output_dir(cfg)
    try:
        # Before the model loads: the save replaces the whole directory, so a wrong
        # --out must stop the command before any time is spent.
        moved = check_output_dir(out, overwrite=args.overwrite)
    except RunDirError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if moved is not None:
        print(f"moved the previous contents of {out} to {moved}")
    import torch

    from twodrl.models.loading import load_reward_model, load_tokenizer, save_pretrained_safe
    from twodrl.models.reward_model import aspect_names, evaluate, format_eval_table, train_reward_model

    torch.manual_seed(cfg.seed)
    progress = cfg.logging.progress and not args.no_progress
    sc = cfg.scorer
    # A causal-LM backbone gets a fresh head named after aspects.names; a reward model
    # must already rate exactly those aspects.
    model = load_reward_model(sc.model, mode=sc.mode, aspects=list(cfg.aspects.names))
    tok = load_tokenizer(sc.model)
    aspects = aspect_names(model)
    try:
        train, held = build_datasets(cfg, aspects)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {sc.model.path} ({type(model).__name__}, {n_params / 1e6:.2f}M parameters), aspects {aspects}")
    lines: list[dict] = []
    t0 = time.time()
    stats = train_reward_model(model, tok, train, sc, progress=progress, seed=cfg.seed, log=lines.append)
    train_s = time.time() - t0
    from twodrl.rundir import REWARD_MODEL_MARKER, reward_model_marker

    # The marker lets a later train-rm replace this directory without --overwrite.
    marker = reward_model_marker(aspects, base_model=sc.model.path, mode=sc.mode)
    save_pretrained_safe(model, tok, out, extra_files={REWARD_MODEL_MARKER: marker})
    # Metrics next to (not inside) the checkpoint dir contents that loaders read.
    with open(out / "train_metrics.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    print(f"trained in {train_s:.0f}s ({stats.get('rm/step', 0)} steps, final epoch MSE {stats.get('rm/epoch_mse', float('nan')):.3f}); saved {out}")
    if not args.no_eval and held:
        result = evaluate(model, tok, held, progress=progress, max_length=sc.model.max_length)
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        print(format_eval_table(result))
    return 0
