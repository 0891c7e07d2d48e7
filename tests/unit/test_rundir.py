"""Run directory guards: a used directory is never silently reused, one job per
directory, a resume keeps the run's meaning, train-rm --out replaces only its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from twodrl.rundir import (
    REWARD_MODEL_MARKER,
    RunDirError,
    RunLock,
    check_output_dir,
    check_resume_config,
    check_run_dir,
    diff_run_configs,
    open_run_dir,
    record_resume,
    run_state,
)

REPO = Path(__file__).resolve().parents[2]


def used_run(run_dir: Path, with_checkpoint: bool = False) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text('{"round": 0}\n')
    (run_dir / "config.yaml").write_text("seed: 0\nrounds: 2\nlearner:\n  beta: 0.2\n  lr: 0.001\n")
    if with_checkpoint:
        ckpt = run_dir / "checkpoints" / "round-0000"
        ckpt.mkdir(parents=True)
        (ckpt / "driver.json").write_text('{"round": 0}')
    return run_dir


# ---------------------------------------------------------------------- fresh / overwrite / resume


def test_fresh_run_in_unused_directory_is_allowed(tmp_path):
    assert check_run_dir(tmp_path / "new", resume=False, overwrite=False) is None
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.txt").write_text("not a run")
    (other / ".lock").write_text("")  # a lock file alone is no run state
    assert run_state(other) == []
    assert check_run_dir(other, resume=False, overwrite=False) is None


def test_used_directory_is_refused_with_both_ways_out(tmp_path):
    run_dir = used_run(tmp_path / "run")
    with pytest.raises(RunDirError) as e:
        check_run_dir(run_dir, resume=False, overwrite=False)
    msg = str(e.value)
    assert str(run_dir) in msg and "--resume" in msg and "--overwrite" in msg and "\n" not in msg
    assert (run_dir / "metrics.jsonl").is_file()  # refused: nothing touched


def test_overwrite_moves_the_old_run_aside_and_keeps_it(tmp_path):
    run_dir = used_run(tmp_path / "run", with_checkpoint=True)
    (run_dir / ".lock").write_text("")
    moved = check_run_dir(run_dir, resume=False, overwrite=True, now=0)
    assert moved == run_dir / ".previous-19700101T000000Z"
    assert (moved / "metrics.jsonl").read_text() == '{"round": 0}\n'
    assert (moved / "checkpoints" / "round-0000" / "driver.json").is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", moved.name]
    assert run_state(run_dir) == []
    # Again in the same second: a second folder, the first one untouched.
    (run_dir / "metrics.jsonl").write_text("second\n")
    again = check_run_dir(run_dir, resume=False, overwrite=True, now=0)
    assert again != moved and (again / "metrics.jsonl").read_text() == "second\n"
    assert (moved / "metrics.jsonl").read_text() == '{"round": 0}\n'


def test_resume_and_overwrite_together_are_refused(tmp_path):
    run_dir = used_run(tmp_path / "run", with_checkpoint=True)
    with pytest.raises(RunDirError, match="--resume and --overwrite"):
        check_run_dir(run_dir, resume=True, overwrite=True)
    assert (run_dir / "metrics.jsonl").is_file()


def test_resume_needs_a_checkpoint(tmp_path):
    run_dir = used_run(tmp_path / "run")
    with pytest.raises(RunDirError, match="no complete round checkpoint") as e:
        check_run_dir(run_dir, resume=True, overwrite=False)
    assert "--overwrite" in str(e.value)
    with pytest.raises(RunDirError, match="does not exist"):
        check_run_dir(tmp_path / "missing", resume=True, overwrite=False)
    used_run(run_dir, with_checkpoint=True)
    assert check_run_dir(run_dir, resume=True, overwrite=False) is None


# ---------------------------------------------------------------------- lock

HOLDER = """
import sys, time
from twodrl.rundir import RunLock
lock = RunLock(sys.argv[1]).acquire()  # kept referenced: a dropped lock is released
print("locked", flush=True)
time.sleep(120)
"""


def start_holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_job_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_holder(run_dir)
    try:
        with pytest.raises(RunDirError) as e:
            RunLock(run_dir).acquire()
        msg = str(e.value)
        assert str(run_dir) in msg and f"pid {proc.pid}" in msg and os.uname().nodename in msg
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_job_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_holder(run_dir)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / ".lock").exists()  # the file stays; the kernel dropped the lock
    lock = RunLock(run_dir).acquire()
    assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_release_and_context_manager(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.held
        with pytest.raises(RunDirError, match="in use"):
            RunLock(tmp_path).acquire()  # another open file: refused even in-process
    assert not lock.held
    RunLock(tmp_path).acquire().release()


# ---------------------------------------------------------------------- resume config

SAVED = {
    "seed": 0,
    "rounds": 4,
    "algorithm": "2d-dpo",
    "policy": {"path": "tiny:policy", "dtype": "float32"},
    "reference": None,
    "aspects": {"names": ["a", "b"], "weights": [0.5, 0.5]},
    "learner": {"beta": 0.2, "lr": 0.001},
    "scorer": {"model": {"path": "tiny:reward"}, "batch_size": 16},
    "logging": {"wandb": True},
}


def changed(**edits) -> dict:
    new = json.loads(json.dumps(SAVED))
    for dotted, value in edits.items():
        *parents, leaf = dotted.split("__")
        d = new
        for p in parents:
            d = d[p]
        d[leaf] = value
    return new


def test_config_diff_blocking_and_allowed():
    assert diff_run_configs(SAVED, changed()) == ([], [])
    blocking, allowed = diff_run_configs(
        SAVED,
        changed(rounds=8, learner__lr=0.01, learner__beta=0.5, policy__path="other", logging__wandb=False,
                aspects__weights=(0.3, 0.7), scorer__model__path="rm2", scorer__batch_size=4),
    )
    assert blocking == [
        "policy.path: \"tiny:policy\" -> \"other\"",
        "aspects.weights: [0.5, 0.5] -> [0.3, 0.7]",
        "learner.beta: 0.2 -> 0.5",
        "scorer.model.path: \"tiny:reward\" -> \"rm2\"",
    ]
    assert allowed == ["rounds: 4 -> 8", "learner.lr: 0.001 -> 0.01", "scorer.batch_size: 16 -> 4", "logging.wandb: true -> false"]
    # Tuples (dataclasses) and lists (YAML) of equal values are no change.
    assert diff_run_configs(SAVED, changed(aspects__names=("a", "b"))) == ([], [])


def test_config_diff_edge_cases():
    # Setting a reference model where there was none changes the run.
    blocking, _ = diff_run_configs(SAVED, changed(reference={"path": "ref"}))
    assert blocking == ['reference: null -> {"path": "ref"}']
    # A field a newer twodrl added (absent from the saved config) is only reported.
    blocking, allowed = diff_run_configs(SAVED, changed(policy__max_length=512))
    assert blocking == [] and allowed == ["policy.max_length: <absent> -> 512"]


def test_blocking_resume_names_every_field_and_allowed_ones_are_returned(tmp_path):
    with pytest.raises(RunDirError) as e:
        check_resume_config(tmp_path, SAVED, changed(seed=1, task={"name": "x"}, rounds=9))
    msg = str(e.value)
    assert "seed: 0 -> 1" in msg and "task: <absent>" not in msg and str(tmp_path / "config.yaml") in msg
    assert "rounds" not in msg
    assert check_resume_config(tmp_path, SAVED, changed(rounds=9)) == {"rounds": [4, 9]}
    assert check_resume_config(tmp_path, None, changed(seed=3)) == {}


def test_resumes_are_appended(tmp_path):
    record_resume(tmp_path, {"rounds": [4, 8]}, ["cfg.yaml", "--resume"], now=0)
    record_resume(tmp_path, {}, ["cfg.yaml", "--resume"], now=60)
    lines = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert lines == [
        {"time": "19700101T000000Z", "overrides": {"rounds": [4, 8]}, "argv": ["cfg.yaml", "--resume"]},
        {"time": "19700101T000100Z", "overrides": {}, "argv": ["cfg.yaml", "--resume"]},
    ]


def test_open_run_dir_locks_checks_and_records(tmp_path):
    run_dir = tmp_path / "run"
    lock, log = open_run_dir(run_dir, resume=False, overwrite=False, new_config={"seed": 0}, argv=[])
    assert lock.held and log == []
    lock.release()

    used_run(run_dir, with_checkpoint=True)
    with pytest.raises(RunDirError, match="already holds a run"):
        open_run_dir(run_dir, resume=False, overwrite=False, new_config={"seed": 0}, argv=[])
    RunLock(run_dir).acquire().release()  # the refusal released the lock

    with pytest.raises(RunDirError, match="learner.beta: 0.2 -> 0.9"):
        open_run_dir(run_dir, resume=True, overwrite=False,
                     new_config={"seed": 0, "rounds": 2, "learner": {"beta": 0.9, "lr": 0.001}}, argv=[])
    assert not (run_dir / "resumes.jsonl").exists()

    lock, log = open_run_dir(run_dir, resume=True, overwrite=False,
                             new_config={"seed": 0, "rounds": 5, "learner": {"beta": 0.2, "lr": 0.001}},
                             argv=["c.yaml", "--resume"])
    lock.release()
    assert any("rounds: 2 -> 5" in line for line in log)
    assert json.loads((run_dir / "resumes.jsonl").read_text())["overrides"] == {"rounds": [2, 5]}
    assert "rounds: 2" in (run_dir / "config.yaml").read_text()  # the original stays


def test_online_main_refuses_before_starting_anything(tmp_path, capsys):
    from jobs.online import main

    run_dir = used_run(tmp_path / "run", with_checkpoint=True)
    config = str(REPO / "configs" / "quickstart.yaml")
    assert main([config, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(run_dir) in err and "--overwrite" in err
    assert main([config, "--run-dir", str(run_dir), "--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").is_file()


# ---------------------------------------------------------------------- train-rm --out


def test_output_dir_check(tmp_path):
    assert check_output_dir(tmp_path / "absent", overwrite=False) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty, overwrite=False) is None
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "model.safetensors").write_text("x")
    (ours / REWARD_MODEL_MARKER).write_text("{}")
    assert check_output_dir(ours, overwrite=False) is None

    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError) as e:
        check_output_dir(foreign, overwrite=False)
    assert str(foreign) in str(e.value) and "--overwrite" in str(e.value)
    moved = check_output_dir(foreign, overwrite=True, now=0)
    assert moved == tmp_path / "data.previous-19700101T000000Z"
    assert (moved / "precious.txt").read_text() == "keep me" and not foreign.exists()

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        check_output_dir(a_file, overwrite=True)


def test_train_rm_refuses_a_foreign_out_before_loading_anything(tmp_path, capsys, monkeypatch):
    import jobs.train_rm as train_rm

    def no_training(*a, **k):
        raise AssertionError("the model was loaded although --out was refused")

    monkeypatch.setattr("twodrl.models.loading.load_reward_model", no_training)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = str(REPO / "configs" / "rm-quickstart.yaml")
    assert train_rm.main([config, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and REWARD_MODEL_MARKER in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "mine"
