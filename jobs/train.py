"""Offline preference training: ``twodrl train CONFIG`` and, for clusters,
``ray job submit --working-dir . -- python -m jobs.train CONFIG``.

Trains the policy on a preference dataset (HelpSteer-2D, HelpSteer2, TRL preference /
UltraFeedback; see ``twodrl convert``) with any preference loss on the DeepSpeed learner
group of the online job. The run directory holds:

  config.yaml, metrics.jsonl (one row per logged step: ``step``, ``epoch``, ``train/*``,
      and ``eval/*`` on eval steps), wandb/ (offline unless WANDB_API_KEY is set)
  reference_logps/{train,eval}.safetensors   reference log-probs computed once
      (``train.precompute_reference``)
  checkpoints/round-NNNN/   every ``train.save_every_steps`` (NNNN = optimizer step):
      DeepSpeed state (optimizer, scheduler), the HF policy (with ``learner.lora``: the
      adapter only), the step and RNG states
  final/   the trained policy in Hugging Face format (safetensors + tokenizer); with
      ``learner.lora`` the merged weights, and the adapter alone in final/adapter/

``--resume`` continues from the newest checkpoint with the same data order, so a run
killed at any point ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from twodrl.config import ConfigError, OfflineConfig, load_config

# Fields whose change on --resume would make the continued run another experiment (on
# top of twodrl.rundir's own list): the data, the step plan and the losses' inputs.
OFFLINE_BLOCKING = ("data", "train.epochs", "train.max_steps", "train.precompute_reference",
                    "learner.micro_batch_size", "learner.grad_accum_steps", "learner.num_ranks",
                    "learner.lr", "learner.lr_schedule", "learner.warmup_ratio", "learner.sft_coef",
                    "learner.lora")


def build_parser(prog: str) -> argparse.ArgumentParser:
    from jobs.online import run_parser

    return run_parser(prog, __doc__.splitlines()[0], "YAML offline config (see configs/offline-quickstart.yaml)",
                      "continue from the newest checkpoint in --run-dir")


def _check_offline_resume(run_dir: Path, new_config: dict) -> None:
    import yaml

    from twodrl.rundir import RunDirError, diff_run_configs

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    blocking, _ = diff_run_configs(saved, new_config, OFFLINE_BLOCKING)
    if blocking:
        raise RunDirError(
            f"--resume: the config changes fields that define the run in {run_dir}: {'; '.join(blocking)}; "
            f"resume with the config it started with ({saved_path}), or start a new run (--overwrite)"
        )


def main(argv: list[str] | None = None, prog: str = "twodrl train") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=OfflineConfig)
        from twodrl.data import DataError
        from twodrl.offline import load_offline_data

        try:
            train, held, info = load_offline_data(cfg)
        except DataError as e:
            raise ConfigError(str(e)) from None
        # (With learner.lora every rank holds the reference: its own base weights.)
        if cfg.algorithm in ("tdpo1", "tdpo2") and not cfg.learner.colocate_reference and not cfg.learner.lora.enabled:
            raise ConfigError(f"{args.config}: algorithm {cfg.algorithm} needs the reference's full distribution on "
                              "every rank: set learner.colocate_reference=true")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jobs.online import claim_run_dir
    from twodrl.rundir import RunDirError

    try:
        run_dir, new_config, lock, log = claim_run_dir(cfg, args, argv, default_name=f"offline-{cfg.algorithm}")
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if args.resume:
            _check_offline_resume(run_dir, new_config)
    except RunDirError as e:
        lock.release()
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in log:
        print(f"[twodrl] {line}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cfg.learner.num_gpus_per_rank == 0 else "cuda")
    from jobs.driver import quiet_driver_loggers
    from jobs.online import _print_actor_logs

    quiet_driver_loggers(args.verbose)
    if not args.verbose:
        print(f"[twodrl] actor logs: {run_dir / 'logs'}/<actor>.log (--verbose shows them here)", flush=True)
    trainer = OfflineTrainer(cfg, run_dir, train, held, info, resume=args.resume, verbose=args.verbose)
    try:
        trainer.setup()
        final = trainer.run()
    except Exception as e:
        _print_actor_logs(run_dir, e, args.verbose)  # a learner rank that died says why in its log
        raise
    finally:
        trainer.shutdown()
        lock.release()
    print(f"[twodrl] done: {trainer.step} step(s); final policy in {final}")
    print(f"[twodrl] metrics: {run_dir / 'metrics.jsonl'}")
    return 0


class OfflineTrainer:
    """The driver of one offline run: owns the step plan, the reference cache, eval,
    checkpoints and metrics; the learner group does the math."""

    def __init__(self, cfg: OfflineConfig, run_dir: Path, train: list[dict], held: list[dict], info: dict,
                 resume: bool = False, verbose: bool = False):
        from twodrl.offline import StepPlan, records_fingerprint, to_run_config

        self.cfg = cfg
        self.run_cfg = to_run_config(cfg)
        self.run_dir = Path(run_dir)
        self.train, self.held, self.info = train, held, info
        self.resume = resume
        self.verbose = verbose  # False: learner output goes to RUN_DIR/logs/<actor>.log
        lc = cfg.learner
        self.plan = StepPlan(len(train), lc.num_ranks, lc.micro_batch_size, lc.grad_accum_steps, cfg.train.epochs,
                             cfg.train.max_steps, cfg.seed)
        self.fingerprint = records_fingerprint(train)
        self.step = 0
        self.group = None
        self.logger = None
        self._wandb = None
        self.ref_train = self.ref_eval = None
        self._logged_info = False

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        import random

        import ray

        from jobs.driver import connect_ray
        from twodrl.checkpoint import latest_checkpoint, read_driver_state
        from twodrl.config import dump_config
        from twodrl.tracking import MetricsLogger

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not (self.resume and (self.run_dir / "config.yaml").exists()):
            dump_config(self.cfg, self.run_dir / "config.yaml")
        namespace = f"twodrl-{self.cfg.run_name}"
        address = connect_ray(self.run_cfg, namespace=namespace, log_dir=None if self.verbose else self.run_dir / "logs")
        (self.run_dir / "ray.json").write_text(json.dumps({"address": address, "namespace": namespace,
                                                           "run_name": self.cfg.run_name}, indent=2))
        from actors.learner import PolicyLearnerGroup

        self.group = PolicyLearnerGroup(self.run_cfg, namespace=namespace, total_steps=self.plan.total_steps)
        self._ray = ray
        random.seed(self.cfg.seed)
        last = latest_checkpoint(self.run_dir) if self.resume else None
        if last is not None:
            step, path = last
            state = read_driver_state(path)  # restores the driver's RNG
            if state.get("fingerprint") != self.fingerprint:
                raise RuntimeError(f"{path}: the checkpoint was made on other training data; start a new run")
            self.group.load_checkpoint(str(path / "learner"))
            from safetensors.torch import load_file

            ranks = load_file(str(path / "rank_rng.safetensors"))
            self.group.set_rank_rng_states([ranks[f"rank{k}"] for k in range(self.group.world_size)])
            self.step = int(state["step"])
            from twodrl.offline import truncate_metrics_by_step

            truncate_metrics_by_step(self.run_dir / "metrics.jsonl", self.step)
            print(f"[twodrl] resumed after step {self.step} from {path}", flush=True)
        self.logger = MetricsLogger(self.run_dir, self.cfg.aspects.names, use_wandb=False)
        if self.cfg.logging.wandb:
            self._wandb = _start_wandb(self.cfg, self.run_dir, self.resume)
        self._reference()

    def _reference(self) -> None:
        """Cache the reference log-probs (or keep the reference model beside the
        policy); TDPO reads reference logits every step, so it always keeps it."""
        from tqdm.auto import tqdm

        from twodrl.models.loading import resolve_model_path
        from twodrl.offline import (
            REFERENCE_DIR, load_reference_cache, records_fingerprint, reference_fingerprint, save_reference_cache,
        )

        if not self.cfg.train.precompute_reference:
            return
        if self.cfg.algorithm in ("tdpo1", "tdpo2"):
            print("[twodrl] train.precompute_reference: TDPO needs the reference's logits every step; "
                  "the reference model stays loaded", flush=True)
            return
        ref_path = resolve_model_path((self.cfg.reference or self.cfg.policy).path)
        for name, records in (("train", self.train), ("eval", self.held)):
            if not records:
                continue
            fp = reference_fingerprint(records_fingerprint(records), ref_path, self.cfg.policy.max_length,
                                       resolve_model_path(self.cfg.policy.path))
            path = self.run_dir / REFERENCE_DIR / f"{name}.safetensors"
            cached = load_reference_cache(path, fp)
            if cached is None:
                bar = tqdm(total=len(records), desc=f"reference log-probs ({name})", unit="pair",
                           disable=not self.cfg.logging.progress)
                cached = self.group.offline_reference_logps(records, progress=bar.update)
                bar.close()
                save_reference_cache(path, cached, fp)
            setattr(self, f"ref_{name}", cached)
        self.group.release_reference()

    # ------------------------------------------------------------------ the loop

    def run(self) -> Path:
        from tqdm.auto import tqdm

        t = self.cfg.train
        total = self.plan.total_steps
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", disable=not self.cfg.logging.progress)
        while self.step < total:
            # Run up to the next step that logs, evaluates or saves, in one call per rank.
            n = 1
            while self.step + n < total and not self._boundary(self.step + n):
                n += 1
            steps = [self.plan.step_indices(s) for s in range(self.step, self.step + n)]
            t0 = time.perf_counter()
            per_step = self.group.offline_train_steps(self.train, steps, self.cfg.algorithm, self.ref_train)
            elapsed = time.perf_counter() - t0
            self.step += n
            row = _window_metrics(per_step)
            row.update({"step": self.step, "epoch": round(self.plan.epoch_of(self.step), 6),
                        "train/tokens_per_s": row["train/tokens"] / max(elapsed, 1e-9), "time/train_s": elapsed})
            if self._due(t.eval_every_steps) or self.step == total:
                row.update(self.evaluate())
            if self._due(t.save_every_steps) and self.step < total:
                self.save_checkpoint(row)
            else:
                self._log(row)
            bar.update(n)
            bar.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['train/tokens_per_s']:.0f}")
        bar.close()
        return self.save_final()

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _boundary(self, step: int) -> bool:
        t = self.cfg.train
        return any(every > 0 and step % every == 0
                   for every in (t.log_every_steps, t.eval_every_steps, t.save_every_steps))

    def evaluate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        out = self.group.offline_eval(self.held, self.cfg.algorithm, self.ref_eval)
        if out:
            out["time/eval_s"] = time.perf_counter() - t0
        return out

    def _log(self, row: dict) -> None:
        if not self._logged_info:  # the data sizes, once per process
            row = {**self.info, **row}
            self._logged_info = True
        self.logger.log(row)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self.step)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, row: dict) -> None:
        """Atomic: the metrics row is written first, so a crash after it and before
        the rename re-runs (and re-logs) those steps on resume, never skips them."""
        from safetensors.torch import save_file

        from twodrl.checkpoint import atomic_directory, prune_checkpoints, round_dir, write_driver_state

        self._log(row)
        t0 = time.perf_counter()
        with atomic_directory(round_dir(self.run_dir, self.step)) as tmp:
            self.group.save_checkpoint(str(tmp / "learner"))
            states = self.group.rank_rng_states()
            save_file({f"rank{k}": s for k, s in enumerate(states)}, str(tmp / "rank_rng.safetensors"))
            write_driver_state(tmp, {"step": self.step, "epoch": self.plan.epoch_of(self.step),
                                     "fingerprint": self.fingerprint, "total_steps": self.plan.total_steps})
        prune_checkpoints(self.run_dir, self.cfg.logging.keep_checkpoints)
        print(f"[twodrl] checkpoint at step {self.step} ({time.perf_counter() - t0:.1f}s)", flush=True)

    def save_final(self) -> Path:
        from twodrl.offline import FINAL_DIR

        final = self.run_dir / FINAL_DIR
        self.group.save_pretrained(str(final))
        return final

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
        if self.logger is not None:
            self.logger.finish()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


_LAST_VALUE = ("train/lr", "train/optimizer_steps", "train/grad_norm")


def _window_metrics(per_step: list[dict]) -> dict:
    """One row for the steps since the last one: means of the per-step metrics, the
    token count summed, the optimizer's state (lr, step count, grad norm) as it is now."""
    row = {}
    for key in per_step[-1]:
        values = [m[key] for m in per_step if key in m]
        if key in _LAST_VALUE:
            row[key] = values[-1]
        elif key == "train/tokens":
            row[key] = float(sum(values))
        else:
            row[key] = sum(values) / len(values)
    return row


def _start_wandb(cfg: OfflineConfig, run_dir: Path, resume: bool):
    """wandb keyed by optimizer step (the online job keys by round)."""
    try:
        import wandb
    except ImportError:
        return None
    from twodrl.config import to_dict
    from twodrl.tracking import redact, wandb_mode

    return wandb.init(project=cfg.logging.wandb_project, name=cfg.run_name, dir=str(run_dir),
                      config=redact(to_dict(cfg)), mode=wandb_mode(), resume="allow" if resume else None,
                      id=(cfg.run_name if resume else None), reinit="finish_previous")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m jobs.train"))
