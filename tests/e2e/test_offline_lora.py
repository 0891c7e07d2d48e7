"""``twodrl train`` with LoRA (``--set learner.lora.r=8``) on the shrunk quickstart of
test_offline_train: the run ends with a merged Hugging Face model in ``final/`` (plain
base parameter names, loadable by ``AutoModelForCausalLM``) and the adapter beside it;
its step checkpoints hold the adapter, not the base weights; and a resume from the
step-4 checkpoint ends with the same final weights as the uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.e2e.test_offline_train import final_weights, run_job, train_cmd
from twodrl.tracking import read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

LORA = ["--set", "learner.lora.r=8", "--set", "learner.lora.alpha=16", "--set", "train.epochs=1",
        "--set", "learner.lr=5e-3"]
TOTAL_STEPS = 7  # 56 train pairs / (4 per micro-batch × 2 ranks), one epoch


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("offline-lora") / "straight"
    log = run_dir.parent / "straight.log"
    proc = run_job(train_cmd(run_dir, *LORA), log)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return run_dir


def test_lora_run_saves_a_merged_model_and_adapter_only_checkpoints(lora_run):
    from transformers import AutoModelForCausalLM

    from twodrl.models.tiny import tiny_model_path

    rows = read_metrics(lora_run / "metrics.jsonl")
    assert rows[-1]["step"] == TOTAL_STEPS
    final = lora_run / "final"
    model = AutoModelForCausalLM.from_pretrained(final, use_safetensors=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path("policy"), use_safetensors=True)
    merged, plain = dict(model.named_parameters()), dict(base.named_parameters())
    assert merged.keys() == plain.keys()
    assert not any("lora_" in k or "base_layer" in k for k in final_weights(lora_run))
    assert any(not torch.equal(merged[k], plain[k]) for k in merged)  # the adapter is merged in
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    (ckpt,) = sorted((lora_run / "checkpoints").glob("round-*"))
    learner = ckpt / "learner"
    assert (learner / "adapter").is_dir() and not (learner / "policy").exists()


def test_lora_resume_from_checkpoint_gives_the_same_weights(lora_run, tmp_path):
    """The step-4 checkpoint of the finished run, continued with --resume in a copy of
    its run directory, reaches the same final weights (float32 on CPU)."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(lora_run, run_dir, ignore=shutil.ignore_patterns("final", "wandb", "logs"))
    log = tmp_path / "resume.log"
    proc = run_job(train_cmd(run_dir, *LORA, "--resume"), log)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "resumed after step 4" in text
    want, got = final_weights(lora_run), final_weights(run_dir)
    assert want.keys() == got.keys()
    diff = max(float((want[k] - got[k]).abs().max()) for k in want)
    assert diff <= 1e-6, f"resumed run's final weights differ by {diff}"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [
        r["step"] for r in read_metrics(lora_run / "metrics.jsonl")]
