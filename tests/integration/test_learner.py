"""The DeepSpeed learner group on a local Ray cluster: 2 ranks on CPU (gloo), ZeRO-2
with a colocated reference and ZeRO-3 with a separate reference actor; the same first
round must give the same weights under both."""

from __future__ import annotations

import math

import pytest
import torch

from twodrl.config import ModelConfig, load_config
from twodrl.metrics import round_metric_keys
from twodrl.synthetic import make_preference_records, score_segments, split_sentences

pytestmark = pytest.mark.integration

PAIRS = make_preference_records(8, seed=11)
PROBE = [{"prompt": p["prompt"], "response": p["chosen"]["text"]} for p in PAIRS[:4]]
TRAIN_KEYS = [k for k in round_metric_keys() if k.startswith("train/")]


def _cfg(stage: int, colocate: bool, name: str):
    return load_config(None, [
        f"run_name={name}", f"learner.zero_stage={stage}", f"learner.colocate_reference={str(colocate).lower()}",
        "learner.num_ranks=2", "learner.micro_batch_size=2", "learner.epochs_per_round=1", "learner.lr=2e-3",
        "learner.lr_schedule=cosine", "learner.warmup_ratio=0.05", "rounds=40", "rollout.prompts_per_round=8",
    ])


def _first_round(group):
    before = group.compute_logprobs(PROBE)
    metrics = group.train_round(PAIRS, "2d-dpo")
    after = group.compute_logprobs(PROBE)
    return before, metrics, after


@pytest.fixture(scope="module")
def zero2(ray_cluster):
    from actors.learner import PolicyLearnerGroup

    group = PolicyLearnerGroup(_cfg(2, True, "learner-z2"))
    first = _first_round(group)
    yield group, first
    group.shutdown()


@pytest.fixture(scope="module")
def zero3(ray_cluster, zero2):
    from actors.learner import PolicyLearnerGroup

    zero2[0].shutdown()  # two ranks at a time on a 2-core machine
    group = PolicyLearnerGroup(_cfg(3, False, "learner-z3"))
    first = _first_round(group)
    yield group, first
    group.shutdown()


def test_round_metrics_and_actor_names(zero2, ray_cluster):
    group, (before, metrics, after) = zero2
    for key in TRAIN_KEYS:
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["train/optimizer_steps"] == 2  # 8 pairs / (2 ranks × 2 per micro-batch)
    assert metrics["train/kl"] != 0.0  # the policy moved during the round
    assert any(abs(a - b) > 1e-4 for x, y in zip(before, after) for a, b in zip(x, y))
    assert [len(x) for x in before] == [len(x) for x in after]
    names = {a["name"] for a in ray_cluster.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "twodrl-learner-z2"}
    assert {"learner-0", "learner-1"} <= names


def test_more_rounds_separate_pairs_and_other_objectives(zero2):
    group, (_, first, _) = zero2
    for _ in range(3):
        last = group.train_round(PAIRS, "2d-dpo")
    assert last["train/rewards/margins"] > first["train/rewards/margins"]
    assert last["train/rewards/accuracies"] >= 0.75
    # Every other objective runs through the same path (TDPO with reference logits).
    for algorithm in ("tdpo2", "orpo", "kto"):
        m = group.train_round(PAIRS[:4], algorithm)
        assert math.isfinite(m["train/loss"]), algorithm


def test_sft_warm_start_lr_and_appo(zero2):
    group, _ = zero2
    examples = [{"prompt": p["prompt"], "response": p["chosen"]["text"]} for p in PAIRS]
    m1 = group.train_sft(examples, lr=1e-2, epochs=2)
    m2 = group.train_sft(examples, lr=1e-2, epochs=2)
    assert m1["train/lr"] == pytest.approx(1e-2)
    assert m2["train/loss"] < m1["train/loss"]
    # the round's schedule is back after the warm start's fixed lr
    m = group.train_round(PAIRS[:4], "dpo")
    assert m["train/lr"] < 2e-3 + 1e-12 and m["train/lr"] != pytest.approx(1e-2)
    groups = []
    for p in PAIRS[:4]:
        g = []
        for side in ("chosen", "rejected"):
            text = p[side]["text"]
            segs = split_sentences(text)
            g.append({"prompt": p["prompt"], "text": text, "segments": segs, "scores": score_segments(p["prompt"], segs)})
        groups.append(g)
    a = group.train_appo(groups)
    for key in ("train/loss", "train/pg_loss", "train/kl", "train/clipfrac", "train/mask_fraction"):
        assert key in a and math.isfinite(a[key]), key


def test_checkpoint_roundtrip(zero2, tmp_path):
    """HF policy in the checkpoint = the learner's weights; loading the DeepSpeed state
    brings back the weights after more training moved them."""
    from transformers import AutoModelForCausalLM

    from twodrl.models.loading import load_tokenizer
    from twodrl.objectives import collate_sequences, forward_token_logps, unpad_response

    group, _ = zero2
    path = tmp_path / "ckpt"
    saved = group.compute_logprobs(PROBE)
    group.save_checkpoint(str(path))
    assert (path / "policy" / "model.safetensors").is_file() and (path / "deepspeed").is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left behind"
    model = AutoModelForCausalLM.from_pretrained(path / "policy", use_safetensors=True).eval()
    tok = load_tokenizer(ModelConfig(path=str(path / "policy")))
    batch = collate_sequences(tok, PROBE, 512)
    with torch.no_grad():
        hf = unpad_response(forward_token_logps(model, batch)[0], batch.response_mask)
    for a, b in zip(hf, saved):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    group.train_round(PAIRS, "dpo")
    moved = group.compute_logprobs(PROBE)
    assert any(abs(a - b) > 1e-4 for x, y in zip(moved, saved) for a, b in zip(x, y))
    group.load_checkpoint(str(path))
    back = group.compute_logprobs(PROBE)
    for a, b in zip(back, saved):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)


def test_zero3_matches_zero2_and_separate_reference(zero3, zero2, ray_cluster, tmp_path):
    group, (before3, m3, after3) = zero3
    _, (before2, m2, after2) = zero2
    assert group.reference is not None  # learner.colocate_reference=false
    names = {a["name"] for a in ray_cluster.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "twodrl-learner-z3"}
    assert {"learner-0", "learner-1", "reference-0"} <= names
    for x, y in zip(before3, before2):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
    for x, y in zip(after3, after2):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-4)
    assert m3["train/loss"] == pytest.approx(m2["train/loss"], abs=1e-4)
    # full (gathered) parameters: the real shapes, not ZeRO-3's empty placeholders
    params = dict(group.named_full_parameters())
    assert params["model.embed_tokens.weight"].dim() == 2 and params["model.embed_tokens.weight"].numel() > 0
    # weight export for the rollout sync: the buckets hold exactly the full weights
    from actors.weight_sync import iter_object_store_buckets
    from twodrl.weights import iter_unpacked

    refs = group.export_weights_object_store(bucket_bytes=1 << 18)
    assert len(refs) > 1  # really bucketed
    exported = {n: t.clone() for n, t in iter_unpacked(iter_object_store_buckets(refs))}
    assert exported.keys() == params.keys()
    for name, t in params.items():
        torch.testing.assert_close(exported[name], t, rtol=0, atol=0)
    group.save_checkpoint(str(tmp_path / "z3"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "z3" / "policy" / "model.safetensors"))
    torch.testing.assert_close(saved["model.embed_tokens.weight"], params["model.embed_tokens.weight"])
