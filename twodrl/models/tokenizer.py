"""A small byte-level BPE tokenizer trained locally, with a ChatML chat template.

Nothing here downloads anything: the vocabulary is learned from the synthetic task's
strings plus a short built-in list of general text (English, CJK, code, numbers), so
arbitrary input still tokenizes sensibly (byte-level BPE never produces unknowns; the
general snippets just keep common words from shattering into single bytes).

Training is deterministic for a fixed corpus: ``tokenizers``' BPE trainer breaks
frequency ties by byte order, and the corpus is fed in a fixed order.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
DEFAULT_VOCAB_SIZE = 1024
# Qwen2's pre-tokenization split (a fact about that tokenizer, needed for round trips).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, written as a Jinja template. The assistant turn ends with <|im_end|>; the
# trailing newline after it is part of the template, not of the response.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# General text so the merges are not only animal facts. Written for this project.
GENERAL_SNIPPETS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Please answer the question below in a few short sentences.",
    "You are a helpful assistant. Answer honestly and safely.",
    "Thank you! Could you explain that again, step by step?",
    "I am not sure about that, but here is what I think.",
    "In summary, the results were good and the method worked well.",
    "Yesterday it rained in the city, so the streets were wet.",
    "What is the capital of France? The capital of France is Paris.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 -1 1e-5 50%",
    "Score: helpfulness=4, correctness=3, safety=4, completeness=2, clarity=1.",
    "Rate each segment from 0 to 4 on every aspect, then return JSON.",
    '{"segments": [{"helpfulness": 4, "correctness": 4}], "reason": "ok"}',
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import torch\nx = torch.zeros(3, 4)\nprint(x.shape)\n",
    "if (x > 0) { return x; } else { return -x; }",
    "SELECT name, age FROM users WHERE age >= 18 ORDER BY name;",
    "你好，世界。今天天气很好。我们一起学习机器学习。",
    "这是一个简单的例子，用来测试中文分词。",
    "こんにちは、元気ですか。日本語のテキストです。",
    "안녕하세요. 만나서 반갑습니다.",
    "Bonjour, comment ça va? Très bien, merci.",
    "Guten Tag! Wie geht es Ihnen heute?",
    "¿Dónde está la biblioteca? Está cerca del parque.",
    "Emoji: 🙂 👍 🚀 — and punctuation: ... ; : ! ? ( ) [ ] { } < > / \\ | @ # $ % ^ & * _ + = ~ `",
)


def _default_corpus() -> list[str]:
    from twodrl import synthetic

    return list(synthetic.corpus()) + list(GENERAL_SNIPPETS)


def build_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` (default: the synthetic task's strings and
    the built-in general snippets) and wrap it as a Hugging Face fast tokenizer with
    the ChatML template. ``<|endoftext|>`` is both pad and eos; chat turns end with
    ``<|im_end|>``, which generation also treats as a stop token (see
    :func:`twodrl.models.tiny.tiny_model_path`'s generation_config)."""
    texts = list(corpus) if corpus is not None else _default_corpus()
    # The chat scaffolding is in every rendered conversation; teach its merges too.
    texts += ["system\n", "user\n", "assistant\n"] * 4
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # The same normalizer / pre-tokenizer / decoder as Qwen2's tokenizer class: the
    # saved checkpoint says model_type "qwen2", and transformers (and vLLM through it)
    # may rebuild the pipeline from that class, so anything else would tokenize
    # differently after a save/load round trip.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
