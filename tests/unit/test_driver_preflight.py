"""A config or dataset with a mistake stops ``twodrl run`` / ``python -m jobs.online``
before any actor starts, with one message naming the file, the line and the field.

Most cases call the entry point in-process (fast: no interpreter start-up, no torch
import per case) with ``ray.init`` replaced by a tripwire: the error must come before
the driver so much as connects to Ray. One case runs the real command line as a
subprocess, with a private ``RAY_TMPDIR``, to check the exit status, the stderr text
and that no Ray session was created on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.online import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if anything tries to start or join a Ray cluster."""
    import ray

    def tripwire(*args, **kwargs):
        raise AssertionError("ray.init was called: the mistake was not caught before the cluster started")

    monkeypatch.setattr(ray, "init", tripwire)
    return ray


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv, prog="twodrl run")
    err = capsys.readouterr().err
    return rc, err


def assert_one_message(err: str, *parts: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("error: ")
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


# ------------------------------------------------------------------------- config file


def test_unknown_key_names_file_line_and_field(tmp_path, capsys, no_ray):
    cfg = write(tmp_path / "typo.yaml", "seed: 0\nrounds: 2\nrollout:\n  num_workers: 1\n  promts_per_round: 8\n")
    rc, err = run_main([cfg, "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, f"{cfg}:5", "rollout.promts_per_round", "prompts_per_round")
    assert not (tmp_path / "run").exists(), "nothing may be written for a rejected config"


def test_wrong_type_names_file_line_and_field(tmp_path, capsys, no_ray):
    cfg = write(tmp_path / "type.yaml", "seed: 0\nrounds: 2\nlearner:\n  beta: 0.2\n  lr: fast\n")
    rc, err = run_main([cfg, "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, f"{cfg}:5", "learner.lr", "float")


def test_wrong_type_in_override_names_the_flag_and_field(tmp_path, capsys, no_ray):
    rc, err = run_main([QUICKSTART, "--set", "rollout.prompts_per_round=many", "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, "--set", "rollout.prompts_per_round", "int")


# ------------------------------------------------------------------------- dataset

JUDGE = "http://127.0.0.1:9/v1"  # never contacted: preflight only checks that a judge is named


def dataset_args(data: str, *more: str) -> list[str]:
    return ["--set", "task.name=dataset", "--set", f"task.dataset={data}", "--set", f"annotator.base_url={JUDGE}",
            *more]


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys, no_ray):
    data = write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{"prompt": "b\n{"prompt": "c"}\n')
    rc, err = run_main([QUICKSTART, *dataset_args(data), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, f"{data}:2", "JSON")


def test_row_without_prompt_or_messages_names_file_line_and_fields(tmp_path, capsys, no_ray):
    data = write(tmp_path / "q.jsonl", '{"prompt": "a"}\n{"question": "b"}\n')
    rc, err = run_main([QUICKSTART, *dataset_args(data), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, f"{data}:2", "'prompt'", "'messages'", "task.prompt_field", "task.messages_field")


def test_bad_turn_role_names_the_field(tmp_path, capsys, no_ray):
    row = {"messages": [{"role": "narrator", "content": "x"}, {"role": "user", "content": "y"}]}
    data = write(tmp_path / "m.jsonl", json.dumps(row) + "\n")
    rc, err = run_main([QUICKSTART, *dataset_args(data), "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, f"{data}:1", "messages[0].role")


def test_dataset_is_never_silently_ignored(tmp_path, capsys, no_ray):
    data = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n')
    rc, err = run_main([QUICKSTART, "--set", f"task.dataset={data}", "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, "task.dataset", "task.name=dataset")


def test_dataset_task_without_judge_names_the_field(tmp_path, capsys, no_ray):
    data = write(tmp_path / "p.jsonl", "".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(10)))
    rc, err = run_main([QUICKSTART, "--set", "task.name=dataset", "--set", f"task.dataset={data}",
                        "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, "annotator.fraction", "annotator.base_url")


def test_valid_dataset_passes_preflight(tmp_path):
    """The checks above are not just rejecting everything: a clean file loads, with its
    too-long prompts dropped and counted."""
    from jobs.online import preflight
    from twodrl.config import load_config

    rows = [{"prompt": f"Question {i}?"} for i in range(30)] + [{"prompt": "word " * 2000}]
    data = write(tmp_path / "good.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(QUICKSTART, ["task.name=dataset", f"task.dataset={data}", f"annotator.base_url={JUDGE}",
                                   "task.eval_prompts=5"])
    task = preflight(cfg, QUICKSTART)
    assert len(task.train) + len(task.eval) == 30
    assert task.stats["task/dropped_too_long"] == 1


# ------------------------------------------------------------------------- real command line


def test_command_line_exits_before_ray_starts(tmp_path):
    cfg = write(tmp_path / "typo.yaml", "seed: 0\nrounds: 2\naspects:\n  names: [helpfulness]\n  wieghts: [1.0]\n")
    ray_tmp = tmp_path / "ray-tmp"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)})
    proc = subprocess.run([sys.executable, "-m", "jobs.online", cfg, "--run-dir", str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_message(proc.stderr, f"{cfg}:5", "aspects.wieghts")
    assert not ray_tmp.exists(), "a Ray session directory was created for a rejected config"
    assert not (tmp_path / "run").exists()
