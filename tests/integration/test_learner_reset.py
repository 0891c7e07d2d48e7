"""``PolicyLearnerGroup.reset_to``: DPA's rounds fine-tune the round-0 policy afresh.
After training moved the weights, resetting to a checkpoint gives back exactly its
weights and optimizer step count, keeps the group's round counter going, and starts a
new lr schedule. 2 ranks on CPU (gloo), ZeRO-2, the tiny policy."""

from __future__ import annotations

import math

import pytest
import torch

from twodrl.config import load_config
from twodrl.synthetic import make_preference_records

pytestmark = pytest.mark.integration

EXAMPLES = [{"prompt": p["prompt"], "response": p["chosen"]["text"]} for p in make_preference_records(8, seed=5)]


@pytest.fixture(scope="module")
def group(ray_cluster):
    from actors.learner import PolicyLearnerGroup

    cfg = load_config(None, [
        "run_name=learner-reset", "learner.zero_stage=2", "learner.num_ranks=2", "learner.micro_batch_size=2",
        "learner.epochs_per_round=1", "learner.lr=2e-3", "learner.lr_schedule=cosine", "learner.warmup_ratio=0.0",
        "rounds=40", "rollout.prompts_per_round=8", "algorithm=dpa-rsf", "rollout.samples_per_prompt=1",
    ])
    g = PolicyLearnerGroup(cfg)
    yield g
    g.shutdown()


def _params(group) -> dict[str, torch.Tensor]:
    return dict(group.named_full_parameters())


def test_reset_to_restores_weights_and_steps_and_restarts_the_schedule(group, tmp_path):
    group.train_sft(EXAMPLES, lr=1e-2, epochs=1)  # the "warm start"
    sft = tmp_path / "sft"
    group.save_checkpoint(str(sft))
    at_sft = _params(group)
    steps_at_sft = group.train_sft(EXAMPLES[:4], epochs=1)["train/optimizer_steps"] - 1  # one step: 4 / (2 × 2)
    group.train_sft(EXAMPLES, epochs=1)
    moved = _params(group)
    assert any(not torch.equal(moved[k], at_sft[k]) for k in at_sft)
    round_before = group._round

    group.reset_to(str(sft), total_steps=4)
    back = _params(group)
    for k, v in at_sft.items():
        assert torch.equal(back[k], v), k  # exactly the checkpoint's weights
    assert group._round == round_before  # batching seeds keep counting

    m = group.train_sft(EXAMPLES, epochs=1)  # 8 examples / (2 ranks × 2) = 2 steps
    assert m["train/optimizer_steps"] == steps_at_sft + 2  # the checkpoint's count, not the moved one's
    # The new schedule: cosine over 4 steps, no warm-up; after 2 steps it is at step 2.
    assert m["train/lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)), rel=1e-6)
