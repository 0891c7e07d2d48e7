"""`twodrl annotate` on small files: layouts, bad lines, resume, budget stop, torn writes."""

from __future__ import annotations

import json

import pytest

from jobs.annotate import done_indices, failures_path, main
from twodrl.annotation.judge_server import JudgeServer
from twodrl.data import load_records
from twodrl.synthetic import make_preference_records


@pytest.fixture
def server():
    s = JudgeServer().start()
    yield s
    s.stop()


def write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))


def pairs(n, seed=0):
    return [{"prompt": r["prompt"], "chosen": r["chosen"]["text"], "rejected": r["rejected"]["text"]}
            for r in make_preference_records(n, seed=seed)]


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_layouts_bad_lines_and_resume(tmp_path, server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "unused-here")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = pairs(3)
    hs2 = {"prompt": "Tell me about the bee.", "response_1": "The bee buzzes.", "response_2": "The bee lives in hives.",
           "preference_strength": 2}
    write(src, [good[0], "{not json", good[1], "", {"prompt": "x"}, hs2, good[2]])
    argv = ["--input", str(src), "--output", str(out), "--base-url", server.url, "--no-progress"]
    assert main(argv) == 0
    recs = read(out)
    assert sorted(r["index"] for r in recs) == [0, 2, 5, 6]
    hs = next(r for r in recs if r["index"] == 5)
    assert hs["chosen"]["text"] == "The bee lives in hives."  # positive strength: response_2
    fails = {f["index"]: f for f in read(failures_path(out))}
    assert set(fails) == {1, 4} and fails[1]["line"] == 2 and "invalid JSON" in fails[1]["reason"]
    assert "expected 'chosen' and 'rejected'" in fails[4]["reason"]
    assert load_records(out).skipped == 0  # the foundation's strict loader accepts it
    n = server.stats()["requests"]
    assert n == 4 * 5
    # Rerun: annotated lines are skipped, bad lines re-recorded once, nothing re-paid.
    assert main(argv) == 0
    assert server.stats()["requests"] == n and len(read(out)) == 4
    assert sorted(f["index"] for f in read(failures_path(out))) == [1, 4]


def test_budget_stop_then_resume_from_cache(tmp_path, server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "unused-here")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(src, pairs(4, seed=1))
    base = ["--input", str(src), "--output", str(out), "--base-url", server.url, "--no-progress", "--concurrency", "1"]
    assert main(base + ["--budget-requests", "7"]) == 3
    fails = read(failures_path(out))
    assert fails and all(f["reason"].startswith("budget exhausted") for f in fails)
    assert len(read(out)) + len(fails) == 4 and server.stats()["requests"] == 7
    assert main(base) == 0
    assert len(read(out)) == 4 and read(failures_path(out)) == []
    # 4 pairs × 5 aspects in all: the 7 answers bought before the stop were not re-bought.
    assert server.stats()["requests"] == 20 and server.stats()["distinct_requests"] == 20


def test_torn_last_line_is_cut_and_corrupt_middle_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"index": 0}\n{"index": 3}\n{"index": 5, "pro')
    assert done_indices(out) == {0, 3}
    assert out.read_text() == '{"index": 0}\n{"index": 3}\n'
    out.write_text('{"index": 0}\ngarbage\n{"index": 2}\n')
    with pytest.raises(ValueError, match="o.jsonl:2: not a JSON record"):
        done_indices(out)


def test_remote_judge_needs_a_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    src = tmp_path / "in.jsonl"
    write(src, pairs(1))
    rc = main(["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:9/v1"])
    assert rc == 2 and "OPENAI_API_KEY" in capsys.readouterr().err


def test_local_judge_by_default_and_config_errors(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    write(src, pairs(1))
    assert main(["--input", str(src), "--output", str(out), "--no-progress", "--single"]) == 0
    assert len(read(out)) == 1 and "local rule-based judge" in capsys.readouterr().err
    assert main(["--input", str(src), "--output", str(out), "--set", "annotator.concurency=3"]) == 2
    assert "did you mean 'concurrency'" in capsys.readouterr().err
