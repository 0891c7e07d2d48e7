"""Round checkpoints: written into a temporary directory, then renamed, so a crash at
any instant leaves either the previous complete checkpoint or the new complete one.

Written once per run, beside them: ``RUN_DIR/warmstart/`` (the warm-started policy,
which is also the reference model) and ``RUN_DIR/reward_model/`` (the round-0 2D RM).

Layout of ``RUN_DIR/checkpoints/round-000K/``:
  learner/         policy in Hugging Face format (safetensors) + DeepSpeed state
  driver.json      round, prompt cursor, RNG states (Python, NumPy), bookkeeping
  torch_rng.safetensors
"""

from __future__ import annotations

import contextlib
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


def replace_directory(tmp: str | Path, final: str | Path) -> None:
    """Move the finished directory ``tmp`` to ``final`` so that ``final`` is always
    either the old complete directory or the new one (an existing one is swapped out
    by rename, then deleted)."""
    tmp, final = Path(tmp), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, final)  # re-saving the same round replaces it whole
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
