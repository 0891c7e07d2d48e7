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
from twodrl.synthetic import make_preference_records

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


@pytest.fixture(scope="module")
def records() -> list[str]:
    return [json.dumps(r) for r in make_preference_records(3, seed=0)]


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


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys, no_ray, records):
    data = write(tmp_path / "bad.jsonl", records[0] + "\n" + records[1][:-7] + "\n" + records[2] + "\n")
    rc, err = run_main([QUICKSTART, "--set", f"task.dataset={data}", "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, f"{data}:2", "JSON")


def test_wrong_field_type_in_jsonl_names_file_line_and_field(tmp_path, capsys, no_ray, records):
    bad = json.loads(records[2])
    bad["rejected"]["text"] = 7
    data = write(tmp_path / "field.jsonl", "\n".join(records[:2] + [json.dumps(bad)]) + "\n")
    rc, err = run_main([QUICKSTART, "--set", f"task.dataset={data}", "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, f"{data}:3", "rejected.text")


def test_score_rows_not_matching_segments(tmp_path, capsys, no_ray, records):
    bad = json.loads(records[1])
    segments = bad["chosen"]["segments"]
    bad["chosen"]["scores"]["correctness"] = bad["chosen"]["scores"]["correctness"] + [2]  # one rating too many
    data = write(tmp_path / "rows.jsonl", "\n".join([records[0], json.dumps(bad), records[2]]) + "\n")
    rc, err = run_main([QUICKSTART, "--set", f"task.dataset={data}", "--run-dir", str(tmp_path / "run")], capsys)
    assert rc == 2
    assert_one_message(err, f"{data}:2", "chosen.scores.correctness", f"{len(segments) + 1} ratings",
                       f"{len(segments)} segments")


def test_valid_dataset_passes_preflight(tmp_path, records):
    """The checks above are not just rejecting everything: a clean file loads."""
    from jobs.online import preflight
    from twodrl.config import load_config

    data = write(tmp_path / "good.jsonl", "\n".join(records) + "\n")
    cfg = load_config(QUICKSTART, [f"task.dataset={data}"])
    preflight(cfg, QUICKSTART)


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
