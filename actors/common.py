"""Actor naming, namespaces and placement, shared by every actor and the driver.

Every actor is named ``<role>-<index>`` (``rollout-0``, ``scorer-1``, ``learner-0``,
``annotator-0``, ``reference-0``) inside one namespace per run, so a second driver (a
resumed run, ``ray job submit``, a debugging shell) finds the same actors with
``ray.get_actor(name, namespace=...)`` and two runs on one cluster never collide.

Resources come from the config sections, never from literals in actor code:

=============  ===========================================  ==============================
role           CPUs / GPUs per actor                        count
=============  ===========================================  ==============================
rollout        rollout.num_cpus / rollout.num_gpus          rollout.num_workers
scorer         scorer.num_cpus / scorer.num_gpus            scorer.num_workers
learner        learner.num_cpus_per_rank / num_gpus_per_rank learner.num_ranks
reference      same as one learner rank                     1 if not learner.colocate_reference
annotator      annotator.num_cpus / 0                       annotator.num_actors
rm_learner     scorer.train_num_cpus/gpus_per_rank          scorer.train_ranks (if > 1)
=============  ===========================================  ==============================

A vLLM tensor-parallel engine (``tensor_parallel_size`` > 1 on GPU) reserves one bundle
per GPU in a ``STRICT_PACK`` placement group, so all shards of one engine land on one
node (NCCL between them stays on NVLink). An HF scorer with ``tensor_parallel_size`` N
> 1 shards its model over N GPUs inside its own process, so the actor itself asks for
N GPUs. Learner ranks share one ``PACK`` group: ranks prefer one node but may spill
over when a node is too small; so do the reward-model trainer's ranks (``rm_learner``,
:mod:`actors.reward_learner`) in a group of their own. :func:`actor_request` is the one place these rules
live; the planner (``twodrl plan``) reads it too.

On CPU every ``num_gpus`` is 0; Ray CPUs are logical slots, so fractional values let a
2-core machine host a handful of actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from twodrl.config import ConfigError, RunConfig

ROLES = ("rollout", "scorer", "learner", "reference", "annotator", "rm_learner")
# The annotation actor only waits on HTTP; it needs a sliver of a CPU slot.
ANNOTATOR_NUM_CPUS = 0.05


class PlacementError(ConfigError):
    """The configured actors cannot be placed on this cluster; names the config field."""


def actor_name(role: str, index: int) -> str:
    """``rollout-0``, ``learner-1`` …"""
    if role not in ROLES:
        raise ValueError(f"unknown actor role {role!r}; known roles: {ROLES}")
    if index < 0:
        raise ValueError(f"actor index must be ≥ 0, got {index}")
    return f"{role}-{index}"


def run_namespace(cfg: RunConfig) -> str:
    """The per-run Ray namespace: ``ray.namespace`` if set, else ``twodrl-<run_name>``."""
    if cfg.ray.namespace:
        return cfg.ray.namespace
    return f"twodrl-{cfg.run_name or 'default'}"


# ----------------------------------------------------------------------- resources


@dataclass(frozen=True)
class RoleResources:
    """What one actor of a role asks for, how many there are, and which config fields
    those numbers came from (for error messages)."""

    role: str
    count: int
    num_cpus: float
    num_gpus: float
    tensor_parallel_size: int = 1
    max_restarts: int = 0
    fields: dict[str, str] = field(default_factory=dict)  # "cpus"/"gpus"/"count" -> dotted field
    backend: str = ""  # rollout / scorer: the engine that runs ("vllm" or "hf")


def role_resources(cfg: RunConfig, role: str) -> RoleResources:
    """Resources of one actor of ``role`` as the config asks for them."""
    if role == "rollout":
        r = cfg.rollout
        return RoleResources(
            "rollout", r.num_workers, r.num_cpus, r.num_gpus, r.tensor_parallel_size, r.max_restarts,
            {"cpus": "rollout.num_cpus", "gpus": "rollout.num_gpus", "count": "rollout.num_workers",
             "tp": "rollout.tensor_parallel_size"},
            r.backend,
        )
    if role == "scorer":
        s = cfg.scorer
        return RoleResources(
            "scorer", s.num_workers, s.num_cpus, s.num_gpus, s.tensor_parallel_size, s.max_restarts,
            {"cpus": "scorer.num_cpus", "gpus": "scorer.num_gpus", "count": "scorer.num_workers",
             "tp": "scorer.tensor_parallel_size"},
            s.resolved_backend(),
        )
    if role in ("learner", "reference"):
        lc = cfg.learner
        # DPA's rejection-sampling fine-tuning never reads a reference model: none is
        # started for it, colocated or not. With LoRA the reference is the policy's own
        # base weights (adapter off) on every rank.
        no_actor = lc.colocate_reference or cfg.algorithm == "dpa-rsf" or lc.lora.enabled
        count = lc.num_ranks if role == "learner" else (0 if no_actor else 1)
        return RoleResources(
            role, count, lc.num_cpus_per_rank, lc.num_gpus_per_rank, 1, 0,
            {"cpus": "learner.num_cpus_per_rank", "gpus": "learner.num_gpus_per_rank",
             "count": "learner.num_ranks" if role == "learner" else "learner.colocate_reference"},
        )
    if role == "rm_learner":
        s = cfg.scorer
        # One process trains a single-rank RM (the scorer actor or train-rm itself);
        # the DeepSpeed group exists only for more ranks.
        return RoleResources(
            role, s.train_ranks if s.train_ranks > 1 else 0, s.train_num_cpus_per_rank, s.train_num_gpus_per_rank, 1, 0,
            {"cpus": "scorer.train_num_cpus_per_rank", "gpus": "scorer.train_num_gpus_per_rank",
             "count": "scorer.train_ranks"},
        )
    if role == "annotator":
        return RoleResources(
            "annotator", cfg.annotator.num_actors, cfg.annotator.num_cpus, 0.0, 1, cfg.annotator.max_restarts,
            {"cpus": "annotator.num_cpus", "gpus": "-", "count": "annotator.num_actors"},
        )
    raise ValueError(f"unknown actor role {role!r}; known roles: {ROLES}")


def gpus_per_actor(res: RoleResources) -> float:
    """GPUs one actor really holds: a TP engine spans ``tensor_parallel_size`` GPUs."""
    return _request(res, 0).gpus


@dataclass(frozen=True)
class ActorRequest:
    """What one actor asks Ray for — the one source :func:`actor_options`, the
    placement groups, :func:`validate_placement` and the planner
    (:mod:`twodrl.planner`) all read, so the plan is what Ray is asked for.

    ``num_cpus`` / ``num_gpus`` go into the actor's own options. An actor inside a
    placement group takes them out of bundle ``bundle_index``; ``bundles`` are the
    bundles it holds (a TP engine: all of its group's, its workers take the others; a
    learner rank: its own), ``strategy`` the group's. ``gpus`` / ``cpus``: the totals
    the actor holds, with or without a group."""

    role: str
    index: int
    num_cpus: float
    num_gpus: float
    bundles: tuple[dict[str, float], ...] = ()
    strategy: str = ""
    bundle_index: int = -1

    @property
    def gpus(self) -> float:
        return float(sum(b.get("GPU", 0.0) for b in self.bundles)) if self.bundles else float(self.num_gpus)

    @property
    def cpus(self) -> float:
        return float(sum(b.get("CPU", 0.0) for b in self.bundles)) if self.bundles else float(self.num_cpus)


def _request(res: RoleResources, index: int) -> ActorRequest:
    role, cpus, gpus, tp = res.role, res.num_cpus, res.num_gpus, res.tensor_parallel_size
    if role in ("rollout", "scorer") and gpus > 0 and tp > 1:
        if res.backend == "vllm":
            # vLLM's TP workers each claim one whole-GPU bundle of a STRICT_PACK group (one
            # node, NVLink); the engine's own process runs in bundle 0 with the CPUs and
            # no GPU of its own.
            bundles = ({"GPU": 1.0, "CPU": float(cpus)},) + ({"GPU": 1.0},) * (tp - 1)
            return ActorRequest(role, index, cpus, 0.0, bundles, "STRICT_PACK", 0)
        if role == "scorer":
            # The HF scorer shards one model over its GPUs in its own process
            # (device_map="auto"): Ray must give that process all of them.
            return ActorRequest(role, index, cpus, float(tp))
        # HF generate runs on one device: tensor_parallel_size does not apply.
    if role in ("learner", "rm_learner") and gpus > 0:
        # Ranks share one PACK group (reserved together, see learner_group); each
        # runs in its own bundle.
        return ActorRequest(role, index, cpus, gpus, ({"GPU": float(gpus), "CPU": float(cpus)},), "PACK", index)
    return ActorRequest(role, index, cpus, gpus)


def actor_request(cfg: RunConfig, role: str, index: int = 0) -> ActorRequest:
    """What actor ``role-index`` asks Ray for (see :class:`ActorRequest`)."""
    return _request(role_resources(cfg, role), index)


def actor_requests(cfg: RunConfig) -> list[ActorRequest]:
    """Every actor of the run, role by role (as many as ``role_resources`` counts)."""
    return [actor_request(cfg, role, i) for role in ROLES for i in range(role_resources(cfg, role).count)]


def _nodes() -> list[dict[str, float]]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", False)]


def validate_placement(
    cfg: RunConfig,
    cluster: Optional[dict[str, float]] = None,
    nodes: Optional[list[dict[str, float]]] = None,
    roles: tuple[str, ...] = ROLES,
    source: str = "<config>",
) -> dict[str, float]:
    """Check that every actor of ``roles`` fits on the cluster before any starts.

    ``cluster`` defaults to ``ray.cluster_resources()`` and ``nodes`` to the alive
    nodes' resources. Returns the totals asked for ({"CPU": .., "GPU": ..}). Raises
    :class:`PlacementError` naming the config field to change.
    """
    if cluster is None:
        cluster = ray.cluster_resources()
    if nodes is None:
        nodes = _nodes() if ray.is_initialized() else [cluster]
    have_cpu = float(cluster.get("CPU", 0.0))
    have_gpu = float(cluster.get("GPU", 0.0))
    max_node_gpu = max((float(n.get("GPU", 0.0)) for n in nodes), default=have_gpu)
    need_cpu = need_gpu = 0.0
    lines = []
    for role in roles:
        res = role_resources(cfg, role)
        f = res.fields
        if res.count == 0:
            continue
        if res.num_cpus < 0:
            raise PlacementError(f"{source}: {f['cpus']} must be ≥ 0, got {res.num_cpus}")
        if res.num_gpus < 0:
            raise PlacementError(f"{source}: {f['gpus']} must be ≥ 0, got {res.num_gpus}")
        if res.tensor_parallel_size < 1:
            raise PlacementError(f"{source}: {f['tp']} must be ≥ 1, got {res.tensor_parallel_size}")
        if res.num_gpus > 0 and have_gpu == 0:
            raise PlacementError(
                f"{source}: {f['gpus']} = {res.num_gpus} but the Ray cluster has no GPU "
                f"(ray.cluster_resources() = {dict(cluster)}); set {f['gpus']}=0 on CPU"
            )
        req = _request(res, 0)
        per = req.gpus
        if per > max_node_gpu > 0:
            what = f"{f['tp']} = {res.tensor_parallel_size}" if res.tensor_parallel_size > 1 else f"{f['gpus']} = {res.num_gpus}"
            raise PlacementError(
                f"{source}: {what} needs {per:g} GPUs on one node, but the largest node has {max_node_gpu:g}"
            )
        if res.num_gpus > 1 and res.tensor_parallel_size == 1 and not float(res.num_gpus).is_integer():
            raise PlacementError(f"{source}: {f['gpus']} = {res.num_gpus}: more than one GPU must be a whole number")
        need_cpu += res.count * req.cpus
        need_gpu += res.count * per
        lines.append(f"{role}: {res.count} × ({req.cpus:g} CPU, {per:g} GPU) [{f['count']}, {f['cpus']}, {f['gpus']}]")
    detail = "; ".join(lines)
    if need_cpu > have_cpu + 1e-9:
        raise PlacementError(
            f"{source}: the actors ask for {need_cpu:g} CPUs but the Ray cluster has {have_cpu:g} "
            f"({detail}); lower the per-actor num_cpus fields or raise ray.num_cpus"
        )
    if need_gpu > have_gpu + 1e-9:
        raise PlacementError(
            f"{source}: the actors ask for {need_gpu:g} GPUs but the Ray cluster has {have_gpu:g} ({detail})"
        )
    return {"CPU": need_cpu, "GPU": need_gpu}


# ----------------------------------------------------------------------- placement groups


def tensor_parallel_group(res: RoleResources, name: str | None = None) -> Optional[PlacementGroup]:
    """One STRICT_PACK group with a bundle per GPU for a TP engine, or None when the
    engine needs no group (CPU, or a single GPU)."""
    req = _request(res, 0)
    if not req.bundles:
        return None
    return placement_group([dict(b) for b in req.bundles], strategy=req.strategy, name=name or "")


def learner_group(cfg: RunConfig, name: str | None = None, role: str = "learner") -> Optional[PlacementGroup]:
    """A PACK group with one bundle per rank of ``role`` (``learner``, or the reward
    model's ``rm_learner``) when the ranks use GPUs, so they are reserved together (a
    half-placed group would deadlock in init_process_group). None on CPU: fractional
    CPU slots need no reservation."""
    reqs = [actor_request(cfg, role, i) for i in range(role_resources(cfg, role).count)]
    if not reqs or not reqs[0].bundles:
        return None
    return placement_group([dict(r.bundles[0]) for r in reqs], strategy=reqs[0].strategy, name=name or "")


def wait_placement_group(pg: Optional[PlacementGroup], timeout_s: float = 300.0, field_hint: str = "") -> None:
    if pg is None:
        return
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        raise PlacementError(
            f"placement group {pg.bundle_specs} was not placed within {timeout_s:.0f}s"
            + (f"; check {field_hint}" if field_hint else "")
        )


# ----------------------------------------------------------------------- actor options


def actor_options(
    role: str,
    index: int,
    cfg: RunConfig,
    namespace: Optional[str] = None,
    placement: Optional[PlacementGroup] = None,
    bundle_index: int = -1,
    max_restarts: Optional[int] = None,
    detached: bool = False,
) -> dict[str, Any]:
    """``ActorClass.options(**actor_options(...))`` for actor ``role-index``.

    ``max_task_retries`` is 0 on purpose: when an actor dies mid-request the caller
    (:mod:`actors.workqueue`) decides what to re-queue, so no item is run twice
    behind its back.
    """
    res = role_resources(cfg, role)
    req = _request(res, index)
    opts: dict[str, Any] = {
        "name": actor_name(role, index),
        "namespace": namespace or run_namespace(cfg),
        "num_cpus": req.num_cpus,
        "num_gpus": req.num_gpus,
        "max_restarts": res.max_restarts if max_restarts is None else max_restarts,
        "max_task_retries": 0,
        "max_concurrency": 1,
    }
    if detached:
        opts["lifetime"] = "detached"
    if placement is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement,
            placement_group_bundle_index=bundle_index,
            placement_group_capture_child_tasks=True,
        )
    return opts


def get_or_create_actor(actor_cls: Any, options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """The actor named ``options['name']`` in ``options['namespace']``, created with
    ``args``/``kwargs`` if it does not exist yet (a resumed driver re-attaches)."""
    name, namespace = options["name"], options.get("namespace")
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        pass
    return actor_cls.options(**options, get_if_exists=True).remote(*args, **kwargs)


def count_incarnation() -> int:
    """Called in an actor's constructor: how many times this actor has been started (1
    the first time, +1 for every restart Ray made). Kept in a small file per actor id on
    its node, since Ray gives a restarted actor no count of its own; the driver reads it
    for ``recovery/<role>_restarts``. 0 outside an actor."""
    import fcntl
    import os
    import tempfile
    from pathlib import Path

    try:
        actor_id = ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001 - not inside Ray
        actor_id = None
    if not actor_id:
        return 0
    path = Path(tempfile.gettempdir()) / "twodrl-actors" / f"{actor_id}.starts"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = int(f.read().strip() or 0) + 1
        f.seek(0)
        f.truncate()
        f.write(str(n))
        f.flush()
        os.fsync(f.fileno())
    return n


# ----------------------------------------------------------------------- actor logs

# The directory every actor writes its own log file to (RUN_DIR/logs), set by
# jobs.driver.connect_ray in the job's runtime env so it reaches actors on every node
# (with or without `ray job submit`). Unset (--verbose, or a Ray the caller started
# itself): actors keep Ray's own log handling and their output goes to the driver.
LOG_DIR_ENV = "TWODRL_ACTOR_LOG_DIR"
LOG_TAIL_LINES = 40


def actor_log_path(log_dir: Any, name: str) -> Any:
    """``<log_dir>/<actor name>.log`` (``rollout-0.log``, ``learner-1.log`` …)."""
    from pathlib import Path

    return Path(log_dir) / f"{name}.log"


def redirect_actor_output(name: Optional[str] = None) -> Optional[str]:
    """Called first thing in every actor's constructor: point the process's stdout and
    stderr (file descriptors 1 and 2, so vLLM's and DeepSpeed's loggers, C++ warnings,
    tqdm bars and Python warnings all follow) at ``RUN_DIR/logs/<actor name>.log``.

    Appends, so a restarted actor (a new process running this constructor again) keeps
    what its previous incarnation wrote, and a resumed run keeps the first attempt's.
    Returns the log file's path, or None when no log directory is set."""
    import os
    import sys
    import time

    log_dir = os.environ.get(LOG_DIR_ENV)
    if not log_dir:
        return None
    if name is None:
        try:
            name = ray.get_runtime_context().get_actor_name()
        except Exception:  # noqa: BLE001 - not inside a named actor
            name = None
        name = name or f"worker-{os.getpid()}"
    path = actor_log_path(log_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream has nothing to flush
            pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"==== {name}: pid {os.getpid()} started {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    return str(path)


def log_tail(path: Any, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' if it is missing), as a terminal shows
    them: of a line that a progress bar rewrote with carriage returns only its last
    state, so the bar's updates do not fill the tail."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        return ""
    with open(p, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    rows = []
    for line in text.split("\n"):
        shown = [part for part in line.split("\r") if part.strip()]
        if shown:
            rows.append(shown[-1])
    return "\n".join(rows[-lines:])


def kill_actor(name: str, namespace: str, no_restart: bool = True) -> bool:
    """Kill a named actor if it exists; True if one was found."""
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=no_restart)
    return True


def node_ip() -> str:
    return ray.util.get_node_ip_address()


def free_port() -> int:
    """A TCP port free on this node right now (used for torch.distributed rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0


__all__ = [
    "ANNOTATOR_NUM_CPUS", "ActorRequest", "PlacementError", "ROLES", "RoleResources", "actor_name", "actor_options",
    "actor_request", "actor_requests", "actor_log_path", "LOG_DIR_ENV", "log_tail", "redirect_actor_output",
    "ceil_div", "free_port", "get_or_create_actor", "gpus_per_actor", "kill_actor", "learner_group",
    "node_ip", "role_resources", "run_namespace", "tensor_parallel_group", "validate_placement",
    "wait_placement_group",
]
