"""Bucketed packing of named tensors for learner → rollout weight sync.

A weight sync moves every parameter of the policy from the learner to each rollout
engine. Sending one message per tensor costs one round trip (and one serialisation) per
tensor — hundreds for a small model, thousands for a 7B one — so tensors are instead
packed into a few large *buckets*: one flat, contiguous ``uint8`` buffer plus a list of
:class:`TensorMeta` saying where each tensor lives inside it. A bucket is one object in
Ray's store, one slice of a shared-memory segment (:class:`SharedSegment`) or one
``broadcast``; the receiver gets every tensor back as a *view* into the buffer (no
copy) and hands the views to the inference engine, which copies them into its own
parameters exactly once.

This module is pure torch (no Ray, no torch.distributed): the transports live in
``actors/weight_sync.py``.

Layout rules
- Every tensor starts at an offset aligned to :data:`ALIGN` bytes, so a ``uint8``
  slice can be reinterpreted as any dtype (``Tensor.view(dtype)`` requires the byte
  offset to be a multiple of the element size) and vectorised copies stay aligned.
- A tensor is never split across buckets (the engine loads whole tensors); a tensor
  larger than ``bucket_bytes`` gets a bucket of its own.
- Bucket order follows the input order, so per-layer weights stay together. vLLM's
  in-place reload processes a layer as soon as all of its weights have arrived, so this
  keeps its temporary buffers small.
"""

from __future__ import annotations

import atexit
import json
import mmap
import os
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

ALIGN = 64  # bytes; ≥ the largest element size, and a cache line

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"twodrl.weights: unsupported tensor dtype {dtype}; supported: {sorted(_DTYPES)}")
    return name


def to_torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"twodrl.weights: unknown dtype name {name!r}; known: {sorted(_DTYPES)}") from None


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside a bucket's flat buffer."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the flat buffer, multiple of ALIGN

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * to_torch_dtype(self.dtype).itemsize

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.offset]

    @classmethod
    def from_json(cls, item: list) -> "TensorMeta":
        name, dtype, shape, offset = item
        return cls(str(name), str(dtype), tuple(int(s) for s in shape), int(offset))


@dataclass
class Bucket:
    """A flat ``uint8`` buffer holding several tensors, and their metadata."""

    flat: torch.Tensor
    metas: list[TensorMeta]

    @property
    def nbytes(self) -> int:
        return int(self.flat.numel())


def bucket_nbytes(metas: Sequence[TensorMeta]) -> int:
    """Size of the flat buffer a bucket plan needs (aligned end of its last tensor)."""
    if not metas:
        return 0
    return _align(max(m.offset + m.nbytes for m in metas))


def plan_buckets(
    specs: Iterable[tuple[str, torch.dtype | str, Sequence[int]]],
    bucket_bytes: int,
    ramp: int = 0,
) -> list[list[TensorMeta]]:
    """Group tensors (given as ``(name, dtype, shape)``) into buckets of at most
    ``bucket_bytes`` (a tensor larger than that gets its own bucket), keeping order.

    ``ramp`` > 0 caps the first buckets at ``bucket_bytes / 2**ramp``, then twice
    that, … up to ``bucket_bytes``: with streamed buckets the receiver can start on a
    small first bucket while the sender packs the next, instead of idling through a
    whole big one.

    Planning needs only shapes, so a ZeRO-3 learner can plan from its partitioned
    parameters' full shapes and gather one bucket's worth of parameters at a time.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"twodrl.weights.plan_buckets: bucket_bytes must be > 0, got {bucket_bytes}")
    plans: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    used = 0
    seen: set[str] = set()
    for name, dtype, shape in specs:
        if name in seen:
            raise ValueError(f"twodrl.weights.plan_buckets: duplicate tensor name {name!r}")
        seen.add(name)
        dname = dtype if isinstance(dtype, str) else dtype_name(dtype)
        to_torch_dtype(dname)  # validate
        meta = TensorMeta(name, dname, tuple(int(s) for s in shape), 0)
        size = _align(meta.nbytes)
        cap = max(1, bucket_bytes >> max(0, ramp - len(plans)))
        if current and used + size > cap:
            plans.append(current)
            current, used = [], 0
        current.append(TensorMeta(meta.name, meta.dtype, meta.shape, used))
        used += size
    if current:
        plans.append(current)
    return plans


def _flat_view(flat: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """The tensor described by ``meta`` as a view into ``flat`` (no copy)."""
    raw = flat[meta.offset : meta.offset + meta.nbytes]
    dtype = to_torch_dtype(meta.dtype)
    # bool has itemsize 1 like uint8, view() handles it as well.
    return raw.view(dtype).view(meta.shape)


def pack_bucket(
    metas: Sequence[TensorMeta],
    tensors: Sequence[torch.Tensor],
    out: Optional[torch.Tensor] = None,
) -> Bucket:
    """Copy ``tensors`` (in ``metas`` order) into one flat buffer. ``out`` may be a
    preallocated ``uint8`` buffer of at least :func:`bucket_nbytes` bytes (e.g. pinned
    memory, or a CUDA buffer for NCCL). Tensors are cast to the planned dtype; shapes
    must match exactly."""
    if len(metas) != len(tensors):
        raise ValueError(f"twodrl.weights.pack_bucket: {len(metas)} metas but {len(tensors)} tensors")
    size = bucket_nbytes(metas)
    device = tensors[0].device if tensors else torch.device("cpu")
    if out is None:
        flat = torch.empty(size, dtype=torch.uint8, device=device)
    else:
        if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < size:
            raise ValueError(
                f"twodrl.weights.pack_bucket: out must be a 1-D uint8 tensor of ≥ {size} bytes, "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        flat = out[:size]
    for meta, tensor in zip(metas, tensors):
        if tuple(tensor.shape) != meta.shape:
            raise ValueError(
                f"twodrl.weights.pack_bucket: tensor {meta.name!r} has shape {tuple(tensor.shape)}, "
                f"planned {meta.shape}"
            )
        # copy_ casts dtype and handles non-contiguous sources in one pass.
        _flat_view(flat, meta).copy_(tensor.detach())
    return Bucket(flat, list(metas))


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    dtype: Optional[torch.dtype] = None,
) -> list[Bucket]:
    """Pack ``(name, tensor)`` pairs into buckets of at most ``bucket_bytes``.

    ``dtype`` casts floating-point tensors (e.g. fp32 master weights → the rollout
    engine's bf16); integer/bool tensors keep their dtype.
    """
    items = [(n, t) for n, t in named_tensors]

    def target(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    plans = plan_buckets(((n, target(t), t.shape) for n, t in items), bucket_bytes)
    by_name = dict(items)
    return [pack_bucket(plan, [by_name[m.name] for m in plan]) for plan in plans]


def unpack_bucket(bucket: Bucket) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views into ``bucket.flat`` — nothing is copied."""
    flat = bucket.flat
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"twodrl.weights.unpack_bucket: flat must be 1-D uint8, got {flat.dtype} {tuple(flat.shape)}")
    need = bucket_nbytes(bucket.metas)
    if flat.numel() < need:
        raise ValueError(
            f"twodrl.weights.unpack_bucket: buffer has {flat.numel()} bytes but the metadata needs {need}"
        )
    return [(m.name, _flat_view(flat, m)) for m in bucket.metas]


def iter_unpacked(buckets: Iterable[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, view)`` over several buckets (buckets may be produced lazily)."""
    for bucket in buckets:
        yield from unpack_bucket(bucket)


# ------------------------------------------------------------------ serialisation
# Metadata travels as JSON (never pickle); the flat buffer travels as a numpy uint8
# array, which Ray's object store hands back zero-copy (read-only, memory-mapped).


def metas_to_bytes(plans: Sequence[Sequence[TensorMeta]]) -> bytes:
    return json.dumps([[m.to_json() for m in plan] for plan in plans], separators=(",", ":")).encode()


def metas_from_bytes(data: bytes) -> list[list[TensorMeta]]:
    try:
        raw = json.loads(bytes(data).decode())
        return [[TensorMeta.from_json(item) for item in plan] for plan in raw]
    except (ValueError, TypeError) as e:
        raise ValueError(f"twodrl.weights.metas_from_bytes: malformed bucket metadata: {e}") from None


def bucket_to_payload(bucket: Bucket) -> dict:
    """A picklable form whose buffer Ray stores out-of-band (zero-copy on get)."""
    flat = bucket.flat if bucket.flat.device.type == "cpu" else bucket.flat.cpu()
    return {"kind": "object_store", "flat": flat.numpy(), "metas": [m.to_json() for m in bucket.metas]}


def bucket_from_payload(payload: dict) -> Bucket:
    """Inverse of :func:`bucket_to_payload`; the tensor shares the payload's memory.

    Arrays from the object store are read-only; torch warns when wrapping them. The
    receiver only ever reads from these views (the engine copies them into its own
    parameters), so the warning is silenced here rather than paying for a copy.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        flat = torch.from_numpy(payload["flat"])
    return Bucket(flat, [TensorMeta.from_json(m) for m in payload["metas"]])


# ------------------------------------------------------------------ shared memory
# The same-node transport: one file in /dev/shm that the sender rewrites in place at
# every sync and each receiver maps once. Ray's object store is shared memory too, but
# every ray.put gets a fresh allocation, so each sync page-faults a new model's worth
# of memory into the sender (~50k faults for 200 MB, costing several times the copy).
# A segment that lives as long as the sender is faulted in once.

_SEGMENT_PREFIX = "twodrl-wsync-"


def shared_memory_dir() -> str:
    """Where segments live: ``/dev/shm`` (RAM-backed) where it exists, else the temp
    dir. ``TWODRL_SHM_DIR`` overrides (e.g. a bigger tmpfs in a container)."""
    override = os.environ.get("TWODRL_SHM_DIR")
    if override:
        return override
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_segments(directory: Optional[str] = None) -> list[str]:
    """Delete segments whose creating process is gone (a sender killed with -9 cannot
    unlink its own). Names carry the creator's pid: ``twodrl-wsync-<pid>-<id>``."""
    directory = directory or shared_memory_dir()
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_SEGMENT_PREFIX):
            continue
        try:
            pid = int(name[len(_SEGMENT_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


class SharedSegment:
    """A file-backed shared-memory buffer exposed as a 1-D ``uint8`` tensor.

    ``SharedSegment.create(n)`` makes a new segment (owner, writable; the space is
    reserved up front with ``posix_fallocate`` so a full ``/dev/shm`` is a clear
    ``OSError`` here instead of a SIGBUS in the middle of a copy).
    ``SharedSegment.attach(path, n)`` maps an existing one read-only.
    """

    def __init__(self, path: str, nbytes: int, mm, tensor: torch.Tensor, owner: bool):
        self.path = path
        self.nbytes = nbytes
        self._mm = mm
        self.tensor = tensor
        self.owner = owner

    @classmethod
    def create(cls, nbytes: int, directory: Optional[str] = None) -> "SharedSegment":
        if nbytes <= 0:
            raise ValueError(f"twodrl.weights.SharedSegment: size must be > 0, got {nbytes}")
        directory = directory or shared_memory_dir()
        sweep_stale_segments(directory)
        path = os.path.join(directory, f"{_SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                os.unlink(path)
                raise OSError(
                    e.errno,
                    f"cannot reserve {nbytes / 2**20:.0f} MiB in {directory} for the weight-sync segment "
                    f"({e.strerror}); give the container a bigger /dev/shm, set TWODRL_SHM_DIR, or use "
                    f"rollout.weight_sync=object_store",
                ) from None
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        tensor = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)
        # Fault every page in now, once, rather than inside the first timed sync.
        tensor.zero_()
        # A normal exit removes the file; a killed process leaves it to the next
        # sweep_stale_segments (run by every create).
        atexit.register(_unlink_quietly, path)
        return cls(path, nbytes, mm, tensor, owner=True)

    @classmethod
    def attach(cls, path: str, nbytes: int) -> "SharedSegment":
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"weight-sync segment {path} does not exist on this node: the learner's rank 0 and this "
                f"rollout worker must share a node for rollout.weight_sync=shared_memory"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise ValueError(f"twodrl.weights.SharedSegment: {path} has {size} bytes, expected ≥ {nbytes}")
            mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            # Read-only mapping: receivers only read (the engine copies into its own
            # parameters), so torch's non-writable warning does not apply.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            tensor = torch.from_numpy(np.frombuffer(mm, dtype=np.uint8, count=nbytes))
        return cls(path, nbytes, mm, tensor, owner=False)

    def close(self) -> None:
        """Unmap (and, for the owner, delete the file). Views must be gone by now;
        if some still exist the mapping is left to the garbage collector."""
        self.tensor = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:
            pass
        if self.owner:
            _unlink_quietly(self.path)


def shared_bucket_descriptor(segment: SharedSegment, offset: int, metas: Sequence[TensorMeta]) -> dict:
    """What a receiver needs to find one bucket inside a segment (small, picklable)."""
    return {"kind": "shared_memory", "path": segment.path, "size": segment.nbytes, "offset": int(offset),
            "metas": [m.to_json() for m in metas]}


def bucket_from_segment(segment: SharedSegment, descriptor: dict) -> Bucket:
    """The bucket a :func:`shared_bucket_descriptor` points at, as views of the mapping."""
    metas = [TensorMeta.from_json(m) for m in descriptor["metas"]]
    start = int(descriptor["offset"])
    return Bucket(segment.tensor[start : start + bucket_nbytes(metas)], metas)
