"""Acceptance: ``twodrl eval --model A --baseline B --prompts P --judge-url URL --json OUT``
on two tiny policies (the tiny offline policy and a copy with perturbed weights), with
the local rule-based judge over HTTP. Real parts: the CLI, a local Ray cluster, vLLM
rollout workers (CPU build), the annotation actors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["How do I store fresh basil?", "Explain what a budget is.", "Why is the sky blue?"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    env.pop("RAY_ADDRESS", None)
    return env


def _perturbed_copy(src: str, dst: Path) -> Path:
    import torch

    from twodrl.config import ModelConfig
    from twodrl.models.loading import load_causal_lm, load_tokenizer

    mc = ModelConfig(path=src)
    model, tok = load_causal_lm(mc), load_tokenizer(mc)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05 * (p.std() if p.numel() > 1 else 1.0))
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def test_eval_model_against_baseline(tmp_path, tiny_policy_path):
    from twodrl.annotation.judge_server import start_judge_server

    baseline = _perturbed_copy(tiny_policy_path, tmp_path / "perturbed")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    url, stop = start_judge_server(host="127.0.0.1", port=0, mode="generic")
    out, md = tmp_path / "report.json", tmp_path / "report.md"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "twodrl", "eval", "--model", tiny_policy_path, "--baseline", str(baseline),
             "--prompts", str(prompts), "--judge-url", url, "--json", str(out), "--md", str(md),
             "--set", "eval.max_new_tokens=24"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200,
        )
    finally:
        stop()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    aspects = report["aspects"]
    assert report["num_prompts"] == 3 and report["judge"] == url
    for role, path in (("model", tiny_policy_path), ("baseline", str(baseline))):
        s = report[role]["summary"]
        assert report[role]["path"] == path
        assert s["judged"] == 3, s  # the generic judge rates every answer
        for a in aspects + ["weighted"]:
            assert 0.0 <= s[f"reward/{a}"] <= 4.0, (role, a, s)
        assert s["mean_segments"] >= 1 and s["mean_tokens"] > 0
    wr = report["win_rate"]
    assert wr["win_rate_pairs"] == 3 and wr["win_rate_failures"] == 0
    assert 0.0 <= wr["win_rate_ci_low"] <= wr["win_rate"] <= wr["win_rate_ci_high"] <= 1.0
    assert not any(math.isnan(wr[k]) for k in ("win_rate", "win_rate_ci_low", "win_rate_ci_high"))
    rows = report["responses"]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"] and [r["prompt"] for r in rows] == PROMPTS
    assert all(r["outcome"] in (0.0, 0.5, 1.0) for r in rows)
    assert sum(r["outcome"] for r in rows) / 3 == pytest.approx(wr["win_rate"])
    # The Markdown table is printed and written.
    table = md.read_text()
    assert table.splitlines()[0].startswith("| model | weighted |") and table in proc.stdout
    assert "Win rate of the model against the baseline" in table
