"""`prepare`: shards and manifest from real video trees, local and on the loopback S3 server."""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import REPO, UCF_CLASSES, make_ucf101_tree, tiny_config, upload_tree, write_video

from tsgd_ray import storage
from tsgd_ray.data.shards import MANIFEST, ManifestError, read_manifest, shards_root
from tsgd_ray.data.video import probe
from tsgd_ray.stages.prepare import decode_once, run_prepare

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def _shard_rows(root, manifest):
    fs, _ = storage.filesystem(root)
    rows = []
    for s in manifest["shards"]:
        with fs.open(storage.filesystem(storage.join(root, s["path"]))[1], "rb") as f:
            rows.extend(pq.read_table(f).to_pylist())
    return rows


def test_prepare_ucf101_from_s3_lists_the_corrupt_files(tmp_path, s3_root, ray_session):
    truncated = write_video(tmp_path / "t.avi", num_frames=40, codec="mpeg4")[:3000]
    corrupt = {
        "Archery/v_Archery_g11_c01.avi": b"RIFF\x00\x00garbage" * 100,
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g12_c01.avi": truncated,
    }
    make_ucf101_tree(tmp_path / "ucf", corrupt=corrupt)
    upload_tree(tmp_path / "ucf", f"{s3_root}/ucf")
    cfg = tiny_config(f"{s3_root}/out", "data.dataset=ucf101", f"data.root={s3_root}/ucf", "data.shard_target_mb=0.03")

    manifest = run_prepare(cfg)

    root = shards_root(cfg)
    assert root == f"{s3_root}/out/shards"
    assert storage.read_json(storage.join(root, MANIFEST)) == manifest == read_manifest(root)
    assert sorted(s["uri"] for s in manifest["skipped"]) == sorted(f"{s3_root}/ucf/UCF-101/{r}" for r in corrupt)
    reasons = {s["uri"].split("/UCF-101/")[1]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        "Archery/v_Archery_g11_c01.avi": "not a video file",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g12_c01.avi": "truncated file",
    }
    assert all(s["stage"] == "probe" and s["detail"] for s in manifest["skipped"])  # the decoders' words
    assert manifest["classes"] == UCF_CLASSES
    assert manifest["counts"] == {"test": {c: 2 for c in UCF_CLASSES}, "train": {c: 3 for c in UCF_CLASSES}}
    assert len(manifest["shards"]) > 2 and manifest["num_videos"] == 15
    rows = _shard_rows(root, manifest)
    assert sorted(r["video_id"] for r in rows) == sorted({r["video_id"] for r in rows})  # no duplicates
    for row in rows:
        assert UCF_CLASSES[row["label"]] == row["class_name"]
        assert probe(row["video"]).num_frames == row["num_frames"] == 12
    shard_objects = {
        s["path"]: storage.filesystem(storage.join(root, s["path"]))[0].info(storage.join(root, s["path"]))[
            "LastModified"
        ]
        for s in manifest["shards"]
    }

    assert run_prepare(cfg) == manifest  # a finished set is returned, nothing rewritten
    fs = storage.filesystem(root)[0]
    fs.invalidate_cache()
    assert shard_objects == {p: fs.info(storage.join(root, p))["LastModified"] for p in shard_objects}


def test_prepare_resumes_only_unfinished_shards(tmp_path, ray_session):
    cfg = tiny_config(tmp_path / "out")
    manifest = run_prepare(cfg)
    root = shards_root(cfg)
    assert len(manifest["shards"]) >= 3
    lost = manifest["shards"][1]["path"]
    os.remove(os.path.join(root, MANIFEST))  # as if the driver died after writing some shards
    os.remove(os.path.join(root, lost))
    os.remove(os.path.join(root, "_parts", lost.replace("/", "-").replace(".parquet", ".json")))
    kept = {s["path"]: os.path.getmtime(os.path.join(root, s["path"])) for s in manifest["shards"] if s["path"] != lost}

    assert run_prepare(cfg) == manifest
    assert kept == {p: os.path.getmtime(os.path.join(root, p)) for p in kept}
    assert os.path.exists(os.path.join(root, lost))

    with pytest.raises(ManifestError, match="another dataset or setting"):
        run_prepare(tiny_config(tmp_path / "out", "data.transcode_short_side=32"))


def test_two_prepares_in_separate_roots_write_the_same_bytes(tmp_path, ray_session):
    """The built-in videos generated under each root's own cache, shards and clip caches written
    there: byte for byte the same (x264 held to deterministic code, sources named relative to the
    dataset root), so one config and seed give one table on any clone."""
    one, two = (tiny_config(tmp_path / name, f"storage.cache_root={tmp_path / name / 'cache'}") for name in "ab")
    first, second = run_prepare(one), run_prepare(two)
    assert first["shards"] == second["shards"] and first["plan_hash"] == second["plan_hash"]
    for shard in first["shards"]:
        path = shard["path"]
        assert storage.read_bytes(storage.join(shards_root(one), path)) == storage.read_bytes(
            storage.join(shards_root(two), path)
        ), path
    caches = [decode_once(cfg)["train"] for cfg in (one, two)]
    files = [[f["path"] for f in c["views"][0]["files"]] for c in caches]
    assert files[0] == files[1]
    for path in files[0]:
        assert storage.read_bytes(storage.join(caches[0]["folder"], path)) == storage.read_bytes(
            storage.join(caches[1]["folder"], path)
        ), path


def test_prepare_transcodes_to_the_short_side(tmp_path, ray_session):
    root = tmp_path / "videos"
    for i in range(3):
        write_video(root / "train" / "a" / f"{i}.mp4", height=96, width=128, num_frames=20)
    cfg = tiny_config(tmp_path / "out", "data.dataset=folder", f"data.root={root}", "data.transcode_short_side=48")
    manifest = run_prepare(cfg)
    rows = _shard_rows(shards_root(cfg), manifest)
    assert {(r["height"], r["width"], r["num_frames"]) for r in rows} == {(48, 64, 20)}
    assert manifest["transcode_short_side"] == 48


@pytest.mark.timeout(420)
@pytest.mark.full  # a scale test
def test_prepare_streams_a_dataset_far_larger_than_the_object_store(tmp_path):
    """200 MB of video through a Ray whose object store holds 80 MB, in its own process."""
    big = write_video(tmp_path / "big.mp4", num_frames=48, height=240, width=320)  # noise: hard to compress
    source = tmp_path / "videos" / "train" / "noise"
    source.mkdir(parents=True)
    copies = max(8, -(-200 * 2**20 // len(big)))
    for i in range(copies):
        (source / f"{i:03d}.mp4").write_bytes(big)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [
        sys.executable,
        "-m",
        "tsgd_ray.cli",
        "prepare",
        "default",
        "data.dataset=folder",
        f"data.root={tmp_path / 'videos'}",
        f"storage.output_root={out}",
        "data.shard_target_mb=16",
        "ray.object_store_mb=80",
        f"ray.temp_dir={REPO / '.cache' / 'ray-small'}",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(str(out / "shards"))
    total = sum(s["bytes"] for s in manifest["shards"])
    assert manifest["num_videos"] == copies and total > 2.4 * 80 * 2**20
