"""The offline tokenizer: deterministic, ChatML, lossless on arbitrary text, and
identical after a save / AutoTokenizer round trip (what vLLM and actors load)."""

from __future__ import annotations

import pytest

from twodrl.models.tokenizer import EOS_TOKEN, IM_END, IM_START, build_tokenizer

TEXTS = [
    "Tell me about the otter. The otter lives in rivers.",
    "  leading and  double  spaces\n\nand newlines\t tabs",
    "你好，世界。こんにちは 🙂🚀",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment",
    "Café naïve résumé — “quotes” ‘single’",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_deterministic_and_small(tok):
    again = build_tokenizer()
    assert tok.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    assert 512 <= len(tok) <= 2048


def test_special_tokens(tok):
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    ids = tok.convert_tokens_to_ids([EOS_TOKEN, IM_START, IM_END])
    assert len(set(ids)) == 3 and all(i < 3 for i in ids)
    # Special tokens written in text are single tokens, never split into bytes.
    enc = tok(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)["input_ids"]
    assert enc[0] == ids[1] and enc[-1] == ids[2]


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert not no_gen.endswith("assistant\n")


@pytest.mark.parametrize("text", TEXTS)
def test_lossless_round_trip_and_offsets(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    # Offsets tile the text (byte-level BPE: no gaps, no overlaps) for ASCII texts.
    if text.isascii():
        offsets = enc["offset_mapping"]
        assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))


def test_synthetic_sentences_are_compact(tok):
    # The task's words are whole tokens, so tiny models see short sequences.
    ids = tok("The penguin makes a sound that brays.", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 10


def test_save_load_round_trip_matches(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    # A config naming qwen2 makes AutoTokenizer pick Qwen2's class, which rebuilds the
    # pre-tokenizer: ours must be the same pipeline.
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        a = tok(text, return_offsets_mapping=True)
        b = loaded(text, return_offsets_mapping=True)
        assert a["input_ids"] == b["input_ids"]
        assert a["offset_mapping"] == b["offset_mapping"]
    assert loaded.chat_template == tok.chat_template
