"""Bucket packing/unpacking of named tensors (twodrl.weights)."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twodrl.weights import (
    ALIGN,
    Bucket,
    TensorMeta,
    bucket_from_payload,
    bucket_nbytes,
    bucket_to_payload,
    iter_unpacked,
    metas_from_bytes,
    metas_to_bytes,
    pack_bucket,
    pack_buckets,
    plan_buckets,
    unpack_bucket,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool]


def _make(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 7), min_size=0, max_size=3),
            st.sampled_from(DTYPES),
        ),
        min_size=1,
        max_size=12,
    ),
    st.integers(1, 600),
)
def test_roundtrip_any_dtypes_shapes_and_bucket_sizes(specs, bucket_bytes):
    named = [(f"t{i}", _make(tuple(shape), dtype, i)) for i, (shape, dtype) in enumerate(specs)]
    buckets = pack_buckets(named, bucket_bytes)
    out = list(iter_unpacked(buckets))
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, a), (_, b) in zip(named, out):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    for bucket in buckets:
        # a bucket only exceeds the limit when it holds one oversized tensor
        assert bucket.nbytes <= max(bucket_bytes, bucket_nbytes(bucket.metas[:1])) or len(bucket.metas) == 1
        assert all(m.offset % ALIGN == 0 for m in bucket.metas)


def test_unpack_returns_views_not_copies():
    named = [("a", torch.arange(10, dtype=torch.float32)), ("b", torch.ones(3, 4))]
    (bucket,) = pack_buckets(named, 1 << 20)
    views = dict(unpack_bucket(bucket))
    base = bucket.flat.data_ptr()
    for meta in bucket.metas:
        assert views[meta.name].data_ptr() == base + meta.offset
    # writing through the flat buffer is visible in the views
    bucket.flat[: 4].view(torch.float32).fill_(42.0)
    assert views["a"][0].item() == 42.0


def test_plan_splits_by_size_keeps_order_and_isolates_big_tensors():
    specs = [("small0", torch.float32, (4,)), ("big", torch.float32, (1000,)), ("small1", torch.float32, (4,))]
    plans = plan_buckets(specs, bucket_bytes=256)
    assert [[m.name for m in p] for p in plans] == [["small0"], ["big"], ["small1"]]
    plans = plan_buckets(specs, bucket_bytes=1 << 20)
    assert [[m.name for m in p] for p in plans] == [["small0", "big", "small1"]]
    assert [m.offset for m in plans[0]] == [0, 64, 64 + 4000 + (ALIGN - 4000 % ALIGN) % ALIGN]


def test_pack_casts_floats_only():
    named = [("w", torch.randn(5, dtype=torch.float32)), ("idx", torch.arange(3))]
    (bucket,) = pack_buckets(named, 1 << 20, dtype=torch.bfloat16)
    got = dict(unpack_bucket(bucket))
    assert got["w"].dtype == torch.bfloat16 and got["idx"].dtype == torch.int64
    assert torch.equal(got["w"], named[0][1].to(torch.bfloat16))


def test_pack_into_preallocated_buffer_and_noncontiguous_source():
    src = torch.randn(6, 4).t()  # non-contiguous
    plan = plan_buckets([("x", src.dtype, src.shape)], 1 << 20)[0]
    out = torch.zeros(bucket_nbytes(plan) + 128, dtype=torch.uint8)
    bucket = pack_bucket(plan, [src], out=out)
    assert bucket.flat.data_ptr() == out.data_ptr()
    assert torch.equal(dict(unpack_bucket(bucket))["x"], src)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        plan_buckets([("a", torch.float32, (1,)), ("a", torch.float32, (1,))], 100)
    with pytest.raises(ValueError, match="bucket_bytes must be > 0"):
        plan_buckets([("a", torch.float32, (1,))], 0)
    plan = plan_buckets([("a", torch.float32, (2, 2))], 100)[0]
    with pytest.raises(ValueError, match="tensor 'a' has shape"):
        pack_bucket(plan, [torch.zeros(3)])
    with pytest.raises(ValueError, match="needs"):
        unpack_bucket(Bucket(torch.zeros(4, dtype=torch.uint8), plan))
    with pytest.raises(ValueError, match="unsupported tensor dtype"):
        plan_buckets([("c", torch.complex64, (1,))], 100)


def test_metadata_json_roundtrip():
    plans = plan_buckets([("a.b", torch.bfloat16, (3, 5)), ("c", torch.int64, ())], 64)
    assert metas_from_bytes(metas_to_bytes(plans)) == plans
    with pytest.raises(ValueError, match="malformed"):
        metas_from_bytes(b"{not json")


def test_payload_roundtrip_shares_memory_with_numpy_buffer():
    named = [("w", torch.randn(3, 3)), ("b", torch.randn(3).to(torch.bfloat16))]
    (bucket,) = pack_buckets(named, 1 << 20)
    payload = bucket_to_payload(bucket)
    # what the object store does: serialize, deserialize; the array is the only big part
    restored = bucket_from_payload(pickle.loads(pickle.dumps(payload)))
    assert restored.metas == bucket.metas
    for (n, a), (m, b) in zip(named, unpack_bucket(restored)):
        assert n == m and torch.equal(a, b)
    # the restored flat tensor wraps the numpy buffer (no copy at unpack time)
    arr = payload["flat"]
    assert bucket_from_payload(payload).flat.data_ptr() == arr.ctypes.data


def test_shared_segment_round_trip_and_cleanup(tmp_path, monkeypatch):
    """A bucket packed into an owner's segment reads back, bit for bit, through a
    read-only attachment (what a rollout worker maps); closing the owner removes the
    file; a segment left by a dead process is swept by the next create."""
    from twodrl.weights import SharedSegment, bucket_from_segment, shared_bucket_descriptor, sweep_stale_segments

    monkeypatch.setenv("TWODRL_SHM_DIR", str(tmp_path))
    named = [("w", torch.randn(5, 7)), ("b", torch.randn(7).to(torch.bfloat16)), ("i", torch.arange(3))]
    plans = plan_buckets(((n, t.dtype, t.shape) for n, t in named), 1 << 20)
    size = bucket_nbytes(plans[0])
    owner = SharedSegment.create(size + 128)
    assert owner.path.startswith(str(tmp_path)) and (tmp_path / owner.path.split("/")[-1]).stat().st_mode & 0o077 == 0
    pack_bucket(plans[0], [t for _, t in named], out=owner.tensor[128 : 128 + size])
    desc = pickle.loads(pickle.dumps(shared_bucket_descriptor(owner, 128, plans[0])))
    reader = SharedSegment.attach(desc["path"], desc["size"])
    for (n, a), (m, b) in zip(named, unpack_bucket(bucket_from_segment(reader, desc))):
        assert n == m and torch.equal(a, b)
    # the reader sees the owner's next write without re-attaching (same pages)
    owner.tensor[128 : 128 + size].zero_()
    assert not bucket_from_segment(reader, desc).flat.any()
    reader.close()
    owner.close()
    assert list(tmp_path.iterdir()) == []
    # a segment named after a pid that no longer exists is stale
    stale = tmp_path / "twodrl-wsync-999999999-deadbeef"
    stale.write_bytes(b"x")
    assert sweep_stale_segments(str(tmp_path)) == [stale.name]
    assert not stale.exists()
    with pytest.raises(FileNotFoundError, match="share a node"):
        SharedSegment.attach(str(tmp_path / "missing"), 8)


def test_tensor_meta_nbytes():
    assert TensorMeta("x", "bfloat16", (3, 4), 0).nbytes == 24
    assert TensorMeta("s", "float32", (), 0).nbytes == 4


# ------------------------------------------------------------ transport (in-process)
# The gloo weight group and the sender/receiver loops of actors/weight_sync.py, run
# with two threads of this process (no Ray): rank 0 sends a real model's parameters.


def _tiny_module():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def _run_pair(sender, receiver):
    import threading

    errors, results = [], {}

    def wrap(name, fn):
        try:
            results[name] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append((name, e))

    threads = [threading.Thread(target=wrap, args=("send", sender)),
               threading.Thread(target=wrap, args=("recv", receiver))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "broadcast hung"
    return results, errors


def _group_pair():
    from actors.weight_sync import WeightGroup

    store = WeightGroup.create_master_store("127.0.0.1", 2, timeout_s=30)
    port = store.port
    groups = {}

    def make(rank):
        groups[rank] = WeightGroup.join("127.0.0.1", port, rank, 2, "gloo", 30, store=store if rank == 0 else None,
                                        token="t")

    _run_pair(lambda: make(0), lambda: make(1))
    return groups[0], groups[1]


def test_broadcast_weights_roundtrip_with_pooled_buffers():
    from actors.weight_sync import BufferPool, broadcast_weights, consume_buckets, iter_broadcast_buckets

    model = _tiny_module()
    g0, g1 = _group_pair()
    send_pool, recv_pool = BufferPool(), BufferPool()
    for step in range(2):  # second sync reuses both sides' buffers
        with torch.no_grad():
            model[0].weight.add_(1.0)
        received = {}

        def load(it):
            for name, view in it:
                received[name] = view.clone()

        results, errors = _run_pair(
            lambda: broadcast_weights(model, g0, bucket_bytes=256, pool=send_pool),
            lambda: consume_buckets(iter_broadcast_buckets(g1, recv_pool), load),
        )
        assert not errors, errors
        assert results["recv"] == len(received) == 6
        assert results["send"]["buckets"] > 1
        for name, p in model.named_parameters():
            assert torch.equal(received[name], p.detach()), (step, name)


def test_receiver_error_still_drains_the_broadcast():
    """A receiver whose engine fails on the first tensor must keep receiving the rest,
    or the learner would block forever in the broadcast."""
    from actors.weight_sync import broadcast_weights, consume_buckets, iter_broadcast_buckets

    model = _tiny_module()
    g0, g1 = _group_pair()

    def bad_load(it):
        next(it)
        raise RuntimeError("engine refused the weights")

    results, errors = _run_pair(
        lambda: broadcast_weights(model, g0, bucket_bytes=128),
        lambda: consume_buckets(iter_broadcast_buckets(g1), bad_load),
    )
    assert "send" in results and results["send"]["buckets"] >= 3  # the sender finished
    assert [n for n, _ in errors] == ["recv"] and "refused" in str(errors[0][1])


def test_hf_param_name_strips_wrappers():
    from actors.weight_sync import hf_param_name

    assert hf_param_name("module.model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_param_name("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert hf_param_name("model.embed_tokens.weight") == "model.embed_tokens.weight"


@pytest.mark.parametrize("transport", ["shared_memory", "object_store"])
def test_stream_buckets_descriptors_open_to_the_model_weights(transport, tmp_path, monkeypatch):
    """The sender loop of the streamed transports, without Ray: every descriptor it
    yields (pickled, as Ray does) opens on the receiver side to views that equal the
    parameters; the shared-memory segment is reused by the next sync, not recreated."""
    from actors.weight_sync import open_bucket, stream_buckets

    monkeypatch.setenv("TWODRL_SHM_DIR", str(tmp_path))
    model = _tiny_module()
    segments = []

    def segment_for(nbytes):
        from twodrl.weights import SharedSegment

        if not segments or segments[-1].nbytes < nbytes:
            segments.append(SharedSegment.create(nbytes))
        return segments[-1]

    for step in range(2):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        descs = [pickle.loads(pickle.dumps(d)) for d in
                 stream_buckets(model, transport, bucket_bytes=256, segment_for=segment_for)]
        assert len(descs) > 1 and all(d["kind"] == transport for d in descs)
        received = {n: v.clone() for d in descs for n, v in unpack_bucket(open_bucket(d))}
        for name, p in model.named_parameters():
            assert torch.equal(received[name], p.detach()), (step, name)
    assert len(segments) == (1 if transport == "shared_memory" else 0)
    # non-source ranks (no ZeRO-3 here) have nothing to gather and yield nothing
    assert list(stream_buckets(model, transport, 256, rank=1, segment_for=segment_for)) == []
    with pytest.raises(ValueError, match="transport"):
        list(stream_buckets(model, "carrier_pigeon", 256))
    for seg in segments:
        seg.close()


def test_plan_buckets_ramp_starts_small_then_full_size():
    specs = [(f"t{i}", torch.float32, (256,)) for i in range(40)]  # 1 KiB each
    flat = plan_buckets(specs, 8 << 10)
    ramped = plan_buckets(specs, 8 << 10, ramp=3)
    assert [len(b) for b in flat] == [8] * 5
    assert [len(b) for b in ramped][:4] == [1, 2, 4, 8]  # 1/8, 1/4, 1/2, then full buckets
    assert all(len(b) <= 8 for b in ramped)
    assert [m.name for b in ramped for m in b] == [n for n, _, _ in specs]  # order kept
