"""Bucketed packing of named tensors for learner → rollout weight sync.

A weight sync moves every parameter of the policy from the learner to each rollout
engine. Sending one message per tensor costs one round trip (and one serialisation) per
tensor — hundreds for a small model, thousands for a 7B one — so tensors are instead
packed into a few large *buckets*: one flat, contiguous ``uint8`` buffer plus a list of
:class:`TensorMeta` saying where each tensor lives inside it. A bucket is one
``ray.put`` or one ``broadcast``; the receiver gets every tensor back as a *view* into
the buffer (no copy) and hands the views to the inference engine, which copies them
into its own parameters exactly once.

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

import json
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

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
) -> list[list[TensorMeta]]:
    """Group tensors (given as ``(name, dtype, shape)``) into buckets of at most
    ``bucket_bytes`` (a tensor larger than that gets its own bucket), keeping order.

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
        if current and used + size > bucket_bytes:
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
    return {"flat": flat.numpy(), "metas": [m.to_json() for m in bucket.metas]}


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
