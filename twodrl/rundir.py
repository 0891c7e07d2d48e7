"""Guards that keep a run directory from being lost or mixed with another run.

- :func:`check_run_dir`: a fresh run in a directory that already holds a run is
  refused unless ``--resume`` (continue it) or ``--overwrite`` (start again; the old
  state is moved into ``RUN_DIR/.previous-<UTC time>/``, never deleted).
- :class:`RunLock`: one job per run directory (``RUN_DIR/.lock``, ``flock``). The
  kernel drops the lock when its holder dies, so a killed job never blocks the next.
- :func:`diff_run_configs` / :func:`check_resume_config` / :func:`record_resume`: a
  resume may change operational fields (rounds, logging, placement ...), not the
  ones that define what is being trained; ``config.yaml`` stays the one the run
  started with and each resume is recorded in ``RUN_DIR/resumes.jsonl``.
- :func:`check_output_dir`: ``twodrl train-rm --out`` replaces only a directory it
  wrote itself (marked by :data:`REWARD_MODEL_MARKER`).

Functions take paths and plain data, raise :class:`RunDirError` with a one-line
message naming the directory and the way out, and print nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

# What a twodrl run writes into its directory: any of these means "used".
RUN_STATE = (
    "config.yaml",
    "metrics.jsonl",
    "checkpoints",
    "warmstart",
    "reward_model",
    "samples",
    "rounds",
    "plots",
    "ray.json",
    "resumes.jsonl",
    "judge_cache.sqlite",
    "wandb",
)
LOCK_NAME = ".lock"
PREVIOUS_PREFIX = ".previous-"
RESUMES_NAME = "resumes.jsonl"
REWARD_MODEL_MARKER = "twodrl_reward_model.json"

# Config fields (dotted; a prefix covers its sub-fields) whose change would make a
# resumed run a different experiment under the same name.
BLOCKING_FIELDS = (
    "algorithm",
    "policy",
    "reference",
    "scorer.model",
    "aspects",
    "learner.beta",
    "learner.lora",  # adapter-only checkpoints load only into the same adapter shape
    "dpa",
    "task",
    "seed",
)


class RunDirError(Exception):
    """The run (or output) directory cannot be used as asked; the message says why
    and what to do instead."""


def _utc_stamp(now: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


def _unique(path: Path) -> Path:
    """``path``, or ``path-1``, ``path-2`` ... when two moves land in the same second."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


# ---------------------------------------------------------------------- run directory


def run_state(run_dir: str | Path) -> list[str]:
    """The names of the run-state entries present in ``run_dir`` (empty: unused)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return [name for name in RUN_STATE if (run_dir / name).exists()]


def check_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunDirError(
            "--resume and --overwrite contradict each other: --resume continues the run in the "
            "directory, --overwrite starts a new one there; pass only one"
        )


def _has_checkpoint(run_dir: Path) -> bool:
    from twodrl.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir) is not None


def check_run_dir(run_dir: str | Path, resume: bool, overwrite: bool, now: float | None = None) -> Path | None:
    """Decide whether a job may use ``run_dir``; raise :class:`RunDirError` if not.

    - ``resume``: the directory must hold a complete round checkpoint.
    - ``overwrite``: a used directory's state is moved into
      ``RUN_DIR/.previous-<UTC time>/``; that path is returned.
    - neither: the directory must hold no run state.

    Run it with the directory's :class:`RunLock` held, after
    ``twodrl.checkpoint.recover_run_dir`` (which may restore an interrupted
    checkpoint this check looks for)."""
    check_flags(resume, overwrite)
    run_dir = Path(run_dir)
    if resume:
        if not run_dir.is_dir():
            raise RunDirError(f"--resume: run directory {run_dir} does not exist; start a new run without --resume")
        if not _has_checkpoint(run_dir):
            raise RunDirError(
                f"--resume: run directory {run_dir} has no complete round checkpoint under "
                f"{run_dir / 'checkpoints'} (the run stopped before its first round ended); "
                f"start it again with --overwrite"
            )
        return None
    used = run_state(run_dir)
    if not used:
        return None
    if overwrite:
        return move_aside(run_dir, now=now)
    shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
    raise RunDirError(
        f"run directory {run_dir} already holds a run ({shown}); continue it with --resume, "
        f"or start again with --overwrite (moves the old run into {run_dir / (PREVIOUS_PREFIX + '<time>')}, deletes nothing)"
    )


def move_aside(run_dir: str | Path, now: float | None = None) -> Path:
    """Move every entry of ``run_dir`` except the lock and earlier ``.previous-*``
    folders into a new ``RUN_DIR/.previous-<UTC time>/`` and return it. Renames within
    one file system: instant, and nothing is copied or deleted. Interrupted half-way,
    the rest stays in place and the next start refuses again (nothing is lost)."""
    run_dir = Path(run_dir)
    dest = _unique(run_dir / f"{PREVIOUS_PREFIX}{_utc_stamp(now)}")
    dest.mkdir()
    for child in sorted(run_dir.iterdir()):
        if child.name == LOCK_NAME or child.name.startswith(PREVIOUS_PREFIX):
            continue
        os.rename(child, dest / child.name)
    return dest


# ---------------------------------------------------------------------- lock


class RunLock:
    """Exclusive lock on a run directory for the life of a job.

    ``flock`` on ``RUN_DIR/.lock``, which also records the holder (pid, host, start
    time) for the message a second job gets. The kernel releases the lock when the
    holder's process ends however it ends, so a file left by a killed job blocks
    nothing. The descriptor is not inherited by programs the job starts (Ray), which
    would otherwise keep the lock after the job died. Works on local file systems
    and NFS (where Linux maps flock onto byte-range locks)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"run directory {self.run_dir}: cannot lock {self.path} ({e})") from None
            raise RunDirError(
                f"run directory {self.run_dir} is in use by another twodrl job "
                f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}); "
                f"wait for it to end or stop it, or choose another --run-dir"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _utc_stamp()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # the holder line would otherwise outlive the holder
        except OSError:
            pass
        # The file itself stays: unlinking it would let a waiting job lock the old
        # inode while a third one creates and locks a new file.
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        # A job that failed between taking the lock and its `finally` must not keep
        # the directory locked for the rest of a long-lived process (notebook, tests).
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------- resume config


_ABSENT = object()


def _walk_diff(saved: Any, new: Any, prefix: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(saved, dict) and isinstance(new, dict):
        for key in list(saved) + [k for k in new if k not in saved]:
            name = f"{prefix}.{key}" if prefix else str(key)
            _walk_diff(saved.get(key, _ABSENT), new.get(key, _ABSENT), name, out)
        return
    if _normal(saved) != _normal(new):
        out.append((prefix, saved, new))


def _normal(value: Any) -> Any:
    # YAML gives lists where dataclasses.asdict may give tuples.
    if isinstance(value, tuple):
        return [_normal(v) for v in value]
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _shown(value: Any) -> str:
    if value is _ABSENT:
        return "<absent>"
    try:
        return json.dumps(_normal(value))
    except (TypeError, ValueError):
        return repr(value)


def _is_blocking(name: str, fields: Iterable[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fields)


def config_changes(saved: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted field, saved value, new value) for every field that differs; a field
    missing on one side has the value ``<absent>`` in messages."""
    out: list[tuple[str, Any, Any]] = []
    _walk_diff(saved, new, "", out)
    return out


def diff_run_configs(saved: dict, new: dict, blocking_fields: Iterable[str] = BLOCKING_FIELDS) -> tuple[list[str], list[str]]:
    """Compare the config a run started with and the one a resume brings, field by
    dotted field. Returns (blocking, allowed) lines ``name: old -> new``. A field the
    saved config lacks altogether (added by a newer twodrl, so left at its default)
    is allowed: the run never chose a value for it."""
    fields = tuple(blocking_fields)
    blocking, allowed = [], []
    for name, old, new_value in config_changes(saved, new):
        line = f"{name}: {_shown(old)} -> {_shown(new_value)}"
        if old is not _ABSENT and _is_blocking(name, fields):
            blocking.append(line)
        else:
            allowed.append(line)
    return blocking, allowed


def check_resume_config(run_dir: str | Path, saved: dict | None, new: dict) -> dict[str, list]:
    """Raise :class:`RunDirError` if ``new`` changes a field that defines the run;
    else return the allowed changes as ``{field: [old, new]}`` (for
    :func:`record_resume`). ``saved`` is ``RUN_DIR/config.yaml`` as loaded (None when
    the file is missing: nothing to compare)."""
    if saved is None:
        return {}
    blocking, _ = diff_run_configs(saved, new)
    if blocking:
        raise RunDirError(
            f"--resume: the config changes fields that define the run in {run_dir}: {'; '.join(blocking)}; "
            f"resume with the config it started with ({Path(run_dir) / 'config.yaml'}), "
            f"or start a new run (another --run-dir, or --overwrite)"
        )
    return {
        name: [None if old is _ABSENT else _normal(old), None if value is _ABSENT else _normal(value)]
        for name, old, value in config_changes(saved, new)
    }


def record_resume(run_dir: str | Path, overrides: dict[str, list], argv: list[str], now: float | None = None) -> Path:
    """Append ``{"time", "overrides", "argv"}`` to ``RUN_DIR/resumes.jsonl``: the
    original ``config.yaml`` stays as the run started, and this file says what each
    resume changed."""
    path = Path(run_dir) / RESUMES_NAME
    line = json.dumps({"time": _utc_stamp(now), "overrides": overrides, "argv": list(argv)})
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


# ---------------------------------------------------------------------- train-rm --out


def reward_model_marker(aspects: list[str], base_model: str, mode: str, now: float | None = None) -> str:
    """Contents of :data:`REWARD_MODEL_MARKER`: what was trained, and when."""
    return json.dumps({"aspects": list(aspects), "base_model": base_model, "mode": mode, "time": _utc_stamp(now)}, indent=1)


def check_output_dir(out: str | Path, overwrite: bool, now: float | None = None) -> Path | None:
    """``twodrl train-rm --out``: the directory is replaced whole, so it must be
    absent, empty or a reward model train-rm wrote (:data:`REWARD_MODEL_MARKER`).
    Anything else is refused, or with ``overwrite`` moved aside to a sibling
    ``OUT.previous-<UTC time>`` (returned)."""
    out = Path(out)
    if not out.exists():
        return None
    if not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory; choose another --out")
    if not any(out.iterdir()) or (out / REWARD_MODEL_MARKER).is_file():
        return None
    if overwrite:
        full = out.resolve()  # "." has no name to put a suffix on
        dest = _unique(full.with_name(f"{full.name}.previous-{_utc_stamp(now)}"))
        os.rename(out, dest)
        return dest
    raise RunDirError(
        f"--out {out} is not empty and is not a reward model written by twodrl train-rm (no {REWARD_MODEL_MARKER}); "
        f"choose another --out, or pass --overwrite to move it to {out.name}.previous-<time> beside it and write there"
    )


# ---------------------------------------------------------------------- the job's entry


def open_run_dir(
    run_dir: str | Path,
    resume: bool,
    overwrite: bool,
    new_config: dict,
    argv: list[str],
) -> tuple[RunLock, list[str]]:
    """Everything ``twodrl run`` does with its directory before the driver starts, in
    the order that makes it safe: lock (so no other job changes the directory
    meanwhile), repair crash leftovers, check fresh/resume/overwrite, compare a
    resume's config and record the resume. Returns the held lock (release it when the
    job ends) and lines for the log; raises :class:`RunDirError` with the lock
    released."""
    from twodrl.checkpoint import recover_run_dir

    check_flags(resume, overwrite)
    run_dir = Path(run_dir)
    if resume and not run_dir.is_dir():
        raise RunDirError(f"--resume: run directory {run_dir} does not exist; start a new run without --resume")
    lock = RunLock(run_dir).acquire()
    try:
        log = [f"recovered: {line}" for line in recover_run_dir(run_dir)]
        moved = check_run_dir(run_dir, resume=resume, overwrite=overwrite)
        if moved is not None:
            log.append(f"--overwrite: moved the previous run in {run_dir} to {moved}")
        if resume:
            saved_path = run_dir / "config.yaml"
            saved = _load_yaml(saved_path) if saved_path.is_file() else None
            if saved is None:
                log.append(f"--resume: {saved_path} is missing; the config is not compared")
            overrides = check_resume_config(run_dir, saved, new_config)
            for name, (old, new) in overrides.items():
                log.append(f"--resume: {name}: {_shown(old)} -> {_shown(new)} (differs from {saved_path})")
            record_resume(run_dir, overrides, argv)
    except BaseException:
        lock.release()
        raise
    return lock, log


def _load_yaml(path: Path) -> dict | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RunDirError(f"--resume: {path} is not valid YAML ({' '.join(str(e).split())}); restore it from the run's start or use --overwrite") from None
    return data if isinstance(data, dict) else None
