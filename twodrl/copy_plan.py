"""Record the copies a weight loader makes once, then replay them directly.

An inference engine's ``load_weights`` maps checkpoint tensors onto its own parameters:
it renames them, slices fused projections (q/k/v into one ``qkv_proj``), narrows a
tensor-parallel shard, and finally ``copy_``s a view of the incoming tensor into a view
of a parameter. The mapping is the same at every weight sync; only the values change.
Walking the loader every time costs Python overhead per tensor (for vLLM ~0.4 ms per
call, more than a third of the copy time of a 50M-parameter model).

:func:`record_copies` runs the loader once under a ``TorchFunctionMode`` that notes every
``copy_`` whose source is a view of one of the incoming tensors: the destination view
and where in the incoming tensor the source view sits. :meth:`CopyPlan.replay` then
does just those copies.

A plan is only used when it is proven faithful: no parameter was written from anything
the recorder could not trace back to an incoming tensor (a cast or ``torch.cat``
first, an indexed assignment), no parameter aliases the incoming buffer afterwards,
and replaying the recorded copies over the freshly loaded weights reproduces them
exactly. Otherwise recording raises :class:`NotReplayable` and the caller keeps using
the loader.

Pure torch: no Ray, no vLLM.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode


class NotReplayable(RuntimeError):
    """The loader did something a recorded list of copies cannot reproduce."""


@dataclass(frozen=True)
class RecordedCopy:
    dst: torch.Tensor  # a view of an engine parameter
    offset: int  # elements from the incoming tensor's first element to the source view's
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def source_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The recorded source view, taken of ``tensor`` (this sync's incoming tensor)."""
        return tensor.as_strided(self.size, self.stride, tensor.storage_offset() + self.offset)


@dataclass(frozen=True)
class _Source:
    start: int  # byte address of the first element
    end: int  # one past the last byte
    name: str
    tensor: torch.Tensor


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] a strided tensor touches."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _Recorder(TorchFunctionMode):
    def __init__(self, sources: list[_Source], param_storages: set[int]):
        super().__init__()
        self.sources = sorted(sources, key=lambda s: s.start)
        self.starts = [s.start for s in self.sources]
        self.param_storages = param_storages
        self.copies: dict[str, list[RecordedCopy]] = {}
        self.problem: Optional[str] = None

    def _source_of(self, t: torch.Tensor) -> Optional[_Source]:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return None
        lo, hi = _extent(t)
        i = bisect.bisect_right(self.starts, lo) - 1
        if i < 0:
            return None
        src = self.sources[i]
        if lo >= src.end:
            return None
        if hi > src.end or t.dtype != src.tensor.dtype:
            self.problem = self.problem or f"a view of {src.name!r} reaches outside it or changes its dtype"
            return None
        return src

    def _is_param(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.param_storages

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and len(args) >= 2:
            dst, src = args[0], args[1]
            source = self._source_of(src)
            if source is not None:
                offset = (src.data_ptr() - source.start) // src.element_size()
                self.copies.setdefault(source.name, []).append(
                    RecordedCopy(dst, offset, tuple(src.shape), tuple(src.stride()))
                )
            elif self._is_param(dst):
                self.problem = self.problem or "a parameter was written from a tensor derived from the input"
        elif func is torch.Tensor.__setitem__ and self._is_param(args[0] if args else None):
            self.problem = self.problem or "a parameter was written by indexed assignment"
        return func(*args, **kwargs)


class CopyPlan:
    """Recorded copies per incoming tensor name; grows as new names are recorded."""

    def __init__(self) -> None:
        self.copies: dict[str, list[RecordedCopy]] = {}
        self.layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}

    def covers(self, named: Sequence[tuple[str, torch.Tensor]]) -> bool:
        return all(self.layout.get(n) == (t.dtype, tuple(t.shape)) for n, t in named)

    @torch.no_grad()
    def replay(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        count = 0
        for name, tensor in named:
            for c in self.copies[name]:
                c.dst.copy_(c.source_view(tensor))
            count += 1
        return count

    def add(self, copies: dict[str, list[RecordedCopy]], named: Sequence[tuple[str, torch.Tensor]]) -> None:
        for n, t in named:
            self.copies[n] = copies[n]
            self.layout[n] = (t.dtype, tuple(t.shape))


@torch.no_grad()
def record_copies(
    load: Callable[[Iterable[tuple[str, torch.Tensor]]], Any],
    named: Sequence[tuple[str, torch.Tensor]],
    parameters: Iterable[torch.Tensor],
) -> dict[str, list[RecordedCopy]]:
    """Run ``load(named)`` (it really loads) while recording its copies, then check the
    recording against the result (see the module docstring). ``parameters``: every
    tensor the loader may write (an engine's parameters and buffers). Returns the
    copies per name; raises :class:`NotReplayable` when they would not reproduce the
    load."""
    params = list(parameters)
    storages = {p.untyped_storage().data_ptr() for p in params}
    sources = []
    for name, t in named:
        lo, hi = _extent(t)
        sources.append(_Source(lo, hi, name, t))
    recorder = _Recorder(sources, storages)
    with recorder:
        load(iter(named))
    if recorder.problem:
        raise NotReplayable(recorder.problem)
    # A tensor the loader did not copy from at all (e.g. a tied lm_head it skips) gets
    # an empty entry: replay skips it too. Had the loader written it to a parameter
    # some untraceable way, the recorder's problem check above has caught it.
    copies = {n: recorder.copies.get(n, []) for n, _ in named}
    buffers = [(s.start, s.end) for s in sources]
    for p in params:
        lo, hi = _extent(p)
        if any(lo < e and s < hi for s, e in buffers):
            raise NotReplayable("a parameter now aliases the incoming buffer")
    # Replaying onto the values the loader just wrote must change nothing.
    for name, t in named:
        for c in copies[name]:
            replayed = torch.empty_like(c.dst)
            replayed.copy_(c.source_view(t))
            if not torch.equal(replayed, c.dst):
                raise NotReplayable(f"replaying the copies of {name!r} does not reproduce the loaded values")
    return copies


__all__ = ["CopyPlan", "NotReplayable", "RecordedCopy", "record_copies"]
