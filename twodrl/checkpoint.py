"""Round checkpoints: written into a temporary directory, then renamed, so a crash at
any instant leaves either the previous complete checkpoint or the new complete one.

Written once per run, beside them: ``RUN_DIR/warmstart/`` (the warm-started policy,
which is also the reference model) and ``RUN_DIR/reward_model/`` (the round-0 2D RM).

Layout of ``RUN_DIR/checkpoints/round-000K/``:
  learner/         policy in Hugging Face format (safetensors) + DeepSpeed state
  driver.json      round, prompt cursor, RNG states (Python, NumPy), bookkeeping
  torch_rng.safetensors
  MANIFEST.sha256.json  SHA-256 of every file above (see :func:`verify_manifest`)

Durability: files are fsynced before the rename that publishes them, and the parent
directory after it, so "renamed" means "on disk". A crash can still leave temporary
siblings (``.NAME.tmp-PID``, ``.NAME.tmp.XXXX``) or, between the two renames of
:func:`replace_directory`, the previous copy as ``.NAME.old-PID`` with ``NAME``
missing; :func:`recover_run_dir` puts those right when a job starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_ROUND_DIR = re.compile(r"^round-(\d{4,})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def round_dir(run_dir: str | Path, round_idx: int) -> Path:
    return checkpoint_root(run_dir) / f"round-{round_idx:04d}"


MANIFEST_NAME = "MANIFEST.sha256.json"


class ManifestError(ValueError):
    """A checkpoint directory does not match its manifest (or has none)."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root``: a rename is only as durable as
    the data it points at, and after a power loss a renamed-but-unflushed checkpoint
    would be complete in name and empty in content."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(dirpath))


def replace_directory(tmp: str | Path, final: str | Path, manifest: bool = False) -> None:
    """Move the finished directory ``tmp`` to ``final`` so that ``final`` is always
    either the old complete directory or the new one (an existing one is swapped out
    by rename, then deleted). With ``manifest``, ``tmp`` gets a
    :data:`MANIFEST_NAME` first (see :func:`write_manifest`)."""
    tmp, final = Path(tmp), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if manifest:
        write_manifest(tmp)
    _fsync_tree(tmp)
    if final.exists():
        # A crash between these two renames leaves `old` and no `final`;
        # recover_directory() renames `old` back.
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        _fsync_path(final.parent)


@contextlib.contextmanager
def atomic_directory(final: str | Path, manifest: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success write its manifest (unless
    ``manifest=False``), flush it and rename it to ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, final, manifest=manifest)  # re-saving the same round replaces it whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` so that a reader (or a crash) sees the old file or the
    whole new one, never a prefix: temporary sibling, fsync, rename, fsync the parent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


# ---------------------------------------------------------------------- manifests


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _walk_files(root: Path, nested: set[str]) -> Iterator[str]:
    """Relative POSIX paths of the files under ``root``, not descending into the
    directories listed in ``nested`` (they are covered by their own manifest, whose
    file is yielded instead)."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if rel_dir != "." and rel_dir in nested:
            dirnames[:] = []
            yield f"{rel_dir}/{MANIFEST_NAME}"
            continue
        # A linked directory is not walked into: listed as an entry of its own, it
        # can never match a manifest (checkpoints are written without links).
        for name in [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            yield name if rel_dir == "." else f"{rel_dir}/{name}"
        dirnames.sort()
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel != MANIFEST_NAME:
                yield rel


def write_manifest(directory: str | Path) -> Path:
    """Record the SHA-256 of every file under ``directory`` in
    ``directory/MANIFEST.sha256.json``. A subdirectory that already has its own
    manifest (a learner checkpoint inside a round) is recorded by that manifest's
    digest only, so multi-gigabyte weights are hashed once, not once per level."""
    directory = Path(directory)
    nested = sorted(
        p.parent.relative_to(directory).as_posix()
        for p in directory.rglob(MANIFEST_NAME)
        if p.parent != directory
    )
    # Only the outermost nested manifests count: an inner one is covered by its parent's.
    outer = [d for d in nested if not any(d.startswith(o + "/") for o in nested if o != d)]
    files = {rel: _sha256(directory / rel) for rel in _walk_files(directory, set(outer))}
    out = directory / MANIFEST_NAME
    out.write_text(json.dumps({"format": 1, "algorithm": "sha256", "nested": outer, "files": files}, indent=1))
    return out


def verify_manifest(directory: str | Path, required: bool = True, nested: bool = True) -> bool:
    """Check every file under ``directory`` against its manifest before anything in it
    is loaded (DeepSpeed state is unpickled). Raises :class:`ManifestError` naming the
    first file that differs, is missing or is not listed. Returns False only when there
    is no manifest and ``required`` is False. ``nested=False`` checks a subdirectory
    that has its own manifest only by that manifest's digest, for a caller whose
    loader verifies that subdirectory itself (no second pass over the weights)."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        if not required:
            return False
        raise ManifestError(
            f"{directory}: no {MANIFEST_NAME}, so its files cannot be checked before loading; "
            f"it was written by an older twodrl or by something else - load it only if you trust its origin"
        )
    try:
        manifest = json.loads(path.read_text())
        expected: dict[str, str] = dict(manifest["files"])
        subdirs = list(manifest.get("nested", []))
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e})") from None
    actual = list(_walk_files(directory, set(subdirs)))
    for rel in actual:
        if rel not in expected:
            raise ManifestError(f"{directory}: file {rel} is not in {MANIFEST_NAME} (added after the checkpoint was written)")
    present = set(actual)
    for rel, digest in expected.items():
        if rel not in present:
            raise ManifestError(f"{directory}: file {rel} listed in {MANIFEST_NAME} is missing")
        if _sha256(directory / rel) != digest:
            raise ManifestError(f"{directory}: file {rel} does not match its SHA-256 in {MANIFEST_NAME} (changed or corrupt)")
    for sub in subdirs if nested else []:
        verify_manifest(directory / sub, required=True)
    return True


# ---------------------------------------------------------------------- crash leftovers


def _leftovers(parent: Path, name: str) -> tuple[list[Path], list[Path]]:
    """(previous copies ``.NAME.old-PID``, temporary directories) that writers of
    ``parent/NAME`` leave behind when killed: ``atomic_directory`` (``.NAME.tmp-PID``),
    ``mkdtemp`` based writers (``.NAME.tmp.XXXX``, and ``.NAME.XXXXXXXX`` from older
    versions) and writers nested in those temporaries (``..NAME.tmp-PID.old-PID``)."""
    if not parent.is_dir():
        return [], []
    olds, tmps = [], []
    old_re = re.compile(rf"^\.{re.escape(name)}\.old-\d+$")
    legacy_re = re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}$")
    for child in parent.iterdir():
        n = child.name
        if old_re.match(n):
            olds.append(child)
        elif n.startswith((f".{name}.tmp", f"..{name}.tmp")) or legacy_re.match(n):
            tmps.append(child)
    return olds, tmps


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_directory(path: str | Path) -> list[str]:
    """Undo what a crash while writing ``path`` left behind. Must only run while no
    writer of ``path`` is alive (the job holds the run directory's lock).

    - ``path`` missing but ``.NAME.old-PID`` present: the crash hit between the two
      renames of :func:`replace_directory`; the previous complete copy is renamed back
      (the newer one, if it got that far, is only a temporary and cannot be told apart
      from a half-written one).
    - ``path`` present and ``.NAME.old-PID`` too: the crash hit after the swap; the
      old copy is deleted.
    - temporary siblings are deleted.

    Returns one line per action, for the job's log."""
    path = Path(path)
    olds, tmps = _leftovers(path.parent, path.name)
    actions = []
    if olds and not path.exists():
        olds.sort(key=lambda p: p.stat().st_mtime)
        keep = olds.pop()
        os.replace(keep, path)
        actions.append(f"restored {path} from {keep.name} (interrupted replace)")
    for p in olds + tmps:
        _remove(p)
        actions.append(f"removed {p}")
    if actions:
        _fsync_path(path.parent)
    return actions


_ROUND_LEFTOVER = re.compile(r"^\.+(round-\d{4,})\.")


def recover_run_dir(run_dir: str | Path) -> list[str]:
    """Everything a job starting on ``run_dir`` puts right after a crash: the warm
    start, the reward model and every round checkpoint (see
    :func:`recover_directory`), and temporary files of :func:`atomic_write_text` and
    of the round prompt files. Call it with the run directory's lock held. Returns the
    actions taken, one line each."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    actions = recover_directory(run_dir / "warmstart") + recover_directory(run_dir / "reward_model")
    root = checkpoint_root(run_dir)
    if root.is_dir():
        names = {m.group(1) for c in root.iterdir() if (m := _ROUND_LEFTOVER.match(c.name))}
        for name in sorted(names):
            actions += recover_directory(root / name)
    for sub in ("samples", "rounds"):
        d = run_dir / sub
        if not d.is_dir():
            continue
        for child in d.iterdir():
            n = child.name
            if child.is_file() and ((n.startswith(".") and ".tmp-" in n) or n.endswith(".tmp")):
                child.unlink(missing_ok=True)
                actions.append(f"removed {child}")
    return actions


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """The last complete round checkpoint, or None. Temporary directories left by a
    crash are ignored (and cleaned)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    best = None
    for child in root.iterdir():
        if child.name.startswith(".") and ".tmp-" in child.name:
            shutil.rmtree(child, ignore_errors=True)
            continue
        m = _ROUND_DIR.match(child.name)
        if m and (child / "driver.json").is_file():
            k = int(m.group(1))
            if best is None or k > best[0]:
                best = (k, child)
    return best


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` round checkpoints (policy weights add up quickly)."""
    root = checkpoint_root(run_dir)
    if keep <= 0 or not root.is_dir():
        return
    rounds = sorted((int(m.group(1)), c) for c in root.iterdir() if (m := _ROUND_DIR.match(c.name)))
    for _, path in rounds[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    state = random.getstate()
    np_state = np.random.get_state()
    py = {
        "python": [state[0], list(state[1]), state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return py, {"torch_cpu": torch.get_rng_state()}


def restore_rng(py: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, internal, gauss = py["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = py["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])


def write_driver_state(directory: str | Path, state: dict[str, Any]) -> None:
    directory = Path(directory)
    py, tensors = capture_rng()
    save_file(tensors, str(directory / "torch_rng.safetensors"))
    (directory / "driver.json").write_text(json.dumps({**state, "rng": py}, indent=2))


def read_driver_state(directory: str | Path, restore: bool = True) -> dict[str, Any]:
    directory = Path(directory)
    state = json.loads((directory / "driver.json").read_text())
    rng = state.pop("rng", None)
    if restore and rng is not None:
        restore_rng(rng, load_file(str(directory / "torch_rng.safetensors")))
    return state
