"""The 2D segment reward model and the sequence-level (DPA) mode."""

from __future__ import annotations

import math

import pytest
import torch

from twodrl import synthetic
from twodrl.config import ModelConfig, ScorerConfig
from twodrl.models.loading import load_reward_model, load_tokenizer, save_pretrained_safe
from twodrl.models.reward_model import (
    collate,
    evaluate,
    examples_from_records,
    format_eval_table,
    reward_forward,
    reward_loss,
    score,
    segment_end_positions,
    spearman,
    train_reward_model,
)


@pytest.fixture(scope="module")
def tok(tiny_reward_path):
    return load_tokenizer(ModelConfig(tiny_reward_path))


@pytest.fixture()
def rm(tiny_reward_path):
    torch.manual_seed(0)
    return load_reward_model(ModelConfig(tiny_reward_path))


@pytest.fixture(scope="module")
def records():
    return synthetic.make_preference_records(24, seed=3)


ASPECTS = ["helpfulness", "correctness", "safety", "completeness", "clarity"]


def test_examples_and_labels(records):
    ex = examples_from_records(records, ASPECTS)
    assert len(ex) == 2 * len(records)
    first = records[0]["chosen"]
    assert ex[0].labels.shape == (len(first["segments"]), 5)
    assert ex[0].labels[:, 1].tolist() == [float(v) for v in first["scores"]["correctness"]]
    seq = examples_from_records(records, ASPECTS, mode="sequence")
    rep = torch.tensor(synthetic.score_segments(records[0]["prompt"], first["segments"]), dtype=torch.float32)
    from twodrl.aspects import representative_scores

    torch.testing.assert_close(seq[0].labels[0], representative_scores(rep))


def test_readout_is_the_last_token_of_each_segment(tok, records):
    ex = examples_from_records(records[:4], ASPECTS)
    batch = collate(tok, ex)
    rows, cols, valid = segment_end_positions(batch.enc)
    enc = batch.enc
    for i in range(len(ex)):
        for k in range(int(enc.num_segments[i])):
            assert valid[i, k]
            positions = ((enc.pair_ids[rows[i, k]] == i) & (enc.segment_ids[rows[i, k]] == k)).nonzero().flatten()
            assert cols[i, k] == positions.max()
        assert not valid[i, int(enc.num_segments[i]):].any()
    # The last segment is read at the end-of-turn token.
    i, k = 0, int(enc.num_segments[0]) - 1
    assert tok.convert_ids_to_tokens(int(enc.input_ids[rows[i, k], cols[i, k]])) == "<|im_end|>"
    # Each other segment ends on its sentence's final period.
    assert tok.decode(int(enc.input_ids[rows[0, 0], cols[0, 0]])) == "."


def test_scores_equal_the_hf_token_classification_outputs(tok, rm, records):
    """Our read-out is the standard class's per-token output, so any loader of the HF
    checkpoint (transformers, vLLM's token_classify) gets the same numbers."""
    ex = examples_from_records(records[:3], ASPECTS)
    batch = collate(tok, ex)
    with torch.no_grad():
        ours, valid, _ = reward_forward(rm, batch.enc)
        hf = rm(input_ids=batch.enc.input_ids, attention_mask=batch.enc.attention_mask).logits
    rows, cols, _ = segment_end_positions(batch.enc)
    torch.testing.assert_close(ours[valid], hf[rows, cols][valid], atol=1e-5, rtol=0)


def test_packed_and_padded_scores_agree(tok, rm, records):
    ex = examples_from_records(records[:6], ASPECTS)
    with torch.no_grad():
        a, va, _ = reward_forward(rm, collate(tok, ex).enc)
        b, vb, _ = reward_forward(rm, collate(tok, ex, pack=True, max_length=256).enc)
    assert torch.equal(va, vb)
    torch.testing.assert_close(a[va], b[vb], atol=1e-5, rtol=0)


def test_loss_masks_missing_labels(tok, rm, records):
    ex = examples_from_records(records[:4], ASPECTS)
    batch = collate(tok, ex)
    loss, stats = reward_loss(rm, batch)
    with torch.no_grad():
        pred, valid, _ = reward_forward(rm, batch.enc)
    cell = valid[..., None] & ~torch.isnan(batch.labels)
    expected = ((pred - torch.nan_to_num(batch.labels)) ** 2)[cell].mean()
    torch.testing.assert_close(loss.detach(), expected)
    # Hide every correctness label: the loss must equal the MSE over the other aspects.
    batch.labels[..., 1] = math.nan
    loss2, stats2 = reward_loss(rm, batch)
    keep = cell.clone()
    keep[..., 1] = False
    torch.testing.assert_close(loss2.detach(), ((pred - torch.nan_to_num(batch.labels)) ** 2)[keep].mean())
    assert stats2["rm/labels"] == stats["rm/labels"] * 4 / 5
    loss2.backward()
    assert rm.score.weight.grad[1].abs().sum() == 0  # no signal for the masked aspect
    assert rm.score.weight.grad[0].abs().sum() > 0


def test_lm_loss_term(tok, rm, records):
    batch = collate(tok, examples_from_records(records[:2], ASPECTS))
    loss0, s0 = reward_loss(rm, batch, lm_loss_coef=0.0)
    loss1, s1 = reward_loss(rm, batch, lm_loss_coef=0.5)
    assert "rm/lm_loss" in s1 and s1["rm/lm_loss"] > 0
    torch.testing.assert_close(loss1.detach(), loss0.detach() + 0.5 * s1["rm/lm_loss"], rtol=1e-5, atol=1e-5)
    # Random init: next-token loss close to log(vocab).
    assert abs(s1["rm/lm_loss"] - math.log(rm.config.vocab_size)) < 1.0


def test_training_learns_and_checkpoint_round_trips(tok, rm, tmp_path):
    train = synthetic.make_preference_records(64, seed=0)
    cfg = ScorerConfig(train_epochs=6, train_lr=3e-3, train_batch_size=16)
    before = evaluate(rm, tok, train)
    stats = train_reward_model(rm, tok, train, cfg, progress=False)
    after = evaluate(rm, tok, train)
    mse_before = sum(d["mse"] for d in before.values())
    mse_after = sum(d["mse"] for d in after.values())
    assert mse_after < 0.5 * mse_before, (mse_before, mse_after)
    assert stats["rm/step"] == 6 * math.ceil(128 / 16)
    prompts = [r["prompt"] for r in train[:3]]
    texts = [r["chosen"]["text"] for r in train[:3]]
    got = score(rm, tok, prompts, texts)
    assert [g.shape for g in got] == [(len(synthetic.split_sentences(t)), 5) for t in texts]
    assert all(((g >= 0) & (g <= 4)).all() for g in got)
    # Saved with safetensors, loaded back by transformers: same scores.
    save_pretrained_safe(rm, tok, tmp_path / "rm")
    from transformers import AutoModelForTokenClassification

    back = AutoModelForTokenClassification.from_pretrained(tmp_path / "rm", use_safetensors=True)
    for a, b in zip(got, score(back, tok, prompts, texts)):
        torch.testing.assert_close(a, b)


def test_sequence_mode(tok):
    seq = load_reward_model(ModelConfig("tiny:reward-seq"))
    recs = synthetic.make_preference_records(32, seed=1, aspects=["helpfulness", "verbosity"], weights=[0.5, 0.5])
    cfg = ScorerConfig(mode="sequence", train_epochs=4, train_lr=3e-3, train_batch_size=16)
    before = evaluate(seq, tok, recs)
    train_reward_model(seq, tok, recs, cfg, progress=False)
    after = evaluate(seq, tok, recs)
    assert after["verbosity"]["mse"] < before["verbosity"]["mse"]
    got = score(seq, tok, [recs[0]["prompt"]], [recs[0]["chosen"]["text"]])
    assert got[0].shape == (1, 2)
    # One vector per response, read where HF's own sequence pooling reads it.
    batch = collate(tok, examples_from_records(recs[:2], ["helpfulness", "verbosity"], mode="sequence"))
    with torch.no_grad():
        ours, _, _ = reward_forward(seq, batch.enc)
        hf = seq(input_ids=batch.enc.input_ids, attention_mask=batch.enc.attention_mask).logits
    torch.testing.assert_close(ours[:, 0], hf, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="scorer.mode"):
        train_reward_model(seq, tok, recs, ScorerConfig(mode="segment"), progress=False)


def test_evaluate_metrics_on_known_predictions(tok, rm, records):
    """Force the head to output constants: accuracy equals the share of labels equal
    to the rounded constant, and the majority baseline is computed from the labels."""
    with torch.no_grad():
        rm.score.weight.zero_()
        rm.score.bias.copy_(torch.tensor([3.6, 4.4, 3.9, -1.0, 2.2]))
    res = evaluate(rm, tok, records)
    ex = examples_from_records(records, ASPECTS)
    Y = torch.cat([e.labels for e in ex])
    for j, (a, const) in enumerate(zip(ASPECTS, [4, 4, 4, 0, 2])):
        clamped = min(max([3.6, 4.4, 3.9, -1.0, 2.2][j], 0.0), 4.0)
        assert res[a]["accuracy"] == pytest.approx(float((Y[:, j] == const).float().mean()))
        assert res[a]["mse"] == pytest.approx(float(((Y[:, j] - clamped) ** 2).mean()), rel=1e-5)
        counts = torch.unique(Y[:, j], return_counts=True)[1]
        assert res[a]["majority_accuracy"] == pytest.approx(float(counts.max() / len(Y)))
        assert math.isnan(res[a]["spearman"])  # constant predictions have no ranking
    assert "majority" in format_eval_table(res)


def test_spearman():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x * 10) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Ties get average ranks: reference value from the textbook formula on ranks.
    a = torch.tensor([1.0, 2.0, 2.0, 3.0])
    b = torch.tensor([1.0, 3.0, 2.0, 4.0])
    ra = torch.tensor([1.0, 2.5, 2.5, 4.0])
    rb = torch.tensor([1.0, 3.0, 2.0, 4.0])
    ref = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert spearman(a, b) == pytest.approx(ref)
    assert math.isnan(spearman(torch.ones(4), b))
