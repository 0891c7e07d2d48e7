"""``learner.lora``: config validation and the helpers of :mod:`twodrl.models.lora` on
the tiny policy without DeepSpeed (the learner group itself: tests/integration/test_lora_learner.py)."""

from __future__ import annotations

import pytest
import torch

from twodrl.config import ConfigError, load_config


def test_lora_is_off_by_default_and_on_with_a_rank():
    assert not load_config(None, []).learner.lora.enabled
    cfg = load_config(None, ["learner.lora.r=8", "learner.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.learner.lora.enabled and cfg.learner.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("overrides, message", [
    (["learner.lora.r=8", "learner.lora.target_modules=[]"], "target_modules must name at least one"),
    (["learner.lora.r=8", "learner.lora.target_modules=['']"], "target_modules must name at least one"),
    (["learner.lora.r=8", "learner.lora.target_modules=[all-linear, q_proj]"], "'all-linear' stands alone"),
    (["learner.lora.r=8", "learner.zero_stage=3"], "ZeRO-3 is not supported with LoRA"),
    (["learner.lora.r=8", "reference.path=tiny:policy"], "remove the reference section"),
    (["learner.lora.r=-1"], "learner.lora.r must be"),
    (["learner.lora.alpha=0"], "learner.lora.alpha must be"),
    (["learner.lora.dropout=1"], "learner.lora.dropout must be"),
])
def test_unusable_lora_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_offline_config_checks_lora_too():
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config(None, ["data.train=synthetic", "learner.lora.r=4", "learner.zero_stage=3"])


@pytest.fixture()
def wrapped(tiny_policy_path):
    from twodrl.config import LoraConfig, ModelConfig
    from twodrl.models import lora
    from twodrl.models.loading import load_causal_lm

    base = load_causal_lm(ModelConfig(path=tiny_policy_path))
    model = lora.wrap(load_causal_lm(ModelConfig(path=tiny_policy_path)), LoraConfig(r=4, alpha=8.0))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (peft starts with B = 0)
        for p in lora.lora_b_parameters(model):
            p.normal_(0, 0.05)
    return base, model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_only_the_adapter_is_trainable(wrapped):
    _, model = wrapped
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_merged_parameters_are_the_peft_model_under_base_names(wrapped):
    from twodrl.models import lora

    base, model = wrapped
    named = lora.merged_named_parameters(model)
    assert [n for n, _ in named] == [n for n, _ in base.named_parameters()]
    ids = torch.randint(3, 1000, (2, 12))
    peft_out = _logits(model.eval(), ids)
    base.load_state_dict(dict(named))
    assert torch.allclose(_logits(base, ids), peft_out, atol=1e-5)


def test_adapter_off_reference_is_the_base_and_fold_keeps_the_policy(wrapped):
    from twodrl.models import lora

    base, model = wrapped
    ids = torch.randint(3, 1000, (2, 12))
    ref = lora.AdapterOffReference(model)
    assert torch.equal(ref(input_ids=ids).logits, _logits(base, ids))
    policy = _logits(model.eval(), ids)
    assert not torch.allclose(policy, _logits(base, ids), atol=1e-4)
    fold = lora.adapter_state(model)
    lora.apply_fold(model, fold)
    with torch.no_grad():
        for p in lora.lora_b_parameters(model):
            p.zero_()
    assert lora.adapter_is_zero(model)
    assert torch.allclose(_logits(model, ids), policy, atol=1e-5)
    assert torch.allclose(ref(input_ids=ids).logits, policy, atol=1e-5)


def test_folds_round_trip_through_a_file(wrapped, tmp_path):
    from twodrl.models import lora

    _, model = wrapped
    folds = [lora.adapter_state(model), {k: v * 2 for k, v in lora.adapter_state(model).items()}]
    lora.save_folds(folds, tmp_path)
    loaded = lora.load_folds(tmp_path)
    assert len(loaded) == 2 and all(lora.same_fold(a, b) for a, b in zip(folds, loaded))
    assert lora.load_folds(tmp_path / "none") == []


def test_planner_counts_only_the_adapter_as_trained():
    from twodrl.planner import Architecture, PlanOptions, learner_memory

    arch = Architecture("qwen2-7b", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, vocab_size=152064,
                        intermediate_size=18944, max_position_embeddings=32768)
    opts = PlanOptions(activation_gb=0.0, overhead_gb=0.0)
    full = learner_memory(load_config(None, ["learner.bf16=true"]), arch, arch, opts)
    lora = learner_memory(load_config(None, ["learner.bf16=true", "learner.lora.r=16"]), arch, arch, opts)
    assert "reference" in full and "reference" not in lora
    assert lora["grads"] < full["grads"] / 100 and lora["optim"] < full["optim"] / 100
    assert arch.lora_params(16, ["q_proj", "v_proj"]) == 16 * 28 * ((3584 + 3584) + (3584 + 512))


def test_eval_merges_a_lora_round_checkpoint(wrapped, tmp_path, tiny_policy_path):
    """``twodrl eval RUN_DIR`` on a LoRA run: the round's adapter (plus a fold, as after
    the online warm start) becomes a merged model directory that scores like the peft
    model; a second call reuses it."""
    from jobs.eval import resolve_checkpoint
    from twodrl.models import lora

    _, model = wrapped
    ids = torch.randint(3, 1000, (2, 12))
    fold = {k: v * 0.5 for k, v in lora.adapter_state(model).items()}
    lora.apply_fold(model, fold)  # the base the adapter now trains on
    expected = _logits(model.eval(), ids)
    round_dir = tmp_path / "run" / "checkpoints" / "round-0002"
    (round_dir / "learner").mkdir(parents=True)
    (round_dir / "driver.json").write_text("{}")
    lora.save_adapter(model, round_dir / "learner" / "adapter", tiny_policy_path)
    lora.save_folds([fold], round_dir / "learner")
    path = resolve_checkpoint(str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "merged" / "round-0002")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    assert torch.allclose(_logits(merged, ids), expected, atol=1e-5)
    assert resolve_checkpoint(str(tmp_path / "run")) == path
