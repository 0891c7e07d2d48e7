"""The online driver: schedules iterative rounds between the rollout workers, the 2D
reward scorer, the annotation pool and the policy learner.

One round (2D-DPO, paper Appendix D), read top to bottom in :meth:`OnlineDriver.run_round`:

    prompts  = next unused prompts of the epoch
    samples  = rollout(prompts, K)                      # vLLM workers
    scores   = reward_model(samples)                    # [S, A] per sample
    audit    = judge(fraction of samples)               # LLM judge, also audits the RM
    pairs    = best vs worst weighted representative score per prompt
    learner.train(pairs, algorithm)                     # DeepSpeed ranks
    sync weights learner → rollout workers              # bucketed, in place
    evaluate held-out prompts (greedy), checkpoint, log

Round 0 prepares the run: an SFT warm start of the policy when the task offers
warm-start data, and the first 2D reward model, trained on judge annotations when
``scorer.rm_train_responses`` > 0; its ``eval/*`` metrics measure that policy *before*
any preference training (the baseline, and the side every later win rate is judged
against), then it runs a normal round. In round k ≥ 1, ``eval/*`` is measured after
that round's training and weight sync, every ``eval.every_rounds`` rounds.

The driver holds no model and knows no task: prompts and warm-start data come from a
:class:`twodrl.tasks.Task`; it moves data between actors and calls the pure functions of
:mod:`twodrl.rounds` and :mod:`twodrl.evaluation`. Scheduling is ``sync`` (stage after
stage), ``overlap`` (the rollout of round k+1 runs while round k scores, judges and
trains) or ``stream``: a round's samples flow rollout → score → judge a chunk of prompts
at a time (:meth:`OnlineDriver.collect`), the collection of the next ``max_staleness``
rounds runs while round k trains, syncs, evaluates and checkpoints, and evaluation runs
on the engines while the learner ranks write the checkpoint. Every sample carries the
weights version that generated it (``rollout/staleness_mean``, ``_max``).
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import logging
import math
import os
import random
import socket
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import ray
import torch
from tqdm.auto import tqdm

from twodrl.checkpoint import (
    atomic_directory,
    atomic_write_text,
    latest_checkpoint,
    prune_checkpoints,
    read_driver_state,
    round_dir,
    verify_manifest,
    write_driver_state,
)
from twodrl.config import RunConfig, dump_config, to_dict
from twodrl.metrics import ray_metric_name, round_metric_keys
from twodrl.rounds import (
    PromptCursor,
    ScoredSample,
    agreement,
    audited,
    reward_summary,
    rounds_to_prefetch,
    select_pairs,
    staleness_summary,
)
from twodrl.tasks import Task, TaskPrompt, prepare_task
from twodrl.tracking import (EVAL_SAMPLES_KEY, MetricsLogger, eval_sample_table, plot_rewards, read_metrics,
                             truncate_metrics)


# Environment the actors need whatever node they land on (CPU DeepSpeed, in-process
# vLLM engine so weight updates reach it, offline wandb/hub).
ACTOR_ENV_DEFAULTS = {
    "DS_ACCELERATOR": None,  # decided from the config: cpu when learners take no GPU
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": None,
    "TWODRL_CACHE": None,
    "VLLM_CPU_KVCACHE_SPACE": None,
    "HF_HUB_OFFLINE": None,
}


def connect_ray(cfg: RunConfig, namespace: str, log_dir: str | Path | None = None) -> str:
    """Join the cluster named by ``ray.address`` or ``RAY_ADDRESS`` (``ray job submit``
    sets it), else start a local one with ``ray.num_cpus`` logical CPU slots. Returns
    the cluster address the run uses (written to ``RUN_DIR/ray.json``).

    With ``log_dir`` (``RUN_DIR/logs``; None with ``--verbose``) every actor writes its
    output to ``log_dir/<actor>.log`` (:func:`actors.common.redirect_actor_output`)
    and none of the workers' output is forwarded to this process: the terminal keeps
    the run's progress, round lines and errors. On a cluster that already exists (``ray
    job submit``, KubeRay) this applies as well: both are settings of this job, not of
    the cluster."""
    from actors.common import LOG_DIR_ENV

    env = {}
    for key, default in ACTOR_ENV_DEFAULTS.items():
        value = os.environ.get(key, default)
        if key == "DS_ACCELERATOR" and value is None:
            value = "cpu" if cfg.learner.num_gpus_per_rank == 0 else "cuda"
        if value is not None:
            env[key] = value
    # Inside `ray job submit` the job's own runtime env already reaches every actor, and
    # Ray refuses (printing every value, secrets included) a driver env naming the same
    # variables: forward only what the job did not set.
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    env = {k: v for k, v in env.items() if k not in (job_env.get("env_vars") or {})}
    if log_dir is not None:
        # Absolute: actors run in another working directory (the job's unpacked
        # working_dir under `ray job submit`).
        env[LOG_DIR_ENV] = str(Path(log_dir).resolve())
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    runtime_env = {"env_vars": env}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    log_to_driver = log_dir is None
    # ray.init sets the level of Ray's own loggers in this process ("Started a local
    # Ray instance", "Connecting to existing Ray cluster" …): warnings only unless verbose.
    quiet = {} if log_to_driver else {"logging_level": logging.WARNING}
    if ray.is_initialized():
        pass  # a notebook or test that started Ray itself
    elif address:
        ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=log_to_driver, **quiet)
    else:
        kwargs: dict[str, Any] = {"num_cpus": cfg.ray.num_cpus, "namespace": namespace, "runtime_env": runtime_env,
                                  "dashboard_host": "127.0.0.1", "include_dashboard": cfg.ray.dashboard,
                                  "log_to_driver": log_to_driver, **quiet}
        if cfg.logging.metrics_port:
            kwargs["_metrics_export_port"] = cfg.logging.metrics_port
        ray.init(**kwargs)
    return ray.get_runtime_context().gcs_address


# Libraries whose INFO lines, logged in the driver process at import or start-up,
# would bury the run's own output; their warnings and errors still show.
NOISY_LOGGERS = ("ray", "vllm", "deepspeed", "DeepSpeed", "transformers", "torch", "urllib3", "httpx", "filelock")


def quiet_driver_loggers(verbose: bool = False) -> None:
    """Raise the driver process's library loggers to WARNING (not with ``--verbose``).
    The actors' own logs go to ``RUN_DIR/logs`` (see :func:`connect_ray`)."""
    if verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def actor_log_tails(log_dir: Path, error: BaseException | None = None, names: list[str] | None = None,
                    lines: int | None = None) -> str:
    """The last lines of the log files of the actors named in ``names`` and in
    ``error`` (Ray's actor-died errors carry the actor's name), for an error message:
    an actor killed by a signal or the OOM killer leaves no traceback, only its log."""
    import re

    from actors.common import LOG_TAIL_LINES, actor_log_path, log_tail

    wanted = list(names or [])
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # the error and its causes
        seen.add(id(error))
        wanted += re.findall(r"\bname:\s*([A-Za-z_]+-\d+)\b", str(error))
        error = error.__cause__ or error.__context__
    out = []
    for name in dict.fromkeys(n.split()[0] for n in wanted if n):
        path = actor_log_path(log_dir, name)
        tail = log_tail(path, lines or LOG_TAIL_LINES)
        if tail:
            out.append(f"---- last lines of {path} ----\n{tail}")
    return "\n".join(out)


def _remote_traceback(error: BaseException | None) -> str:
    """The traceback an actor's exception came back with (a ``RayTaskError`` among
    ``error`` and its causes), '' if none did."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ray.exceptions.RayTaskError):
            return str(error).strip()
        error = error.__cause__ or error.__context__
    return ""


def _await_ready(actors: list, deadline_s: float = 600.0) -> None:
    """Block until every actor answers ``ready()``: one Ray is restarting refuses calls
    (ActorUnavailableError) until its constructor has run again."""
    deadline = time.monotonic() + deadline_s
    for actor in actors:
        while True:
            try:
                ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def _wait_names_free(names: list[str], namespace: str, timeout_s: float = 60.0) -> None:
    """Block until killed actors' names are released, so the new group's actors are
    created fresh instead of re-attaching to the dying ones."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=namespace)
            except ValueError:
                break
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request_round(request_id: str) -> int:
    """The round a rollout request was planned for, from its id (``r<round>-e…``, see
    ``OnlineDriver._prompt_requests``): with overlap scheduling the next round's
    requests exist while this round trains, so the driver's own counters cannot say."""
    head = request_id.split("-", 1)[0]
    if not (head.startswith("r") and head[1:].isdigit()):
        raise ValueError(f"request id {request_id!r} does not start with r<round>-")
    return int(head[1:])


class RunStopped(RuntimeError):
    """A fault the run could not ride through; the message says which, where, and from
    which checkpoint ``--resume`` continues."""


class JudgeBudgetExhausted(RuntimeError):
    """The run's judge budget is spent; the job stops (exit code 3) and can be resumed."""


class RayMetricsSink:
    """Round metrics as Ray gauges (``twodrl_*``), exported on the Ray metrics port
    for Prometheus/Grafana and shown in the dashboard."""

    def __init__(self, keys: list[str], run_name: str):
        from ray.util.metrics import Gauge

        self._gauges = {
            k: Gauge(ray_metric_name(k), description=f"twodrl round metric {k}", tag_keys=("run",)) for k in keys
        }
        self._tags = {"run": run_name}

    def __call__(self, row: dict) -> None:
        for key, value in row.items():
            gauge = self._gauges.get(key)
            if gauge is not None and isinstance(value, (int, float)):
                gauge.set(float(value), tags=self._tags)


class OnlineDriver:
    """Builds the actors for a run and runs its rounds. Usable step by step from a
    notebook: ``d = OnlineDriver(cfg, run_dir); d.setup(); d.run_round(0); ...``."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool | None = None,
                 task: Task | None = None, verbose: bool = False):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        # False: each actor's output goes to RUN_DIR/logs/<actor>.log; True: to this terminal.
        self.verbose = verbose
        self.progress = cfg.logging.progress if progress is None else progress
        from actors.common import run_namespace

        if cfg.run_name is None:
            cfg.run_name = self.run_dir.name
        self.run_name = cfg.run_name
        self.namespace = run_namespace(cfg)
        self.aspects = list(cfg.aspects.names)
        self.weights = list(cfg.aspects.weights)
        # The run's world (prompts, warm-start data); built and checked before any actor
        # starts by jobs.online's preflight, or here for a notebook.
        self.task = task if task is not None else prepare_task(cfg)
        print(f"[twodrl] {self.task.describe()}", flush=True)
        self.train_prompts: list[TaskPrompt] = self.task.train
        self.eval_prompts: list[TaskPrompt] = self.task.eval[: cfg.eval.num_prompts]
        self.cursor = PromptCursor(len(self.train_prompts), seed=cfg.seed)
        self.baseline: list[dict] | None = None  # round-0 eval responses, for win rates
        self.next_round = 0
        self.weights_version = 0
        self.planned_prompts = 0
        self.completed_prompts = 0
        self.resynced_samples = 0  # prompts re-sampled after a rollout worker restarted
        self._unlogged_row: dict | None = None  # see _restore
        # Prefetched rounds' collection and a concurrent evaluation; the chunks a
        # streaming collection scores and judges while it still generates.
        self._pool = futures.ThreadPoolExecutor(max_workers=cfg.max_staleness + 2, thread_name_prefix="twodrl-round")
        self._stage_pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="twodrl-stage")
        self._prefetched: dict[int, tuple[list[dict], futures.Future]] = {}  # round -> (requests, collection)
        self._sync_lock = threading.Lock()
        self._resume_requests: dict[int, list[dict]] | None = None
        self._stop_judge: Callable[[], None] | None = None
        self._directions: dict[str, list[float]] = {}  # DPA: prompt id -> direction v
        self._replay_rng = random.Random(cfg.seed + 1)
        self.learner_restarts = 0  # learner groups rebuilt after a rank died
        self.recovered: dict[str, int] = {}  # role -> faults of its actors the driver rode through
        # Restarts Ray made of each role's actors, seen as a new process id.
        self.restarts: dict[str, int] = {"rollout": 0, "scorer": 0, "annotator": 0}
        self._restarts_before: dict[str, int] = {}  # from the checkpoint a resume starts at
        self._credit_probe: tuple[list[dict], list] | None = None  # probe pairs, their log-probs then
        self._faults_fired: set[str] = set()
        self.logger: MetricsLogger | None = None

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not (self.resume and (self.run_dir / "config.yaml").exists()):
            # A resumed run keeps the config it started with (its changes go to
            # resumes.jsonl, see twodrl.rundir).
            dump_config(self.cfg, self.run_dir / "config.yaml")
        address = connect_ray(self.cfg, namespace=self.namespace,
                              log_dir=None if self.verbose else self.run_dir / "logs")
        (self.run_dir / "ray.json").write_text(
            json.dumps({"address": address, "namespace": self.namespace, "run_name": self.run_name}, indent=2)
        )
        self._start_judge()
        self._create_actors()
        sinks = [RayMetricsSink(round_metric_keys(self.aspects), self.run_name)]
        last = latest_checkpoint(self.run_dir) if self.resume else None
        if last is None:
            random.seed(self.cfg.seed)  # restored from the checkpoint otherwise
        if last is not None:
            self._restore(*last)
        self.logger = MetricsLogger(
            self.run_dir,
            self.aspects,
            config=to_dict(self.cfg),
            use_wandb=self.cfg.logging.wandb,
            wandb_project=self.cfg.logging.wandb_project,
            run_name=self.run_name,
            sinks=sinks,
            resume=self.resume,
        )
        if self._unlogged_row:
            self._log(self._unlogged_row)
            self._unlogged_row = None

    def _start_judge(self) -> None:
        """The judge endpoint: ``annotator.base_url`` when the config names one, else the
        local rule-based server in the mode the task is rated by (the synthetic task),
        started here on 127.0.0.1, else none (the reward model rates everything)."""
        self.judge_url: str | None = self.cfg.annotator.base_url
        if self.judge_url is not None or self.task.local_judge is None:
            return
        from twodrl.annotation.judge_server import start_judge_server

        self.judge_url, self._stop_judge = start_judge_server(host="127.0.0.1", port=_free_port(),
                                                              mode=self.task.local_judge)

    def _create_actors(self) -> None:
        from actors.annotator import create_annotators
        from actors.learner import PolicyLearnerGroup
        from actors.rollout import create_rollout_workers
        from actors.scorer import create_scorers
        from actors.common import validate_placement

        cfg = self.cfg
        # Every role at once, before the first actor starts: a config that cannot be
        # placed stops here with the config field to change (PlacementError).
        validate_placement(cfg)
        self.rollout_workers = create_rollout_workers(cfg, self.namespace)
        self.scorers = create_scorers(cfg, self.namespace)
        self.annotators = (create_annotators(cfg, self.namespace, base_url=self.judge_url, run_dir=self.run_dir)
                           if self.judge_url is not None else [])
        self.learner = PolicyLearnerGroup(cfg, self.namespace)

    def _restore(self, round_idx: int, path: Path) -> None:
        self._restore_state(round_idx, path)
        truncate_metrics(self.run_dir / "metrics.jsonl", round_idx)
        logged = {r.get("round") for r in read_metrics(self.run_dir / "metrics.jsonl")}
        # Killed between the checkpoint's rename and the metrics write: log it on set-up.
        state = read_driver_state(path, restore=False)
        # A resumed run's actors are new (their start counts begin again): carry the
        # restarts of the attempts before.
        self._restarts_before = dict(state.get("restarts") or {})
        self.restarts.update(self._restarts_before)
        self._unlogged_row = state.get("metrics") if round_idx not in logged and state.get("metrics") else None
        print(f"[twodrl] resumed after round {round_idx} from {path}")

    def _restore_state(self, round_idx: int, path: Path) -> None:
        """The driver's, learner's and scorers' state as of the checkpoint of
        ``round_idx``, pushed to the rollout workers as a new weights version."""
        verify_manifest(path, nested=False)  # the learner checks its own part when it loads it
        state = read_driver_state(path)
        self.cursor = PromptCursor.from_state(state["cursor"])
        self.next_round = round_idx + 1
        self.planned_prompts = state.get("planned_prompts", 0)
        self.completed_prompts = state.get("completed_prompts", 0)
        self.weights_version = state.get("weights_version", 0)
        self.learner_restarts = max(self.learner_restarts, state.get("learner_restarts", 0))
        pending = state.get("pending_rounds") or {}
        if state.get("pending_requests"):  # written before several rounds could be pending
            pending = {str(round_idx + 1): state["pending_requests"]}
        self._resume_requests = {int(q): reqs for q, reqs in pending.items()}
        self._directions.update(state.get("pending_directions") or {})
        if (self.run_dir / "warmstart").is_dir():
            # The reference is the warm-started policy: load it, freeze it, then
            # continue from the last round.
            self.learner.load_checkpoint(str(self.run_dir / "warmstart"))
            self.learner.reset_reference()
        self.learner.load_checkpoint(str(path / "learner"))
        if (self.run_dir / "reward_model").is_dir():
            ray.get([s.load.remote(str(self.run_dir / "reward_model")) for s in self.scorers])
        self.baseline = self._read_baseline()
        self._read_credit_probe()
        self._sync_weights()

    # ------------------------------------------------------------------ faults

    def _fault_point(self, stage: str, round_idx: int) -> None:
        """Test-only fault injection: ``TWODRL_TEST_FAULTS=learner-1@train@1,…`` kills the
        named actor when the driver reaches that stage of that round (once each), so
        every recovery path can be tested deterministically. An environment variable,
        not a config field, so no config can switch it on by accident."""
        self._stage = stage
        spec = os.environ.get("TWODRL_TEST_FAULTS")
        if not spec:
            return
        from actors.common import kill_actor

        for fault in spec.split(","):
            name, at_stage, at_round = fault.strip().split("@")
            if at_stage == stage and int(at_round) == round_idx and fault not in self._faults_fired:
                self._faults_fired.add(fault)
                # Learner ranks never restart (a broken collective); other roles do.
                restart = not name.startswith("learner-")
                print(f"[twodrl] test fault: killing {name} at {stage} of round {round_idx}", flush=True)
                kill_actor(name, self.namespace, no_restart=not restart)

    def _stopped(self, round_idx: int, error: BaseException, dead: list[str] | None = None) -> "RunStopped":
        """One message for a fault the run cannot ride through: which actors are gone
        (restarts used up), at which stage of which round, the last error, and where a
        ``--resume`` continues from (every finished round is checkpointed)."""
        if dead is None:
            dead = []
            for role, actors in (("rollout", self.rollout_workers), ("scorer", self.scorers),
                                 ("annotator", self.annotators)):
                for i, a in enumerate(actors):
                    try:
                        ray.get(a.ready.remote(), timeout=30)
                    except Exception:  # noqa: BLE001 - any failure to answer: it is gone
                        dead.append(f"{role}-{i}")
        import traceback

        # Actor output goes to RUN_DIR/logs, not the terminal: what a failed actor
        # said last (its traceback, or its last log lines when a signal or the OOM
        # killer ended it without one) is part of the message.
        tails = actor_log_tails(self.run_dir / "logs", error, dead)
        remote = _remote_traceback(error)
        # The full traceback, for whoever debugs it; the message's first line is the summary.
        atomic_write_text(self.run_dir / "error.log", "".join(traceback.format_exception(error))
                          + (f"\n{tails}\n" if tails else ""))
        last = latest_checkpoint(self.run_dir)
        where = f"round {last[0]}" if last else "nothing yet (round 0 had not finished)"
        first = (str(error).strip().splitlines() or [""])[0][:300]
        return RunStopped(
            f"round {round_idx}, stage {getattr(self, '_stage', '?')}: "
            + (f"actor(s) {', '.join(dead)} did not come back; " if dead else "")
            + f"last error {type(error).__name__}: {first} (traceback in {self.run_dir / 'error.log'}). "
            + f"--resume continues after {where}."
            + (f"\n{remote}" if remote else "")
            + (f"\n{tails}" if tails else "")
        )

    def _count_restarts(self) -> None:
        """``recovery/<role>_restarts``: how often Ray restarted the run's rollout,
        scorer and annotator actors (each counts its own starts; the run rode through
        every one), plus those of earlier attempts of a resumed run."""
        for role, actors in (("rollout", self.rollout_workers), ("scorer", self.scorers),
                             ("annotator", self.annotators)):
            # With stream scheduling an actor can die while this runs (a collection of
            # the next round is under way): wait for it to come back and ask again.
            for attempt in range(5):
                _await_ready(actors)
                try:
                    starts = ray.get([a.incarnation.remote() for a in actors], timeout=60)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    if attempt == 4:
                        raise
            self.restarts[role] = self._restarts_before.get(role, 0) + sum(max(0, n - 1) for n in starts)

    def _learner_alive(self) -> bool:
        try:
            ray.get([r.ready.remote() for r in self.learner.ranks], timeout=60)
            return True
        except Exception:  # noqa: BLE001 - any failure to answer means the group is gone
            return False

    def _recover_learner(self, error: BaseException) -> int:
        """Rebuild the learner group after a rank died and continue from the last round
        checkpoint (in this process: the rollout workers, scorers and annotators keep
        running). Returns the round to run next."""
        from actors.learner import PolicyLearnerGroup

        self.learner_restarts += 1
        print(f"[twodrl] learner failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
              f"rebuilding it ({self.learner_restarts}/{self.cfg.learner.max_failures})", flush=True)
        self._cancel_prefetched()  # prefetched rounds are redrawn from the checkpoint
        try:  # rank 0 may be alive and own the weight-sync segment
            self.learner.close_weight_segments(timeout_s=10)
        except Exception:  # noqa: BLE001 - best effort: the segment is swept later anyway
            pass
        self.learner.shutdown()
        _wait_names_free([f"learner-{i}" for i in range(self.cfg.learner.num_ranks)] + ["reference-0"], self.namespace)
        self.learner = PolicyLearnerGroup(self.cfg, self.namespace, validate=False)
        last = latest_checkpoint(self.run_dir)
        if last is None:  # nothing finished yet: round 0 again, from the start
            self.cursor = PromptCursor(len(self.train_prompts), seed=self.cfg.seed)
            self.planned_prompts = self.completed_prompts = 0
            self._directions.clear()
            self._credit_probe = None  # drawn again by the redone round 0
            random.seed(self.cfg.seed)
            self._sync_weights()
            return 0
        round_idx, path = last
        self._resume_requests = None
        self._restore_state(round_idx, path)
        self._collect_resumed()
        return round_idx + 1

    # ------------------------------------------------------------------ stages

    def _request(self, p: TaskPrompt, request_id: str) -> dict:
        """A rollout request for a task prompt: its id in the round, the dataset's own
        prompt id, the chat fields, and ``rollout.system_prompt`` where the prompt has
        no system prompt of its own."""
        req = {"id": request_id, "prompt_id": p.id, **p.request()}
        if "system" not in req and self.cfg.rollout.system_prompt:
            req["system"] = self.cfg.rollout.system_prompt
        return req

    def _prompt_requests(self, picks: list[tuple[int, int]], round_idx: int) -> list[dict]:
        reqs = [self._request(self.train_prompts[i], f"r{round_idx}-e{epoch}-p{i}") for epoch, i in picks]
        if self.cfg.algorithm == "dpa-rsf":
            reqs = self._attach_directions(reqs, round_idx)
        return reqs

    def _attach_directions(self, requests: list[dict], round_idx: int) -> list[dict]:
        """DPA: each prompt is asked ``dpa.directions_per_prompt`` times, each time
        with its own sampled preference direction v stated in the system prompt
        (integer weights round(100·v)), after the prompt's own system prompt."""
        from twodrl.dpa import direction_system_prompt, sample_directions

        dpa = self.cfg.dpa
        per = dpa.directions_per_prompt
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + round_idx)
        v = sample_directions(len(requests) * per, k=len(dpa.objectives), generator=gen,
                              angle_low=dpa.angle_low, angle_high=dpa.angle_high, dtype=torch.float64)
        out = []
        for n, req in enumerate(requests):
            for j in range(per):
                direction = v[n * per + j]
                r = dict(req, id=req["id"] if per == 1 else f"{req['id']}-d{j}")
                stated = direction_system_prompt(direction, dpa.objectives)
                r["system"] = f"{req['system']}\n\n{stated}" if req.get("system") else stated
                self._directions[r["id"]] = direction.tolist()
                out.append(r)
        return out

    def rollout(self, requests: list[dict], n: int, greedy: bool = False,
                on_group: Callable[[list[ScoredSample]], None] | None = None) -> tuple[list[list[ScoredSample]], dict]:
        """Generate ``n`` samples per request across the rollout workers; requests of a
        worker that dies are re-queued (none lost, none duplicated). ``on_group`` gets
        each request's samples as soon as they are in (stream scheduling scores them
        while other prompts still generate); they are the same objects returned."""
        from actors.workqueue import run_work_queue

        t0 = time.perf_counter()
        params = {
            "n": n,
            "temperature": self.cfg.rollout.temperature,
            "top_p": self.cfg.rollout.top_p,
            "max_new_tokens": self.cfg.eval.max_new_tokens if greedy else self.cfg.rollout.max_new_tokens,
            "greedy": greedy,
        }
        expected = self.weights_version
        by_request = {r["id"]: r for r in requests}
        groups_by_id: dict[str, list[ScoredSample]] = {}
        stale: set[str] = set()

        def accept(res: dict) -> None:
            # A worker that Ray restarted mid-round came back with the initial weights
            # (its constructor loads policy.path); its samples are from the wrong policy.
            if res.get("weights_version", expected) < expected:
                stale.add(res["id"])
                return
            group = self._group(by_request[res["id"]], res)
            groups_by_id[res["id"]] = group
            if on_group is not None:
                on_group(group)

        workers = len(self.rollout_workers)
        todo = list(requests)
        # Streaming: chunks of about one scorer batch, so scoring starts early.
        chunk = (max(1, -(-self.cfg.scorer.batch_size // n)) if on_group is not None
                 else max(1, len(todo) // (2 * workers) or 1))
        for attempt in range(3):
            stale.clear()
            run_work_queue(self.rollout_workers, todo, method="generate", kwargs=params, chunk_size=chunk,
                           progress=self.progress and not greedy, desc="rollout", on_result=accept)
            if not stale:
                break
            # Bring the restarted worker up to the current version and sample those
            # prompts again.
            _await_ready(self.rollout_workers, deadline_s=self.cfg.rollout.call_timeout_s)
            versions = ray.get([w.weights_version.remote() for w in self.rollout_workers])
            lagging = [w for w, v in zip(self.rollout_workers, versions) if v < expected]
            if lagging:
                self._sync_weights(lagging)
            self.resynced_samples += len(stale)
            todo = [r for r in requests if r["id"] in stale]
        else:
            raise RuntimeError(f"rollout: {len(stale)} prompt(s) still sampled with stale weights after re-syncing")
        groups = [groups_by_id[req["id"]] for req in requests]
        tokens = sum(len(s.token_ids or []) for g in groups for s in g)
        elapsed = time.perf_counter() - t0
        return groups, {"rollout/tokens_per_s": tokens / max(elapsed, 1e-9), "time/rollout_s": elapsed}

    def _group(self, req: dict, res: dict) -> list[ScoredSample]:
        """One request's samples, unscored, each with the weights version it was
        generated with."""
        return [
            ScoredSample(prompt_id=req["id"], prompt=req["prompt"], text=s["text"], segments=[], scores=[],
                         history=req.get("history"), system=req.get("system"), token_ids=s.get("token_ids"),
                         logprobs=s.get("logprobs"), weights_version=res.get("weights_version"))
            for s in res["samples"]
        ]

    def score(self, samples: list[ScoredSample], progress: bool | None = None) -> float:
        """Fill every sample's segments and [S, A] scores from the 2D reward model."""
        from actors.workqueue import run_work_queue

        t0 = time.perf_counter()
        items = [
            {"id": str(i), "prompt": s.prompt, "response": s.text, "history": s.history} for i, s in enumerate(samples)
        ]
        results = run_work_queue(
            self.scorers, items, method="score", chunk_size=self.cfg.scorer.batch_size,
            progress=self.progress if progress is None else progress, desc="score",
            call_timeout_s=self.cfg.scorer.call_timeout_s,
        )
        for r in results:
            s = samples[int(r["id"])]
            s.segments, s.scores = r["segments"], r["scores"]
        return time.perf_counter() - t0

    def annotate(self, samples: list[ScoredSample]) -> tuple[list[list[list[float]] | None], dict]:
        """Judge ratings for ``samples`` (single-response mode), split across the
        annotation actors. A failed request yields None for that sample."""
        t0 = time.perf_counter()
        before = self._annotator_stats()
        judged = self._judge_samples(samples)
        after = self._annotator_stats()
        self._check_budget(after)
        return judged, self._annotate_metrics(before, after, time.perf_counter() - t0)

    def _judge_samples(self, samples: list[ScoredSample]) -> list[Any]:
        """The judge's (segments, [S][A] ratings) per sample, None where it failed."""
        items = [
            {"id": str(i), "prompt": s.prompt, "response": s.text, "history": s.history} for i, s in enumerate(samples)
        ]
        results = self._judge(items, "annotate_responses")
        judged: list[Any] = [None] * len(samples)
        for r in results:
            if r.get("scores") is not None:
                judged[int(r["id"])] = (r["segments"], r["scores"])
        return judged

    def _annotate_metrics(self, before: list[dict], after: list[dict], elapsed: float) -> dict:
        """``annotate/*`` between two readings of the annotators' counters."""
        # Requests and cost come from the run-wide ledger in the judge cache when there
        # is one: an annotator that Ray restarted mid-call starts its own counters at 0,
        # the ledger does not. Failures are per actor (a restart loses a few at most).
        def total(stats: list[dict], key: str) -> float:
            run_wide = [st[f"run_{key}"] for st in stats if f"run_{key}" in st]
            return max(run_wide) if run_wide else sum(st.get(key, 0) for st in stats)

        delta = {k: max(0, total(after, k) - total(before, k)) for k in ("requests", "cost_usd")}
        delta["failures"] = max(0, sum(a.get("failures", 0) for a in after) - sum(b.get("failures", 0) for b in before))
        return {
            "annotate/requests": delta["requests"],
            "annotate/failures": delta["failures"],
            "annotate/cost_usd": delta["cost_usd"],
            "time/annotate_s": elapsed,
        }

    def _sync_weights(self, workers: list | None = None) -> float:
        """Push the learner's weights to ``workers`` (default: all, as a new version);
        a subset gets the current version again (a restarted worker catching up).

        A rollout worker that Ray is restarting (killed, OOM) is waited for; one that
        dies or is restarted during the sync comes back with its initial weights, so it
        is synced again at the same version. Only a learner failure ends the sync."""
        with self._sync_lock:  # a streaming collection may catch a restarted worker up meanwhile
            return self._sync_weights_locked(workers)

    def _sync_weights_locked(self, workers: list | None) -> float:
        from actors.weight_sync import sync_weights

        t0 = time.perf_counter()
        if workers is None:
            self.weights_version += 1
        targets = list(workers if workers is not None else self.rollout_workers)
        for attempt in range(self.cfg.rollout.max_restarts + 2):
            _await_ready(targets, deadline_s=self.cfg.rollout.sync_timeout_s)
            try:
                result = sync_weights(self.learner, targets, transport=self.cfg.rollout.weight_sync,
                                      bucket_mb=self.cfg.rollout.weight_sync_bucket_mb, version=self.weights_version)
            except ray.exceptions.RayError as e:
                if not self._learner_alive():
                    raise
                print(f"[twodrl] weight sync: a rollout worker failed ({type(e).__name__}); syncing again", flush=True)
                self.recovered["rollout"] = self.recovered.get("rollout", 0) + 1
                continue
            restarted = [targets[i] for i in result.get("restarted") or []]
            if not restarted:
                break
            targets = restarted  # back with their initial weights
        else:
            raise RuntimeError(f"weight sync: rollout workers kept failing for version {self.weights_version}")
        return time.perf_counter() - t0

    def evaluate(self, round_idx: int) -> dict:
        """Greedy responses to the held-out prompts, rated per aspect by the judge — or
        by the reward model where no judge is configured or the judge failed on a
        sample (``eval/rater`` and ``eval/judge_failures`` say which) — and, from round
        1 on, the win rate against the round-0 policy's responses, judged pairwise in
        both orders."""
        reqs = [self._request(p, f"eval-{i}") for i, p in enumerate(self.eval_prompts)]
        groups, _ = self.rollout(reqs, n=1, greedy=True)
        samples = [g[0] for g in groups]
        judged, _ = self.annotate(samples) if self.annotators else ([None] * len(samples), {})
        for s, j in zip(samples, judged):
            if j is not None:
                s.segments, s.scores = j
        missing = [s for s, j in zip(samples, judged) if j is None]
        if missing:
            self.score(missing)
        out: dict[str, Any] = reward_summary(samples, self.weights, self.aspects, prefix="eval/reward")
        out["eval/mean_segments"] = sum(len(s.segments) for s in samples) / max(len(samples), 1)
        out["eval/judge_failures"] = len(missing) if self.annotators else 0
        out["eval/rater"] = ("reward_model" if not self.annotators or len(missing) == len(samples)
                             else "judge+reward_model" if missing else "judge")
        out["eval/weights_version"] = self.weights_version
        self.last_eval_samples = samples
        if round_idx == 0 or self.baseline is None:
            self._write_baseline(samples)
        elif self.annotators:
            out.update(self._win_rate(samples, round_idx))
        return out

    def _win_rate(self, samples: list[ScoredSample], round_idx: int) -> dict:
        from twodrl.evaluation import both_order_items, both_order_outcomes, win_rate

        base = {b["id"]: b for b in self.baseline or []}
        pairs = [(s, base[p.id]) for s, p in zip(samples, self.eval_prompts) if p.id in base]
        items = both_order_items([(s.prompt, s.history, s.segments, b["segments"]) for s, b in pairs])
        outcomes = both_order_outcomes(self.judge_pairs(items), self._weighted)
        return win_rate(outcomes, prefix="eval", seed=self.cfg.seed + round_idx)

    def _weighted(self, by_aspect: dict) -> float:
        from twodrl.evaluation import weighted_rating

        return weighted_rating(by_aspect, self.weights, self.aspects)

    def judge_pairs(self, items: list[dict]) -> list[list[dict] | None]:
        """Judge ratings of segmented response pairs (``{"prompt", "history",
        "responses": [segs_1, segs_2]}``) across the annotation actors: per item
        ``[{aspect: [rating per segment]}, {…}]``, or None where the judge failed."""
        results = self._judge([dict(item, id=str(i)) for i, item in enumerate(items)], "annotate_pairs")
        self._check_budget(self._annotator_stats())
        rated: list[list[dict] | None] = [None] * len(items)
        for r in results:
            if r.get("scores") is not None:
                rated[int(r["id"])] = r["scores"]
        return rated

    def _annotator_stats(self) -> list[dict]:
        """Each annotator's counters; one that is restarting right now counts as empty
        (its counters start again at 0 anyway)."""
        out = []
        for a in self.annotators:
            try:
                out.append(ray.get(a.stats.remote(), timeout=60))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append({})
        return out

    def _judge(self, items: list[dict], method: str) -> list[dict]:
        """Items through the annotation actors as a work queue: an annotator that dies
        mid-call (Ray restarts it) has its unfinished items re-queued, none lost, none
        judged twice by the run's accounting (the answer cache makes a repeat free)."""
        from actors.workqueue import run_work_queue

        chunk = max(1, min(self.cfg.annotator.concurrency, -(-len(items) // len(self.annotators))))
        return run_work_queue(self.annotators, items, method=method, chunk_size=chunk, progress=False)

    def _check_budget(self, stats: list[dict]) -> None:
        """The run-wide judge budget (kept in the run's SQLite store, so it holds across
        annotators, restarts and resumes) is spent: stop at this point, with the last
        round's checkpoint as the place a resume with a larger cap continues from."""
        if any(st.get("budget_exceeded") for st in stats):
            spent = max(stats, key=lambda st: st.get("run_cost_usd", 0.0))
            raise JudgeBudgetExhausted(
                f"the judge budget is spent (run total: {spent.get('run_requests', '?')} requests, "
                f"{spent.get('run_tokens', '?')} tokens, ${spent.get('run_cost_usd', 0.0):.2f}; caps "
                f"annotator.max_requests={self.cfg.annotator.max_requests}, max_tokens={self.cfg.annotator.max_tokens}, "
                f"max_cost_usd={self.cfg.annotator.max_cost_usd}). Raise the cap and continue with --resume."
            )

    def _baseline_path(self) -> Path:
        return self.run_dir / "eval" / "baseline.jsonl"

    def _write_baseline(self, samples: list[ScoredSample]) -> None:
        """The round-0 policy's eval responses, generated once: later rounds (and a
        resumed run) are judged against exactly these."""
        self.baseline = [{"id": p.id, "prompt": s.prompt, "text": s.text, "segments": s.segments}
                         for s, p in zip(samples, self.eval_prompts)]
        atomic_write_text(self._baseline_path(), "".join(json.dumps(b) + "\n" for b in self.baseline))

    def _read_baseline(self) -> list[dict] | None:
        path = self._baseline_path()
        if not path.exists():
            return None
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _eval_due(self, round_idx: int) -> bool:
        """Round 0 (the baseline), every ``eval.every_rounds``-th round, and the last."""
        every = self.cfg.eval.every_rounds
        return round_idx == 0 or round_idx % every == 0 or round_idx == self.total_rounds - 1

    # ------------------------------------------------------------------ round 0

    def warm_start(self) -> dict:
        """Round 0: SFT the policy on the task's warm-start data (skipped when the task
        has none or ``task.sft_examples`` is 0: an instruct policy needs none), then
        train the first 2D reward model on judge annotations (skipped when
        ``scorer.rm_train_responses`` is 0: the scorer serves ``scorer.model.path``). The
        annotated responses are the task's own when it has them, else the policy's own
        responses to train prompts. DPA-RSF with ``dpa.restart_from_sft`` and no SFT keeps
        the initial policy (``RUN_DIR/dpa/sft``): every round's fine-tune restarts there."""
        cfg = self.cfg
        examples = self.task.warm_start_examples(cfg.task.sft_examples) if cfg.task.sft_examples > 0 else []
        out: dict[str, Any] = {"time/train_s": 0.0, "time/sync_s": 0.0}
        out.update(self.task.stats)
        if cfg.task.sft_examples > 0 and not examples:
            print(f"[twodrl] {self.task.name} task: no warm-start data (task.sft_dataset), so no SFT in round 0: "
                  "the policy is taken to be an instruct model", flush=True)
        if examples:
            t0 = time.perf_counter()
            sft = self.learner.train_sft(examples, lr=cfg.task.sft_warmup_lr, epochs=cfg.task.sft_epochs)
            out["time/train_s"] += time.perf_counter() - t0
            out.update({f"warmstart/{k.split('/')[-1]}": v for k, v in sft.items()})
            # DPO-style objectives measure the policy against the model the online
            # rounds start from: the warm-started one, not the initial weights.
            self.learner.reset_reference()
            # Kept so a resumed run can rebuild the same reference model.
            self.learner.save_checkpoint(str(self.run_dir / "warmstart"))
            out["time/sync_s"] += self._sync_weights()
        elif cfg.algorithm == "dpa-rsf" and cfg.dpa.restart_from_sft:
            # No warm start: DPA's rounds restart from the initial policy, kept here.
            self.learner.save_checkpoint(str(self._dpa_sft_dir()))
        if cfg.scorer.rm_train_responses > 0:
            n = cfg.scorer.rm_train_responses
            responses = self.task.rm_training_responses(n)
            if responses is None:
                responses = self._policy_responses(n)
            # Judge annotations for the reward model: one response per prompt.
            rm_samples = [
                ScoredSample(prompt_id=f"rm-{i}", prompt=ex["prompt"], text=ex["response"], segments=[], scores=[],
                             history=ex.get("history"), system=ex.get("system"))
                for i, ex in enumerate(responses[:n])
            ]
            judged, annotate_metrics = self.annotate(rm_samples)
            out.update(annotate_metrics)
            labelled = [(s, j) for s, j in zip(rm_samples, judged) if j is not None]
            # The RM learns from single labelled responses; pair records are just the
            # container its trainer reads (both sides are used).
            records = [
                {"prompt": a.prompt, "history": a.history or [], "chosen": self._labelled(a, ja),
                 "rejected": self._labelled(b, jb)}
                for (a, ja), (b, jb) in zip(labelled[0::2], labelled[1::2])
            ]
            t0 = time.perf_counter()
            rm_metrics = ray.get([s.train.remote(records) for s in self.scorers])[0]
            with atomic_directory(self.run_dir / "reward_model") as tmp:
                ray.get(self.scorers[0].save.remote(str(tmp)))
            if len(self.scorers) > 1:  # every scorer serves the same trained model
                ray.get([s.load.remote(str(self.run_dir / "reward_model")) for s in self.scorers[1:]])
            out["time/train_s"] += time.perf_counter() - t0
            out.update({f"rm_train/{k.split('/')[-1]}": v for k, v in rm_metrics.items() if isinstance(v, (int, float))})
        return out

    def _policy_responses(self, n: int) -> list[dict]:
        """One sampled response of the current policy to each of ``n`` train prompts
        (cycling through the pool), for the first reward model's annotations."""
        prompts = [self.train_prompts[i % len(self.train_prompts)] for i in range(n)]
        reqs = [self._request(p, f"rm-{i}") for i, p in enumerate(prompts)]
        groups, _ = self.rollout(reqs, n=1)
        return [{"prompt": r["prompt"], "response": g[0].text, "history": r.get("history"), "system": r.get("system")}
                for r, g in zip(reqs, groups)]

    def _labelled(self, sample: ScoredSample, judged: tuple) -> dict:
        segments, scores = judged
        return {"text": sample.text, "segments": segments,
                "scores": {a: [row[k] for row in scores] for k, a in enumerate(self.aspects)}}

    def update_reward_model(self, judged_samples: list[tuple[ScoredSample, Any]], round_idx: int) -> dict:
        """Keep the reward model current (``scorer.update_every_rounds``): this round's
        judge-rated samples join the RM's online training set
        (``RUN_DIR/reward_model_data.jsonl``), and the RM is fine-tuned on the whole set
        for ``scorer.update_epochs`` epochs before the next round's scoring. The policy
        drifts away from the data the round-0 RM saw; the judge's audit labels are the
        policy's current distribution, so they are what keeps the RM's ratings honest.

        ``judged_samples``: (sample, judge answer or None) with the RM's ratings still
        in ``sample.scores``. Returns ``rm/mae/<aspect>`` (mean absolute error of the RM
        against the judge on this round's audited segments, logged every round) and, when
        it trained, ``rm_update/*``. The updated RM replaces ``RUN_DIR/reward_model``
        atomically, so a resumed run and a restarted scorer load it."""
        sc = self.cfg.scorer
        judged = [(s, j) for s, j in judged_samples if j is not None]
        same = [(s.scores, j[1]) for s, j in judged if len(j[1]) == len(s.scores)]
        out: dict[str, Any] = {}
        for k, a in enumerate(self.aspects):
            errs = [abs(min(4.0, max(0.0, float(m[k]))) - float(r[k])) for ms, js in same for m, r in zip(ms, js)]
            out[f"rm/mae/{a}"] = sum(errs) / len(errs) if errs else math.nan
        if sc.update_every_rounds == 0 or sc.resolved_backend() != "hf":
            return out
        path = self.run_dir / "reward_model_data.jsonl"
        # A redone round (resume, learner recovery) replaces its own earlier rows.
        rows = [r for r in (json.loads(x) for x in (path.read_text().splitlines() if path.is_file() else []) if x.strip())
                if r["round"] < round_idx]
        rows += [{"round": round_idx, "prompt": s.prompt, "history": s.history or [], "system": s.system,
                  "chosen": self._labelled(s, j)} for s, j in judged if j[0]]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        # No update after the last round: no scoring follows it.
        due = (round_idx + 1) % sc.update_every_rounds == 0 and round_idx + 1 < self.total_rounds
        if not due or not rows:
            return out
        t0 = time.perf_counter()
        for attempt in range(sc.max_restarts + 1):
            # A scorer Ray is restarting is waited for; one that dies while training
            # comes back with the last saved RM, so the update is simply redone.
            _await_ready(self.scorers, deadline_s=sc.call_timeout_s)
            try:
                if sc.train_ranks > 1:
                    stats = self._update_rm_on_group(rows)
                    # Every scorer serves the model the group saved.
                    ray.get([s.load.remote(str(self.run_dir / "reward_model")) for s in self.scorers])
                    break
                stats = ray.get(self.scorers[0].train.remote(rows, epochs=sc.update_epochs, lr=sc.update_lr))
                with atomic_directory(self.run_dir / "reward_model") as tmp:
                    ray.get(self.scorers[0].save.remote(str(tmp)))
                if len(self.scorers) > 1:  # every scorer serves the same model
                    ray.get([s.load.remote(str(self.run_dir / "reward_model")) for s in self.scorers[1:]])
                break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError):
                if attempt == sc.max_restarts:
                    raise
        out.update({f"rm_update/{k.split('/')[-1]}": v for k, v in stats.items() if isinstance(v, (int, float))})
        out["rm_update/records"] = len(rows)
        out["time/rm_update_s"] = time.perf_counter() - t0
        return out

    def _update_rm_on_group(self, rows: list[dict]) -> dict:
        """An RM update on ``scorer.train_ranks`` DeepSpeed ranks (a model too large to
        train inside one scorer): the group starts from the RM the scorers serve
        (``RUN_DIR/reward_model``, else ``scorer.model.path``), trains like
        :meth:`actors.scorer.RewardScorer.train` would (``scorer.update_epochs``,
        ``update_lr``), saves over ``RUN_DIR/reward_model`` atomically and is shut
        down, so its GPUs are held only during the update."""
        from actors.reward_learner import RewardLearnerGroup

        sc = self.cfg.scorer
        current = self.run_dir / "reward_model"
        start = str(current) if (current / "config.json").is_file() else sc.model.path
        update = replace(sc, train_epochs=sc.update_epochs, train_lr=sc.update_lr or sc.train_lr)
        group = RewardLearnerGroup(self.cfg, rows, sc=update, model_path=start, namespace=self.namespace)
        try:
            stats: dict = {}
            while group.epochs_done < len(group.plan):
                stats = group.train_epoch()
            with atomic_directory(current) as tmp:
                group.save_pretrained(str(tmp))
        finally:
            group.shutdown()
        return stats

    # ------------------------------------------------------------------ a round

    def _plan_prompts(self, round_idx: int) -> list[dict]:
        picks = self._take_prompts(round_idx)
        self.planned_prompts += len(picks)
        requests = self._prompt_requests(picks, round_idx)
        # Which prompts the round drew, for auditing the cursor: a resumed run redraws
        # the interrupted round's prompts from the checkpointed cursor and rewrites this.
        # ``id`` is the task's own prompt id (a dataset row's), ``request`` the round's.
        out = self.run_dir / "rounds" / f"round-{round_idx:04d}.prompts.json"
        drawn = [self.train_prompts[i] for _, i in picks]
        atomic_write_text(out, json.dumps({"round": round_idx, "prompts": [
            {"epoch": e, "index": i, "id": p.id, "prompt": p.text, "request": f"r{round_idx}-e{e}-p{i}"}
            for (e, i), p in zip(picks, drawn)]}, indent=1))
        return requests

    def collect(self, requests: list[dict], round_idx: int) -> dict:
        """The round's samples: rollout, and with ``scheduling: stream`` also the reward
        model's scores and the judge's audit, per chunk of prompts as soon as its samples
        are in, while other prompts still generate. Other scheduling leaves scoring and
        judging to :meth:`finish_collect`. Runs in a stage thread for prefetched rounds."""
        cfg = self.cfg
        n = cfg.rollout.samples_per_prompt
        if cfg.scheduling != "stream":
            groups, metrics = self.rollout(requests, n)
            return {"groups": groups, "metrics": metrics, "audit": None, "judged": None}
        t0 = time.perf_counter()
        before = self._annotator_stats() if self.annotators else []
        jobs: list[futures.Future] = []
        batch: list[ScoredSample] = []

        def on_group(group: list[ScoredSample]) -> None:
            batch.extend(group)
            if len(batch) >= cfg.scorer.batch_size:
                jobs.append(self._stage_pool.submit(self._score_and_audit, list(batch), round_idx))
                batch.clear()

        groups, metrics = self.rollout(requests, n, on_group=on_group)
        if batch:
            jobs.append(self._stage_pool.submit(self._score_and_audit, list(batch), round_idx))
        audit, judged, score_s, annotate_s = [], [], 0.0, 0.0
        for job in jobs:
            a, j, ts, ta = job.result()
            audit += a
            judged += j
            score_s, annotate_s = score_s + ts, annotate_s + ta
        if self.annotators:
            after = self._annotator_stats()
            self._check_budget(after)
            metrics.update(self._annotate_metrics(before, after, annotate_s))
        # Busy time of each stage (they overlap: their sum exceeds the wall time).
        metrics.update({"time/score_s": score_s, "time/annotate_s": annotate_s,
                        "time/collect_s": time.perf_counter() - t0})
        return {"groups": groups, "metrics": metrics, "audit": audit, "judged": judged}

    def _audit(self, samples: list[ScoredSample], round_idx: int) -> list[ScoredSample]:
        """The samples the judge rates: ``annotator.fraction`` of them. Stage after
        stage, one draw per sample from the run's random stream (restored with each
        checkpoint); streaming scores samples in whatever order they finish, so there
        each sample has a seeded draw of its own (:func:`twodrl.rounds.audited`)."""
        fraction = self.cfg.annotator.fraction
        if self.cfg.scheduling != "stream":
            audit = [s for s in samples if random.random() < fraction]
            return audit if self.annotators else []
        if not self.annotators:
            return []
        counts: dict[str, int] = {}
        out = []
        for s in samples:
            k = counts[s.prompt_id] = counts.get(s.prompt_id, -1) + 1
            if audited(self.cfg.seed, round_idx, s.prompt_id, k, fraction):
                out.append(s)
        return out

    def _score_and_audit(self, samples: list[ScoredSample], round_idx: int) -> tuple[list, list, float, float]:
        """Stream scheduling, one chunk: reward-model scores, then the judge's ratings of
        its audited samples (the judge sees the response, not the RM's scores)."""
        score_s = self.score(samples, progress=False)  # many small calls: the rollout bar is the round's
        audit = self._audit(samples, round_idx)
        t0 = time.perf_counter()
        judged = self._judge_samples(audit) if audit else []
        return audit, judged, score_s, time.perf_counter() - t0

    def finish_collect(self, data: dict, round_idx: int) -> dict:
        """Scoring and judging of a collected round that :meth:`collect` left undone
        (``sync`` and ``overlap`` scheduling): stage after stage."""
        if data["audit"] is not None:
            return data
        samples = [s for g in data["groups"] for s in g]
        metrics = data["metrics"]
        self._fault_point("score", round_idx)
        metrics["time/score_s"] = self.score(samples)
        audit = self._audit(samples, round_idx)
        self._fault_point("annotate", round_idx)
        judged, annotate_metrics = (self.annotate(audit) if audit else
                                    ([], {"time/annotate_s": 0.0, "annotate/requests": 0, "annotate/failures": 0,
                                          "annotate/cost_usd": 0.0}))
        metrics.update(annotate_metrics)
        return dict(data, audit=audit, judged=judged)

    def _prefetch(self, round_idx: int) -> None:
        """Start collecting the rounds that may be sampled now (``overlap``: the next
        round's rollout; ``stream``: up to ``max_staleness`` rounds, all stages). Their
        prompts are drawn now, in round order, and checkpointed with this round, so a
        resumed run collects exactly these again."""
        cfg = self.cfg
        ahead = {"sync": 0, "overlap": 1, "stream": cfg.max_staleness}[cfg.scheduling]
        for q in rounds_to_prefetch(round_idx, self.total_rounds, ahead, list(self._prefetched)):
            requests = self._plan_prompts(q)
            self._prefetched[q] = (requests, self._pool.submit(self.collect, requests, q))

    def _cancel_prefetched(self) -> None:
        for _, fut in self._prefetched.values():
            fut.cancel()
        self._prefetched.clear()

    def run_round(self, round_idx: int, pending: futures.Future | None = None) -> dict:
        """One round; returns its logged metrics. ``pending`` is this round's collection
        already under way (overlap/stream scheduling; by default the one this driver
        prefetched)."""
        cfg = self.cfg
        t_round = time.perf_counter()
        stage_time = 0.0
        metrics: dict[str, Any] = {"round": round_idx, "weights_version": self.weights_version}
        if round_idx == 0:
            m = self.warm_start()
            metrics.update(m)
            stage_time += m["time/train_s"] + m["time/sync_s"] + m.get("time/annotate_s", 0.0)
            # Round 0's eval is the baseline: the policy the online rounds start from.
            t0 = time.perf_counter()
            eval_metrics = self.evaluate(round_idx)
            self._write_samples(round_idx)
            stage_time += time.perf_counter() - t0

        self._fault_point("rollout", round_idx)
        prefetched = self._prefetched.pop(round_idx, None)
        if pending is None and prefetched is not None:
            pending = prefetched[1]
        if pending is None:
            data = self.collect(self._plan_prompts(round_idx), round_idx)
            stage_time += data["metrics"].get("time/collect_s", data["metrics"]["time/rollout_s"])
        else:
            t0 = time.perf_counter()
            data = pending.result()  # collected beside the previous round
            stage_time += time.perf_counter() - t0  # what of it was not hidden
        # The next rounds' collection runs while this one scores, trains and evaluates.
        self._prefetch(round_idx)
        data = self.finish_collect(data, round_idx)
        groups, audit, judged = data["groups"], data["audit"], data["judged"]
        samples = [s for g in groups for s in g]
        for k, v in data["metrics"].items():
            metrics[k] = metrics.get(k, 0) + v if k.startswith(("annotate/", "time/annotate")) and k in metrics else v
        if cfg.scheduling != "stream":
            stage_time += metrics["time/score_s"] + metrics["time/annotate_s"]
        # DPA asks a prompt once per direction: count prompts, not requests.
        n_prompts = len({s.prompt_id.split("-d")[0] for s in samples}) if cfg.algorithm == "dpa-rsf" else len(groups)
        self.completed_prompts += n_prompts
        metrics.update({"rollout/prompts": n_prompts, "rollout/samples": len(samples),
                        "rollout/prompts_planned": cfg.rollout.prompts_per_round})
        staleness = staleness_summary([s.weights_version for s in samples], self.weights_version)
        metrics.update(staleness)

        pairs_rm = [(s, j[1]) for s, j in zip(audit, judged) if j is not None and len(j[1]) == len(s.scores)]
        metrics.update(agreement([s.scores for s, _ in pairs_rm], [j for _, j in pairs_rm], self.aspects))
        rm_job = None
        if cfg.scheduling == "stream":
            # The RM fine-tunes on the scorer while the policy trains; it is done before
            # the round's checkpoint. It sees the RM's own ratings, kept aside here
            # before the judge's replace them below.
            judged_rm = [(replace(s, scores=[list(row) for row in s.scores]), j) for s, j in zip(audit, judged)]
            rm_job = self._stage_pool.submit(self.update_reward_model, judged_rm, round_idx)
        else:
            t0 = time.perf_counter()
            metrics.update(self.update_reward_model(list(zip(audit, judged)), round_idx))
            stage_time += time.perf_counter() - t0
        if cfg.annotator.judge_overrides_rm:
            for s, judge_scores in pairs_rm:  # the judge's ratings are the better label
                s.scores = [list(map(float, row)) for row in judge_scores]
        metrics.update(reward_summary(samples, self.weights, self.aspects))

        self._fault_point("train", round_idx)
        t0 = time.perf_counter()
        metrics.update(self.train(groups))
        metrics.update(self.credit())
        metrics["time/train_s"] = metrics.get("time/train_s", 0.0) + time.perf_counter() - t0
        stage_time += time.perf_counter() - t0
        self._fault_point("sync", round_idx)
        sync_s = self._sync_weights()
        metrics["time/sync_s"] = metrics.get("time/sync_s", 0.0) + sync_s
        stage_time += sync_s

        self._fault_point("eval", round_idx)
        evaluating = round_idx > 0 and self._eval_due(round_idx)  # after this round's training
        if round_idx == 0:
            metrics.update(eval_metrics)
        metrics["time/eval_s"] = 0.0
        t0 = time.perf_counter()
        if cfg.scheduling == "stream":
            # The engines evaluate and the scorer fine-tunes while the learner ranks write
            # the checkpoint; the round's metrics (with theirs) go into it last.
            jobs = [rm_job]
            if evaluating:
                jobs.append(self._pool.submit(self._evaluate_round, round_idx))
            self._fault_point("checkpoint", round_idx)
            jobs.append(self._stage_pool.submit(self._recovery_metrics))  # restarts up to the checkpoint
            self.checkpoint(round_idx, metrics, jobs=[j for j in jobs if j is not None])
        else:
            if evaluating:
                metrics.update(self._evaluate_round(round_idx))
            self._fault_point("checkpoint", round_idx)
            metrics.update(self._recovery_metrics())
            self.checkpoint(round_idx, metrics)
        metrics["time/checkpoint_s"] = time.perf_counter() - t0 - (0.0 if cfg.scheduling == "stream" else metrics["time/eval_s"])
        stage_time += time.perf_counter() - t0
        metrics["time/round_s"] = time.perf_counter() - t_round
        metrics["time/driver_overhead_s"] = max(0.0, metrics["time/round_s"] - stage_time)
        return self._log(metrics)

    def _evaluate_round(self, round_idx: int) -> dict:
        t0 = time.perf_counter()
        out = self.evaluate(round_idx)
        self._write_samples(round_idx)
        out["time/eval_s"] = time.perf_counter() - t0
        return out

    def _recovery_metrics(self) -> dict:
        self._count_restarts()
        return {"recovery/learner_restarts": self.learner_restarts,
                **{f"recovery/{role}_restarts": n for role, n in self.restarts.items()}}

    def train(self, groups: list[list[ScoredSample]]) -> dict:
        """The learner's step of the round, by algorithm: preference pairs (2D-DPO, the
        DPO family and ADPO), PPO-clip with adaptive masks (APPO), adaptive rejection
        sampling on each prompt's best sample (ARS), or rejection-sampling fine-tuning on
        the best sample along each prompt's direction (DPA-RSF)."""
        algorithm = self.cfg.algorithm
        if algorithm in ("appo", "dpa-rsf", "ars"):
            # These train on samples, not pairs: the probe is still drawn from the
            # round's best/worst pairs, but nothing is held out of training.
            self._hold_out_probe(select_pairs(groups, self.weights, self.aspects), hold_out=False)
        if algorithm == "appo":
            return self.learner.train_appo(groups, self.weights, self.aspects)
        if algorithm == "ars":
            return self.learner.train_ars(groups, self.weights, self.aspects)
        if algorithm == "dpa-rsf":
            return self._train_dpa(groups)
        pairs = self._hold_out_probe(select_pairs(groups, self.weights, self.aspects))
        out = self.learner.train_round(pairs, algorithm) if pairs else {}
        out["train/pairs"] = len(pairs)
        return out

    # ------------------------------------------------------------------ segment credit

    def _credit_probe_path(self) -> Path:
        return self.run_dir / "credit_probe.json"

    def _hold_out_probe(self, pairs: list[dict], hold_out: bool = True) -> list[dict]:
        """The first round with pairs sets a few of them aside, for good, as the probe of
        the segment-credit diagnostic, and records their per-token log-probs under the
        policy the preference rounds start from (``RUN_DIR/credit_probe.json``)."""
        n = min(self.cfg.eval.credit_probe_pairs, len(pairs) // 8)
        # A sequence-mode RM rates whole responses: there are no segment ratings to bin by.
        if self._credit_probe is not None or n == 0 or self.cfg.scorer.mode == "sequence":
            return pairs
        from twodrl.diagnostics import split_probe_pairs

        probe, rest = split_probe_pairs(pairs, n, seed=self.cfg.seed)
        before = self.learner.segment_logprobs(probe)
        atomic_write_text(self._credit_probe_path(),
                          json.dumps({"pairs": probe, "before": [b.as_dict() for b in before]}))
        self._credit_probe = (probe, before)
        return rest if hold_out else pairs

    def _read_credit_probe(self) -> None:
        from twodrl.diagnostics import PairSegmentLogps

        path = self._credit_probe_path()
        if path.is_file():
            doc = json.loads(path.read_text())
            self._credit_probe = (doc["pairs"], [PairSegmentLogps.from_dict(x) for x in doc["before"]])

    def credit(self) -> dict:
        """``credit/<side>/<rating bin>``: mean change of per-token log-prob of the probe's
        segments since the probe was drawn, by chosen/rejected and by the segment's
        weighted rating (see :mod:`twodrl.diagnostics`)."""
        if self._credit_probe is None:
            return {}
        from twodrl.diagnostics import credit_metrics

        probe, before = self._credit_probe
        return credit_metrics(probe, before, self.learner.segment_logprobs(probe), self.aspects, self.weights)

    def _train_dpa(self, groups: list[list[ScoredSample]]) -> dict:
        """DPA-RSF's fine-tune of a round: each (prompt, direction)'s best sample by
        ``vᵀr`` plus a ``dpa.replay_fraction`` share of the task's own data is this
        round's selection, kept in ``RUN_DIR/dpa/selected.jsonl``. With
        ``dpa.restart_from_sft`` the learner goes back to the round-0 policy and is
        fine-tuned on every round's selection so far; otherwise the last policy is
        fine-tuned on this round's."""
        from twodrl.dpa import record_selected, select_winners
        from twodrl.rounds import objective_values

        dpa = self.cfg.dpa
        groups = [g for g in groups if g and g[0].prompt_id in self._directions]
        if not groups:
            return {}
        round_idx = _request_round(groups[0][0].prompt_id)
        n = max(len(g) for g in groups)
        rewards = torch.zeros(len(groups), n, len(dpa.objectives), dtype=torch.float64)
        valid = torch.zeros(len(groups), n, dtype=torch.bool)
        for p, group in enumerate(groups):
            for k, sample in enumerate(group):
                if sample.segments:
                    values = torch.tensor(objective_values(sample, dpa.objectives, self.aspects), dtype=torch.float64)
                    # A rating the RM could not give (NaN) must not win the argmax.
                    if torch.isfinite(values).all():
                        rewards[p, k] = values
                        valid[p, k] = True
        directions = torch.tensor([self._directions.pop(g[0].prompt_id) for g in groups], dtype=torch.float64)
        winners = select_winners(rewards, directions, valid)
        rows = [
            {"kind": "winner", "prompt": g[int(i)].prompt, "response": g[int(i)].text, "system": g[int(i)].system,
             "history": g[int(i)].history, "direction": d.tolist(), "score": float(sc)}
            for g, i, d, sc in zip(groups, winners.index.tolist(), directions, winners.score.tolist()) if i >= 0
        ]
        n_winners = len(rows)
        # Replay a share of the task's original (warm-start) data so fine-tuning on its
        # own samples does not drift away from what the policy could already do; a task
        # without such data replays nothing (said once, in the log).
        n_replay = round(n_winners * dpa.replay_fraction / max(1e-9, 1 - dpa.replay_fraction))
        if not self.task.has_replay:
            if n_replay and not getattr(self, "_said_no_replay", False):
                print(f"[twodrl] dpa: the {self.task.name} task has no warm-start data (task.sft_dataset): "
                      "no replay", flush=True)
                self._said_no_replay = True
            n_replay = 0
        # Seeded by round: a redone round (resume, rebuilt learner) replays the same data.
        self._replay_rng.seed(f"{self.cfg.seed}:dpa-replay:{round_idx}")
        for _ in range(n_replay):
            rows.append(dict(self.task.replay_example(self._replay_rng), kind="replay"))
        selected = record_selected(self.run_dir / "dpa" / "selected.jsonl", round_idx, rows)
        train_rows = selected if dpa.restart_from_sft else rows
        examples = [{k: r[k] for k in ("prompt", "response", "system", "history") if r.get(k) is not None}
                    for r in train_rows]
        out: dict[str, Any] = {}
        if dpa.restart_from_sft and examples:
            lc = self.cfg.learner
            per_step = lc.micro_batch_size * lc.grad_accum_steps * lc.num_ranks
            steps = lc.epochs_per_round * -(-len(examples) // per_step)
            t0 = time.perf_counter()
            if not self._dpa_sft_dir().is_dir():  # a run directory from before this option
                raise RuntimeError(f"dpa.restart_from_sft: no round-0 policy to restart from at {self._dpa_sft_dir()} "
                                   "(saved by round 0); start a new run or set dpa.restart_from_sft=false")
            self.learner.reset_to(str(self._dpa_sft_dir()), total_steps=steps)
            out["time/dpa_restart_s"] = time.perf_counter() - t0
        out.update(self.learner.train_sft(examples, epochs=self.cfg.learner.epochs_per_round))
        out["train/winners"] = n_winners
        out["train/replay"] = n_replay
        out["train/sft_examples"] = len(examples)
        out["train/restarted"] = int(bool(dpa.restart_from_sft and examples))
        out["train/winner_score"] = float(winners.score[winners.index >= 0].mean()) if (winners.index >= 0).any() else math.nan
        return out

    def _dpa_sft_dir(self) -> Path:
        """The policy DPA's rounds restart from: the warm-started one
        (``RUN_DIR/warmstart``), or, when round 0 had no SFT, the initial policy saved by
        :meth:`warm_start` (``RUN_DIR/dpa/sft``)."""
        warm = self.run_dir / "warmstart"
        return warm if warm.is_dir() else self.run_dir / "dpa" / "sft"

    def _take_prompts(self, round_idx: int) -> list[tuple[int, int]]:
        """The round's prompts as ``(epoch, pool index)``: the next ones of the run's
        cursor, or with ``dpa.disjoint_prompts`` (DPA-RSF) the round's own part of the
        pool, one of ``rounds + 1`` disjoint parts."""
        n = self.cfg.rollout.prompts_per_round
        if self.cfg.algorithm == "dpa-rsf" and self.cfg.dpa.disjoint_prompts:
            from twodrl.rounds import part_picks

            part = len(self.train_prompts) // self.total_rounds
            if n > part and not getattr(self, "_said_small_part", False):
                print(f"[twodrl] dpa.disjoint_prompts: each round's part holds ~{part} of the "
                      f"{len(self.train_prompts)} train prompts, fewer than rollout.prompts_per_round={n}: "
                      "a round asks some prompts more than once", flush=True)
                self._said_small_part = True
            return part_picks(len(self.train_prompts), self.total_rounds, round_idx, n, self.cfg.seed)
        return self.cursor.take(n)

    def _write_samples(self, round_idx: int) -> None:
        """Held-out responses of the round with their segment × aspect ratings, to read
        what the policy actually says (``RUN_DIR/samples/round-000K.jsonl``)."""
        out = self.run_dir / "samples" / f"round-{round_idx:04d}.jsonl"
        records = [{"id": p.id, "prompt": s.prompt, "history": s.history, "system": s.system, "text": s.text,
                    "segments": s.segments, "scores": s.scores}
                   for s, p in zip(self.last_eval_samples, self.eval_prompts)]
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
        # The same rows as a wandb table (a no-op without wandb), at the round's step.
        if self.logger is not None:
            self.logger.log_table(EVAL_SAMPLES_KEY, *eval_sample_table(records, self.aspects), step=round_idx)

    def _log(self, metrics: dict) -> dict:
        """Called after the round's checkpoint, which also holds the round's metrics: on
        resume, lines newer than the last checkpoint are dropped and a checkpointed
        round without its line is logged from that copy, so each round appears once."""
        assert self.logger is not None
        row = self.logger.log(metrics)
        self._print_round(row)
        if self.cfg.logging.plots:
            plot_rewards(self.logger.path, self.run_dir / "plots" / "rewards.png", self.aspects)
        return row

    def checkpoint(self, round_idx: int, metrics: dict | None = None, jobs: list[futures.Future] = ()) -> Path:
        """The round's checkpoint, written to a temporary sibling and renamed: a crash
        at any point leaves the previous one whole. ``jobs``: the round's work still
        running on other actors (evaluation, reward-model update); the checkpoint is
        complete once they are, and their metrics join ``metrics`` before it is saved."""
        final = round_dir(self.run_dir, round_idx)
        pending = {q: reqs for q, (reqs, _) in sorted(self._prefetched.items()) if q > round_idx}
        with atomic_directory(final) as tmp:
            self.learner.save_checkpoint(str(tmp / "learner"))
            for job in jobs:
                out = job.result()
                if metrics is not None:
                    metrics.update(out)
            write_driver_state(
                tmp,
                {
                    "round": round_idx,
                    "cursor": self.cursor.state(),
                    "planned_prompts": self.planned_prompts,
                    "completed_prompts": self.completed_prompts,
                    "weights_version": self.weights_version,
                    "learner_restarts": self.learner_restarts,
                    "restarts": dict(self.restarts),
                    # Overlap/stream scheduling: later rounds' prompts are already drawn
                    # (the cursor includes them); a resumed run collects exactly these.
                    "pending_rounds": {str(q): reqs for q, reqs in pending.items()},
                    "pending_directions": {r["id"]: self._directions[r["id"]]
                                           for reqs in pending.values() for r in reqs if r["id"] in self._directions},
                    # The round's metrics so far: a crash after this rename but before
                    # the metrics line is written must not lose the round's line.
                    "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str, type(None)))},
                },
            )
        prune_checkpoints(self.run_dir, keep=self.cfg.logging.keep_checkpoints)
        return final

    def _print_round(self, row: dict) -> None:
        cols = ["reward/weighted", "eval/reward/weighted", "train/loss", "train/rewards/accuracies", "time/round_s"]
        cells = [f"{c}={row[c]:.3f}" if isinstance(row.get(c), (int, float)) else f"{c}=-" for c in cols]
        aspects = " ".join(
            f"{a[:5]}={row[f'eval/reward/{a}']:.2f}" for a in self.aspects if isinstance(row.get(f"eval/reward/{a}"), (int, float))
        )
        # Bars cleared first and redrawn below: a plain print would land on the rounds
        # bar's row, after it.
        with tqdm.external_write_mode():
            print(f"[round {row['round']}] " + "  ".join(cells) + f"\n          eval per aspect: {aspects}", flush=True)

    # ------------------------------------------------------------------ run

    @property
    def total_rounds(self) -> int:
        return self.cfg.rounds + 1  # round 0 (warm start) + the online rounds

    def _collect_resumed(self) -> None:
        """Collect again the rounds a checkpoint recorded as prefetched, with the same
        prompts (each re-issued exactly once)."""
        for q, requests in sorted((getattr(self, "_resume_requests", None) or {}).items()):
            if q < self.total_rounds and q not in self._prefetched:
                self._prefetched[q] = (requests, self._pool.submit(self.collect, requests, q))
        self._resume_requests = None

    def run(self) -> list[dict]:
        rows = []
        self._collect_resumed()
        bar = tqdm(total=self.total_rounds, initial=self.next_round, desc="rounds", disable=not self.progress)
        r = self.next_round
        while r < self.total_rounds:
            try:
                rows.append(self.run_round(r))
            except JudgeBudgetExhausted:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised unless it is a learner failure
                if self._learner_alive():
                    raise self._stopped(r, e) from e
                if self.learner_restarts >= self.cfg.learner.max_failures:
                    raise self._stopped(r, e, ["learner (learner.max_failures reached)"]) from e
                r = self._recover_learner(e)
                rows = [row for row in rows if row["round"] < r]
                bar.n = r
                continue
            r += 1
            bar.update(1)
        bar.close()
        return rows

    def shutdown(self) -> None:
        if getattr(self, "learner", None) is not None:
            # The learner's /dev/shm weight-sync segment: its actors may be killed
            # with the cluster next, before their own exit handlers could remove it.
            self.learner.close_weight_segments()
        if self.logger is not None:
            self.logger.finish()
        if self._stop_judge is not None:
            self._stop_judge()
            self._stop_judge = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stage_pool.shutdown(wait=False, cancel_futures=True)
