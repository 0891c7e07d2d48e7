"""Offline training's pure parts (twodrl.offline) with a plain Hugging Face model:
the step plan, the reference cache giving the same losses as a colocated reference,
2D-DPO reducing to DPO on one-segment one-aspect records over a short run, per-aspect
margins, the offline config and the metrics truncation used by --resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from twodrl import objectives
from twodrl.config import ConfigError, LearnerConfig, OfflineConfig, load_config
from twodrl.offline import (
    StepPlan, aspect_margins, eval_indices, fill_reference, load_offline_data, load_reference_cache,
    save_reference_cache, truncate_metrics_by_step,
)
from twodrl.synthetic import make_preference_records

ASPECTS = ["helpfulness", "correctness", "safety", "completeness", "clarity"]
WEIGHTS = [0.3, 0.4, 0.1, 0.1, 0.1]


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from twodrl.models.tiny import tiny_model_path

    path = tiny_model_path("policy")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


# ------------------------------------------------------------------ step plan


@pytest.mark.parametrize("n, world, micro, accum, epochs", [(10, 2, 2, 1, 2), (33, 2, 4, 2, 3), (5, 3, 2, 2, 1)])
def test_step_plan_covers_every_pair_each_epoch_in_equal_shares(n, world, micro, accum, epochs):
    plan = StepPlan(n, world, micro, accum, epochs, None, seed=3)
    assert plan.total_steps == epochs * math.ceil(n / (world * micro * accum))
    for epoch in range(epochs):
        seen = []
        for s in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            step = plan.step_indices(s)
            assert len(step) == world and all(len(r) == accum and all(len(mb) == micro for mb in r) for r in step)
            seen += [i for r in step for mb in r for i in mb]
        assert set(seen) == set(range(n))  # the wrap-around repeats a few, drops none
    # The order depends on (seed, epoch) only, so a resumed run recomputes it exactly.
    again = StepPlan(n, world, micro, accum, epochs, None, seed=3)
    assert [again.step_indices(s) for s in range(again.total_steps)] == [plan.step_indices(s) for s in range(plan.total_steps)]
    assert plan.epoch_order(0) != plan.epoch_order(1) or n < 3
    capped = StepPlan(n, world, micro, accum, epochs, max_steps=1, seed=3)
    assert capped.total_steps == 1 and capped.epoch_of(1) == 1 / plan.steps_per_epoch


@pytest.mark.parametrize("n, world, micro", [(7, 2, 2), (1, 3, 4), (12, 2, 3)])
def test_eval_indices_count_each_pair_once(n, world, micro):
    plan, real = eval_indices(n, world, micro)
    assert len({len(r) for r in plan}) == 1  # same number of forwards on every rank
    counted = [i for rank, flags in zip(plan, real) for mb, ok in zip(rank, flags) if ok for i in mb]
    assert sorted(counted) == list(range(n))


# ------------------------------------------------------------------ reference cache


def _pairs(n, seed=5):
    return make_preference_records(n, seed=seed)


def _ref_logps(model, batch):
    with torch.no_grad():
        return objectives.forward_token_logps(model, batch)[0]


@pytest.mark.parametrize("algorithm", ["2d-dpo", "1d-dpo", "dpo", "ipo", "kto", "orpo", "simpo"])
def test_cached_reference_gives_the_losses_of_the_colocated_one(tiny, tmp_path, algorithm):
    model, tok = tiny
    pairs = _pairs(4)
    batch = objectives.collate_pairs(tok, pairs, ASPECTS, 256)
    ref = _ref_logps(model, batch)
    rows = objectives.unpad_response(ref, batch.response_mask)
    cache = [(rows[i], rows[4 + i]) for i in range(4)]
    save_reference_cache(tmp_path / "train.safetensors", cache, "fp")
    assert load_reference_cache(tmp_path / "train.safetensors", "other") is None  # other data: recomputed
    loaded = load_reference_cache(tmp_path / "train.safetensors", "fp")
    # The batch a rank sees may hold the pairs in another order: the cache is per pair.
    order = [2, 0, 3, 1]
    batch2 = objectives.collate_pairs(tok, [pairs[i] for i in order], ASPECTS, 256)
    filled = fill_reference(batch2.response_mask, 4, [loaded[i] for i in order])
    direct = _ref_logps(model, batch2)
    assert torch.equal(filled, direct)

    torch.manual_seed(1)
    policy_lp = direct + 0.05 * torch.randn_like(direct) * batch2.response_mask
    lc = LearnerConfig()
    a, ma = objectives.compute_preference_loss(algorithm, {"token_logps": policy_lp, "logits": None},
                                               {"token_logps": filled}, batch2, lc, WEIGHTS)
    b, mb = objectives.compute_preference_loss(algorithm, {"token_logps": policy_lp, "logits": None},
                                               {"token_logps": direct}, batch2, lc, WEIGHTS)
    assert torch.equal(a, b) and ma == mb


def test_cache_for_another_tokenization_is_refused():
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="row 1 has 2 values for 1 response tokens"):
        fill_reference(mask, 1, [([-1.0, -2.0], [-1.0, -2.0])])


# ------------------------------------------------------------------ 2D-DPO == DPO in one dimension


def _one_dimensional(records):
    out = []
    for r in records:
        side = {}
        for name in ("chosen", "rejected"):
            text = r[name]["text"]
            side[name] = {"text": text, "segments": [text.strip()], "scores": {"helpfulness": [4 if name == "chosen" else 1]}}
        out.append({"prompt": r["prompt"], **side})
    return out


def test_two_d_dpo_is_dpo_on_one_segment_one_aspect_records_at_every_step(tiny):
    """Two copies of one model, one trained with 2D-DPO (weight 1 on the only aspect),
    one with DPO: the losses agree at every step and so do the weights after it."""
    import copy

    model, tok = tiny
    records = _one_dimensional(_pairs(8, seed=9))
    # float64: the two losses are one formula evaluated in a different order, and Adam
    # would turn float32 rounding of near-zero gradients into visible weight differences.
    model = copy.deepcopy(model).double()
    ref = copy.deepcopy(model)
    runs = {}
    lc = LearnerConfig(beta=0.2, sft_coef=0.1)
    for algorithm in ("2d-dpo", "dpo"):
        torch.manual_seed(0)
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        losses = []
        for step in range(3):
            batch = objectives.collate_pairs(tok, records[(step * 4) % 8:(step * 4) % 8 + 4], ["helpfulness"], 256)
            lp, _ = objectives.forward_token_logps(m, batch)
            loss, _ = objectives.compute_preference_loss(algorithm, {"token_logps": lp, "logits": None},
                                                         {"token_logps": _ref_logps(ref, batch)}, batch, lc, [1.0])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs[algorithm] = (losses, {n: p.detach().clone() for n, p in m.named_parameters()})
    (l2d, w2d), (l1d, w1d) = runs["2d-dpo"], runs["dpo"]
    assert l2d == pytest.approx(l1d, abs=1e-5)
    assert max(float((w2d[n] - w1d[n]).abs().max()) for n in w2d) < 1e-5
    assert l2d[0] != pytest.approx(l2d[-1], abs=1e-6)  # the weights really moved


# ------------------------------------------------------------------ per-aspect margins


def test_aspect_margins_by_hand():
    # One pair; chosen has 2 segments, rejected 1; two aspects.
    ratios = torch.tensor([[0.0, 1.0, 1.0, 2.0], [0.0, -1.0, -1.0, 0.0]])
    seg = torch.tensor([[-1, 0, 0, 1], [-1, 0, 0, -1]])
    scores = torch.tensor([[[4.0, 0.0], [0.0, 4.0]], [[0.0, 0.0], [math.nan, math.nan]]])
    m = aspect_margins(ratios, seg, scores, 1, beta=0.5, aspects=["helpfulness", "correctness"])
    # chosen: R = [2, 2]; helpfulness g = [2, 1] → 0.5·6 = 3; correctness g = [1, 2] → 3.
    # rejected: R = [-2]; g = 1 → −1 on both.
    assert float(m["helpfulness"][0]) == pytest.approx(4.0) and float(m["correctness"][0]) == pytest.approx(4.0)


# ------------------------------------------------------------------ config, data, metrics


def test_offline_config_ranges_and_errors(tmp_path):
    import dataclasses
    import typing

    from twodrl.config import OfflineDataConfig, OfflineTrainConfig

    for cls in (OfflineDataConfig, OfflineTrainConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if any(t in (int, float) for t in (hints[f.name], *typing.get_args(hints[f.name]))):
                assert "range" in f.metadata, f"{cls.__name__}.{f.name} has no ranged(...)"
    path = tmp_path / "off.yaml"
    path.write_text("data:\n  train: synthetic\ntrain:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"off.yaml:4: train.epochs must be ≥ 1"):
        load_config(path, cls=OfflineConfig)
    with pytest.raises(ConfigError, match="did you mean 'eval_every_steps'"):
        load_config(path, ["train.eval_every=2", "train.epochs=1"], cls=OfflineConfig)
    with pytest.raises(ConfigError, match="aspects.weights must sum to 1"):
        load_config(path, ["train.epochs=1", "aspects.weights=[0.5,0.4,0.1,0.1,0.1]"], cls=OfflineConfig)


def test_offline_data_split_is_seeded_and_disjoint(tmp_path):
    cfg = load_config(None, ["data.train=synthetic", "data.synthetic_pairs=40", "data.eval_fraction=0.25"],
                      cls=OfflineConfig)
    train, held, info = load_offline_data(cfg)
    again, held2, _ = load_offline_data(cfg)
    assert (len(train), len(held)) == (30, 10) and train == again and held == held2
    assert not {json.dumps(r, sort_keys=True) for r in train} & {json.dumps(r, sort_keys=True) for r in held}
    # Helpfulness-only data with the five default aspects: refused, saying what to set.
    one_d = tmp_path / "trl.jsonl"
    one_d.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"not rated on .*correctness.*set aspects.names"):
        load_offline_data(load_config(None, [f"data.train={one_d}"], cls=OfflineConfig))


def test_truncate_metrics_by_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "epoch": s / 4}) + "\n" for s in (2, 4, 6)) + '{"step": 8')
    assert truncate_metrics_by_step(path, 4) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]


def test_train_command_refuses_bad_input_before_ray(tmp_path, capsys):
    from jobs.train import main

    assert main(["configs/offline-quickstart.yaml", "--run-dir", str(tmp_path / "r"),
                 "--set", f"data.train={tmp_path / 'missing.jsonl'}"]) == 2
    assert "missing.jsonl: no such file or directory" in capsys.readouterr().err
    assert main(["configs/offline-quickstart.yaml", "--run-dir", str(tmp_path / "r"), "--set", "train.epochs=0"]) == 2
    assert "--set: train.epochs must be ≥ 1" in capsys.readouterr().err and not (tmp_path / "r").exists()
