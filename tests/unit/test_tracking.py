"""MLflow tracking: sqlite, a real `mlflow server` on loopback, artifacts on the loopback S3 server,
and no credential in params, tags or artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import BUCKET, REPO, free_port, tiny_config

from tsgd_ray.tracking import OFF, Tracker, flatten, redact

pytestmark = pytest.mark.timeout(180)
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"


def _all_logged_text(client, run_id: str, folder: Path) -> str:
    run = client.get_run(run_id)
    parts = [str(run.data.params), str(run.data.tags)]
    local = client.download_artifacts(run_id, "", str(folder))
    parts += [p.read_text(errors="replace") for p in Path(local).rglob("*") if p.is_file()]
    return "\n".join(parts)


def test_redaction_of_uris_and_secret_keys():
    assert redact("https://alice:s3cr3t@mlflow.example.com/x") == "https://***@mlflow.example.com/x"
    assert redact("s3://bucket/key") == "s3://bucket/key"
    flat = flatten({"a": {"db_password": "hunter2", "uri": "postgresql://u:p@h/db"}, "n": 3})
    assert flat == {"a.db_password": "***", "a.uri": "postgresql://***@h/db", "n": "3"}


def test_sqlite_run_has_config_params_versions_and_no_credentials(tmp_path, s3_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(
        tmp_path / "out",
        f"tracking.tracking_uri={uri}",
        f"data.root=s3://AKIAEXAMPLE:{SECRET}@bucket/videos",
        "tracking.run_name=first",
    )
    with Tracker(cfg, "run") as tracker:
        child = tracker.child("teacher")
        tracker.log_history(child, [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.5}])
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["distill.ipc"] == "1" and run.data.params["data.num_frames"] == "8"
    assert run.data.tags["version.torch"] and run.data.tags["command"] == "run"
    assert [m.value for m in client.get_metric_history(child, "loss")] == [2.0, 1.5]
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == tracker.run_id
    logged = _all_logged_text(client, tracker.run_id, tmp_path / "dl")
    assert "config.yaml" in [a.path for a in client.list_artifacts(tracker.run_id)]
    assert SECRET not in logged and "AKIAEXAMPLE" not in logged


def test_a_stage_logs_through_its_run_context_and_off_logs_nothing(tmp_path):
    """The skeleton's run context: a child of the invocation's run takes the Tracker's calls less
    the run id, reaches its parent, and finishes; with tracking off every call is a no-op."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(tmp_path / "out", f"tracking.tracking_uri={uri}")
    with Tracker(cfg, "run") as tracker:
        run = tracker.context()
        stage = run.child("stats", tags={"method": "tsgd"})
        stage.log_metrics({"clips": 64})
        stage.log_text("notes/what.txt", "probed")
        stage.parent.set_tags({"teacher_sha256": "abc"})
        seed = stage.child("evaluate/tsgd/seed-0")
        assert stage.find_child("evaluate/tsgd/seed-0").run_id == seed.run_id and stage.find_child("x") is None
        seed.finish()
        stage.finish()
    client = MlflowClient(uri)
    got = client.get_run(stage.run_id)
    assert got.data.metrics == {"clips": 64} and got.data.tags["method"] == "tsgd"
    assert got.data.tags["mlflow.parentRunId"] == tracker.run_id and got.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(stage.run_id, "notes")] == ["notes/what.txt"]
    assert client.get_run(tracker.run_id).data.tags["teacher_sha256"] == "abc"
    assert client.get_run(seed.run_id).data.tags["mlflow.parentRunId"] == stage.run_id

    assert not OFF and OFF.child("stats") is OFF and OFF.parent is OFF and OFF.uri == ""
    assert OFF.log_metrics({"clips": 1}) is None and OFF.log_teacher(b"", {}) is None and OFF.find_child("x") is None
    OFF.finish()
    OFF.fail_children()
    with pytest.raises(AttributeError):
        OFF.log_everything  # noqa: B018 (a call the Tracker does not have is an error, on or off)


def test_failed_invocation_marks_runs_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(tmp_path / "out", f"tracking.tracking_uri={uri}")
    with pytest.raises(RuntimeError):
        with Tracker(cfg, "run") as tracker:
            child = tracker.child("distill")
            raise RuntimeError("worker lost")
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert client.get_run(child).info.status == "FAILED"


def _readme_flag(flag: str) -> str:
    """The value infra/mlflow/README.md gives `flag` in its server command."""
    import re

    return re.search(rf'{flag} "([^"]+)"', (REPO / "infra" / "mlflow" / "README.md").read_text()).group(1)


def _status_with_host(url: str, host: str) -> int:
    """HTTP status of the server's experiment search when the client sends Host: `host`."""
    import urllib.error

    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def mlflow_server(tmp_path, s3_server):
    """`mlflow server` as infra/mlflow/README.md runs it: a database backend (sqlite here) and an
    S3 artifact store (the loopback S3 server) that the server proxies; yields (URL, artifact URI)."""
    port = free_port()
    artifacts = f"s3://{BUCKET}/mlflow-server-{os.urandom(3).hex()}"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            artifacts,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--allowed-hosts",
            _readme_flag("--allowed-hosts"),
            "--cors-allowed-origins",
            _readme_flag("--cors-allowed-origins"),
        ],
        env={**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
    yield url, artifacts
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


def test_shared_mlflow_server_with_s3_artifacts(tmp_path, mlflow_server, monkeypatch):
    """The job needs only MLFLOW_TRACKING_URI: no S3 credentials, the server writes the artifacts."""
    import s3fs
    from mlflow.tracking import MlflowClient

    url, artifacts = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key)
    cfg = tiny_config(tmp_path / "out", "tracking.experiment=server")
    with Tracker(cfg, "run") as tracker:
        tracker.log_metrics(tracker.run_id, {"tsgd/top1_mean": 0.5})
    client = MlflowClient(url)
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["tsgd/top1_mean"] == 0.5 and run.data.params["seed"] == "0"
    assert "config.yaml" in [a.path for a in client.list_artifacts(tracker.run_id)]
    monkeypatch.undo()
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert any(k.endswith(f"{tracker.run_id}/artifacts/config.yaml") for k in fs.find(artifacts.removeprefix("s3://")))
    # the names the docs and manifests give the server are accepted as Host headers; others are not
    configmap = (REPO / "infra" / "k8s" / "configmap.yaml").read_text()
    in_cluster = configmap.split("MLFLOW_TRACKING_URI:", 1)[1].split()[0].removeprefix("http://")
    for host in ("mlflow.internal:5000", in_cluster, "localhost:5000"):
        assert _status_with_host(url, host) == 200, host
    assert _status_with_host(url, "attacker.example.com:5000") == 403


def test_the_kubernetes_mlflow_server_runs_as_its_manifest_says(tmp_path):
    """infra/k8s/mlflow.yaml's command, run here (its volume a temporary folder, loopback and a free
    port in place of 0.0.0.0:5000): the readiness probe's request is served, a run and its
    artifact are logged through it into the volume, the ConfigMap's in-cluster name is accepted as
    Host, another name refused."""
    import yaml
    from mlflow.tracking import MlflowClient

    manifest = yaml.safe_load((REPO / "infra" / "k8s" / "mlflow.yaml").read_text())
    (deployment,) = [item for item in manifest["items"] if item["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (mount,) = container["volumeMounts"]
    port = free_port()
    command = [
        a.replace(mount["mountPath"] + "/", f"{tmp_path}/").replace("0.0.0.0", "127.0.0.1")
        for a in container["command"]
    ]
    command[command.index("--port") + 1] = str(port)
    command[0] = str(Path(sys.executable).parent / command[0])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        probe = container["readinessProbe"]["httpGet"]
        deadline = time.time() + 90
        while True:
            try:
                # as the kubelet asks: the pod's IP as Host
                request = urllib.request.Request(f"{url}{probe['path']}", headers={"Host": f"10.0.0.5:{port}"})
                with urllib.request.urlopen(request, timeout=2) as response:
                    assert response.status == 200
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("k8s"))
        client.log_text(run.info.run_id, "hello", "note.txt")
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
        assert list(tmp_path.glob(f"artifacts/**/{run.info.run_id}/artifacts/note.txt"))
        assert (tmp_path / "mlflow.db").exists()
        configmap = (REPO / "infra" / "k8s" / "configmap.yaml").read_text()
        in_cluster = configmap.split("MLFLOW_TRACKING_URI:", 1)[1].split()[0].removeprefix("http://")
        assert _status_with_host(url, in_cluster) == 200
        assert _status_with_host(url, "attacker.example.com:5000") == 403
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_artifacts_on_s3(tmp_path, s3_server, monkeypatch):
    import s3fs

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
    location = f"s3://{BUCKET}/mlflow-{os.urandom(3).hex()}"
    cfg = tiny_config(
        tmp_path / "out",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment=s3art",
        f"tracking.artifact_location={location}",
    )
    with Tracker(cfg, "run") as tracker:
        tracker.log_bytes(tracker.run_id, "synthetic/previews/grid.mp4", b"\x00\x01mp4")
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    keys = fs.find(location.removeprefix("s3://"))
    assert any(k.endswith(f"{tracker.run_id}/artifacts/config.yaml") for k in keys)
    assert any(k.endswith("synthetic/previews/grid.mp4") for k in keys)


def test_git_commit_baked_into_the_image_stands_in_where_there_is_no_git(monkeypatch):
    """The image has no .git and perhaps no git: MLflow's git_commit tag is the build's commit."""
    import subprocess

    from tsgd_ray.tracking import runs as tracking

    checkout = tracking._git_commit()
    assert len(checkout) == 40  # this checkout's commit

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    monkeypatch.setenv("TSGD_RAY_GIT_COMMIT", "0123abcd")
    assert tracking._git_commit() == "0123abcd"
    monkeypatch.delenv("TSGD_RAY_GIT_COMMIT")
    assert tracking._git_commit() == "unknown"
