"""Read an offline wandb run (``wandb/offline-run-*/run-*.wandb``) without a network.

Offline runs write no ``wandb-summary.json``; everything is in the run's append-only
record log (the format ``wandb sync`` uploads): a 7-byte file header, then 32 KiB
blocks of chunks, each with a 7-byte header (crc32c, length uint16, chunk type) and a
serialised ``Record`` protobuf. We only need the chunking to get at the records.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32c (not checked here), length, type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path):
    """Yield ``wandb_internal_pb2.Record`` messages of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a wandb record log (header {data[:7]!r})")
    pos, pending = _FILE_HEADER.size, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        pos += _CHUNK_HEADER.size
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 0 and length == 0:  # zero fill up to the next block
            pos += (_BLOCK - pos % _BLOCK) % _BLOCK
            continue
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_history(run_dir: str | Path) -> list[dict]:
    """History rows (``run.log`` calls) of the single offline run under ``run_dir``."""
    runs = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if len(runs) != 1:
        raise AssertionError(f"expected one offline wandb run under {run_dir}/wandb, found {runs}")
    rows = []
    for rec in iter_records(runs[0]):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in rec.history.item})
    return rows


def offline_config(run_dir: str | Path, timeout_s: float = 30.0) -> dict:
    """The run config as logged (all config updates merged). wandb's service process
    can still be writing the log when ``finish()`` has returned in the caller, and the
    run record with the config is not always first on disk: read until it is there."""
    runs = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    while True:
        config: dict = {}
        seen_run = False
        for rec in iter_records(runs[0]):
            kind = rec.WhichOneof("record_type")
            seen_run = seen_run or kind == "run"
            # The initial config rides on the run record; later changes are config records.
            updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
            for item in updates:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        if (seen_run and config) or time.monotonic() > deadline:
            return config
        time.sleep(0.5)
