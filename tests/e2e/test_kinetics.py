"""A Kinetics-shaped run end to end: a generated Kinetics-layout dataset with 100 classes (train and
val only, some annotated files missing) on the loopback S3 server, through `tsgd-ray run` with a
tiny teacher and few iterations, evaluated on val; and a missing evaluation split refused before
any Ray work."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import upload_tree
from support.kinetics_layout import make_kinetics_layout

from tsgd_ray import artifacts, layout, storage
from tsgd_ray.cli import main
from tsgd_ray.config import load_config
from tsgd_ray.data import clip_cache
from tsgd_ray.data.shards import read_manifest, shards_root

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

CLASSES, TRAIN, VAL, MISSING = 40, 3, 1, 5


@pytest.fixture(scope="module")
def kinetics_bucket(tmp_path_factory, s3_server) -> tuple[str, dict]:
    local = tmp_path_factory.mktemp("kinetics")
    info = make_kinetics_layout(local, CLASSES, TRAIN, VAL, missing=MISSING, distinct=24, frames=8, size=32)
    uri = f"s3://tsgd-test/kinetics-{hashlib.sha1(str(local).encode()).hexdigest()[:6]}"
    upload_tree(local / "videos", f"{uri}/videos")
    upload_tree(local / "annotations", f"{uri}/annotations")
    return uri, info


def _overrides(bucket: str, tmp_path) -> list[str]:
    return [
        "data.dataset=kinetics",
        f"data.root={bucket}/videos",
        f"data.annotations={bucket}/annotations",
        "data.on_catalog_error=skip",
        "data.num_frames=8",
        "data.height=32",
        "data.width=32",
        "data.shard_target_mb=0.2",
        "data.transcode_short_side=0",
        "data.decode_actors=1",
        "data.decode_cpus_per_actor=0.5",
        "data.decode_batch_size=32",
        "teacher.width=8",
        "teacher.depth=2",
        "teacher.epochs=1",
        "teacher.batch_size=64",
        "teacher.num_workers=1",
        "teacher.cpus_per_worker=1",
        "teacher.gpus_per_worker=0",
        "stats.actors=1",
        "stats.cpus_per_actor=0.5",
        "stats.gpus_per_actor=0",
        "stats.batch_size=64",
        "distill.ipc=1",
        "distill.pack=false",  # packing takes 4 x ipc clips of a class; these classes have TRAIN = 3
        "distill.iterations=2",
        "distill.actors=1",
        "distill.gpus_per_actor=0",
        "distill.chunk_size=50",
        "distill.max_videos_per_partition=12",
        "evaluate.epochs=1",
        "evaluate.seeds=[0]",
        "evaluate.baselines=[]",
        "evaluate.cpus_per_worker=1",
        "evaluate.gpus_per_worker=0",
        f"storage.output_root={bucket}/out-{tmp_path.name}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "tracking.experiment=kinetics",
    ]


def test_kinetics_layout_runs_end_to_end_from_s3_and_is_tested_on_val(ray_session, kinetics_bucket, tmp_path, capsys):
    bucket, info = kinetics_bucket
    overrides = _overrides(bucket, tmp_path)
    assert main(["run", "kinetics400", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "| tsgd | 1 |" in printed

    cfg = load_config("kinetics400", overrides)
    manifest = read_manifest(shards_root(cfg))
    assert sorted(manifest["counts"]) == ["train", "val"] and len(manifest["classes"]) == CLASSES
    assert sum(manifest["counts"]["val"].values()) == info["present"]["val"]
    assert len([s for s in manifest["skipped"] if s["reason"] == "missing file"]) == 2 * MISSING

    results = storage.read_json(layout.of(cfg, cfg.distill.method).results)
    assert results["eval_split"] == "val" and results["test_clips"] == info["present"]["val"]

    plan = storage.read_json(layout.of(cfg).plan)["partitions"]
    assert len(plan) == 4 and max(len(p) for p in plan) <= 12  # max_videos_per_partition raised the count
    synthetic = artifacts.read_synthetic_manifest(cfg)
    assert synthetic["num_videos"] == CLASSES and len(synthetic["files"]) == len(plan)
    for f in synthetic["files"]:
        data = storage.read_bytes(storage.join(layout.of(cfg).synthetic, f["path"]))
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
    init = storage.read_json(storage.join(layout.of(cfg).init, layout.INIT_MARKER))
    assert sum(p["rows"] for p in init["parts"]) == CLASSES
    stats = storage.read_json(storage.join(layout.of(cfg).stats, layout.STATS_MARKER))
    assert stats["clips"] == info["present"]["train"] and stats["classes"] == CLASSES
    # the teacher and the students read decoded clips from the clip cache in the bucket: train once, val once
    for split in ("train", "val"):
        cache = storage.read_json(storage.join(clip_cache.cache_dir(cfg, split), clip_cache.MARKER))
        assert clip_cache.rows(cache) == info["present"][split] and cache["bad"] == 0

    # a second run finds every stage finished: nothing is listed or recomputed
    assert main(["run", "kinetics400", *overrides]) == 0
    assert json.dumps(storage.read_json(layout.of(cfg, cfg.distill.method).results)) == json.dumps(results)


def test_a_missing_evaluation_split_stops_before_any_ray_work(kinetics_bucket, tmp_path, capsys):
    bucket, _ = kinetics_bucket
    overrides = [*_overrides(bucket, tmp_path), "data.eval_split=test"]
    assert main(["run", "kinetics400", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tsgd-ray run: error: data.eval_split: the dataset has no 'test' split")
    assert not storage.list_files(f"{bucket}/out-{tmp_path.name}")  # nothing written, no shard planned
