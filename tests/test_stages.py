"""The Ray stages on the tiny built-in dataset: exactness against the in-process core, resume,
clear errors, and the whole pipeline with MLflow (Ray Train teacher and students)."""

from __future__ import annotations

import os

import pytest
import torch

from tsgd_ray import storage
from tsgd_ray.core.bn_stats import accumulate_statistics
from tsgd_ray.core.clips import to_model_input
from tsgd_ray.core.models import ModelError
from tsgd_ray.data.in_memory import load_split
from tsgd_ray.data.prepare import run_prepare
from tsgd_ray.data.video import probe
from tsgd_ray.distributed import layout
from tsgd_ray.distributed.layout import read_tensors
from tsgd_ray.distributed.distill import partition_uri, run_distill
from tsgd_ray.distributed.merge import MergeError, load_synthetic, run_merge
from tsgd_ray.distributed.run import results_table, run_stages
from tsgd_ray.distributed.stats import load_init, load_statistics, run_stats
from tsgd_ray.distributed.teacher import load_teacher, run_teacher
from tsgd_ray.tracking import Tracker, compare_runs

from conftest import tiny_config
from stage_helpers import imported_config, teacher_file

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return teacher_file(tmp_path_factory.mktemp("teacher"))


def test_stats_and_distill_match_the_in_process_core(ray_session, tmp_path, teacher_path):
    cfg = imported_config(tmp_path / "out", teacher_path, "distill.actors=2", "distill.ipc=2")
    run_prepare(cfg)
    assert run_teacher(cfg)["source"] == "imported"
    run_stats(cfg)
    clips, labels, classes = load_split(cfg, "train")
    teacher = load_teacher(cfg, classes)
    x = to_model_input(clips, cfg.data.mean, cfg.data.std)
    expected = accumulate_statistics(teacher, [(x[i : i + 5], labels[i : i + 5]) for i in range(0, len(x), 5)], len(classes))
    assert load_statistics(cfg) == expected  # integer sums: bit-identical whatever the block order

    init = load_init(cfg)
    assert torch.bincount(init["labels"]).tolist() == [2] * len(classes)
    assert init["indices"].tolist() == [0, 1] * len(classes)

    summary = run_distill(cfg)
    assert summary["recovered"] == 4 and summary["actor_failures"] == 0
    run_merge(cfg)
    videos, merged_labels, merged_classes = load_synthetic(cfg)
    assert merged_classes == classes and merged_labels.tolist() == init["labels"].tolist()
    parts = [read_tensors(partition_uri(cfg, p, ".pt")) for p in range(4)]
    assert torch.equal(videos, torch.cat([p["videos"] for p in parts]))  # merge keeps every bit, in order


def test_reruns_skip_finished_work_and_merge_names_missing_classes(ray_session, tmp_path, teacher_path):
    cfg = imported_config(tmp_path / "out", teacher_path)
    run_prepare(cfg)
    run_teacher(cfg)
    run_stats(cfg)
    assert run_stats(cfg)["skipped"] and run_teacher(cfg)["skipped"]
    run_distill(cfg)
    # lose one partition (as if its actor died before writing): merge names its classes
    for suffix in (".json", ".pt"):
        os.unlink(partition_uri(cfg, 2, suffix))
    classes = load_split(cfg, "test")[2]
    with pytest.raises(MergeError, match=rf"{classes[4]} \(0\), {classes[5]} \(0\)"):
        run_merge(cfg)
    before = {p: os.stat(partition_uri(cfg, p, ".json")).st_mtime_ns for p in (0, 1, 3)}
    summary = run_distill(cfg)
    assert (summary["skipped"], summary["recovered"]) == (3, 1)
    assert {p: os.stat(partition_uri(cfg, p, ".json")).st_mtime_ns for p in (0, 1, 3)} == before
    manifest = run_merge(cfg)
    assert manifest["num_videos"] == 8 and run_merge(cfg)["skipped"]
    frames = probe(storage.read_bytes(storage.join(layout.synthetic_dir(cfg), manifest["preview"])))
    assert frames.num_frames == cfg.data.num_frames and frames.width >= 2 * 64


def test_imported_teacher_with_another_class_map_is_refused(ray_session, tmp_path, teacher_path):
    from tsgd_ray.core.models import checkpoint_bytes, load_checkpoint
    from tsgd_ray.distributed.teacher import new_teacher

    cfg = imported_config(tmp_path / "out", teacher_path)
    run_prepare(cfg)
    names = load_split(cfg, "test")[2]
    model = load_checkpoint(new_teacher(cfg, len(names)), teacher_path.read_bytes(), names)
    swapped = tmp_path / "swapped.pt"
    swapped.write_bytes(checkpoint_bytes(model, [names[1], names[0], *names[2:]]))
    with pytest.raises(ModelError, match="same names in another order"):
        run_teacher(imported_config(tmp_path / "out", swapped))
    assert not storage.list_files(str(tmp_path / "out" / "teacher"))  # nothing half-written


def test_pipeline_with_ray_train_and_mlflow_then_one_key_changed(ray_session, tmp_path):
    """The whole pipeline (Ray Train teacher and students, `full` streamed), its MLflow runs, and a
    second run differing only in tsgf.enabled: it reuses the teacher and statistics, and the two
    parent runs are found by search_runs and carry the same metric names."""
    from mlflow.tracking import MlflowClient

    common = ["teacher.width=8", "teacher.depth=2", "teacher.epochs=2", "teacher.cpus_per_worker=1",
              "distill.iterations=5", "evaluate.epochs=2", "evaluate.seeds=[0,1]", "evaluate.cpus_per_worker=1",
              "data.cache_clips=true", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=stages"]
    cfg = tiny_config(tmp_path / "out", *common, "evaluate.baselines=[random_real,full]")
    with Tracker(cfg, "run") as tracker:
        results = run_stages(cfg, tracker=tracker)
    assert [r["method"] for r in results] == ["tsgd", "random_real", "full"]
    for r in results:
        assert len(r["top1"]) == 2 and all(0 <= a <= b <= 1 for a, b in zip(r["top1"], r["top5"]))
        assert r["test_clips"] == 16
    table = results_table(results)
    assert "| tsgd | 1 |" in table and "| full | all |" in table

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(tracker.run_id)
    assert parent.data.params["tsgf.enabled"] == "True" and parent.data.tags["git_commit"]
    assert parent.data.tags["dataset_manifest_sha256"] and parent.data.tags["teacher_sha256"]
    children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{tracker.run_id}'")
    stages = sorted(r.data.tags["stage"] for r in children)
    assert stages == sorted(["teacher", "stats", "distill", "merge", "distill", "merge",
                             "evaluate/tsgd", "evaluate/random_real", "evaluate/full"])
    teacher_run = next(r for r in children if r.data.tags["stage"] == "teacher")
    assert [m.step for m in client.get_metric_history(teacher_run.info.run_id, "loss")] == [0, 1]
    distill_run = next(r for r in children if r.data.tags["stage"] == "distill" and r.data.tags["method"] == "tsgd")
    assert client.get_metric_history(distill_run.info.run_id, "p00000/loss")
    merge_run = next(r for r in children if r.data.tags["stage"] == "merge")
    artifacts = {a.path for a in client.list_artifacts(merge_run.info.run_id, "synthetic")}
    assert {"synthetic/manifest.json", "synthetic/previews"} <= artifacts

    off = tiny_config(tmp_path / "out", *common, "tsgf.enabled=false")
    assert layout.teacher_dir(off) == layout.teacher_dir(cfg) and layout.stats_dir(off) == layout.stats_dir(cfg)
    with Tracker(off, "run") as tracker_off:
        run_stages(off, tracker=tracker_off)
    runs = client.search_runs([tracker.experiment_id], "tags.command = 'run' and attributes.status = 'FINISHED'")
    by_flag = {r.data.params["tsgf.enabled"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(by_flag) == {"True", "False"}
    assert {"tsgd/top1_mean", "tsgd/top5_mean"} <= set(by_flag["True"].data.metrics) & set(by_flag["False"].data.metrics)
    off_children = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{tracker_off.run_id}'")
    assert "teacher" not in {r.data.tags["stage"] for r in off_children}  # reused, not retrained

    table = compare_runs(off).splitlines()  # `tsgd-ray compare`: newest first, only what differs
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["run", "evaluate.baselines", "tsgf.enabled"] and "tsgd top-1 %" in header
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert [(row[0][-9:-1], row[2]) for row in rows] == [(tracker_off.run_id[:8], "False"), (tracker.run_id[:8], "True")]
    top1 = header.index("tsgd top-1 %")
    for row, run in zip(rows, (by_flag["False"], by_flag["True"])):
        assert row[top1] == f"{100 * run.data.metrics['tsgd/top1_mean']:.1f} +- {100 * run.data.metrics['tsgd/top1_std']:.1f}"
