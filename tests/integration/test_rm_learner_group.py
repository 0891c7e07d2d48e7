"""Reward-model training on DeepSpeed ranks (actors/reward_learner.py): `twodrl train-rm`
with two ranks from a plain random-init Qwen2 backbone writes a model that loads in
transformers and in the scorer actor, and two ranks follow one rank's loss curve on the
same global batches (and the one-process loop's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from twodrl.cli import main as cli
from twodrl.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ASPECTS = ["helpfulness", "correctness", "safety", "completeness", "clarity"]
CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "rm-quickstart.yaml")


@pytest.fixture(scope="module")
def qwen2_backbone(tmp_path_factory) -> Path:
    """A tiny random-init Qwen2ForCausalLM saved with save_pretrained, tokenizer beside
    it. No dropout before the head, so split batches see the same forward."""
    import torch
    import transformers

    from twodrl.models.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("qwen2-backbone")
    tok = build_tokenizer()
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, classifier_dropout=0.0,
    )).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_train_rm_on_two_ranks(ray_cluster, qwen2_backbone, tmp_path):
    import transformers

    from actors.scorer import create_scorers

    out = tmp_path / "rm"
    sets = [f"scorer.model.path={qwen2_backbone}", "scorer.train_ranks=2", "scorer.train_synthetic_pairs=4",
            "scorer.eval_synthetic_pairs=6", "scorer.include_sample_data=false", "scorer.train_epochs=1",
            "scorer.train_batch_size=4", "logging.progress=false", "run_name=rm-two-ranks"]
    assert cli(["train-rm", CONFIG, *[a for s in sets for a in ("--set", s)], "--out", str(out)]) == 0

    model = transformers.AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.num_labels == 5 and [model.config.id2label[i] for i in range(5)] == ASPECTS
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "checkpoints").exists()  # dropped once the model is saved
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["epoch"] == 1 and line["rm/step"] == 2  # 8 responses, batches of 4
    for a in ASPECTS:
        assert 0.0 <= line[f"eval/{a}/accuracy"] <= 1.0 and line[f"eval/{a}/mse"] >= 0.0

    cfg = load_config(CONFIG, [f"scorer.model.path={out}", "run_name=rm-two-ranks-scorer"])
    (scorer,) = create_scorers(cfg, namespace="twodrl-tests-rm-group-scorer")
    try:
        items = [{"id": "a", "prompt": "Tell me about the otter.", "response": "The otter lives in rivers. The otter eats fish."},
                 {"id": "b", "prompt": "Tell me about the owl.", "response": "The owl hunts at night."}]
        scored = ray.get(scorer.score.remote(items))
    finally:
        ray.kill(scorer, no_restart=True)
    assert [s["id"] for s in scored] == ["a", "b"]
    assert [len(s["scores"]) for s in scored] == [2, 1]
    assert all(len(row) == 5 and all(0.0 <= v <= 4.0 for v in row) for s in scored for row in s["scores"])


@pytest.mark.parametrize("stage,lm_coef", [(0, 1.0), (3, 0.0)], ids=["zero0-lm", "zero3"])
def test_two_ranks_follow_one_rank(ray_cluster, qwen2_backbone, stage, lm_coef):
    import torch

    from actors.reward_learner import RewardLearnerGroup
    from twodrl import synthetic
    from twodrl.models.loading import load_reward_model, load_tokenizer
    from twodrl.models.reward_model import train_reward_model

    # 10 responses in batches of 6 (6, 4): the ranks' shares are uneven, and with
    # micro-batches of 2 some ranks run zero-weighted fillers.
    cfg = load_config(CONFIG, [f"scorer.model.path={qwen2_backbone}", "scorer.train_batch_size=6",
                               "scorer.train_epochs=2", "scorer.train_micro_batch_size=2",
                               f"scorer.train_zero_stage={stage}", f"scorer.lm_loss_coef={lm_coef}"])
    records = synthetic.make_preference_records(5, seed=0, aspects=ASPECTS, weights=list(cfg.aspects.weights))
    steps, epochs = {}, {}
    for world in (1, 2):
        group = RewardLearnerGroup(cfg, records, world_size=world, namespace=f"twodrl-tests-rm-group-{stage}-{world}")
        try:
            epochs[world] = [group.train_epoch() for _ in range(2)]
            steps[world] = [m["rm/loss"] for m in group.step_metrics]
        finally:
            group.shutdown()
    assert len(steps[1]) == len(steps[2]) == 4
    assert steps[2] == pytest.approx(steps[1], rel=1e-5), (steps[1], steps[2])

    # The one-process loop (what train-rm runs with one rank) on the same batches.
    torch.manual_seed(cfg.seed)
    model = load_reward_model(cfg.scorer.model, mode="segment", aspects=ASPECTS)
    lines: list[dict] = []
    train_reward_model(model, load_tokenizer(cfg.scorer.model), records, cfg.scorer, progress=False,
                       seed=cfg.seed, log=lines.append)
    assert [x["rm/epoch_mse"] for x in epochs[2]] == pytest.approx([x["rm/epoch_mse"] for x in lines], rel=1e-4)
    print(f"ZeRO-{stage} step losses, 1 rank: {steps[1]}; 2 ranks: {steps[2]}")
