"""The scorer as a Ray actor on a plain causal-LM backbone: it starts with a fresh head
named after the aspects, trains on judge-style records, and what it saves loads in
transformers as a token-classification model with those labels."""

from __future__ import annotations

from pathlib import Path

import ray

from twodrl import synthetic
from twodrl.config import load_config

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
ASPECTS = ["helpfulness", "correctness", "safety", "completeness", "clarity"]


def _records(n: int) -> list[dict]:
    import random

    rng = random.Random(0)
    out = []
    for i in range(n):
        topic = sorted(synthetic.ANIMALS)[i % len(synthetic.ANIMALS)]
        prompt = f"Tell me about the {topic}."
        text = synthetic.sample_response(rng, topic)
        segs = synthetic.split_sentences(text)
        rows = synthetic.score_segments(prompt, segs, ASPECTS)
        out.append({"prompt": prompt, "history": [], "chosen": {
            "text": text, "segments": segs, "scores": {a: [r[k] for r in rows] for k, a in enumerate(ASPECTS)}}})
    return out


def test_scorer_actor_on_a_qwen2_backbone(ray_cluster, tmp_path):
    import torch
    import transformers

    from actors.scorer import create_scorers
    from twodrl.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    backbone = tmp_path / "qwen2"
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )).save_pretrained(backbone)
    tok.save_pretrained(backbone)

    cfg = load_config(CONFIG, [f"scorer.model.path={backbone}", "scorer.train_batch_size=8", "run_name=backbone-scorer"])
    (scorer,) = create_scorers(cfg, namespace="twodrl-tests-backbone")
    try:
        item = {"id": "a", "prompt": "Tell me about the otter.", "response": "The otter lives in rivers. The otter eats fish."}
        first = ray.get(scorer.score.remote([item]))[0]
        assert len(first["scores"]) == 2 and all(len(r) == 5 for r in first["scores"])
        stats = ray.get(scorer.train.remote(_records(16), epochs=1))
        assert stats["rm/epoch"] == 1
        out = tmp_path / "rm"
        ray.get(scorer.save.remote(str(out)))
    finally:
        ray.kill(scorer, no_restart=True)
    saved = transformers.AutoModelForTokenClassification.from_pretrained(out)
    assert saved.config.num_labels == 5 and [saved.config.id2label[i] for i in range(5)] == ASPECTS
