"""The cluster path as a user drives it (README "Run on a Ray cluster" and "Monitor").

One short online run covers several things, because starting the actors (a vLLM CPU
engine, two DeepSpeed ranks, the reward scorer) is most of its cost:

1. ``ray start --head`` with the dashboard on 127.0.0.1 and a metrics export port, then
   ``ray job submit --working-dir . -- python -m jobs.online configs/quickstart.yaml``;
   the job must end SUCCEEDED and its ``metrics.jsonl`` hold every standard key.
2. While it runs: the dashboard's state API lists the named actor of every role, and
   Prometheus-format ``/metrics`` on 127.0.0.1 (the head's export port and every target
   of Ray's service-discovery file) carries the ``ray_twodrl_*`` round gauges.
3. wandb ran offline (no ``WANDB_API_KEY``): an ``offline-run-*`` directory whose history
   uses the metrics.jsonl names, and no secret from the job's environment in any file.

The cluster gets its own temp dir and ports, and is torn down by process id (never a
machine-wide ``ray stop``), so it can run beside other Ray clusters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from twodrl.metrics import ray_metric_name, round_metric_keys
from twodrl.tracking import EVAL_SAMPLES_KEY, read_metrics

from .wandb_reader import offline_config, offline_history

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
ROLES = ("rollout-0", "scorer-0", "learner-0", "learner-1", "annotator-0")
# A fake judge key in the job's environment: it must reach no file the run writes.
FAKE_KEY = "sk-twodrl-e2e-" + uuid.uuid4().hex
SMALL = [
    "rounds=1",
    "rollout.prompts_per_round=8",
    "eval.num_prompts=4",
    "task.sft_examples=64",
    "scorer.rm_train_responses=64",
    "logging.progress=false",
]
JOB_TIMEOUT_S = 1500  # minutes of actor start-up on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_env() -> dict:
    """The shell of a user who activated .venv: ``python`` and ``ray`` are the venv's.
    No wandb settings, so the job takes its own default (offline without a key)."""
    env = dict(os.environ)
    env["PATH"] = f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("WANDB_MODE", "WANDB_API_KEY", "RAY_ADDRESS"):
        env.pop(key, None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's token auth: `ray start` turns it on when ~/.ray/auth_token exists (and
    # creates the token in token mode), but client commands (`ray job submit`) only send
    # the token when the mode is set. README tells users to export it too.
    env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="module")
def token_auth_client():
    """This test process talks to the cluster through the job and state SDKs: put it in
    token mode like the user's shell (Ray caches the mode in its C++ config)."""
    from ray._raylet import Config

    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")
    yield
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before
    Config.initialize("")


def _session_pids(sid: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: session id
            pids.append(int(proc.name))
    return pids


def _stop_cluster(sid: int) -> None:
    """Stop exactly the processes of this cluster. ``ray start`` ran as the leader of a
    new session and exited; the daemons it left (GCS, raylet, dashboard, agents, workers,
    the job driver) are still in that session. ``ray stop`` would stop every Ray
    cluster of the user on this machine instead."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while _session_pids(sid) and time.time() < deadline:
            time.sleep(0.5)


def _scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except OSError:
        return ""


def _metrics_targets(temp_dir: Path, export_port: int) -> list[str]:
    """The head's export port plus every target Ray lists for Prometheus."""
    urls = [f"http://127.0.0.1:{export_port}/metrics"]
    for sd in temp_dir.glob("**/prom_metrics_service_discovery.json"):
        try:
            for group in json.loads(sd.read_text()):
                urls += [f"http://{t}/metrics" for t in group.get("targets", [])]
        except (OSError, json.JSONDecodeError):
            continue
    return list(dict.fromkeys(urls))


def _twodrl_lines(text: str, run_name: str) -> list[str]:
    prefix = "ray_" + ray_metric_name("")  # Ray adds its own "ray_" to app metrics
    return [l for l in text.splitlines() if l.startswith(prefix) and f'run="{run_name}"' in l]


@pytest.fixture(scope="module")
def cluster(token_auth_client):
    temp_dir = Path(tempfile.mkdtemp(prefix="twodrl-ray-", dir="/tmp"))  # short: unix socket paths
    ports = {name: _free_port() for name in ("gcs", "dashboard", "metrics", "client", "agent")}
    cmd = [
        str(RAY), "start", "--head",
        f"--port={ports['gcs']}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        "--num-cpus=8",
        f"--metrics-export-port={ports['metrics']}",
        "--include-dashboard=true",
        "--disable-usage-stats",
        # Isolation from other clusters on this machine (defaults are fixed ports/dirs):
        f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--temp-dir={temp_dir}",
    ]
    # Not --block: with it, any helper process that dies under load (the client server
    # on a busy machine) takes the whole node down. The session id is our handle instead.
    log = open(temp_dir / "ray-start.log", "w")
    head = subprocess.Popen(cmd, env=_user_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        if head.wait(timeout=300) != 0:
            pytest.fail(f"ray start exited with {head.returncode}:\n{(temp_dir / 'ray-start.log').read_text()[-3000:]}")
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 300
        while True:  # the job API answers once the head's dashboard is up
            try:
                JobSubmissionClient(dashboard).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        yield {"dashboard": dashboard, "temp_dir": temp_dir, "ports": ports, "head": head}
    finally:
        _stop_cluster(head.pid)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory):
    """Submit the quickstart job as the README does and watch it until it ends."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    run_dir = tmp_path_factory.mktemp("job") / "run"
    run_name = f"e2e-{uuid.uuid4().hex[:8]}"
    runtime_env = {
        "env_vars": {
            "TWODRL_CACHE": str(REPO / ".cache" / "twodrl"),  # reuse the tiny models built here
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "OPENAI_API_KEY": FAKE_KEY,
        },
        # .gitignore already keeps .venv/.cache/runs out of the upload; be explicit.
        "excludes": [".venv", ".cache", "runs", "wandb", "*.egg-info"],
    }
    submission_id = f"twodrl-{run_name}"
    cmd = [
        str(RAY), "job", "submit",
        "--address", cluster["dashboard"],
        "--submission-id", submission_id,
        "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env),
        "--",
        "python", "-m", "jobs.online", "configs/quickstart.yaml",
        "--run-dir", str(run_dir),
        "--set", f"run_name={run_name}",
        *[a for kv in SMALL for a in ("--set", kv)],
    ]
    out_path = cluster["temp_dir"] / "job-submit.log"
    with open(out_path, "w") as out:
        submit = subprocess.Popen(cmd, cwd=REPO, env=_user_env(), stdout=out, stderr=subprocess.STDOUT)
        alive_actors: dict[str, str] = {}
        scraped: dict[str, list[str]] = {}
        targets: list[str] = []

        def watch() -> None:
            """Actors are only alive and gauges only exported while the job runs."""
            if len(alive_actors) < len(ROLES):
                try:
                    for a in list_actors(address=cluster["dashboard"], filters=[("state", "=", "ALIVE")], limit=1000):
                        if a.name in ROLES and a.ray_namespace == f"twodrl-{run_name}":
                            alive_actors[a.name] = a.class_name
                except Exception:
                    pass  # the state API is briefly unavailable under load; retry
            if read_metrics(run_dir / "metrics.jsonl"):  # a round finished: gauges are set
                targets[:] = _metrics_targets(cluster["temp_dir"], cluster["ports"]["metrics"])
                for url in targets:
                    lines = _twodrl_lines(_scrape(url), run_name)
                    if lines:
                        scraped[url] = lines

        deadline = time.time() + JOB_TIMEOUT_S
        while submit.poll() is None and time.time() < deadline:
            watch()
            time.sleep(3)
        if submit.poll() is None:
            submit.kill()
            pytest.fail(f"job did not finish in {JOB_TIMEOUT_S}s:\n{out_path.read_text()[-4000:]}")
        # Ray flushes metrics every few seconds: give the last gauges time to show.
        settle = time.time() + 30
        while not scraped and time.time() < settle:
            watch()
            time.sleep(2)
    status = JobSubmissionClient(cluster["dashboard"]).get_job_status(submission_id)
    return {
        "run_dir": run_dir,
        "run_name": run_name,
        "status": str(status.value if hasattr(status, "value") else status),
        "returncode": submit.returncode,
        "output": out_path.read_text(),
        "alive_actors": alive_actors,
        "scraped": scraped,
        "targets": targets,
        "gcs_port": cluster["ports"]["gcs"],
    }


def test_job_succeeds_and_logs_every_metric(job):
    assert job["status"] == "SUCCEEDED", job["output"][-4000:]
    assert job["returncode"] == 0, job["output"][-4000:]
    rows = read_metrics(job["run_dir"] / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]  # the warm-start round and one online round
    for row in rows:
        missing = [k for k in round_metric_keys() if k not in row]
        assert not missing, f"round {row['round']} lacks {missing}"
        assert isinstance(row["eval/reward/weighted"], float) and 0.0 <= row["eval/reward/weighted"] <= 4.0
        assert row["rollout/samples"] == 8 * 4  # prompts_per_round × samples_per_prompt
    assert rows[1]["train/loss"] is not None
    # The job names the cluster it joined: the address of this head node, not a new one.
    ray_json = json.loads((job["run_dir"] / "ray.json").read_text())
    assert ray_json["namespace"] == f"twodrl-{job['run_name']}"
    assert ray_json["address"].rsplit(":", 1)[1] == str(job["gcs_port"])
    assert (job["run_dir"] / "plots" / "rewards.png").stat().st_size > 0
    print("\n".join(l for l in job["output"].splitlines() if l.startswith(("[round", "[twodrl]", "   ", "---", "Job"))))


def test_actor_output_goes_to_run_dir_logs_not_the_job_log(job):
    # The job joined an existing cluster: its own ray.init still decides that worker
    # output is not forwarded, and the actors write RUN_DIR/logs/<actor>.log.
    assert "(RolloutWorker pid=" not in job["output"] and "(LearnerRank pid=" not in job["output"]
    logs = job["run_dir"] / "logs"
    for name in ROLES:
        assert (logs / f"{name}.log").is_file(), sorted(p.name for p in logs.glob("*"))
    assert "Initializing a V1 LLM engine" in (logs / "rollout-0.log").read_text(errors="replace")


def test_dashboard_lists_named_actor_per_role(job):
    assert set(job["alive_actors"]) == set(ROLES), job["alive_actors"]


def test_metrics_endpoint_exports_round_gauges(job):
    assert job["scraped"], f"no ray_twodrl_* metrics for run {job['run_name']} at {job['targets']}"
    text = "\n".join(line for lines in job["scraped"].values() for line in lines)
    for key in ("reward/weighted", "eval/reward/weighted", "train/loss", "time/round_s", "rollout/tokens_per_s"):
        name = "ray_" + ray_metric_name(key)
        assert any(line.startswith(name + "{") for line in text.splitlines()), f"{name} not exported"
    # Values are numbers Prometheus can parse.
    for line in text.splitlines():
        float(line.rsplit(" ", 1)[1])
    print("\n".join(sorted(set(text.splitlines()))))  # shown with -s: what a scrape sees


def test_wandb_offline_history_matches_metrics_jsonl(job):
    run_dir = job["run_dir"]
    assert list(run_dir.glob("wandb/offline-run-*")), "wandb did not run offline in the run directory"
    history = offline_history(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(history) == len(rows)
    for logged, row in zip(history, rows):
        # Evaluated rounds also carry their held-out samples as a wandb table (a file
        # reference under eval/samples/...), which metrics.jsonl does not hold.
        user_keys = {k for k in logged if not k.startswith("_") and not k.startswith(EVAL_SAMPLES_KEY + "/")}
        numeric = {k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert user_keys == numeric  # same names, nothing renamed, nothing dropped
        for k in user_keys:
            assert logged[k] == pytest.approx(row[k])
    config = offline_config(run_dir)
    assert config["annotator"]["api_key_env"] == "OPENAI_API_KEY"  # the variable's name, not its value


def test_no_secret_reaches_run_files(job):
    leaks = []
    for path in job["run_dir"].rglob("*"):
        if path.is_file() and FAKE_KEY.encode() in path.read_bytes():
            leaks.append(str(path))
    assert not leaks, f"the judge API key was written to {leaks}"
    assert FAKE_KEY not in job["output"]
