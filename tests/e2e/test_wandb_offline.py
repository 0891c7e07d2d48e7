"""The real wandb client, offline: what the metrics logger hands it is what a later
``wandb sync`` would upload. (The cluster run in test_ray_job_submit.py checks the same
for a whole job; this one checks config redaction with secrets *in the config*.)"""

from __future__ import annotations

import json

import pytest

from twodrl.aspects import DEFAULT_ASPECTS
from twodrl.metrics import round_metric_keys
from twodrl.tracking import EVAL_SAMPLES_KEY, MetricsLogger, eval_sample_table, read_metrics

from .wandb_reader import offline_config, offline_history

pytestmark = pytest.mark.e2e

SECRET = "sk-e2e-config-secret-0123456789"


def test_offline_run_redacts_config_and_keeps_metric_names(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default decision, not the test env's
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config = {
        "annotator": {"api_key": SECRET, "api_key_env": "OPENAI_API_KEY", "base_url": "http://127.0.0.1:1/v1"},
        "extra": [{"hf_token": SECRET}],
        "learner": {"beta": 0.2},
    }
    logger = MetricsLogger(tmp_path, DEFAULT_ASPECTS, config=config, run_name="wandb-e2e")
    logger.log({"round": 0, "reward/weighted": 1.25, "reward/safety": 3.0, "time/round_s": 4.5})
    # The driver's eval logs the held-out samples before the round's metrics, same step.
    records = [{"id": "eval-0", "prompt": "What is 2+2?", "text": "It is 4. Four.", "segments": ["It is 4.", "Four."],
                "scores": [[3.0, 4.0, 4.0, 2.0, 3.0], [2.0, 4.0, 4.0, 1.0, 4.0]]}]
    logger.log_table(EVAL_SAMPLES_KEY, *eval_sample_table(records, DEFAULT_ASPECTS), step=1)
    logger.log({"round": 1, "reward/weighted": 2.5, "train/loss": 0.69, "train/kl": float("nan")})
    logger.finish()

    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"secret written to {leaks}"

    logged = offline_config(tmp_path)
    assert logged["annotator"]["api_key"] == "<redacted>"
    assert logged["annotator"]["api_key_env"] == "OPENAI_API_KEY"
    assert logged["extra"][0]["hf_token"] == "<redacted>"
    assert logged["learner"]["beta"] == 0.2

    rows = read_metrics(tmp_path / "metrics.jsonl")
    history = offline_history(tmp_path)
    assert [h["_step"] for h in history] == [0, 1]  # wandb step = round
    # Merged into round 1's row as a table-file reference (the reader joins its nested
    # keys with '/'), not a metric.
    prefix = EVAL_SAMPLES_KEY + "/"
    table = {k[len(prefix):]: history[1].pop(k) for k in list(history[1]) if k.startswith(prefix)}
    assert table["_type"] == "table-file" and table["nrows"] == 1 and table["ncols"] == 4 + len(DEFAULT_ASPECTS)
    saved = json.loads(next(tmp_path.glob(f"wandb/offline-run-*/files/{table['path']}")).read_text())
    assert saved["columns"] == ["id", "prompt", "response", "segments", *DEFAULT_ASPECTS]
    assert saved["data"][0][:3] == ["eval-0", "What is 2+2?", "It is 4. Four."]
    assert saved["data"][0][4:] == ["[3, 2]", "[4, 4]", "[4, 4]", "[2, 1]", "[3, 4]"]  # per segment, per aspect
    for h, row in zip(history, rows):
        names = {k for k in h if not k.startswith("_")}
        assert names <= set(row) and names >= {k for k, v in row.items() if isinstance(v, (int, float))}
        assert set(row) >= set(round_metric_keys(DEFAULT_ASPECTS))
        for k in names:
            assert h[k] == pytest.approx(row[k])
    assert "train/kl" not in history[1]  # NaN is "not measured": null in jsonl, absent in wandb
