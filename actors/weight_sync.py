"""Learner → rollout weight sync: bucketed, in place, engines keep running.

Three transports move the same buckets (:mod:`twodrl.weights`):

``shared_memory`` (same node)
    Learner rank 0 packs the buckets straight into one shared-memory segment (a file
    in ``/dev/shm``) that lives as long as the learner and is rewritten in place at
    every sync; each rollout worker maps it once and loads views of it. One copy on
    each side and no page faults after the first sync. The CPU default when learner
    rank 0 and the rollout workers share a node (``rollout.weight_sync: auto``).

``object_store`` (any cluster)
    Learner rank 0 yields each bucket from a Ray streaming generator; every bucket
    becomes one object in Ray's store, which receivers on the same node map read-only
    and zero-copy, and receivers elsewhere pull over the network.

``collective``
    A torch.distributed process group made of learner rank 0 and every rollout engine
    rank (gloo on CPU, NCCL on GPU). It is built on its own ``TCPStore`` and is *not*
    the learner's default (DeepSpeed) group, so it never interferes with training
    collectives and can be rebuilt when a rollout worker restarts. Rank 0 broadcasts a
    JSON header (the bucket plan), then each bucket. The GPU default.

The first two are streamed: the driver hands bucket ``i`` to the rollout workers while
the learner packs bucket ``i+1``, and the broadcast double-buffers the same way.

With ZeRO-3 every learner rank holds a shard of each parameter, so *all* ranks walk the
same bucket plan and gather one bucket's parameters at a time
(``deepspeed.zero.GatheredParameters``, a collective on the learner's own group); only
rank 0 packs and sends. Peak extra memory on the learner is one bucket, not one model
(plus, for ``shared_memory``, the segment: one model's worth of bytes in ``/dev/shm``).

Learner-side API (the learner actor inherits :class:`WeightSenderMixin`, or calls the
functions directly): :func:`stream_buckets`, ``WeightGroup.create_master_store`` /
``WeightGroup.join``, :func:`broadcast_weights`. Receiver side: :func:`open_bucket`,
:func:`iter_broadcast_buckets`. Driver side: :func:`sync_weights`.

Parameter names are the Hugging Face names (``model.layers.0.self_attn.q_proj.weight``);
vLLM's model ``load_weights`` maps them onto its fused q/k/v and gate/up parameters.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import ray
import torch

from twodrl.weights import (
    Bucket,
    SharedSegment,
    bucket_from_payload,
    bucket_from_segment,
    bucket_nbytes,
    bucket_to_payload,
    iter_unpacked,
    metas_from_bytes,
    metas_to_bytes,
    pack_bucket,
    plan_buckets,
    shared_bucket_descriptor,
)

DEFAULT_BUCKET_MB = 64
# The first buckets of a sync are 1/8, 1/4, 1/2 of the bucket size: every transport
# overlaps packing bucket i+1 with moving/loading bucket i, and a small first bucket
# gets the receiver going sooner (twodrl.weights.plan_buckets).
BUCKET_RAMP = 3
# Wrapper prefixes that are not part of the model's own parameter names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
_STORE_PREFIX = "twodrl-weight-sync"
# Per-bucket deadline when neither the caller nor the workers name one
# (rollout.sync_timeout_s is the configured value).
DEFAULT_SYNC_TIMEOUT_S = 600.0

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- naming


def hf_param_name(name: str) -> str:
    """Strip DeepSpeed / DDP / torch.compile wrapper prefixes: the rollout engine loads
    plain Hugging Face names."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    # ZeRO-3 partitions a parameter in place: p.shape is empty, ds_shape is the real one.
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def _is_zero3(params: Sequence[torch.Tensor]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


@contextmanager
def _gathered(params: list[torch.Tensor], zero3: bool):
    """Full parameters inside the block. A collective across the learner's ranks under
    ZeRO-3 (every rank must enter with the same list); a no-op otherwise."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _sync_dtype(p: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    return dtype if (dtype is not None and p.is_floating_point()) else p.dtype


def weight_plan(
    model: torch.nn.Module, bucket_bytes: int, dtype: Optional[torch.dtype] = None
) -> tuple[list, dict[str, torch.Tensor]]:
    """The bucket plan for ``model``'s parameters and a name → parameter map. Identical
    on every learner rank (it depends only on names, full shapes and dtypes). Buckets
    ramp up in size (:data:`BUCKET_RAMP`) so that receivers start loading early."""
    named = [(hf_param_name(n), p) for n, p in model.named_parameters()]
    if not named:
        raise ValueError(f"weight_sync: {type(model).__name__} has no parameters to sync")
    plans = plan_buckets(((n, _sync_dtype(p, dtype), _full_shape(p)) for n, p in named), bucket_bytes, BUCKET_RAMP)
    return plans, dict(named)


class BufferPool:
    """Flat ``uint8`` buffers kept from one sync to the next, one per bucket index.

    A fresh multi-megabyte allocation is served by ``mmap`` and page-faulted on first
    touch, which on CPU costs more than the copy that fills it; warm buffers leave only
    the copy. A buffer is handed out again only at the *next* sync, when its previous
    contents have been consumed (sent and waited for, ``ray.put`` copied, or loaded by
    the engine's completed reload).
    """

    def __init__(self) -> None:
        self._bufs: dict[int, torch.Tensor] = {}

    def get(self, index: int, nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
        buf = self._bufs.get(index)
        if buf is None or buf.numel() < nbytes or buf.device != torch.device(device):
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._bufs[index] = buf
        return buf[:nbytes]

    def clear(self) -> None:
        self._bufs.clear()


def iter_packed_buckets(
    model: torch.nn.Module,
    bucket_bytes: int,
    *,
    pack: bool = True,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    pool: Optional[BufferPool] = None,
    plan: Optional[tuple[list, dict[str, torch.Tensor]]] = None,
) -> Iterator[Optional[Bucket]]:
    """Yield one packed :class:`Bucket` per planned bucket (``None`` where ``pack`` is
    False: non-source ZeRO-3 ranks still have to take part in every gather). With a
    ``pool`` the buckets are packed into reused buffers: consume each bucket before
    the next sync. ``plan``: :func:`weight_plan`'s result, when the caller has it."""
    plans, by_name = plan or weight_plan(model, bucket_bytes, dtype)
    zero3 = _is_zero3(list(by_name.values()))
    if not pack and not zero3:
        return  # nothing to gather, nothing to send
    realize = _sync_tensor_hook(model)
    for i, plan in enumerate(plans):
        params = [by_name[m.name] for m in plan]
        with _gathered(params, zero3), torch.no_grad():
            if pack:
                out = None
                if pool is not None:
                    out = pool.get(i, bucket_nbytes(plan), device or params[0].device)
                elif device is not None:
                    out = torch.empty(bucket_nbytes(plan), dtype=torch.uint8, device=device)
                tensors = [realize(m.name, p) for m, p in zip(plan, params)] if realize else params
                yield pack_bucket(plan, tensors, out=out)
            else:
                yield None


def named_full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every parameter, gathering ZeRO-3 shards one at a
    time (a collective: every learner rank must iterate). The tensor is only valid until
    the next item under ZeRO-3 — copy it if you keep it."""
    named = [(hf_param_name(n), p) for n, p in model.named_parameters()]
    zero3 = _is_zero3([p for _, p in named])
    realize = _sync_tensor_hook(model)
    for name, p in named:
        with _gathered([p], zero3), torch.no_grad():
            yield name, (realize(name, p.detach()) if realize else p.detach())


def _sync_tensor_hook(model: Any) -> Optional[Callable[[str, torch.Tensor], torch.Tensor]]:
    """``model.sync_tensor(name, tensor)`` when the model has one: the tensor to send in
    place of a parameter, computed as its bucket is packed (a LoRA policy sends
    ``W + scaling * B @ A`` for its adapted weights, twodrl.models.lora.MergedView), so
    no second copy of the model exists during a sync. Same shape and dtype."""
    return getattr(model, "sync_tensor", None)


# --------------------------------------------------------------------------- streamed buckets


class SegmentSlots:
    """Bucket buffers carved out of one :class:`~twodrl.weights.SharedSegment`: bucket
    ``i`` lives at a fixed offset, so every sync rewrites the same (already faulted-in)
    pages. Same ``get`` signature as :class:`BufferPool`."""

    def __init__(self, segment: SharedSegment, offsets: Sequence[int]):
        self.segment = segment
        self.offsets = list(offsets)

    def get(self, index: int, nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
        start = self.offsets[index]
        return self.segment.tensor[start : start + nbytes]


def stream_buckets(
    model: torch.nn.Module,
    transport: str,
    bucket_bytes: int,
    rank: int = 0,
    dtype: Optional[torch.dtype] = None,
    pool: Optional[BufferPool] = None,
    segment_for: Optional[Callable[[int], SharedSegment]] = None,
) -> Iterator[dict]:
    """Sender side of the ``object_store`` and ``shared_memory`` transports: gather and
    pack the parameters bucket by bucket and yield one small picklable *descriptor* per
    bucket, as soon as it is packed, so receivers load bucket ``i`` while bucket
    ``i+1`` is being packed.

    - ``object_store``: the descriptor carries the bucket's buffer; yielded from a Ray
      streaming generator it becomes one object in the store (copied there at the
      yield, so a pooled buffer is free again when the generator resumes).
    - ``shared_memory``: the bucket is packed straight into a segment that outlives
      the sync (``segment_for(total_bytes)`` returns it); the descriptor says where.

    Call on every learner rank (ZeRO-3 gathers are collective); only rank 0 yields.
    """
    if transport == "object_store":
        for bucket in iter_packed_buckets(model, bucket_bytes, pack=(rank == 0), dtype=dtype, pool=pool):
            if bucket is not None:
                yield bucket_to_payload(bucket)
        return
    if transport != "shared_memory":
        raise ValueError(f"weight_sync.stream_buckets: transport must be object_store or shared_memory, got {transport!r}")
    if rank != 0:
        for _ in iter_packed_buckets(model, bucket_bytes, pack=False, dtype=dtype):
            pass
        return
    if segment_for is None:
        raise ValueError("weight_sync.stream_buckets: shared_memory needs segment_for")
    plan = weight_plan(model, bucket_bytes, dtype)
    offsets = list(itertools.accumulate((bucket_nbytes(p) for p in plan[0]), initial=0))
    segment = segment_for(offsets[-1])
    slots = SegmentSlots(segment, offsets)
    buckets = iter_packed_buckets(model, bucket_bytes, dtype=dtype, device="cpu", pool=slots, plan=plan)
    for i, bucket in enumerate(buckets):
        yield shared_bucket_descriptor(segment, offsets[i], bucket.metas)


# Segments this process has mapped as a receiver, newest last. A few are kept so that
# two senders (e.g. the learner and a reference source in a test) do not evict each
# other at every sync.
_ATTACHED: dict[str, SharedSegment] = {}
_MAX_ATTACHED = 4


def open_bucket(descriptor: dict) -> Bucket:
    """Receiver side: the :class:`Bucket` a descriptor from :func:`stream_buckets`
    stands for, as zero-copy views (of the object-store buffer, or of the shared
    segment, mapped on first use and kept for later syncs)."""
    kind = descriptor.get("kind")
    if kind == "object_store":
        return bucket_from_payload(descriptor)
    if kind != "shared_memory":
        raise ValueError(f"weight_sync.open_bucket: unknown bucket kind {kind!r}")
    path, size = descriptor["path"], int(descriptor["size"])
    segment = _ATTACHED.get(path)
    if segment is None or segment.nbytes < size:
        if segment is not None:
            _ATTACHED.pop(path).close()
        segment = SharedSegment.attach(path, size)
        _ATTACHED[path] = segment
        while len(_ATTACHED) > _MAX_ATTACHED:
            _ATTACHED.pop(next(iter(_ATTACHED))).close()
    return bucket_from_segment(segment, descriptor)


def iter_object_store_buckets(refs: Sequence[Any]) -> Iterator[Bucket]:
    """Fetch object-store buckets one at a time (bounded memory) as zero-copy views."""
    for ref in refs:
        yield open_bucket(ray.get(ref))


# --------------------------------------------------------------------------- collective


class WeightGroup:
    """A standalone process group for weight broadcast: learner rank 0 (group rank 0)
    plus every rollout engine rank. Built from its own ``TCPStore`` and a directly
    constructed ``ProcessGroupGloo`` / ``ProcessGroupNCCL``, so it touches neither the
    default process group nor DeepSpeed's groups, and several can coexist in a process.
    """

    def __init__(self, pg: Any, store: Any, rank: int, world_size: int, backend: str, device: torch.device,
                 token: str):
        self.pg = pg
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = device
        self.token = token

    # -- construction --------------------------------------------------------------

    @staticmethod
    def create_master_store(host: str, world_size: int, timeout_s: float) -> Any:
        """The TCPStore server, bound by rank 0 on an OS-chosen port (no race between
        picking a free port and binding it). ``store.port`` tells the others."""
        from torch.distributed import TCPStore

        return TCPStore(
            host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )

    @classmethod
    def join(
        cls,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str = "gloo",
        timeout_s: float = 600.0,
        device: Optional[torch.device] = None,
        store: Any = None,
        token: str = "",
    ) -> "WeightGroup":
        """Join (rank ≥ 1) or finish creating (rank 0, passing the master ``store``)
        the group. Blocks until all ``world_size`` ranks have joined."""
        from torch.distributed import PrefixStore, TCPStore

        if not 0 <= rank < world_size:
            raise ValueError(f"weight_sync: rank {rank} outside world_size {world_size}")
        timeout = timedelta(seconds=timeout_s)
        if store is None:
            store = TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        # A prefix per group token: a rebuilt group never reads a stale key.
        prefixed = PrefixStore(f"{_STORE_PREFIX}/{token}", store)
        if backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            pg = ProcessGroupGloo(prefixed, rank, world_size, timeout)
            dev = torch.device("cpu")
        elif backend == "nccl":  # GPU clusters only
            from torch.distributed import ProcessGroupNCCL

            dev = device or torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(dev)
            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = ProcessGroupNCCL(prefixed, rank, world_size, opts)
        else:
            raise ValueError(f"weight_sync: backend must be 'gloo' or 'nccl', got {backend!r}")
        return cls(pg, store, rank, world_size, backend, dev, token)

    # -- ops -----------------------------------------------------------------------

    def broadcast_async(self, tensor: torch.Tensor, src: int = 0) -> Any:
        """Start a broadcast; returns the work handle (``.wait()`` it)."""
        # ProcessGroup.broadcast takes group-local ranks (torch.distributed.broadcast
        # would map them through the default group, which this group is not part of).
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = src
        return self.pg.broadcast([tensor], opts)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.broadcast_async(tensor, src).wait()

    def close(self) -> None:
        self.pg = None
        self.store = None


def broadcast_weights(
    model: torch.nn.Module,
    group: Optional[WeightGroup],
    bucket_bytes: int,
    rank: int = 0,
    dtype: Optional[torch.dtype] = None,
    pool: Optional[BufferPool] = None,
) -> Optional[dict]:
    """Broadcast the full parameters over ``group`` (rank 0 only holds a group). Call on
    every learner rank (ZeRO-3 gathers are collective); rank 0 returns stats."""
    if rank != 0:
        for _ in iter_packed_buckets(model, bucket_bytes, pack=False, dtype=dtype):
            pass
        return None
    if group is None:
        raise RuntimeError("weight_sync.broadcast_weights: learner rank 0 has no weight group; call init_weight_group first")
    plan = weight_plan(model, bucket_bytes, dtype)
    plans = plan[0]
    t0 = time.perf_counter()
    header = torch.frombuffer(bytearray(metas_to_bytes(plans)), dtype=torch.uint8)
    size = torch.tensor([header.numel()], dtype=torch.int64, device=group.device)
    group.broadcast(size)
    group.broadcast(header.to(group.device))
    nbytes = 0
    wait_s = 0.0
    pending = None
    # Double buffering: bucket i+1 is gathered and packed while bucket i is on the
    # wire (every bucket index has its own buffer, so nothing in flight is overwritten).
    for bucket in iter_packed_buckets(model, bucket_bytes, pack=True, dtype=dtype, device=group.device, pool=pool,
                                      plan=plan):
        if pending is not None:
            t = time.perf_counter()
            pending.wait()
            wait_s += time.perf_counter() - t
        pending = group.broadcast_async(bucket.flat)
        nbytes += bucket.nbytes
    if pending is not None:
        t = time.perf_counter()
        pending.wait()
        wait_s += time.perf_counter() - t
    total = time.perf_counter() - t0
    return {"bytes": nbytes, "buckets": len(plans), "send_s": total, "wait_s": wait_s, "total_s": total}


def iter_broadcast_buckets(group: WeightGroup, pool: Optional[BufferPool] = None) -> Iterator[Bucket]:
    """Receiver side of :func:`broadcast_weights`: the header, then one buffer per
    bucket. Within a sync every bucket has its own buffer, never a shared one: the
    engine may keep views of a bucket until a layer's last weight arrives (vLLM's
    layer-wise reload buffers them). ``pool`` reuses them from one sync to the next."""
    size = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.broadcast(size)
    header = torch.empty(int(size.item()), dtype=torch.uint8, device=group.device)
    group.broadcast(header)
    plans = metas_from_bytes(header.cpu().numpy().tobytes())

    def post(i: int) -> tuple[torch.Tensor, Any]:
        n = bucket_nbytes(plans[i])
        flat = pool.get(i, n, group.device) if pool is not None else torch.empty(n, dtype=torch.uint8, device=group.device)
        return flat, group.broadcast_async(flat)

    # The receive of bucket i+1 is posted before bucket i is handed to the engine, so
    # the next bucket arrives while the engine loads this one.
    nxt = post(0) if plans else None
    for i, plan in enumerate(plans):
        flat, work = nxt
        work.wait()
        nxt = post(i + 1) if i + 1 < len(plans) else None
        yield Bucket(flat, plan)


def consume_buckets(buckets: Iterable[Bucket], load: Callable[[Iterator[tuple[str, torch.Tensor]]], Any]) -> int:
    """Feed ``(name, view)`` pairs from ``buckets`` to ``load`` (which takes an
    iterator), then drain whatever it left unread, so that a broadcast sender is never
    left blocked on a receiver that stopped early or raised. Returns tensors loaded."""
    it = iter(buckets)
    count = 0

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal count
        for name, view in iter_unpacked(it):
            count += 1
            yield name, view

    try:
        load(counted())
    finally:
        for _ in it:  # drain: keep the collective in step even on error
            pass
    return count


# --------------------------------------------------------------------------- learner mixin


class WeightSenderMixin:
    """Learner-side weight export for a Ray actor class. The class provides
    :meth:`weight_sync_model` (the module whose parameters are the policy, e.g. a
    DeepSpeed engine's ``.module``) and :meth:`weight_sync_rank` (its rank among the
    learner ranks); optionally :meth:`weight_sync_dtype` (e.g. bf16 for a bf16 engine).
    """

    _wsync_store: Any = None
    _wsync_group: Optional[WeightGroup] = None

    def weight_sync_model(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_sync_rank(self) -> int:
        return 0

    def weight_sync_dtype(self) -> Optional[torch.dtype]:
        return None

    def _weight_sync_pool(self) -> BufferPool:
        pool = getattr(self, "_wsync_pool", None)
        if pool is None:
            pool = self._wsync_pool = BufferPool()
        return pool

    def stream_weights(self, transport: str, bucket_bytes: int) -> Iterator[dict]:
        """A generator method: call it with ``.options(num_returns="streaming")``; each
        item is one bucket descriptor (see :func:`stream_buckets`)."""
        yield from stream_buckets(
            self.weight_sync_model(), transport, bucket_bytes, rank=self.weight_sync_rank(),
            dtype=self.weight_sync_dtype(), pool=self._weight_sync_pool(), segment_for=self._weight_sync_segment,
        )

    def _weight_sync_segment(self, nbytes: int) -> SharedSegment:
        """The shared-memory segment, created on first use and replaced only when a
        bigger one is needed (a different bucket size can shift the padding)."""
        segment = getattr(self, "_wsync_segment", None)
        if segment is None or segment.nbytes < nbytes:
            if segment is not None:
                segment.close()
            segment = self._wsync_segment = SharedSegment.create(nbytes)
        return segment

    def close_weight_segment(self) -> None:
        segment = getattr(self, "_wsync_segment", None)
        if segment is not None:
            segment.close()
        self._wsync_segment = None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def weight_sync_endpoint(self, world_size: int, timeout_s: float = 600.0) -> tuple[str, int]:
        """Rank 0: open the group's TCPStore on this node; returns ``(host, port)``."""
        if self.weight_sync_rank() != 0:
            raise RuntimeError("weight_sync_endpoint must be called on learner rank 0")
        self.close_weight_group()
        host = ray.util.get_node_ip_address()
        self._wsync_store = WeightGroup.create_master_store(host, world_size, timeout_s)
        return host, int(self._wsync_store.port)

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str = "gloo",
                          timeout_s: float = 600.0, token: str = "") -> None:
        """Rank 0: complete the group (blocks until every rollout rank joined)."""
        if self._wsync_store is None:
            raise RuntimeError("init_weight_group: call weight_sync_endpoint first (it opens the store)")
        self._wsync_group = WeightGroup.join(host, port, 0, world_size, backend, timeout_s,
                                             store=self._wsync_store, token=token)

    def broadcast_weights(self, bucket_bytes: int) -> Optional[dict]:
        return broadcast_weights(
            self.weight_sync_model(), self._wsync_group, bucket_bytes,
            rank=self.weight_sync_rank(), dtype=self.weight_sync_dtype(), pool=self._weight_sync_pool(),
        )

    def close_weight_group(self) -> None:
        if self._wsync_group is not None:
            self._wsync_group.close()
        self._wsync_group = None
        self._wsync_store = None


# --------------------------------------------------------------------------- stand-in source


@ray.remote
class WeightSourceActor(WeightSenderMixin):
    """A plain Hugging Face policy in an actor: a weight source with the learner's
    sync interface, without DeepSpeed. Used by the weight-sync benchmark, and as a
    second source next to the learner in the parity tests."""

    def __init__(self, model_path: str, dtype: str = "float32"):
        from twodrl.config import ModelConfig
        from twodrl.models.loading import load_causal_lm

        torch.set_num_threads(1)
        self.model = load_causal_lm(ModelConfig(path=model_path, dtype=dtype))

    def weight_sync_model(self) -> torch.nn.Module:
        return self.model

    def perturb(self, scale: float = 0.02, seed: int = 0) -> None:
        """Add seeded Gaussian noise to every parameter (a stand-in for an update)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def sequence_logprobs(self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]) -> list[list[float]]:
        from actors.rollout import hf_sequence_logprobs

        return hf_sequence_logprobs(self.model, prompt_token_ids, response_token_ids)

    def copy_time(self, repeats: int = 3) -> float:
        """Seconds for one in-memory copy of all parameters into preallocated buffers
        (the floor a weight sync is compared with): the best of ``repeats``."""
        params = [p.detach() for p in self.model.parameters()]
        bufs = [torch.empty_like(p) for p in params]
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for b, p in zip(bufs, params):
                b.copy_(p)
            best = min(best, time.perf_counter() - t)
        return best


# --------------------------------------------------------------------------- driver side


def _learner_handles(learner_group: Any) -> list:
    """Rank-ordered learner actor handles from a list, or from a group object exposing
    ``actors`` / ``ranks`` / ``handles``."""
    if isinstance(learner_group, (list, tuple)):
        return list(learner_group)
    for attr in ("actors", "ranks", "handles"):
        handles = getattr(learner_group, attr, None)
        if handles:
            return list(handles)
    return [learner_group]


@dataclass
class _GroupState:
    token: str
    world_size: int
    worker_tokens: list[str]


_GROUPS: dict[tuple, _GroupState] = {}
_VERSION = itertools.count(1)


def _group_key(learners: list, workers: list) -> tuple:
    return (learners[0]._actor_id.hex(),) + tuple(w._actor_id.hex() for w in workers)


def _ensure_collective(learners: list, workers: list, backend: str, timeout_s: float) -> _GroupState:
    """Build the learner-0 + rollout group once; rebuild it when a rollout worker was
    restarted (its token no longer matches) or joined later."""
    key = _group_key(learners, workers)
    state = _GROUPS.get(key)
    if state is not None:
        current = ray.get([w.weight_group_token.remote() for w in workers], timeout=timeout_s)
        if current == state.worker_tokens:
            return state
    ranks_per_worker = ray.get([w.weight_group_ranks.remote() for w in workers], timeout=timeout_s)
    world_size = 1 + sum(ranks_per_worker)
    token = uuid.uuid4().hex[:12]
    host, port = ray.get(learners[0].weight_sync_endpoint.remote(world_size, timeout_s), timeout=timeout_s)
    base = 1
    calls = []
    for w, n in zip(workers, ranks_per_worker):
        calls.append(w.init_weight_group.remote(host, port, world_size, base, backend, timeout_s, token))
        base += n
    calls.append(learners[0].init_weight_group.remote(host, port, world_size, backend, timeout_s, token))
    ray.get(calls, timeout=timeout_s)
    state = _GroupState(token, world_size, [token] * len(workers))
    _GROUPS[key] = state
    return state


def iter_stream(stream: Any, timeout_s: Optional[float] = None, what: str = "stream") -> Iterator[Any]:
    """The refs of a Ray streaming generator, each within ``timeout_s`` of the one
    before (``None``: no limit); a producer that stalls raises ``GetTimeoutError``."""
    while True:
        ready, _ = ray.wait([stream], num_returns=1, timeout=timeout_s)
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"{what}: no new bucket within {timeout_s:g}s")
        try:
            yield next(stream)
        except StopIteration:
            return


def stream_from_learners(learners: list, transport: str, bucket_bytes: int,
                         timeout_s: Optional[float] = None) -> Iterator[Any]:
    """Start :meth:`WeightSenderMixin.stream_weights` on every learner rank and yield
    rank 0's bucket refs as they are packed, each within ``timeout_s`` of the last;
    then wait for the other ranks (under ZeRO-3 they only take part in the gathers) so
    their errors surface."""
    streams = [r.stream_weights.options(num_returns="streaming").remote(transport, bucket_bytes)
               for r in learners]
    yield from iter_stream(streams[0], timeout_s, "learner rank 0")
    for rank, stream in enumerate(streams[1:], start=1):
        ray.get(list(iter_stream(stream, timeout_s, f"learner rank {rank}")), timeout=timeout_s)


def await_in_order(calls: Sequence[Sequence[Any]], timeout_s: float, first_timeout_s: Optional[float] = None,
                   clock: Callable[[], float] = time.monotonic) -> list[int]:
    """Wait until every actor has run its calls (``calls[k]``: refs of actor ``k``, which
    runs them one after another). An actor that finishes none of its remaining calls
    for ``timeout_s`` (``first_timeout_s`` before its first one, counted from now) is
    taken for hung: the indices of those are returned and their calls left alone.
    Errors are not raised here: a failed call counts as finished (``ray.get`` it)."""
    now = clock()
    first = timeout_s if first_timeout_s is None else first_timeout_s
    pos = [0] * len(calls)
    since = [now] * len(calls)
    allow = [first] * len(calls)
    finished: set = set()
    late: list[int] = []
    while True:
        active = [k for k in range(len(calls)) if k not in late and pos[k] < len(calls[k])]
        if not active:
            return late
        deadline = min(since[k] + allow[k] for k in active)
        waiting = [ref for k in active for ref in calls[k][pos[k]:] if ref not in finished]
        ready, _ = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - clock()), fetch_local=False)
        finished.update(ready)
        now = clock()
        for k in active:
            moved = False
            while pos[k] < len(calls[k]) and calls[k][pos[k]] in finished:
                pos[k] += 1
                moved = True
            if moved:
                since[k], allow[k] = now, timeout_s
            elif pos[k] < len(calls[k]) and now >= since[k] + allow[k]:
                late.append(k)


def _worker_deadlines(workers: list, timeout_s: Optional[float]) -> tuple[float, float]:
    """``(per-bucket timeout, allowance for the first bucket)``. The first bucket of an
    update waits for the generation already running on the engine (actors.rollout's
    EngineGate), so it is also allowed a generate call's deadline. Unset values come
    from the workers (``rollout.sync_timeout_s`` / ``call_timeout_s`` via their
    ``deadlines()``), else DEFAULT_SYNC_TIMEOUT_S."""
    answers: list[dict] = []
    try:
        answers = ray.get([w.deadlines.remote() for w in workers], timeout=60)
    except (AttributeError, ray.exceptions.RayError) as e:  # older receivers, or one down
        log.debug("weight sync: no deadlines from the rollout workers (%s)", e)
    per_bucket = timeout_s if timeout_s is not None else max(
        [float(a.get("sync", 0.0)) for a in answers] or [DEFAULT_SYNC_TIMEOUT_S])
    generate = max([float(a.get("generate", 0.0)) for a in answers] or [0.0])
    return per_bucket, per_bucket + generate


def _restart_hung(workers: list, late: list[int], what: str) -> None:
    """Kill rollout workers that missed the sync's deadline, with a restart: Ray brings
    each back from its constructor (initial weights, version 0), and the driver's
    stale-version check re-syncs it before its samples are used."""
    for k in late:
        log.warning("weight sync: rollout worker %d made no progress on %s in time; restarting it", k, what)
        ray.kill(workers[k], no_restart=False)


def _abort_updates(workers: list, reason: str, timeout_s: float) -> None:
    """Close the half-sent update on every worker, so generation waiting on it goes on
    (best effort: the sync is failing anyway)."""
    refs = [w.abort_weight_update.remote(reason) for w in workers]
    try:
        ray.get(refs, timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        log.warning("weight sync: could not close the abandoned update on every worker: %s", e)


TRANSPORTS = ("auto", "shared_memory", "object_store", "collective")


def resolve_transport(transport: str, learners: list, workers: list, timeout_s: Optional[float] = None) -> str:
    """``auto``: NCCL ``collective`` on a GPU cluster; on CPU, ``shared_memory`` when
    learner rank 0 and every rollout worker share a node, else ``object_store``. An
    explicit ``shared_memory`` is checked the same way, so a worker on another node is
    a clear error here rather than a missing file inside the engine."""
    if transport not in TRANSPORTS:
        raise ValueError(f"rollout.weight_sync: {transport!r} is not one of {list(TRANSPORTS)}")
    if transport in ("object_store", "collective"):
        return transport
    if transport == "auto" and ray.cluster_resources().get("GPU", 0) > 0:
        return "collective"
    nodes = ray.get([learners[0].node_id.remote()] + [w.node_id.remote() for w in workers], timeout=timeout_s)
    same_node = all(n == nodes[0] for n in nodes[1:])
    if transport == "auto":
        return "shared_memory" if same_node else "object_store"
    if not same_node:
        raise ValueError(
            "rollout.weight_sync=shared_memory needs every rollout worker on learner rank 0's node; "
            "use object_store (or auto) when they are spread over several nodes"
        )
    return transport


def sync_weights(
    learner_group: Any,
    rollout_workers: Sequence[Any],
    transport: str = "auto",
    bucket_mb: float = DEFAULT_BUCKET_MB,
    version: Optional[int] = None,
    backend: Optional[str] = None,
    timeout_s: Optional[float] = None,
) -> dict:
    """Push the learner's current weights into every rollout worker, in place.

    ``learner_group``: learner rank actors (rank 0 first) or an object with ``actors``;
    each rank implements the :class:`WeightSenderMixin` methods. ``transport``: see
    :func:`resolve_transport`. ``backend`` for the collective transport defaults to
    NCCL when the cluster has GPUs, else gloo.

    With ``shared_memory`` and ``object_store`` the buckets are streamed: learner rank
    0 is a Ray streaming generator, and each bucket is handed to every worker (one
    ``load_weight_bucket`` call per worker and bucket) as soon as it is packed, so
    packing and loading overlap. ``finish_weight_update`` then closes the update. On
    a worker the first bucket waits for a running ``generate`` and a ``generate`` asked
    for mid-update waits for the finish (actors.rollout's EngineGate).

    Deadlines: ``timeout_s`` per bucket (default: the workers' ``rollout.sync_timeout_s``)
    for the learner to pack the next one and for each worker to load its next one; the
    first bucket also gets a generate call's deadline (it may wait for one). A worker
    that misses it is restarted by Ray and listed in ``restarted`` (the driver re-syncs
    it when its samples come back stale); a learner that misses it fails the sync, and
    the workers' open update is aborted so nothing waits on it.

    Returns timings: ``total_s``, ``send_s`` (until the last bucket was packed / sent),
    ``load_s`` (slowest receiver's time spent loading), ``bytes``, ``buckets``,
    ``tensors``, ``version``, ``transport`` (the resolved one), ``restarted`` (indices
    of workers restarted for missing the deadline).
    """
    learners = _learner_handles(learner_group)
    workers = list(rollout_workers)
    if not learners or not workers:
        raise ValueError("sync_weights: need at least one learner rank and one rollout worker")
    if bucket_mb <= 0:
        raise ValueError(f"sync_weights: bucket_mb must be > 0 (rollout.weight_sync_bucket_mb), got {bucket_mb}")
    bucket_bytes = max(1, int(bucket_mb * (1 << 20)))
    version = int(version) if version is not None else next(_VERSION)
    t0 = time.perf_counter()
    timeout_s, first_timeout_s = _worker_deadlines(workers, timeout_s)
    transport = resolve_transport(transport, learners, workers, timeout_s)
    stats: dict[str, Any] = {"bytes": 0, "buckets": 0}
    loads: list[dict] = []
    late: list[int] = []
    if transport in ("object_store", "shared_memory"):
        calls: list[list] = [[] for _ in workers]
        try:
            for ref in stream_from_learners(learners, transport, bucket_bytes, timeout_s):
                # A top-level ObjectRef argument is resolved before the call runs: the
                # worker gets the descriptor (for object_store, a zero-copy view of the
                # bucket in the node's store). A worker runs its weight calls one at a
                # time, in the order they were sent.
                for k, w in enumerate(workers):
                    calls[k].append(w.load_weight_bucket.remote(ref))
        except BaseException as e:
            started = [w for k, w in enumerate(workers) if calls[k]]
            if started:
                _abort_updates(started, f"the learner's bucket stream failed ({type(e).__name__})", timeout_s)
            raise
        send_s = time.perf_counter() - t0
        for k, w in enumerate(workers):
            calls[k].append(w.finish_weight_update.remote(version))
        late = await_in_order(calls, timeout_s, first_timeout_s)
        _restart_hung(workers, late, "its weight buckets")
        live = [k for k in range(len(workers)) if k not in late]
        ray.get([ref for k in live for ref in calls[k][:-1]])  # a failed bucket load surfaces here
        loads = ray.get([calls[k][-1] for k in live])
        del calls  # the object-store buckets can go now
        if loads:
            stats = {"bytes": loads[0]["bytes"], "buckets": loads[0]["buckets"]}
    elif transport == "collective":
        if backend is None:
            # The driver itself may sit on a CPU head node: decide by the cluster.
            backend = "nccl" if ray.cluster_resources().get("GPU", 0) > 0 else "gloo"
        _ensure_collective(learners, workers, backend, timeout_s)
        t_setup = time.perf_counter()
        sends = [r.broadcast_weights.remote(bucket_bytes) for r in learners]
        recvs = [w.receive_weights_broadcast.remote(version) for w in workers]
        # One call each carries every bucket: the whole broadcast gets the first
        # bucket's allowance plus the per-bucket deadline.
        late = await_in_order([[ref] for ref in sends + recvs], timeout_s, first_timeout_s + timeout_s)
        if late:
            # A member that stalls breaks the group for all: restart the hung rollout
            # workers, forget the group (rebuilt next time) and fail this sync.
            _GROUPS.pop(_group_key(learners, workers), None)
            hung_workers = [k - len(sends) for k in late if k >= len(sends)]
            _restart_hung(workers, hung_workers, "the weight broadcast")
            raise ray.exceptions.GetTimeoutError(
                f"sync_weights: the weight broadcast did not finish in time on "
                f"{[f'learner rank {k}' for k in late if k < len(sends)] + [f'rollout worker {k}' for k in hung_workers]}"
            )
        out = ray.get(sends + recvs)
        sent = out[0]
        loads = out[len(sends):]
        send_s = sent["send_s"]
        stats = {"bytes": sent["bytes"], "buckets": sent["buckets"], "setup_s": t_setup - t0}
    total = time.perf_counter() - t0
    return {
        "transport": transport,
        "version": version,
        "total_s": total,
        "send_s": send_s,
        "load_s": max([l["load_s"] for l in loads] or [0.0]),
        "tensors": loads[0]["tensors"] if loads else 0,
        "restarted": late,
        **stats,
    }


__all__ = [
    "BufferPool", "DEFAULT_BUCKET_MB", "DEFAULT_SYNC_TIMEOUT_S", "SegmentSlots", "TRANSPORTS", "WeightGroup",
    "WeightSenderMixin", "WeightSourceActor", "await_in_order", "broadcast_weights", "consume_buckets",
    "hf_param_name", "iter_broadcast_buckets", "iter_stream",
    "iter_object_store_buckets", "iter_packed_buckets", "named_full_parameters", "open_bucket", "resolve_transport",
    "stream_buckets", "stream_from_learners", "sync_weights", "weight_plan",
]
