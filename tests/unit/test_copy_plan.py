"""Record-and-replay of a weight loader's copies (twodrl.copy_plan)."""

from __future__ import annotations

import pytest
import torch

from twodrl.copy_plan import CopyPlan, NotReplayable, record_copies
from twodrl.weights import pack_buckets, unpack_bucket


class FusedModel(torch.nn.Module):
    """A stand-in for an inference engine's layout: q, k and v land in one fused
    parameter, gate/up in another (each at its own rows), a norm is copied whole, and
    a tied head is skipped, the way vLLM's loaders do it."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(12, 4), requires_grad=False)
        self.gate_up = torch.nn.Parameter(torch.zeros(4, 6), requires_grad=False)
        self.norm = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
        self.loader_calls = 0

    def load_weights(self, weights):
        self.loader_calls += 1
        rows = {"q": (0, 4), "k": (4, 8), "v": (8, 12)}
        for name, t in weights:
            if name in rows:
                a, b = rows[name]
                self.qkv.data.narrow(0, a, b - a).copy_(t)
            elif name in ("gate", "up"):
                col = 0 if name == "gate" else 3
                self.gate_up.data.narrow(1, col, 3).copy_(t.t())  # a transposed view
            elif name == "norm":
                self.norm.data.copy_(t)
            elif name == "lm_head":
                pass  # tied to an embedding elsewhere: nothing to load


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    return [("q", torch.randn(4, 4, generator=g)), ("k", torch.randn(4, 4, generator=g)),
            ("v", torch.randn(4, 4, generator=g)), ("gate", torch.randn(3, 4, generator=g)),
            ("up", torch.randn(3, 4, generator=g)), ("norm", torch.randn(4, generator=g)),
            ("lm_head", torch.randn(2, 4, generator=g))]


def _as_received(named, bucket_bytes=1 << 20):
    """Views into packed flat buckets, as a rollout worker receives them."""
    return [item for b in pack_buckets(named, bucket_bytes) for item in unpack_bucket(b)]


def test_replay_reproduces_the_loader_on_new_values():
    model = FusedModel()
    plan = CopyPlan()
    first = _as_received(_weights(0))
    plan.add(record_copies(model.load_weights, first, model.parameters()), first)
    assert model.loader_calls == 1 and plan.covers(first)
    assert plan.copies["lm_head"] == []  # skipped by the loader, skipped by the replay

    reference = FusedModel()
    second = _weights(1)
    reference.load_weights(second)
    plan.replay(_as_received(second, bucket_bytes=64))  # other buckets, same tensors
    assert model.loader_calls == 1  # the loader did not run again
    for got, want in zip(model.parameters(), reference.parameters()):
        assert torch.equal(got, want)


def test_plan_grows_bucket_by_bucket_and_checks_layout():
    model = FusedModel()
    plan = CopyPlan()
    received = _as_received(_weights(0))
    for part in (received[:3], received[3:]):
        assert not plan.covers(part)
        plan.add(record_copies(model.load_weights, part, model.parameters()), part)
    assert plan.covers(received)
    assert not plan.covers([("q", torch.zeros(2, 8))])  # a different shape is not covered
    assert not plan.covers([("q", torch.zeros(4, 4, dtype=torch.float64))])


class CastingModel(FusedModel):
    def load_weights(self, weights):
        for name, t in weights:
            if name == "norm":
                self.norm.data.copy_(t.to(torch.float64).mul(1.0))  # derived tensor
            else:
                super().load_weights([(name, t)])


class IndexedModel(FusedModel):
    def load_weights(self, weights):
        for name, t in weights:
            if name == "norm":
                self.norm.data[:] = t
            else:
                super().load_weights([(name, t)])


class ScalingModel(FusedModel):
    def load_weights(self, weights):
        super().load_weights(weights)
        self.norm.data.mul_(2.0)  # a post-processing step the copies do not capture


class AliasingModel(FusedModel):
    def load_weights(self, weights):
        for name, t in weights:
            if name == "norm":
                self.norm.data = t  # keeps a view of the incoming buffer
            else:
                super().load_weights([(name, t)])


@pytest.mark.parametrize("cls, reason", [
    (CastingModel, "derived"),
    (IndexedModel, "indexed"),
    (ScalingModel, "reproduce"),
    (AliasingModel, "aliases"),
])
def test_loaders_a_plan_cannot_reproduce_are_refused(cls, reason):
    model = cls()
    received = _as_received(_weights(0))
    with pytest.raises(NotReplayable, match=reason):
        record_copies(model.load_weights, received, model.parameters())
