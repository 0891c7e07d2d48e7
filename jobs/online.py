"""The main job: ``twodrl run CONFIG`` and, for clusters,
``ray job submit --working-dir . -- python -m jobs.online CONFIG``.

Joins the Ray cluster named by ``RAY_ADDRESS`` (or ``ray.address``), else starts a
local one. Everything that can be checked before an actor starts is checked first:
the config (unknown keys, types, values), the task (every prompt row of a dataset, the
prompts too long for the policy) and that the task has a judge where it needs one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from twodrl.config import ConfigError, RunConfig, load_config


def build_parser(prog: str) -> argparse.ArgumentParser:
    return run_parser(prog, __doc__.splitlines()[0], "YAML run config (see configs/)",
                      "continue after the last completed round in --run-dir")


def run_parser(prog: str, description: str, config_help: str, resume_help: str) -> argparse.ArgumentParser:
    """The arguments every job that owns a run directory takes (``twodrl run``,
    ``twodrl train``): the config, overrides, the run directory and how to treat one
    that already holds a run."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set learner.beta=0.5 (repeatable)")
    parser.add_argument("--run-dir", help="where metrics, checkpoints and outputs go (default: runs/<name>)")
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a --run-dir that holds one; the old run is moved to "
                             "RUN_DIR/.previous-<time>/, not deleted")
    parser.add_argument("--verbose", action="store_true",
                        help="show the engines' logs (vLLM, DeepSpeed, Ray workers) in the terminal instead of "
                             "RUN_DIR/logs/<actor>.log")
    return parser


def claim_run_dir(cfg, args: argparse.Namespace, argv: list[str] | None, default_name: str):
    """The run directory a job writes to (``--run-dir``, else ``runs/<run_name>``, else
    ``runs/<default_name>-<time>``), checked and locked by :func:`twodrl.rundir.open_run_dir`.
    Returns ``(run_dir, config dict as saved, lock, log lines)``; an unnamed run takes
    the directory's name, as the job saves it. Raises ``RunDirError``."""
    from twodrl.config import to_dict
    from twodrl.rundir import open_run_dir

    run_dir = Path(args.run_dir or Path("runs") / (cfg.run_name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if cfg.run_name is None:
        cfg.run_name = run_dir.name
    new_config = to_dict(cfg)
    lock, log = open_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite, new_config=new_config,
                             argv=list(sys.argv[1:] if argv is None else argv))
    return run_dir, new_config, lock, log


def preflight(cfg: RunConfig, source: str):
    """Checks that need no actor; returns the run's task. A prompt dataset that does not
    load is reported now, naming its file, line and field, and so is a task that needs
    a judge the config does not name."""
    from twodrl.tasks import prepare_task

    if cfg.task.name != "synthetic" and cfg.task.dataset is None:
        raise ConfigError(f"{source}: task.name is {cfg.task.name!r} but task.dataset names no prompt dataset")
    if cfg.task.name == "synthetic" and (cfg.task.dataset or cfg.task.eval_dataset or cfg.task.sft_dataset):
        # A dataset is never silently ignored.
        raise ConfigError(f"{source}: task.dataset / eval_dataset / sft_dataset are set but task.name is "
                          "'synthetic'; set task.name=dataset to use them")
    from twodrl.annotation.client import check_budget_config

    check_budget_config(cfg.annotator)  # a cost cap the job could not count is refused now
    task = prepare_task(cfg)
    if task.local_judge is None and cfg.annotator.base_url is None:
        needs = [f for f, v in (("annotator.fraction", cfg.annotator.fraction),
                                ("scorer.rm_train_responses", cfg.scorer.rm_train_responses)) if v > 0]
        if needs:
            raise ConfigError(
                f"{source}: the {task.name} task has no built-in judge, and {' and '.join(needs)} > 0 need one: "
                "set annotator.base_url to an OpenAI-compatible endpoint (its key in the variable "
                f"annotator.api_key_env = {cfg.annotator.api_key_env}), or set {' and '.join(needs)} to 0 "
                "(the reward model at scorer.model.path then rates everything, and eval has no win rate)"
            )
    return task


def main(argv: list[str] | None = None, prog: str = "twodrl run") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=RunConfig)
        task = preflight(cfg, args.config)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from twodrl.rundir import RunDirError

    try:
        # Held until the job ends: one job per run directory.
        run_dir, new_config, lock, log = claim_run_dir(cfg, args, argv, default_name=cfg.algorithm)
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in log:
        print(f"[twodrl] {line}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if cfg.learner.num_gpus_per_rank == 0 else "cuda")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from jobs.driver import JudgeBudgetExhausted, OnlineDriver, RunStopped, quiet_driver_loggers

    quiet_driver_loggers(args.verbose)
    if not args.verbose:
        print(f"[twodrl] actor logs: {run_dir / 'logs'}/<actor>.log (--verbose shows them here)", flush=True)
    driver = OnlineDriver(cfg, run_dir, resume=args.resume, task=task, verbose=args.verbose)
    try:
        try:
            driver.setup()
        except Exception as e:
            _print_actor_logs(run_dir, e, args.verbose)
            raise
        rows = driver.run()
    except JudgeBudgetExhausted as e:
        print(f"[twodrl] stopped: {e}", file=sys.stderr)
        return 3
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        driver.shutdown()
        lock.release()
    if rows:
        last = rows[-1]
        print(f"[twodrl] done: {len(rows)} round(s) in {run_dir}; last eval/reward/weighted = {last.get('eval/reward/weighted')}")
    print(f"[twodrl] metrics: {run_dir / 'metrics.jsonl'}  plot: {run_dir / 'plots' / 'rewards.png'}")
    return 0


def _print_actor_logs(run_dir: Path, error: BaseException, verbose: bool) -> None:
    """An actor that died while the job was starting (a vLLM engine killed for memory,
    a segfault) leaves no traceback: show the end of its log, which the terminal did
    not see."""
    if verbose:
        return
    from jobs.driver import actor_log_tails

    tails = actor_log_tails(run_dir / "logs", error)
    if tails:
        print(tails, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m jobs.online"))
