"""Tiny offline models and the one loading path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from twodrl.config import ModelConfig
from twodrl.models.loading import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_model_path,
    save_pretrained_safe,
)
from twodrl.models.tiny import parse_tiny_spec, tiny_config, tiny_model_path


def test_policy_checkpoint_files_and_config(tiny_policy_path):
    p = Path(tiny_policy_path)
    names = {f.name for f in p.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32  # vLLM CPU attention
    gen = json.loads((p / "generation_config.json").read_text())
    tok = load_tokenizer(ModelConfig(str(p)))
    assert set(gen["eos_token_id"]) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}


def test_cached_and_keyed_by_config(tiny_policy_path):
    assert str(tiny_model_path("policy")) == tiny_policy_path
    assert str(tiny_model_path("reference")) == tiny_policy_path  # frozen copy of the policy
    other = tiny_model_path("policy", num_hidden_layers=1)
    assert str(other) != tiny_policy_path
    assert json.loads((other / "config.json").read_text())["num_hidden_layers"] == 1


def test_seeded_init_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("TWODRL_CACHE", str(tmp_path))
    a = load_causal_lm(ModelConfig(str(tiny_model_path("policy", num_hidden_layers=1))))
    import shutil

    shutil.rmtree(tmp_path)
    torch.manual_seed(12345)  # the caller's RNG state must not matter
    b = load_causal_lm(ModelConfig(str(tiny_model_path("policy", num_hidden_layers=1))))
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n


def test_reward_kinds(tiny_reward_path):
    seg = load_reward_model(ModelConfig(tiny_reward_path))
    assert type(seg).__name__ == "Qwen2ForTokenClassification"
    assert [seg.config.id2label[i] for i in range(5)] == [
        "helpfulness", "correctness", "safety", "completeness", "clarity"
    ]
    seq = load_reward_model(ModelConfig("tiny:reward-seq"))
    assert type(seq).__name__ == "Qwen2ForSequenceClassification"
    assert seq.config.num_labels == 2 and seq.config.pad_token_id is not None
    custom = tiny_config("reward-seq", aspects=["helpfulness", "verbosity", "safety"])
    assert custom.num_labels == 3


def test_bench_size_is_about_50m():
    cfg = tiny_config("policy", size="bench")
    with torch.device("meta"):
        from transformers import Qwen2ForCausalLM

        n = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
    assert 30e6 < n < 70e6


def test_bad_specs_name_the_problem():
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        tiny_model_path("critic")
    with pytest.raises(ValueError, match="not Qwen2Config fields"):
        tiny_config("policy", hidden_sise=64)
    with pytest.raises(ValueError, match="head_dim 16"):
        tiny_config("policy", hidden_size=64, num_attention_heads=4, num_key_value_heads=4)
    assert parse_tiny_spec("tiny:policy,size=bench,num_hidden_layers=2") == (
        "policy", {"size": "bench", "num_hidden_layers": 2}
    )


def test_resolve_model_path():
    assert resolve_model_path("Qwen/Qwen2-7B-Instruct") == "Qwen/Qwen2-7B-Instruct"
    assert resolve_model_path("/some/dir") == "/some/dir"
    assert resolve_model_path("tiny:policy,num_hidden_layers=1") == str(tiny_model_path("policy", num_hidden_layers=1))


def test_load_dtype_and_remote_code_default(tiny_policy_path):
    assert ModelConfig().trust_remote_code is False
    m = load_causal_lm(ModelConfig(tiny_policy_path, dtype="bfloat16"))
    assert next(m.parameters()).dtype == torch.bfloat16
    assert not m.training


def test_save_pretrained_safe_round_trip(tiny_policy_path, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(tiny_policy_path)
    m, tok = load_causal_lm(cfg), load_tokenizer(cfg)
    with torch.no_grad():
        m.lm_head.weight.add_(1.0)
    out = tmp_path / "ckpt"
    save_pretrained_safe(m, tok, out)
    save_pretrained_safe(m, tok, out)  # overwriting an existing checkpoint is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp leftovers
    back = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert torch.equal(back.lm_head.weight, m.lm_head.weight)
    assert (out / "tokenizer.json").is_file()


def test_concurrent_builders_agree(tmp_path, monkeypatch):
    """Several builders at once (threads here; each holds its own lock file handle,
    exactly like separate processes) end with one complete checkpoint."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("TWODRL_CACHE", str(tmp_path))
    with ThreadPoolExecutor(3) as pool:
        paths = set(pool.map(lambda _: str(tiny_model_path("policy", num_hidden_layers=1, seed=7)), range(3)))
    assert len(paths) == 1
    built = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(built) == 1 and (built[0] / "model.safetensors").is_file()
    load_causal_lm(ModelConfig(paths.pop()))  # complete and loadable


def test_reward_mode_must_match_the_checkpoint(tiny_reward_path):
    with pytest.raises(ValueError, match="scorer.mode is 'sequence'"):
        load_reward_model(ModelConfig(tiny_reward_path), mode="sequence")
    with pytest.raises(ValueError, match="scorer.mode"):
        load_reward_model(ModelConfig(tiny_reward_path), mode="tokens")
