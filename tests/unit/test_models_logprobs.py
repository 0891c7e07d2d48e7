"""The log-prob engine: rendering, segment alignment, padding and packing."""

from __future__ import annotations

import random

import pytest
import torch

from twodrl import synthetic
from twodrl.config import ModelConfig
from twodrl.models.loading import load_causal_lm, load_tokenizer
from twodrl.models.logprobs import encode_pairs, end_of_turn_id, render_prompt, response_logprobs


@pytest.fixture(scope="module")
def tok(tiny_policy_path):
    return load_tokenizer(ModelConfig(tiny_policy_path))


@pytest.fixture(scope="module")
def model(tiny_policy_path):
    torch.manual_seed(0)
    m = load_causal_lm(ModelConfig(tiny_policy_path))
    # Random-init logits are nearly uniform; sharpen them so log-prob differences
    # caused by a wrong mask or position would be large, not hidden in noise.
    with torch.no_grad():
        m.lm_head.weight.mul_(50.0)
    return m


def _pairs(n=6, seed=0):
    rng = random.Random(seed)
    prompts = synthetic.make_prompts(n, seed=seed)
    responses = [synthetic.sample_response(rng, p.topic) for p in prompts]
    if n > 2:
        responses[1] = "I hope this helps."  # one short
        responses[2] = ""  # an empty response still ends with the end-of-turn token
    return [p.text for p in prompts], responses


def test_render_prompt(tok):
    hist = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]
    text = render_prompt(tok, "Tell me about the owl.", history=hist, system="Be brief.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.")
    assert "<|im_start|>assistant\nHello!<|im_end|>" in text
    assert text.endswith("<|im_start|>user\nTell me about the owl.<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match=r"history\[0\]"):
        render_prompt(tok, "x", history=["not a message"])


def test_encoding_matches_full_chat_rendering(tok):
    prompts, responses = _pairs(3)
    b = encode_pairs(tok, prompts, responses)
    for i in range(3):
        n = int(b.attention_mask[i].sum())
        full = tok.apply_chat_template(
            [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": responses[i]}], tokenize=False
        )
        # Prompt + response + <|im_end|> is exactly the chat rendering (minus the final newline).
        assert tok.decode(b.input_ids[i, :n]) == full.rstrip("\n")
        resp = b.input_ids[i][b.response_mask[i]]
        assert resp[-1].item() == end_of_turn_id(tok)
        assert tok.decode(resp[:-1]) == responses[i]


def test_segment_ids_follow_the_segments(tok):
    prompts, responses = _pairs(6)
    b = encode_pairs(tok, prompts, responses)
    for i, text in enumerate(responses):
        segs = synthetic.split_sentences(text)
        ids = b.segment_ids[i][b.response_mask[i]]
        assert (b.segment_ids[i][~b.response_mask[i]] == -1).all()
        assert int(b.num_segments[i]) == max(len(segs), 1)
        assert (ids[1:] >= ids[:-1]).all() and ids[-1] == max(len(segs), 1) - 1  # eot in last segment
        toks = b.input_ids[i][b.response_mask[i]]
        for k, seg in enumerate(segs):
            assert tok.decode(toks[ids == k]).strip().removesuffix("<|im_end|>").strip() == seg


def test_given_segments_are_used(tok):
    text = "The owl lives in forests. The owl eats mice."
    b = encode_pairs(tok, ["Tell me about the owl."], [text], segments=[[text]])
    assert int(b.num_segments[0]) == 1
    assert set(b.segment_ids[0][b.response_mask[0]].tolist()) == {0}
    with pytest.raises(ValueError, match="pair 0"):
        encode_pairs(tok, ["q"], [text], segments=[["The cat sat."]])


@pytest.mark.parametrize("pack", [False, True])
def test_batched_logprobs_equal_unbatched(tok, model, pack):
    prompts, responses = _pairs(6)
    with torch.no_grad():
        singles = []
        for p, r in zip(prompts, responses):
            one = encode_pairs(tok, [p], [r])
            singles.append(one.response_values(response_logprobs(model, one))[0])
        batch = encode_pairs(tok, prompts, responses, pack=pack, max_length=160)
        if pack:
            assert batch.input_ids.shape[0] < len(prompts)  # really packed
        got = batch.response_values(response_logprobs(model, batch))
    for a, b in zip(got, singles):
        assert a.shape == b.shape
        # float32 matmuls blocked differently by batch shape: rounding grows with the
        # magnitude of a log-prob (≈40 for a rare token), hence the small relative term.
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    # And the values are real log-probs, not a degenerate constant.
    assert torch.cat(singles).std() > 0.1


def test_packed_pairs_do_not_see_each_other(tok, model):
    """Changing one pair's tokens must not move another pair's log-probs in the same row."""
    prompts, responses = _pairs(2)
    with torch.no_grad():
        a = encode_pairs(tok, prompts, responses, pack=True, max_length=512)
        assert a.input_ids.shape[0] == 1
        other = list(responses)
        other[1] = "Poison the camel if you see one. " * 3
        b = encode_pairs(tok, prompts, other, pack=True, max_length=512)
        la = a.response_values(response_logprobs(model, a))
        lb = b.response_values(response_logprobs(model, b))
    torch.testing.assert_close(la[0], lb[0], atol=1e-5, rtol=0)


def test_reductions_match_loops(tok, model):
    prompts, responses = _pairs(5)
    b = encode_pairs(tok, prompts, responses, pack=True, max_length=200)
    with torch.no_grad():
        lp = response_logprobs(model, b)
    per_pair = b.response_values(lp)
    seg_ids = b.response_values(b.segment_ids.float())
    sums = b.pair_sums(lp)
    seg_sums = b.segment_sums(lp)
    counts = b.segment_token_counts()
    for i in range(5):
        torch.testing.assert_close(sums[i], per_pair[i].sum())
        for k in range(int(b.num_segments[i])):
            sel = seg_ids[i] == k
            torch.testing.assert_close(seg_sums[i, k], per_pair[i][sel].sum())
            assert counts[i, k] == int(sel.sum())
        assert (seg_sums[i, int(b.num_segments[i]):] == 0).all()


def test_gradients_flow_and_zero_outside_responses(tok, model):
    prompts, responses = _pairs(2)
    b = encode_pairs(tok, prompts, responses)
    lp = response_logprobs(model, b)
    assert (lp[~b.response_mask] == 0).all()
    assert (lp[b.response_mask] < 0).all()
    lp.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_truncation_keeps_response_and_budget(tok):
    long_prompt = "Tell me about the owl. " * 40
    b = encode_pairs(tok, [long_prompt], ["The owl lives in forests."], max_length=32)
    assert b.input_ids.shape[1] <= 32
    resp = b.input_ids[0][b.response_mask[0]]
    assert tok.decode(resp[:-1]) == "The owl lives in forests."
    b2 = encode_pairs(tok, ["Hi."], ["The owl lives in forests. " * 40], max_length=32)
    assert b2.input_ids.shape[1] == 32 and int(b2.prompt_lengths[0]) >= 8
    with pytest.raises(ValueError, match="responses for"):
        encode_pairs(tok, ["a", "b"], ["x"])
