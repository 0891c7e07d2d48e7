"""The tiny checkpoints load in vLLM (CPU build) and agree with transformers.

Each engine runs in its own subprocess: vLLM with in-process engines
(VLLM_ENABLE_V1_MULTIPROCESSING=0) keeps global distributed state that a second
engine in the same process trips over, and a crashed engine must not take the test
session down with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.integration

_ENV = {
    **os.environ,
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

PROMPT = "Tell me about the owl."


def _run(code: str, timeout: int = 600) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=_ENV, capture_output=True, text=True, timeout=timeout
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"vLLM subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_vllm_generates_from_tiny_policy_and_logprobs_match_hf(tiny_policy_path):
    from twodrl.config import ModelConfig
    from twodrl.models.loading import load_causal_lm, load_tokenizer
    from twodrl.models.logprobs import encode_pairs, render_prompt, response_logprobs

    tok = load_tokenizer(ModelConfig(tiny_policy_path))
    rendered = render_prompt(tok, PROMPT)
    out = _run(
        f"""
        import json, vllm
        llm = vllm.LLM(model={tiny_policy_path!r}, dtype="float32", max_model_len=256, seed=0, enforce_eager=True)
        params = vllm.SamplingParams(max_tokens=8, temperature=1.0, seed=0, logprobs=0)
        o = llm.generate([{rendered!r}], params)[0].outputs[0]
        lps = [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)]
        print("RESULT " + json.dumps({{"text": o.text, "ids": list(o.token_ids), "logprobs": lps}}))
        """
    )
    assert len(out["ids"]) >= 1
    # The same tokens scored by the HF log-prob engine: equal up to kernel differences,
    # which proves vLLM loaded the same weights and tokenizer.
    model = load_causal_lm(ModelConfig(tiny_policy_path))
    ids = out["ids"]
    prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
        hf = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(out["logprobs"]), hf, atol=2e-3, rtol=0)
    # And the engine's text is the tokenizer's decoding of the same ids (vLLM holds back
    # a trailing incomplete UTF-8 sequence, which random-init models do produce).
    assert out["text"] and tok.decode(ids, skip_special_tokens=True).startswith(out["text"])


def test_vllm_pooling_runner_reads_the_2d_reward_model(tiny_reward_path):
    """vLLM has no native Qwen2ForTokenClassification; it converts the architecture
    (causal backbone + ``score`` head, pooling runner) and its ``token_classify`` task
    returns the head's per-token outputs, i.e. exactly what the 2D RM reads at
    segment-final tokens."""
    from twodrl.config import ModelConfig
    from twodrl.models.loading import load_reward_model, load_tokenizer
    from twodrl.models.logprobs import encode_pairs, render_prompt
    from twodrl.models.reward_model import reward_forward

    tok = load_tokenizer(ModelConfig(tiny_reward_path))
    response = "The owl lives in forests. The owl eats mice."
    text = render_prompt(tok, PROMPT) + response + "<|im_end|>"
    out = _run(
        f"""
        import json, vllm
        llm = vllm.LLM(model={tiny_reward_path!r}, dtype="float32", max_model_len=256, runner="pooling",
                       enforce_eager=True)
        res = llm.encode([{text!r}], pooling_task="token_classify")
        print("RESULT " + json.dumps({{"scores": res[0].outputs.data.tolist()}}))
        """
    )
    vl = torch.tensor(out["scores"])
    model = load_reward_model(ModelConfig(tiny_reward_path))
    enc = encode_pairs(tok, [PROMPT], [response])
    assert vl.shape == (enc.input_ids.shape[1], 5)
    with torch.no_grad():
        hf = model(input_ids=enc.input_ids).logits[0]
        seg, valid, _ = reward_forward(model, enc)
    torch.testing.assert_close(vl, hf, atol=1e-4, rtol=0)
    # Segment-final positions of the vLLM output = the RM's segment scores.
    mask = enc.response_mask[0]
    ends = [int(((enc.segment_ids[0] == k) & mask).nonzero().max()) for k in range(2)]
    torch.testing.assert_close(vl[ends], seg[0, :2], atol=1e-4, rtol=0)
