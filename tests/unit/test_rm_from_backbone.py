"""A reward model from any causal-LM backbone: `twodrl train-rm` on a plain
Qwen2/Llama/Mistral directory builds the classification model with one output per
aspect, and what it saves loads in transformers and in the scorer.

The backbones here are random-init models written with ``save_pretrained`` (the real
loading path on a real directory), not the tiny reward factory."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from twodrl.cli import main as cli
from twodrl.config import ModelConfig, load_config
from twodrl.models.loading import load_reward_model

ASPECTS = ["helpfulness", "correctness", "safety", "completeness", "clarity"]
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "rm-quickstart.yaml")


def _write_backbone(path: Path, family: str) -> Path:
    """A tiny random-init causal LM of ``family`` with the project's tiny tokenizer."""
    import transformers

    from twodrl.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)
    if family == "qwen2":
        config = transformers.Qwen2Config(**shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        cls = transformers.Qwen2ForCausalLM
    elif family == "llama":
        # Llama checkpoints ship without a pad token: the loader must find one.
        config = transformers.LlamaConfig(**shape, pad_token_id=None, eos_token_id=tok.eos_token_id)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.MistralConfig(**shape, pad_token_id=None, eos_token_id=tok.eos_token_id)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(0)
    cls(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2_backbone(tmp_path_factory):
    return _write_backbone(tmp_path_factory.mktemp("qwen2-backbone"), "qwen2")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    # The scorer remembers its weights under the temp dir, keyed by process: keep each
    # test's scorer from picking up another test's.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
@pytest.mark.parametrize("mode", ["segment", "sequence"])
def test_causal_lm_gets_a_fresh_aspect_head(tmp_path, family, mode):
    path = _write_backbone(tmp_path / family, family)
    model = load_reward_model(ModelConfig(str(path)), mode=mode, aspects=ASPECTS)
    kind = "ForTokenClassification" if mode == "segment" else "ForSequenceClassification"
    assert type(model).__name__.endswith(kind)
    assert model.config.num_labels == 5
    assert [model.config.id2label[i] for i in range(5)] == ASPECTS
    assert model.config.label2id == {a: i for i, a in enumerate(ASPECTS)}
    assert model.config.pad_token_id is not None
    w = model.score.weight.detach()
    assert w.shape == (5, 64)
    # Small normal init, not HF's leftover two-label head or zeros.
    assert 0.005 < float(w.std()) < 0.05 and float(w.abs().max()) < 0.5
    # The backbone weights are the saved ones, not re-initialised.
    saved = transformers_state(path)
    name = next(k for k in saved if k.endswith("layers.0.mlp.up_proj.weight"))
    assert torch.equal(model.state_dict()[name], saved[name])


def transformers_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_a_head_for_other_aspects_is_refused(tmp_path, tiny_reward_path):
    other = ["helpfulness", "safety"]
    with pytest.raises(ValueError) as err:
        load_reward_model(ModelConfig(tiny_reward_path), mode="segment", aspects=other)
    msg = str(err.value)
    assert str(ASPECTS) in msg and str(other) in msg
    # The same aspects in the same order load.
    load_reward_model(ModelConfig(tiny_reward_path), mode="segment", aspects=ASPECTS)


def test_train_rm_from_a_qwen2_backbone_then_score(qwen2_backbone, private_tmp, capsys):
    from transformers import AutoModelForTokenClassification

    out = private_tmp / "rm"
    args = [
        "train-rm", CONFIG, "--out", str(out),
        "--set", f"scorer.model.path={qwen2_backbone}",
        "--set", "scorer.train_synthetic_pairs=16", "--set", "scorer.eval_synthetic_pairs=8",
        "--set", "scorer.include_sample_data=false", "--set", "scorer.train_epochs=1",
        "--set", "scorer.train_batch_size=8", "--set", "logging.progress=false",
    ]
    assert cli(args) == 0
    printed = capsys.readouterr().out
    assert f"aspects {ASPECTS}" in printed and "LABEL_0" not in printed
    assert set(json.loads((out / "eval.json").read_text())) == set(ASPECTS)

    model = AutoModelForTokenClassification.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForTokenClassification"
    assert model.config.num_labels == 5
    assert [model.config.id2label[i] for i in range(5)] == ASPECTS

    # The scorer actor's own load path accepts it and rates on the aspects' scale.
    from actors.scorer import RewardScorer

    cfg = load_config(CONFIG, [f"scorer.model.path={out}", "scorer.batch_size=2"])
    scorer = RewardScorer(cfg, index=0)
    res = scorer.score([{"id": "a", "prompt": "Tell me about the otter.",
                         "response": "The otter lives in rivers. The otter eats fish."}])
    assert res[0]["id"] == "a" and len(res[0]["scores"]) == len(res[0]["segments"]) == 2
    assert all(len(row) == 5 and all(0.0 <= v <= 4.0 for v in row) for row in res[0]["scores"])


def test_scorer_accepts_a_plain_backbone(qwen2_backbone, private_tmp):
    """Serving a backbone directly (its fresh head untrained) is allowed: round 0 of a
    run trains it; the aspect names are right from the start."""
    from actors.scorer import RewardScorer

    cfg = load_config(CONFIG, [f"scorer.model.path={qwen2_backbone}"])
    scorer = RewardScorer(cfg, index=0)
    assert scorer.score([{"id": "x", "prompt": "Hi.", "response": "Hello there."}])[0]["scores"]


def test_scorer_refuses_other_aspects(tiny_reward_path, private_tmp):
    from actors.scorer import RewardScorer

    cfg = load_config(CONFIG, [f"scorer.model.path={tiny_reward_path}", "aspects.names=[helpfulness,safety]",
                               "aspects.weights=[0.5,0.5]"])
    with pytest.raises(ValueError, match="helpfulness"):
        RewardScorer(cfg, index=0)
