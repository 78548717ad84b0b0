"""A whole `tsgd-ray run` as a user starts it, on a small built-in set (the session's
`finished_run`): what the console shows, what the log file keeps, and the MLflow run it leaves
(sqlite store, read back with MlflowClient)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import SMALL_RUN

from tsgd_ray import methods

CONSOLE_LINES = 100  # the target for a default run
NOISE = re.compile(
    r"PlacementGroupCleaner|logging_progress|Total Progress|mlflow\.store\.db|Started a local Ray"
    r"|\bINFO\b|\bWARNING\b|Traceback|Reporting training result"
)


def _first_parent(runs):
    """The finished run's first invocation (its second changes tsgf.enabled)."""
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.params["tsgf.enabled"] == "True"]
    return parent


@pytest.mark.ray
@pytest.mark.timeout(700)
def test_the_console_is_quiet_and_the_log_file_keeps_everything(finished_run):
    root, console = finished_run
    lines = console.splitlines()
    assert len(lines) < CONSOLE_LINES, console
    assert not [line for line in lines if NOISE.search(line)], console
    # the project's progress, from the driver and from inside the Ray Train workers
    assert re.search(r"\[tsgd-ray\] teacher: epoch 2/2, loss", console)
    assert re.search(r"\[tsgd-ray\] evaluate tsgd seed 1: epoch 2/2", console)
    sets = sum(methods.get(m).distils for m in methods.registered())  # one actor pool for every set
    assert f"distill: {8 * sets}/{8 * sets} partitions" in console
    assert "| tsgd | 2 |" in console and "| full | all |" in console and "teacher (the ceiling)" in console
    shown = [line for line in lines if "[tsgd-ray]" in line]
    assert len(shown) == len(set(shown))  # Ray forwards a worker's print twice: shown once
    mlflow = Path(sys.executable).with_name("mlflow")  # printed as it runs without activating the venv
    assert f"  {mlflow} ui --backend-store-uri sqlite:///{root}/mlflow.db" in console
    assert re.search(
        r"open http://127.0.0.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}\?workflowType=machine_learning", console
    )
    logs = sorted((root / "logs").glob("run-*.log"))  # named by their start: this run's, then the second's
    assert len(logs) == 2
    kept = logs[0].read_text()
    assert len(kept.splitlines()) > len(lines)
    assert "Started a local Ray instance" in kept or "Ray resources" in kept
    for line in lines:  # every console line is in the file too (but the table and the MLflow lines)
        if line.startswith(("|", "MLflow:", f"  {mlflow} ui", "  then open", "teacher (the ceiling)", "[20")):
            continue
        assert line.split(" ", 1)[-1] in kept, line


@pytest.mark.ray
@pytest.mark.timeout(700)
def test_the_mlflow_run_reads_like_a_training_project(finished_run, tmp_path):
    from mlflow.tracking import MlflowClient

    root, _ = finished_run
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("tsgd-ray-default")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parent = _first_parent(runs)
    assert re.fullmatch(r"run-builtin-ipc2-[0-9a-f]{6}", parent.info.run_name)
    tags = parent.data.tags
    assert tags["mlflow.source.name"] == "tsgd-ray run" and tags["mlflow.user"]
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", tags["mlflow.source.git.commit"])
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == "builtin-shards" and dataset.tags[0].value == "train"
    assert json.loads(dataset.dataset.profile) == {"classes": 8, "train_videos": 64, "test_videos": 16}
    metrics = parent.data.metrics
    assert 0 <= metrics["teacher/top1"] <= 1 and 0 <= metrics["tsgd/top1_mean"] <= 1
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "results.json", str(tmp_path))).read_text())
    assert table["columns"][:2] == ["method", "ipc"]
    assert [row[0] for row in table["data"]] == [m.value for m in methods.registered()]  # tsgd, then the baselines
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "synthetic/tsgd")}
    assert "synthetic/tsgd/preview.mp4" in names
    sheets = client.list_artifacts(parent.info.run_id, "synthetic/tsgd/classes")
    assert len(sheets) == 8 and all(a.path.endswith(".png") and a.file_size > 1000 for a in sheets)
    # children: opened before their work, so they last as long as it did; seeds at the times they ran
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    teacher = next(r for r in children if r.info.run_name == "teacher")
    assert teacher.info.end_time - teacher.info.start_time > 1000
    curve = client.get_metric_history(teacher.info.run_id, "loss")
    assert [m.step for m in curve] == [0, 1] and curve[0].timestamp < curve[1].timestamp
    evaluate = next(r for r in children if r.info.run_name == "evaluate/tsgd")
    seeds = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == evaluate.info.run_id),
        key=lambda r: r.info.run_name,
    )
    assert [s.info.run_name for s in seeds] == ["evaluate/tsgd/seed-0", "evaluate/tsgd/seed-1"]
    assert len(seeds) == 2  # trained in the fleet, in any order, within their stage
    assert all(evaluate.info.start_time <= s.info.start_time < s.info.end_time <= evaluate.info.end_time for s in seeds)
    for seed in seeds:  # logged live from the Ray Train controller, epoch by epoch
        assert [m.step for m in client.get_metric_history(seed.info.run_id, "loss")] == [0, 1]
        assert seed.info.status == "FINISHED" and "top1" in seed.data.metrics
    distill = next(r for r in children if r.info.run_name == "distill" and "loss" in r.data.metrics)
    assert not [k for k in distill.data.metrics if k.startswith("p0")]  # one curve, not one per partition
    assert len(client.get_metric_history(distill.info.run_id, "loss")) >= 2


def test_the_trained_teacher_is_an_mlflow_model_that_teacher_checkpoint_takes_back(finished_run, tmp_path):
    import torch
    from mlflow.tracking import MlflowClient

    from tsgd_ray import layout
    from tsgd_ray.config import ConfigError, load_config
    from tsgd_ray.stages.teacher import run_teacher

    root, _ = finished_run
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("tsgd-ray-default")
    parent = _first_parent(client.search_runs([experiment.experiment_id]))
    model_uri = parent.data.tags["teacher_model"]
    assert re.fullmatch(r"models:/m-[0-9a-f]+", model_uri)
    trained = load_config("default", [f"storage.output_root={root}", *SMALL_RUN])
    reads_the_run = [f"data.shards={root}/shards", f"tracking.tracking_uri=sqlite:///{root}/mlflow.db"]
    imported = load_config(  # writes under tmp_path, reads the finished run's shards and MLflow store
        "default", [f"storage.output_root={tmp_path}", *reads_the_run, *SMALL_RUN, f"teacher.checkpoint={model_uri}"]
    )
    assert imported.teacher.checkpoint == model_uri  # not taken for a relative path
    assert run_teacher(imported)["source"] == "imported"

    def weights(cfg):
        return torch.load(layout.of(cfg).teacher_file, weights_only=True)["state_dict"]

    assert layout.of(imported).teacher_file != layout.of(trained).teacher_file
    assert all(torch.equal(a, b) for a, b in zip(weights(imported).values(), weights(trained).values()))
    missing = load_config(
        "default", [f"storage.output_root={tmp_path / 'other'}", "teacher.checkpoint=runs:/0123abcd/teacher.pt"]
    )
    with pytest.raises(ConfigError, match=r"teacher.checkpoint: cannot fetch runs:/0123abcd/teacher.pt"):
        from tsgd_ray.tracking import read_mlflow_checkpoint

        read_mlflow_checkpoint(missing, missing.teacher.checkpoint)
