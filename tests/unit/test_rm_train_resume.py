"""`twodrl train-rm` epoch checkpoints and --resume (one process), and how the
reward-model ranks split a batch (actors/reward_learner.py, no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import jobs.train_rm as train_rm
from actors.reward_learner import micro_layout, shard_batches
from twodrl.cli import main as cli
from twodrl.config import load_config

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "rm-quickstart.yaml")
SMALL = [
    "--set", "scorer.model.path=tiny:reward",
    "--set", "scorer.train_synthetic_pairs=12",
    "--set", "scorer.eval_synthetic_pairs=6",
    "--set", "scorer.include_sample_data=false",
    "--set", "scorer.train_epochs=2",
    "--set", "scorer.train_batch_size=8",
    "--set", "logging.progress=false",
]


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


class _Stop(Exception):
    pass


def test_resume_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert cli(["train-rm", CONFIG, *SMALL, "--out", str(whole)]) == 0
    expected = _lines(whole)
    assert [x["epoch"] for x in expected] == [1, 2]
    assert all(f"eval/{a}/accuracy" in x and f"eval/{a}/mse" in x for x in expected
               for a in ("helpfulness", "correctness", "safety", "completeness", "clarity"))
    assert not (whole / "checkpoints").exists()

    # Killed during epoch 2's evaluation: epoch 1's checkpoint is what is left.
    calls = {"n": 0}
    real = train_rm._eval_line

    def flaky(result):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Stop
        return real(result)

    monkeypatch.setattr(train_rm, "_eval_line", flaky)
    cut = tmp_path / "cut"
    with pytest.raises(_Stop):
        cli(["train-rm", CONFIG, *SMALL, "--out", str(cut)])
    assert (cut / "checkpoints" / "epoch-0001" / "state.json").is_file()
    monkeypatch.setattr(train_rm, "_eval_line", real)
    capsys.readouterr()

    assert cli(["train-rm", CONFIG, *SMALL, "--out", str(cut), "--resume"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    got = _lines(cut)
    assert [x["epoch"] for x in got] == [1, 2]
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert not (cut / "checkpoints").exists() and (cut / "model.safetensors").is_file()


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    assert cli(["train-rm", CONFIG, *SMALL, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no epoch checkpoint" in capsys.readouterr().err


def test_batches_split_over_ranks():
    cfg = load_config(CONFIG, ["scorer.train_batch_size=6", "scorer.train_micro_batch_size=2"])
    assert micro_layout(cfg.scorer, 1) == (2, 3)
    assert micro_layout(cfg.scorer, 2) == (2, 2)
    assert micro_layout(cfg.scorer, 4) == (2, 1)
    plan = shard_batches([[0, 1, 2, 3, 4, 5], [6, 7, 8]], world_size=2, accum=2)
    assert plan[0] == [[[0, 1], [2]], [[6], [7]]]
    assert plan[1] == [[[3, 4], [5]], [[8], []]]  # [] = a zero-weighted filler
    # Every example of every batch exactly once, every rank the same number of steps.
    assert sorted(i for r in plan for step in r for mb in step for i in mb) == list(range(9))
