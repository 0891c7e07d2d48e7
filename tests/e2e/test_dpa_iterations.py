"""DPA-RSF run as its paper runs it: ``twodrl run configs/quickstart.yaml --set
algorithm=dpa-rsf`` for two rounds with several directions per prompt, each round
fine-tuning the warm-started policy afresh on every example selected so far
(``dpa.restart_from_sft``), on its own disjoint part of the prompts
(``dpa.disjoint_prompts``). Real parts: the CLI, a local Ray cluster, vLLM (CPU build)
rollouts, the DeepSpeed learner (two ranks), the local judge."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.e2e.test_adaptive_algorithms import REPO, SMALL, _env
from twodrl.tracking import read_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

PROMPTS, DIRECTIONS, RANKS, MICRO, EPOCHS = 6, 2, 2, 8, 2


def _optimizer_steps(n: int) -> int:
    """Optimizer steps of one fine-tune on ``n`` examples (learner.plan_micro_batches:
    ceil(n / ranks) per rank in micro-batches of MICRO, grad_accum_steps 1)."""
    return EPOCHS * -(-(-(-n // RANKS)) // MICRO)


def test_dpa_rounds_restart_from_sft_on_accumulated_data(tmp_path):
    run_dir = tmp_path / "dpa"
    sets = [*SMALL, "algorithm=dpa-rsf", f"dpa.directions_per_prompt={DIRECTIONS}", "dpa.restart_from_sft=true",
            "dpa.disjoint_prompts=true", f"learner.num_ranks={RANKS}", f"learner.micro_batch_size={MICRO}",
            "learner.grad_accum_steps=1", f"learner.epochs_per_round={EPOCHS}"]
    cmd = [sys.executable, "-m", "twodrl", "run", "configs/quickstart.yaml", "--run-dir", str(run_dir)]
    for kv in sets:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1], rows  # rounds=1: round 0 and one more, both fine-tune

    # Several directions per prompt: every (prompt, direction) keeps its best sample.
    selected = [json.loads(x) for x in (run_dir / "dpa" / "selected.jsonl").read_text().splitlines() if x.strip()]
    per_round = {r: [s for s in selected if s["round"] == r] for r in (0, 1)}
    for r, row in enumerate(rows):
        assert row["rollout/prompts"] == PROMPTS and row["train/winners"] == PROMPTS * DIRECTIONS, row
        assert row["train/replay"] >= 1  # the synthetic task's warm-start data, ~15%
        winners = [s for s in per_round[r] if s["kind"] == "winner"]
        assert len(winners) == row["train/winners"] and len(per_round[r]) == row["train/winners"] + row["train/replay"]
        assert all(len(s["direction"]) == 2 and math.isfinite(s["score"]) for s in winners)
        # The direction the winner was asked for is in its system prompt.
        assert all("Reply preferences" in (s["system"] or "") for s in winners)
        assert len({s["system"] for s in winners}) > PROMPTS  # distinct directions per prompt

    # Selected data accumulates: round 1 fine-tunes on round 0's and its own.
    assert rows[0]["train/sft_examples"] == len(per_round[0])
    assert rows[1]["train/sft_examples"] == len(per_round[0]) + len(per_round[1]) == len(selected)

    # Each round's fine-tune starts from the warm-started policy: the learner's DeepSpeed
    # state (weights, optimizer, step count) is the warm start's, so its optimizer step
    # count is the warm start's plus this round's steps only. Fine-tuning on from the
    # last policy would also carry round 0's steps into round 1.
    warm = rows[0]["warmstart/optimizer_steps"]
    assert isinstance(warm, (int, float)) and warm > 0
    for row in rows:
        assert row["train/restarted"] == 1
        assert row["train/optimizer_steps"] == warm + _optimizer_steps(row["train/sft_examples"]), row
    assert rows[1]["train/optimizer_steps"] < rows[0]["train/optimizer_steps"] + _optimizer_steps(
        rows[1]["train/sft_examples"])

    # Disjoint prompts: round 1 draws none of round 0's.
    files = [run_dir / "rounds" / f"round-{r:04d}.prompts.json" for r in (0, 1)]
    drawn = [{p["index"] for p in json.loads(f.read_text())["prompts"]} for f in files]
    assert len(drawn[0]) == len(drawn[1]) == PROMPTS and not drawn[0] & drawn[1]


def test_dpa_with_a_sequence_reward_model(tmp_path):
    """``scorer.mode=sequence``: a sequence-classification RM (one rating per aspect for
    the whole response) is trained in round 0, updated online, and ranks DPA's samples."""
    from twodrl.models.tiny import tiny_model_path

    rm = tiny_model_path("reward-seq", aspects=["helpfulness", "correctness", "safety", "completeness", "clarity"])
    run_dir = tmp_path / "dpa-seq"
    sets = [*SMALL, "algorithm=dpa-rsf", f"dpa.directions_per_prompt={DIRECTIONS}", "scorer.mode=sequence",
            f"scorer.model.path={rm}"]
    cmd = [sys.executable, "-m", "twodrl", "run", "configs/quickstart.yaml", "--run-dir", str(run_dir)]
    for kv in sets:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1], rows
    assert math.isfinite(rows[0]["rm_train/mse"]) and rows[0]["rm_update/records"] >= 1
    for row in rows:
        assert row["train/winners"] == PROMPTS * DIRECTIONS and math.isfinite(row["train/winner_score"]), row
        assert math.isfinite(row["train/loss"])
    config = json.loads((run_dir / "reward_model" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]  # still a sequence RM
