"""``twodrl train-rm CONFIG``: train the 2D segment reward model (or DPA's sequence-level
multi-objective RM with ``scorer.mode=sequence``) and save it in Hugging Face format.

    twodrl train-rm configs/rm-quickstart.yaml [--set scorer.train_epochs=4] [--out DIR]

Data: ``scorer.train_synthetic_pairs`` records labelled by the synthetic task's rules,
the shipped HelpSteer-2D sample (``scorer.include_sample_data``) and any
``scorer.train_data`` files. Held out: ``scorer.eval_synthetic_pairs`` records drawn
with another seed, minus any response also in the training set, plus
``scorer.eval_data`` files. Writes ``OUT/`` (the checkpoint: config.json,
model.safetensors, tokenizer), ``OUT/metrics.jsonl`` and ``OUT/train_metrics.jsonl``
(one line per epoch, with and without the held-out metrics) and ``OUT/eval.json`` (the
final model's), and prints the per-aspect evaluation table.

``scorer.model.path`` is a reward model to continue training, or any causal-LM
directory or hub name (Qwen2, Llama, Mistral …): the backbone then gets a fresh head
with one output per ``aspects.names`` entry (token classification, or sequence
classification with ``scorer.mode=sequence``), so what is saved loads with
``AutoModelForTokenClassification`` and rates the run's aspects by name.

Ranks: ``scorer.train_ranks`` > 1 trains on that many DeepSpeed ranks (ZeRO
``scorer.train_zero_stage``; :mod:`actors.reward_learner`), each taking its share of
every batch, with the same loss curve as one process; 1 trains in this process.

After every epoch: the held-out evaluation (rounded accuracy and MSE per aspect) is
appended to ``OUT/metrics.jsonl`` with the epoch's training metrics, and the model,
optimizer and schedule are checkpointed atomically to ``OUT/checkpoints/epoch-000K``
(the newest one is kept). ``--resume`` continues an interrupted run from there, with
the same data order and learning rate as if it had not stopped; the settings that
decide those must not change. The final save replaces ``OUT`` and drops the
checkpoints.

``OUT`` is replaced whole, so it must be absent, empty or a reward model this command
wrote (it leaves ``twodrl_reward_model.json`` there); anything else is refused before
the model loads, unless ``--overwrite``, which moves it aside to ``OUT.previous-<time>``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
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
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last epoch checkpoint (OUT/checkpoints)")
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


CHECKPOINTS = "checkpoints"  # OUT/checkpoints/epoch-000K while training


def checkpoint_dir(out: Path, epoch: int) -> Path:
    return out / CHECKPOINTS / f"epoch-{epoch:04d}"


def latest_epoch_checkpoint(out: Path) -> tuple[int, Path] | None:
    """The newest complete epoch checkpoint under ``OUT/checkpoints`` (crash leftovers
    of an interrupted write are put right first), or None."""
    from twodrl.checkpoint import recover_directory

    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    for name in {c.name.lstrip(".").split(".")[0] for c in root.iterdir() if c.name.startswith(".")}:
        recover_directory(root / name)
    found = sorted(
        (int(c.name.split("-")[1]), c) for c in root.iterdir()
        if c.name.startswith("epoch-") and c.name.split("-")[1].isdigit() and (c / "state.json").is_file()
    )
    return found[-1] if found else None


def _fingerprint(cfg: RunConfig, n_examples: int, ranks: int) -> dict[str, Any]:
    """What must not change between a checkpoint and its resume: the data order and
    learning-rate schedule depend on all of it, the optimizer shards on ``ranks``."""
    sc = cfg.scorer
    return {"examples": n_examples, "train_batch_size": sc.train_batch_size, "train_epochs": sc.train_epochs,
            "seed": cfg.seed, "ranks": ranks, "mode": sc.mode, "base_model": sc.model.path}


def _eval_line(result: dict[str, dict[str, float]]) -> dict[str, float]:
    """Held-out metrics for metrics.jsonl: rounded accuracy and MSE per aspect, and the
    MSE over all labelled cells."""
    import math

    line = {}
    for a, d in result.items():
        line[f"eval/{a}/accuracy"] = d["accuracy"]
        line[f"eval/{a}/mse"] = d["mse"]
    n = sum(d["n"] for d in result.values())
    if n:
        line["eval/mse"] = sum(d["mse"] * d["n"] for d in result.values() if d["n"] and not math.isnan(d["mse"])) / n
    return line


class _InProcess:
    """One-process training (``scorer.train_ranks`` = 1): the plain torch loop."""

    def __init__(self, cfg: RunConfig, train: list, progress: bool, resume_dir: Path | None):
        from dataclasses import replace

        import torch

        from twodrl.models.loading import load_reward_model, load_tokenizer

        sc = cfg.scorer
        self.cfg, self.train, self.progress = cfg, train, progress
        self.state = None
        path = sc.model.path
        if resume_dir is not None:
            path = str(resume_dir / "trainer" / "reward_model")
            self.state = torch.load(resume_dir / "trainer" / "optimizer.pt", weights_only=True)
        torch.manual_seed(cfg.seed)
        self.model = load_reward_model(replace(sc.model, path=path), mode=sc.mode, aspects=list(cfg.aspects.names))
        self.tok = load_tokenizer(sc.model)
        if self.state is not None:
            torch.set_rng_state(self.state["torch_rng"])
        n_params = sum(p.numel() for p in self.model.parameters())
        print(f"model: {sc.model.path} ({type(self.model).__name__}, {n_params / 1e6:.2f}M parameters), "
              f"aspects {list(cfg.aspects.names)}")

    def run(self, on_epoch: Any) -> dict[str, float]:
        import torch

        from twodrl.models.reward_model import train_reward_model

        def epoch_end(epoch: int, state: dict) -> None:
            on_epoch(epoch, self._pending[-1], lambda tmp: self._save_trainer(tmp, state, torch))

        self._pending: list[dict] = []
        return train_reward_model(self.model, self.tok, self.train, self.cfg.scorer, progress=self.progress,
                                  seed=self.cfg.seed, log=self._pending.append, resume=self.state,
                                  on_epoch_end=epoch_end)

    def _save_trainer(self, tmp: Path, state: dict, torch: Any) -> None:
        from twodrl.models.loading import save_pretrained_safe

        save_pretrained_safe(self.model, self.tok, tmp / "reward_model")
        torch.save({**state, "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")

    def evaluate(self, held: list) -> dict:
        from twodrl.models.reward_model import evaluate

        return evaluate(self.model, self.tok, held, progress=self.progress, max_length=self.cfg.scorer.model.max_length)

    def save(self, out: Path, extra_files: dict[str, str]) -> None:
        from twodrl.models.loading import save_pretrained_safe

        save_pretrained_safe(self.model, self.tok, out, extra_files=extra_files)


class _Group:
    """``scorer.train_ranks`` > 1: the DeepSpeed group of :mod:`actors.reward_learner`."""

    def __init__(self, cfg: RunConfig, train: list, progress: bool, resume_dir: Path | None):
        from dataclasses import replace

        from actors.common import run_namespace
        from actors.reward_learner import RewardLearnerGroup
        from jobs.driver import connect_ray

        sc = cfg.scorer
        self.cfg, self.progress = cfg, progress
        # connect_ray tells the actors which DeepSpeed accelerator to use from the
        # learner's GPUs; here the ranks are the reward model's.
        ray_cfg = replace(cfg, learner=replace(cfg.learner, num_gpus_per_rank=sc.train_num_gpus_per_rank))
        connect_ray(ray_cfg, namespace=run_namespace(cfg))
        print(f"model: {sc.model.path} on {sc.train_ranks} DeepSpeed ranks (ZeRO-{sc.train_zero_stage}), "
              f"aspects {list(cfg.aspects.names)}")
        self.group = RewardLearnerGroup(cfg, train)
        if resume_dir is not None:
            self.group.load_checkpoint(str(resume_dir / "trainer"))

    def run(self, on_epoch: Any) -> dict[str, float]:
        from tqdm.auto import tqdm

        g = self.group
        bar = tqdm(total=g.total_steps, initial=g.step, desc="train-rm", disable=not self.progress, dynamic_ncols=True)
        stats: dict[str, float] = {}
        try:
            while g.epochs_done < len(g.plan):
                stats = g.train_epoch(progress=bar.update)
                on_epoch(g.epochs_done, stats, lambda tmp: g.save_checkpoint(str(tmp)))
        finally:
            bar.close()
        return stats

    def evaluate(self, held: list) -> dict:
        return self.group.evaluate(held)

    def save(self, out: Path, extra_files: dict[str, str]) -> None:
        self.group.save_pretrained(str(out), extra_files=extra_files)

    def close(self) -> None:
        self.group.shutdown()


def main(argv: list[str], prog: str = "twodrl train-rm") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    from twodrl.rundir import RunDirError, check_output_dir

    out = Path(args.out) if args.out else output_dir(cfg)
    resume_from = None
    if args.resume:
        if args.overwrite:
            print(f"{prog}: error: --resume and --overwrite exclude each other", file=sys.stderr)
            return 2
        resume_from = latest_epoch_checkpoint(out)
        if resume_from is None:
            print(f"{prog}: error: --resume: no epoch checkpoint under {out / CHECKPOINTS} "
                  f"(a finished train-rm keeps none); start without --resume", file=sys.stderr)
            return 2
    else:
        try:
            # Before the model loads: the save replaces the whole directory, so a wrong
            # --out must stop the command before any time is spent.
            moved = check_output_dir(out, overwrite=args.overwrite)
        except RunDirError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        if moved is not None:
            print(f"moved the previous contents of {out} to {moved}")
        # An interrupted earlier run's epochs belong to another training: not resumed.
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    import torch

    from twodrl.checkpoint import atomic_directory, atomic_write_text, verify_manifest
    from twodrl.models.reward_model import examples_from_records, format_eval_table
    from twodrl.rundir import REWARD_MODEL_MARKER, reward_model_marker

    torch.manual_seed(cfg.seed)
    progress = cfg.logging.progress and not args.no_progress
    sc = cfg.scorer
    aspects = list(cfg.aspects.names)
    try:
        train, held = build_datasets(cfg, aspects)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    fingerprint = _fingerprint(cfg, len(examples_from_records(train, aspects, sc.mode)), sc.train_ranks)
    lines: list[dict] = []
    resume_dir = None
    if resume_from is not None:
        epoch, resume_dir = resume_from
        verify_manifest(resume_dir)
        state = json.loads((resume_dir / "state.json").read_text())
        changed = {k: (state["fingerprint"].get(k), v) for k, v in fingerprint.items() if state["fingerprint"].get(k) != v}
        if changed:
            shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            print(f"{prog}: error: --resume: {resume_dir} was trained with other settings ({shown}); "
                  f"resume with the same ones or start without --resume", file=sys.stderr)
            return 2
        lines = list(state["metrics"])
        print(f"resuming after epoch {epoch} from {resume_dir}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / REWARD_MODEL_MARKER).is_file():
        # An interrupted run's OUT (checkpoints, no model yet) stays one train-rm may
        # resume or replace.
        atomic_write_text(out / REWARD_MODEL_MARKER, reward_model_marker(aspects, base_model=sc.model.path, mode=sc.mode))
    trainer = (_Group if sc.train_ranks > 1 else _InProcess)(cfg, train, progress, resume_dir)
    last_eval: dict = {}

    def on_epoch(epoch: int, stats: dict, write_trainer) -> None:
        """Held-out evaluation, metrics.jsonl and an atomic checkpoint after every epoch."""
        nonlocal last_eval
        line = {"epoch": epoch, **{k: v for k, v in stats.items() if isinstance(v, (int, float))}}
        if not args.no_eval and held:
            last_eval = trainer.evaluate(held)
            line.update(_eval_line(last_eval))
        lines.append(line)
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
        with atomic_directory(checkpoint_dir(out, epoch)) as tmp:
            write_trainer(tmp / "trainer")
            (tmp / "state.json").write_text(json.dumps({"epoch": epoch, "fingerprint": fingerprint, "metrics": lines}))
        # Only the newest epoch is needed to resume; optimizer states are large.
        for old in (out / CHECKPOINTS).glob("epoch-*"):
            if old.name != checkpoint_dir(out, epoch).name:
                shutil.rmtree(old, ignore_errors=True)

    t0 = time.time()
    try:
        stats = trainer.run(on_epoch)
        train_s = time.time() - t0
        if not last_eval and held and not args.no_eval:
            last_eval = trainer.evaluate(held)  # resumed after the last epoch's checkpoint
        # The marker lets a later train-rm replace this directory without --overwrite.
        marker = reward_model_marker(aspects, base_model=sc.model.path, mode=sc.mode)
        train_lines = [{k: v for k, v in x.items() if not k.startswith("eval/")} for x in lines]
        extra = {
            REWARD_MODEL_MARKER: marker,
            "metrics.jsonl": "".join(json.dumps(x) + "\n" for x in lines),
            # Metrics next to (not inside) the checkpoint dir contents that loaders read.
            "train_metrics.jsonl": "".join(json.dumps(x) + "\n" for x in train_lines),
        }
        if last_eval:
            extra["eval.json"] = json.dumps(last_eval, indent=2)
        # Replaces OUT whole: the epoch checkpoints go with it once the model is saved.
        trainer.save(out, extra)
    finally:
        if hasattr(trainer, "close"):
            trainer.close()
    final = lines[-1] if lines else stats
    print(f"trained in {train_s:.0f}s ({final.get('rm/step', 0)} steps, final epoch MSE "
          f"{final.get('rm/epoch_mse', float('nan')):.3f}); saved {out}")
    if last_eval:
        print(format_eval_table(last_eval))
    return 0
