"""``twodrl eval``'s pure parts: checkpoint resolution, the summary and its Markdown,
and the both-orders helpers the online job's win rate shares with it."""

from __future__ import annotations

import json
import math

import pytest

from jobs.eval import EvalError, markdown_report, resolve_checkpoint, summarize
from twodrl.evaluation import both_order_items, both_order_outcomes, weighted_rating


def _round(run, k, with_policy=True):
    d = run / "checkpoints" / f"round-{k:04d}"
    (d / "learner" / "policy").mkdir(parents=True)
    (d / "driver.json").write_text("{}")
    if with_policy:
        (d / "learner" / "policy" / "config.json").write_text("{}")
    return d


def test_resolve_checkpoint_forms(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_checkpoint(str(hf)) == str(hf)
    with pytest.raises(EvalError, match="--round applies to run directories"):
        resolve_checkpoint(str(hf), 1)
    run = tmp_path / "run"
    _round(run, 1)
    _round(run, 3)
    # a live run's half-written checkpoint is neither used nor touched
    tmp = run / "checkpoints" / ".round-0004.tmp-123"
    tmp.mkdir()
    assert resolve_checkpoint(str(run)) == str(run / "checkpoints" / "round-0003" / "learner" / "policy")
    assert resolve_checkpoint(str(run), 1).endswith("round-0001/learner/policy")
    assert tmp.exists()
    with pytest.raises(EvalError, match=r"no checkpoint of round 2; kept rounds: \[1, 3\]"):
        resolve_checkpoint(str(run), 2)
    _round(run, 5, with_policy=False)
    with pytest.raises(EvalError, match="has no policy"):
        resolve_checkpoint(str(run), 5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvalError, match="neither a model directory"):
        resolve_checkpoint(str(empty))
    assert resolve_checkpoint("tiny:policy") == "tiny:policy"  # the loaders resolve names
    with pytest.raises(EvalError, match="no such directory"):
        resolve_checkpoint(str(tmp_path / "missing"))


ASPECTS = ["helpfulness", "safety"]
W = [0.75, 0.25]


def test_summarize_and_markdown():
    samples = [
        {"id": "a", "prompt": "p", "text": "One. Two.", "segments": ["One.", "Two."], "scores": [[4, 2], [2, 2]],
         "num_tokens": 6},
        {"id": "b", "prompt": "q", "text": "Three.", "segments": ["Three."], "scores": None, "num_tokens": 2},
    ]
    s = summarize(samples, W, ASPECTS)
    assert s["judged"] == 1 and s["judge_failures"] == 1
    assert s["mean_segments"] == 1.5 and s["mean_tokens"] == 4 and s["mean_chars"] == (9 + 6) / 2
    assert 0 <= s["reward/weighted"] <= 4 and set(ASPECTS) <= {k.split("/")[1] for k in s if k.startswith("reward/")}
    report = {"aspects": ASPECTS, "num_prompts": 2, "model": {"path": "A", "summary": s},
              "baseline": {"path": "B", "summary": s},
              "win_rate": {"win_rate": 0.5, "win_rate_ci_low": 0.0, "win_rate_ci_high": 1.0, "win_rate_pairs": 2.0,
                           "win_rate_failures": 0.0}}
    md = markdown_report(report)
    lines = md.splitlines()
    assert lines[0] == "| model | weighted | helpfulness | safety | segments | tokens | judged |"
    assert lines[2].startswith("| model: `A` |") and lines[3].startswith("| baseline: `B` |")
    assert "1/2" in lines[2] and "**0.500**" in md and "[0.000, 1.000]" in md
    json.dumps(report)


def test_both_order_helpers_cancel_position():
    items = both_order_items([("p", None, ["c1", "c2"], ["b1"])])
    assert [it["responses"] for it in items] == [[["c1", "c2"], ["b1"]], [["b1"], ["c1", "c2"]]]

    def judged(first, second):
        return [{"helpfulness": [first], "safety": [first]}, {"helpfulness": [second], "safety": [second]}]

    rate = lambda r: weighted_rating(r, W, ASPECTS)  # noqa: E731
    # A judge that always prefers the first position: one order each way → a tie.
    assert both_order_outcomes([judged(4, 2), judged(4, 2)], rate) == [0.5]
    # Candidate better in both orders → a win; a failed order → None.
    assert both_order_outcomes([judged(4, 2), judged(1, 3)], rate) == [1.0]
    assert both_order_outcomes([judged(4, 2), None], rate) == [None]
    assert math.isclose(rate({"helpfulness": [4], "safety": [0]}), 3.0)


def test_online_driver_win_rate_uses_the_shared_helpers():
    # The driver's eval/win_rate goes through both_order_items / both_order_outcomes:
    # a stub judge that prefers the first position and rates the candidate higher.
    from types import SimpleNamespace

    from jobs.driver import OnlineDriver
    from twodrl.rounds import ScoredSample
    from twodrl.tasks import TaskPrompt

    d = OnlineDriver.__new__(OnlineDriver)
    d.cfg = SimpleNamespace(seed=0)
    d.aspects, d.weights = ASPECTS, W
    d.eval_prompts = [TaskPrompt("e0", "p0"), TaskPrompt("e1", "p1"), TaskPrompt("e2", "p2")]
    d.baseline = [{"id": "e0", "segments": ["b0"]}, {"id": "e1", "segments": ["b1"]}]  # no baseline for e2
    seen = []

    def judge_pairs(items):
        seen.extend(items)
        out = []
        for it in items:
            cand_first = it["responses"][0][0].startswith("c")
            hi, lo = {"helpfulness": [4], "safety": [4]}, {"helpfulness": [1], "safety": [1]}
            out.append([hi, lo] if cand_first else [lo, hi])
        out[-1] = None  # the last order of the last pair failed
        return out

    d.judge_pairs = judge_pairs
    samples = [ScoredSample(p.id, p.text, "", [f"c{i}"], []) for i, p in enumerate(d.eval_prompts)]
    out = d._win_rate(samples, round_idx=1)
    assert [it["responses"] for it in seen] == [[["c0"], ["b0"]], [["b0"], ["c0"]], [["c1"], ["b1"]], [["b1"], ["c1"]]]
    assert out["eval/win_rate"] == 1.0 and out["eval/win_rate_pairs"] == 1 and out["eval/win_rate_failures"] == 1
