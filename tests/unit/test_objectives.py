"""twodrl.objectives with the real tiny policy: collation, forward, every preference
objective, SFT and APPO."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from twodrl import losses, objectives
from twodrl.aspects import DEFAULT_ASPECTS, DEFAULT_WEIGHTS
from twodrl.config import LearnerConfig, ModelConfig
from twodrl.synthetic import make_preference_records

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok_model(tiny_policy_path):
    from twodrl.models.loading import load_causal_lm, load_tokenizer

    mc = ModelConfig(path=tiny_policy_path)
    torch.manual_seed(0)
    return load_tokenizer(mc), load_causal_lm(mc)


@pytest.fixture(scope="module")
def pairs():
    return make_preference_records(6, seed=3)


def _batch(tok, pairs):
    return objectives.collate_pairs(tok, pairs, DEFAULT_ASPECTS, max_length=256)


def test_collate_pairs_shapes_and_scores(tok_model, pairs):
    tok, _ = tok_model
    b = _batch(tok, pairs)
    P = len(pairs)
    assert b.num_pairs == P and b.size == P and b.input_ids.shape[0] == 2 * P
    assert b.scores.shape[0] == 2 * P and b.scores.shape[2] == len(DEFAULT_ASPECTS)
    for i, rec in enumerate(pairs):
        for row, side in ((i, "chosen"), (P + i, "rejected")):
            S = len(rec[side]["segments"])
            # every given segment owns tokens, ids are 0..S-1, prompt/padding are -1
            ids = b.segment_ids[row][b.response_mask[row]]
            assert ids.min() == 0 and ids.max() == S - 1
            assert set(ids.tolist()) == set(range(S))
            assert (b.segment_ids[row][~b.response_mask[row]] == -1).all()
            expect = torch.tensor([rec[side]["scores"][a] for a in DEFAULT_ASPECTS], dtype=torch.float32).T
            assert torch.equal(b.scores[row, :S], expect)
            assert torch.isnan(b.scores[row, S:]).all()


def test_collate_errors_name_the_field(tok_model, pairs):
    tok, _ = tok_model
    bad = copy.deepcopy(pairs[:2])
    bad[1]["rejected"]["scores"]["safety"] = bad[1]["rejected"]["scores"]["safety"][:-1]
    with pytest.raises(ValueError, match=r"pair 1\.rejected\.scores\.safety"):
        _batch(tok, bad)
    bad = copy.deepcopy(pairs[:1])
    del bad[0]["chosen"]["scores"]["clarity"]
    with pytest.raises(ValueError, match="missing aspect"):
        _batch(tok, bad)


def test_forward_matches_model_package(tok_model, pairs):
    from twodrl.models.logprobs import encode_pairs, response_logprobs

    tok, model = tok_model
    b = _batch(tok, pairs[:3])
    with torch.no_grad():
        lp, logits = objectives.forward_token_logps(model, b, return_logits=True)
        enc = encode_pairs(
            tok, [p["prompt"] for p in pairs[:3]] * 2,
            [p["chosen"]["text"] for p in pairs[:3]] + [p["rejected"]["text"] for p in pairs[:3]],
            segments=[p["chosen"]["segments"] for p in pairs[:3]] + [p["rejected"]["segments"] for p in pairs[:3]],
            max_length=256,
        )
        ref = response_logprobs(model, enc)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    # aligned logits: row t is the distribution that produced token t
    t = int(b.response_mask[0].nonzero()[0])
    manual = torch.log_softmax(logits[0, t], -1)[b.input_ids[0, t]]
    assert float(manual) == pytest.approx(float(lp[0, t]), abs=1e-5)


def _outputs(model, b, logits=False):
    lp, lg = objectives.forward_token_logps(model, b, return_logits=logits)
    return {"token_logps": lp, "logits": lg}


@pytest.mark.parametrize("algorithm", objectives.PREFERENCE_ALGORITHMS)
def test_every_algorithm_at_init(tok_model, pairs, algorithm):
    """Policy == reference: implicit rewards and KL are 0, the loss is finite and has a
    gradient, and the documented closed forms hold."""
    tok, model = tok_model
    b = _batch(tok, pairs)
    cfg = LearnerConfig()
    need = algorithm in objectives.NEEDS_REFERENCE_LOGITS
    model.zero_grad()
    pol = _outputs(model, b, need)
    with torch.no_grad():
        ref = _outputs(model, b, need)
    loss, m = objectives.compute_preference_loss(algorithm, pol, ref, b, cfg, DEFAULT_WEIGHTS)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "kl", "sft_loss", "pref_loss"):
        assert key in m and math.isfinite(m[key]), key
    assert m["kl"] == pytest.approx(0.0, abs=1e-5)
    if algorithm == "orpo":
        assert m["loss"] == pytest.approx(m["pref_loss"], abs=1e-6)
    else:
        assert m["loss"] == pytest.approx(m["pref_loss"] + cfg.sft_coef * m["sft_loss"], rel=1e-5)
    if algorithm not in ("orpo", "simpo"):
        assert m["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    if algorithm in ("dpo", "tdpo1", "tdpo2"):
        assert m["pref_loss"] == pytest.approx(math.log(2), abs=1e-5)
    if algorithm in ("2d-dpo", "1d-dpo"):
        # R = 0 for every segment: each of the N = min(S_c, S_r) pairs costs log 2.
        n = [min(len(p["chosen"]["segments"]), len(p["rejected"]["segments"])) for p in pairs]
        assert m["pref_loss"] == pytest.approx(math.log(2) * sum(n) / len(n), abs=1e-5)
    if algorithm == "ipo":
        assert m["pref_loss"] == pytest.approx((1 / (2 * cfg.beta)) ** 2, rel=1e-5)


def test_one_d_dpo_is_two_d_with_helpfulness_only(tok_model, pairs):
    tok, model = tok_model
    b = _batch(tok, pairs)
    torch.manual_seed(1)
    with torch.no_grad():
        pol = _outputs(model, b)
        ref = {"token_logps": pol["token_logps"] + 0.05 * torch.randn_like(pol["token_logps"]) * b.response_mask}
    cfg = LearnerConfig(sft_coef=0.0)
    l1, _ = objectives.compute_preference_loss("1d-dpo", pol, ref, b, cfg, DEFAULT_WEIGHTS)
    l2, _ = objectives.compute_preference_loss("2d-dpo", pol, ref, b, cfg, [1.0, 0, 0, 0, 0])
    l3, _ = objectives.compute_preference_loss("2d-dpo", pol, ref, b, cfg, DEFAULT_WEIGHTS)
    assert float(l1) == pytest.approx(float(l2), abs=1e-6)
    assert abs(float(l1) - float(l3)) > 1e-6
    # and it is the losses module's per-example value, averaged
    P = b.num_pairs
    ratios = (pol["token_logps"] - ref["token_logps"]) * b.response_mask
    direct = losses.two_d_dpo_loss(ratios[:P], ratios[P:], b.segment_ids[:P], b.segment_ids[P:],
                                   b.scores[:P], b.scores[P:], DEFAULT_WEIGHTS, beta=cfg.beta).mean()
    assert float(l3) == pytest.approx(float(direct), abs=1e-6)


@pytest.mark.parametrize("algorithm", ["2d-dpo", "dpo", "simpo"])
def test_training_separates_chosen_from_rejected(tiny_policy_path, tok_model, pairs, algorithm):
    """A few AdamW steps on the objective raise the chosen-vs-rejected margin."""
    from twodrl.models.loading import load_causal_lm

    tok, ref_model = tok_model
    model = load_causal_lm(ModelConfig(path=tiny_policy_path))
    model.train()
    b = _batch(tok, pairs)
    with torch.no_grad():
        ref = _outputs(ref_model, b)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = LearnerConfig()
    first = None
    for _ in range(8):
        loss, m = objectives.compute_preference_loss(algorithm, _outputs(model, b), ref, b, cfg, DEFAULT_WEIGHTS)
        first = m if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, last = objectives.compute_preference_loss(algorithm, _outputs(model, b), ref, b, cfg, DEFAULT_WEIGHTS)
    assert last["pref_loss"] < first["pref_loss"]
    assert last["rewards/margins"] > first["rewards/margins"]
    assert last["rewards/accuracies"] >= 0.5


def test_tdpo_needs_logits(tok_model, pairs):
    tok, model = tok_model
    b = _batch(tok, pairs[:2])
    with torch.no_grad():
        out = _outputs(model, b)
    with pytest.raises(ValueError, match="logits"):
        objectives.compute_preference_loss("tdpo2", out, out, b, LearnerConfig(), DEFAULT_WEIGHTS)
    with pytest.raises(ValueError, match="unknown preference algorithm"):
        objectives.compute_preference_loss("ppo", out, out, b, LearnerConfig(), DEFAULT_WEIGHTS)


def test_sft_loss_is_token_nll(tok_model):
    tok, model = tok_model
    items = [{"prompt": "Tell me about the owl.", "response": "The owl eats mice. The owl hoots."},
             {"prompt": "Describe the bee for me.", "response": "The bee lives in hives."}]
    b = objectives.collate_sequences(tok, items, max_length=128)
    with torch.no_grad():
        lp, _ = objectives.forward_token_logps(model, b)
        loss, m = objectives.compute_sft_loss(lp, b.response_mask)
    per = [-(lp[i][b.response_mask[i]]).mean() for i in range(2)]
    assert float(loss) == pytest.approx(float(sum(per) / 2), rel=1e-6)
    assert m["loss"] == pytest.approx(float(loss))


def test_token_id_batches():
    b = objectives.collate_token_ids([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert b.response_mask.tolist() == [[False, False, False, True, True], [False, True, True, True, False]]


def _groups():
    """Two prompts × K=2 scored samples (dicts as the driver's samples carry them)."""
    from twodrl.synthetic import score_segments, split_sentences

    texts = [
        ("Tell me about the owl.", ["The owl eats mice. The owl hoots.", "The owl eats seeds. I hope this helps."]),
        ("Describe the bee for me.", ["The bee lives in ponds.", "The bee lives in hives. The bee buzzes."]),
    ]
    groups = []
    for prompt, responses in texts:
        g = []
        for r in responses:
            segs = split_sentences(r)
            g.append({"prompt": prompt, "text": r, "segments": segs, "scores": score_segments(prompt, segs)})
        groups.append(g)
    return groups


def test_appo_advantages_and_loss(tok_model):
    tok, model = tok_model
    items, k = objectives.rollout_items(_groups())
    assert k == 2 and len(items) == 4
    b = objectives.collate_rollouts(tok, items, DEFAULT_ASPECTS, max_length=128)
    cfg = LearnerConfig(schmitt_delta=0.1)
    adv = objectives.appo_advantages(b, DEFAULT_WEIGHTS, k, cfg)
    # the better sample of each prompt is the chosen one: [0] for the owl, [3] for the bee
    assert adv.chosen.tolist() == [True, False, False, True]
    assert (adv.mask.bool() <= b.response_mask).all()
    assert bool(adv.mask.any())
    pol, _ = objectives.forward_token_logps(model, b)
    with torch.no_grad():
        old = pol.detach().clone()
    loss, m = objectives.compute_appo_loss(pol, old, old, adv.advantages, adv.mask, b.response_mask, cfg)
    # ratio 1 and policy == reference: surrogate = −mean masked advantage, KL 0
    expect = -float((adv.advantages * adv.mask).sum() / adv.mask.sum())
    assert m["pg_loss"] == pytest.approx(expect, rel=1e-5)
    assert m["kl"] == pytest.approx(0.0, abs=1e-6) and m["kl_token"] == pytest.approx(0.0, abs=1e-6)
    assert m["clipfrac"] == 0.0
    model.zero_grad()
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    # the KL term grows with the distance to the reference and is ≥ 0
    _, m2 = objectives.compute_appo_loss(pol.detach(), old, old - 0.3 * b.response_mask, adv.advantages, adv.mask,
                                         b.response_mask, cfg)
    assert m2["kl_token"] > 0


def test_rollout_items_rejects_ragged_groups():
    g = _groups()
    g[1] = g[1][:1]
    with pytest.raises(ValueError, match="same number of samples"):
        objectives.rollout_items(g)
