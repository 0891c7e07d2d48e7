"""Actor output goes to ``RUN_DIR/logs/<actor>.log``, not the terminal: the redirect
every actor's constructor makes (file descriptors, so C-level writes follow), the
``ray.init`` settings the driver uses with and without ``--verbose``, and the log tail
an error message carries for an actor that died without a traceback.

The redirect runs in a child interpreter: dup2 on this process's stdout would swallow
pytest's own output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.common import LOG_DIR_ENV, log_tail, redirect_actor_output
from jobs.driver import actor_log_tails, connect_ray
from twodrl.config import RunConfig

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import os, sys, warnings
from actors.common import redirect_actor_output
print("before redirect")
sys.stdout.flush()
path = redirect_actor_output(sys.argv[1])
print("python stdout", sys.argv[2])
print("python stderr", sys.argv[2], file=sys.stderr)
warnings.warn("a python warning " + sys.argv[2])
sys.stdout.flush()
os.write(1, b"fd-level write\n")  # what a C++ library or vLLM's logger does
os.write(2, b"fd-level stderr\n")
"""


def _child(log_dir: Path | None, name: str, tag: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != LOG_DIR_ENV}
    env["PYTHONPATH"] = str(REPO)
    if log_dir is not None:
        env[LOG_DIR_ENV] = str(log_dir)
    return subprocess.run([sys.executable, "-c", CHILD, name, tag], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_redirect_sends_fd_1_and_2_to_the_actor_log_and_appends_on_restart(tmp_path):
    logs = tmp_path / "logs"
    first = _child(logs, "rollout-0", "first")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "before redirect\n" and first.stderr == ""  # nothing after the redirect
    second = _child(logs, "rollout-0", "second")  # a restarted actor: same name, new process
    assert second.returncode == 0, second.stderr
    text = (logs / "rollout-0.log").read_text()
    for tag in ("first", "second"):
        assert f"python stdout {tag}" in text and f"python stderr {tag}" in text
        assert f"a python warning {tag}" in text
    assert text.count("fd-level write") == 2 and text.count("fd-level stderr") == 2
    assert text.count("==== rollout-0: pid") == 2  # one header per incarnation
    assert text.index("python stdout first") < text.index("python stdout second")
    assert sorted(p.name for p in logs.iterdir()) == ["rollout-0.log"]


def test_no_log_dir_leaves_output_alone(tmp_path):
    out = _child(None, "rollout-0", "x")
    assert out.returncode == 0, out.stderr
    assert "python stdout x" in out.stdout and "python stderr x" in out.stderr
    assert LOG_DIR_ENV not in os.environ
    assert redirect_actor_output("scorer-0") is None  # the driver (or a test) calling it is left alone


def test_log_tail_shows_a_progress_bar_as_its_last_state(tmp_path):
    path = tmp_path / "a.log"
    path.write_text("".join(f"line {i}\n" for i in range(100)) + "bar 1%\rbar 50%\rbar 100%\n")
    assert log_tail(path, 4).splitlines() == ["line 97", "line 98", "line 99", "bar 100%"]
    assert log_tail(tmp_path / "missing.log") == ""


def test_actor_log_tails_names_the_dead_actor_from_rays_error(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rollout-0.log").write_text("".join(f"vllm line {i}\n" for i in range(100)) + "Killed: out of memory\n")
    (logs / "scorer-0.log").write_text("scorer is fine\n")
    # The shape of ray.exceptions.ActorDiedError's message.
    err = RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: RolloutWorker\n"
                       "\tactor_id: abc\n\tpid: 123\n\tname: rollout-0\n\tnamespace: twodrl-x\n")
    wrapped = RuntimeError("rollout failed")
    wrapped.__cause__ = err
    text = actor_log_tails(logs, wrapped)
    assert f"last lines of {logs / 'rollout-0.log'}" in text
    assert "Killed: out of memory" in text and "vllm line 99" in text and "vllm line 10\n" not in text
    assert "scorer is fine" not in text
    # Names the driver found dead itself; one with no log is skipped.
    assert "scorer is fine" in actor_log_tails(logs, None, ["scorer-0", "annotator-0", "learner (max_failures)"])
    assert actor_log_tails(logs, ValueError("no actor here")) == ""
    (logs / "rm_learner-1.log").write_text("rank 1 of the reward-model trainer\n")
    assert "rank 1 of the reward-model trainer" in actor_log_tails(logs, RuntimeError("\tname: rm_learner-1\n"))


@pytest.mark.parametrize("verbose", [False, True])
def test_connect_ray_forwards_worker_output_only_when_verbose(tmp_path, monkeypatch, verbose):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))

    class _Ctx:
        gcs_address = "127.0.0.1:6379"

    monkeypatch.setattr(ray, "get_runtime_context", lambda: _Ctx())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = RunConfig()
    log_dir = None if verbose else tmp_path / "run" / "logs"
    for address in (None, "10.0.0.1:6379"):  # a local cluster, and one that exists (ray job submit, KubeRay)
        cfg.ray.address = address
        calls.clear()
        connect_ray(cfg, "twodrl-test", log_dir=log_dir)
        (kw,) = calls
        assert kw["log_to_driver"] is verbose
        env = kw["runtime_env"]["env_vars"]
        if verbose:
            assert LOG_DIR_ENV not in env and "logging_level" not in kw
        else:
            assert env[LOG_DIR_ENV] == str(log_dir.resolve()) and Path(env[LOG_DIR_ENV]).is_absolute()
            assert log_dir.is_dir()
            import logging

            assert kw["logging_level"] == logging.WARNING
    assert LOG_DIR_ENV not in os.environ  # set for the actors, never for the driver itself


def test_verbose_flag_on_run_and_train():
    from jobs.online import build_parser as run_parser
    from jobs.train import build_parser as train_parser

    for build in (run_parser, train_parser):
        assert build("x").parse_args(["c.yaml", "--verbose"]).verbose is True
        assert build("x").parse_args(["c.yaml"]).verbose is False


def test_an_actors_traceback_is_part_of_the_stop_message():
    import ray

    from jobs.driver import _remote_traceback

    remote = ray.exceptions.RayTaskError(
        "RolloutWorker.generate", 'Traceback (most recent call last):\n  File "actors/rollout.py", line 1, in generate\n'
        "ValueError: engine exploded", ValueError("engine exploded")).as_instanceof_cause()
    wrapped = RuntimeError("rollout stage failed")
    wrapped.__cause__ = remote
    text = _remote_traceback(wrapped)
    assert "actors/rollout.py" in text and "engine exploded" in text
    assert _remote_traceback(ValueError("a driver-side error")) == ""
