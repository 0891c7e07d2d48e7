"""`twodrl train-rm` / `twodrl eval-rm` wiring on a very small run (the quickstart's
accuracy target is checked by running the jobs with configs/rm-quickstart.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

from twodrl.cli import main as cli

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "rm-quickstart.yaml")
SMALL = [
    "--set", "scorer.model.path=tiny:reward",
    "--set", "scorer.train_synthetic_pairs=24",
    "--set", "scorer.eval_synthetic_pairs=12",
    "--set", "scorer.train_epochs=1",
    "--set", "logging.progress=false",
]


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "rm"
    assert cli(["train-rm", CONFIG, *SMALL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out" in printed and "majority" in printed
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    lines = (out / "train_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "rm/epoch_mse" in json.loads(lines[0])
    saved = json.loads((out / "eval.json").read_text())
    assert set(saved) == {"helpfulness", "correctness", "safety", "completeness", "clarity"}

    report = tmp_path / "eval.json"
    assert cli(["eval-rm", CONFIG, *SMALL, "--checkpoint", str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    for aspect in saved:
        assert aspect in printed
    again = json.loads(report.read_text())
    # Same held-out set, same checkpoint: the same numbers as right after training.
    for aspect, d in saved.items():
        assert abs(again[aspect]["accuracy"] - d["accuracy"]) < 1e-9


def test_config_errors_are_reported(tmp_path, capsys):
    assert cli(["train-rm", CONFIG, "--set", "scorer.train_epoch=2"]) == 2
    assert "scorer.train_epoch" in capsys.readouterr().err
    assert cli(["eval-rm", CONFIG, "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no reward model checkpoint" in capsys.readouterr().err
