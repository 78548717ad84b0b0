"""`ray job submit` against a real head node started with `ray start --head` on loopback, over a
copy of the session's finished run: the job finds the finished stages and trains new students."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SMALL_RUN, free_port

from tsgd_ray import methods

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
BIN = Path(sys.executable).parent


@pytest.fixture
def head_node(tmp_path):
    """A Ray head (2 CPUs, dashboard with the job server) in its own session and temp dir; stopped
    by ending exactly the processes it started (never `ray stop`, which ends every Ray of the user)."""
    # every port of its own: another Ray on this host (the test session's) holds the defaults
    gcs_port, dashboard_port, agent_http, agent_grpc, metrics = (free_port() for _ in range(5))
    temp_dir = REPO / ".cache" / f"ray-head-{os.getpid()}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--object-store-memory={300 * 2**20}",
            "--disable-usage-stats",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 90
    while True:
        try:
            client = JobSubmissionClient(address)
            break
        except Exception:  # noqa: BLE001 - not up yet
            assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(1)
    yield address, client, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    _kill_started_by(temp_dir)  # what a slow stop left: this head's processes only


def _kill_started_by(temp_dir: Path) -> None:
    """SIGKILL every process whose command line names `temp_dir` (the Ray this test started)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(temp_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def test_pipeline_submitted_as_a_ray_job(head_node, finished_run, tmp_path):
    """The README's `ray job submit` of jobs/run.py over a copy of a finished run with one more
    seed: every stage up to merge is found finished, and the job's fleet trains the new students."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus

    address, client, env = head_node
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    shutil.copytree(finished_run[0], out, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "logs"))
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--no-wait",
        "--working-dir",
        ".",
        "--runtime-env",
        "infra/runtime_env.yaml",
        "--",
        sys.executable,
        "jobs/run.py",  # the thin entry script the README's example submits
        "default",
        f"storage.output_root={out}",
        f"tracking.tracking_uri=sqlite:///{db}",
        "tracking.experiment=submitted",
        *SMALL_RUN,
        "evaluate.seeds=[2]",
    ]
    for _ in range(30):  # the job agent comes up a few seconds after the dashboard
        submit = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job_id = next(w for w in (submit.stdout + submit.stderr).replace("'", " ").split() if w.startswith("raysubmit_"))
    deadline = time.time() + 420
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "| tsgd | 2 |" in logs and "| random_real | 2 |" in logs and "MLflow: sqlite:///" in logs
    assert "teacher: finished at" in logs and "merge: finished at" in logs  # found, not redone
    assert len(list(out.glob("evaluate/*/seed-00002.json"))) == len(methods.registered())  # trained in the job

    mlflow = MlflowClient(f"sqlite:///{db}")
    experiment = mlflow.get_experiment_by_name("submitted")
    parents = [r for r in mlflow.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "tsgd/top1_mean" in parents[0].data.metrics and parents[0].data.params["distill.ipc"] == "2"
