"""`tsgd-ray doctor`: one line per check on every node, exit 2 naming the fix when one fails; and the
stop before any work when a cluster job would keep MLflow's store where `ray down` loses it."""

from __future__ import annotations

import pytest
from conftest import tiny_config
from support.clusters import run_script

from tsgd_ray.cli import run_command
from tsgd_ray.config import ConfigError
from tsgd_ray.tracking.runs import check_store

NODE_CHECKS = ("ray", "torch", "bf16", "compute", "decord", "pyav", "storage")


def _lines(text: str) -> dict[str, str]:
    """check name -> its line, for the report lines of one node."""
    return {line.split("] ", 1)[1].split(":", 1)[0]: line for line in text.splitlines() if line[:4] in ("ok  ", "FAIL")}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_doctor_passes_on_a_cpu_node_with_its_output_root_on_s3(ray_session, s3_root, capsys):
    assert run_command("doctor", "default", [f"storage.output_root={s3_root}", "device=cpu"]) == 0
    lines = _lines(capsys.readouterr().out)
    assert set(NODE_CHECKS) | {"tracking store", "ray auth", "tracking"} <= set(lines)
    assert all(line.startswith("ok") for line in lines.values())
    assert f"storage: {s3_root}: write True, read back True, second create refused True" in lines["storage"]
    assert "on cpu" in lines["compute"] and "mean difference to decord" in lines["pyav"]
    from tsgd_ray import storage

    assert storage.list_files(s3_root) == []  # the probe objects are gone


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_doctor_fails_with_the_fix_where_a_gpu_node_has_a_cpu_only_torch(ray_session, tmp_path, capsys):
    """The session's Ray declares a GPU that this machine's CPU-only torch cannot use."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks a node without CUDA")
    assert run_command("doctor", "default", [f"storage.output_root={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    lines = _lines(out)
    assert lines["torch"].startswith("FAIL") and "install a CUDA build of torch" in lines["torch"]
    assert lines["actor with 0 GPU"].startswith("ok") and "runs on cpu" in lines["actor with 0 GPU"]
    assert lines["actor with 0.5 GPU"].startswith("FAIL")
    assert lines["decord"].startswith("ok") and lines["storage"].startswith("ok")  # the rest still ran
    (last,) = err.strip().splitlines()[-1:]
    assert last.startswith("tsgd-ray doctor: error: ") and "checks failed; the first: FAIL" in last
    assert "Traceback" not in err


@pytest.mark.timeout(300)
@pytest.mark.full  # a 3-node cluster
def test_doctor_checks_every_node_of_a_cluster(tmp_path):
    """A 3-node cluster (its own process: one Ray per process): every node answers for itself, and
    the node whose declared GPU torch cannot use is the one that fails."""
    report = run_script("doctor_cluster.py", tmp_path / "out", timeout=280)
    by_node = {node: [line for line in report["lines"] if f"/{node[:8]}]" in line] for node in report["nodes"]}
    assert len(by_node) == 3 and all(by_node.values())
    failing = {node for node, lines in by_node.items() if any(line.startswith("FAIL") for line in lines)}
    assert len(failing) == 1  # the GPU node with a CPU-only torch
    (gpu_node,) = failing
    assert any(" torch: " in line and line.startswith("FAIL") for line in by_node[gpu_node])
    assert any("actor with 0 GPU" in line and line.startswith("ok") for line in by_node[gpu_node])
    for node, lines in by_node.items():
        assert {"storage", "decord", "compute"} <= {line.split("] ", 1)[1].split(":")[0] for line in lines}, node
    failed = {line.split("] ", 1)[1].split(":")[0] for line in by_node[gpu_node] if line.startswith("FAIL")}
    assert failed == {"torch", "compute", "actor with 0.5 GPU"}
    assert report["error"].startswith("3 of ") and "install a CUDA build of torch" in report["error"]


def test_a_cluster_job_with_remote_outputs_needs_a_tracking_server(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    remote = ["storage.output_root=s3://bucket/runs", "ray.address=auto"]
    with pytest.raises(ConfigError, match=r"lost when the cluster goes down: set tracking.tracking_uri"):
        check_store(tiny_config(tmp_path, *remote))  # the default: ./mlflow.db in the job's folder
    for server in ("http://mlflow.internal:5000", "databricks"):  # a server or a hosted store keeps it
        check_store(tiny_config(tmp_path, *remote, f"tracking.tracking_uri={server}"))
    check_store(tiny_config(tmp_path, "storage.output_root=s3://bucket/runs"))  # a local Ray: the laptop keeps it
    check_store(tiny_config(tmp_path, "ray.address=auto"))  # a local output root holds the store
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # inside `ray job submit`
    with pytest.raises(ConfigError):
        check_store(tiny_config(tmp_path, "storage.output_root=s3://bucket/runs"))


def test_the_run_stops_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run_command("run", "default", ["storage.output_root=s3://bucket/runs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tracking.tracking_uri" in err[0]
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the store


def test_a_driver_older_than_the_torch_builds_cuda_fails_the_torch_check_with_the_driver_it_needs(monkeypatch):
    """torch 2.13's CUDA 13 build on a node whose driver predates 580 (an AMI resolved as `latest`
    at another time): the line names the driver, the CUDA build and the minimum. The GPU and
    nvidia-smi cannot run here: the build and the driver's answer stand in."""
    import torch

    from tsgd_ray import doctor

    assert (
        doctor.driver_too_old("570.133.20", "13.0")
        == "driver 570.133.20 is older than CUDA 13.0 builds need (>= 580.65.06)"
    )
    assert doctor.driver_too_old("580.65.06", "13.0") == doctor.driver_too_old("595.91.07", "13.2") == ""
    assert doctor.driver_too_old("535.104.05", "12.8") == ""  # minor-version compatibility within 12.x
    assert doctor.driver_too_old("no nvidia-smi", "13.0") == doctor.driver_too_old("570.1", None) == ""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(doctor, "_driver_version", lambda: "570.133.20")
    check = doctor._torch(gpus=1.0)
    assert not check.ok and "older than CUDA 13.0 builds need (>= 580.65.06)" in check.detail
    assert "newer driver" in check.line("node")
    assert doctor._torch(gpus=0.0).ok  # a node that is given no GPU does not need one
