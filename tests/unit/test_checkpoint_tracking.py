import json
import random

import torch

from twodrl.checkpoint import atomic_directory, latest_checkpoint, prune_checkpoints, read_driver_state, round_dir, write_driver_state
from twodrl.tracking import (EVAL_SAMPLES_KEY, MetricsLogger, eval_sample_table, plot_rewards, read_metrics, redact,
                             truncate_metrics)
from twodrl.aspects import DEFAULT_ASPECTS
from twodrl.metrics import round_metric_keys, ray_metric_name


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = round_dir(tmp_path, 1)
    try:
        with atomic_directory(final) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("crash mid-save")
    except RuntimeError:
        pass
    assert not final.exists()
    assert latest_checkpoint(tmp_path) is None


def test_driver_state_round_trip_restores_rng(tmp_path):
    for k in (0, 1, 2):
        with atomic_directory(round_dir(tmp_path, k)) as tmp:
            write_driver_state(tmp, {"round": k, "cursor": {"epoch": 0, "position": 4 * k}})
    k, path = latest_checkpoint(tmp_path)
    assert k == 2
    expected = (random.random(), torch.rand(3))
    state = read_driver_state(path)  # restores the RNG captured at save time
    assert state["cursor"]["position"] == 8
    # RNG was captured when round 2 was written, after which we drew `expected`:
    again = (random.random(), torch.rand(3))
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-0002"]


def test_metrics_logger_writes_every_key_and_truncates_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path, DEFAULT_ASPECTS, use_wandb=False)
    for r in range(3):
        logger.log({"round": r, "reward/weighted": 1.0 + r, "train/loss": float("nan")})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(round_metric_keys(DEFAULT_ASPECTS)) <= set(row)
        assert row["train/loss"] is None
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "rew')  # torn line from a crash
    truncate_metrics(tmp_path / "metrics.jsonl", last_round=1)
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]
    png = plot_rewards(tmp_path / "metrics.jsonl", tmp_path / "plots" / "rewards.png", DEFAULT_ASPECTS)
    assert png.stat().st_size > 1000


def test_redact_hides_secret_values_but_keeps_env_names():
    cfg = {"annotator": {"api_key": "sk-123", "api_key_env": "OPENAI_API_KEY", "base_url": "http://x"}, "token": None}
    out = redact(cfg)
    assert out["annotator"]["api_key"] == "<redacted>"
    assert out["annotator"]["api_key_env"] == "OPENAI_API_KEY"
    assert "sk-123" not in json.dumps(out)


def test_ray_metric_names_are_prometheus_safe():
    assert ray_metric_name("eval/reward/weighted") == "twodrl_eval_reward_weighted"
    for key in round_metric_keys():
        name = ray_metric_name(key)
        assert name.replace("_", "a").isalnum()


def test_eval_sample_table_has_segment_ratings_per_aspect_and_is_a_noop_without_wandb(tmp_path):
    records = [
        {"id": "eval-0", "prompt": "Q?", "text": "A. B.", "segments": ["A.", "B."],
         "scores": [[3.0, 4.0, 4.0, 2.0, 3.5], [1.0, 0.0, 4.0, 2.0, 3.0]]},
        {"id": "eval-1", "prompt": "R?", "text": "", "segments": [], "scores": []},
    ]
    columns, rows = eval_sample_table(records, DEFAULT_ASPECTS)
    assert columns == ["id", "prompt", "response", "segments", *DEFAULT_ASPECTS]
    assert rows[0][:4] == ["eval-0", "Q?", "A. B.", '["A.", "B."]']
    assert rows[0][4:] == ["[3, 1]", "[4, 0]", "[4, 4]", "[2, 2]", "[3.5, 3]"]
    assert rows[1][4:] == ["[]"] * len(DEFAULT_ASPECTS)
    logger = MetricsLogger(tmp_path, DEFAULT_ASPECTS, use_wandb=False)
    logger.log_table(EVAL_SAMPLES_KEY, columns, rows, step=0)  # nothing to log to: no error, no file
    assert not (tmp_path / "metrics.jsonl").exists()
