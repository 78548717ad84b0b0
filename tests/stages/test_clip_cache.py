"""The clip cache: a split is decoded once, then teacher epochs and evaluation passes read clips."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import tiny_config

from tsgd_ray import layout, storage
from tsgd_ray.config import ConfigError, Method
from tsgd_ray.data import clip_cache
from tsgd_ray.data.node_cache import NodeCache
from tsgd_ray.data.pipeline import ClipStream, clip_dataset, expected_rows
from tsgd_ray.data.shards import read_manifest, shard_uris, shards_root
from tsgd_ray.methods import method_config
from tsgd_ray.stages.pipeline import STAGES, run_stages
from tsgd_ray.stages.prepare import decode_once, run_prepare
from tsgd_ray.stages.teacher import run_teacher

pytestmark = pytest.mark.usefixtures("ray_session")

TEACHER = ["teacher.width=8", "teacher.depth=2", "teacher.cpus_per_worker=1", "teacher.batch_size=8"]


def by_video(batches) -> dict[str, np.ndarray]:
    return {v: clip.numpy() for b in batches for v, clip in zip(b["video_id"], b["clip"])}


def test_the_cache_holds_the_clips_live_decoding_gives(tmp_path):
    cfg = tiny_config(tmp_path, "data.decode_batch_size=5")
    run_prepare(cfg)
    expected = expected_rows(cfg, "train")
    live = by_video(ClipStream(clip_dataset(cfg, "train"), expected, 0.0, 7))
    marker = clip_cache.ensure(cfg, "train")
    assert marker["bad"] == 0 and clip_cache.rows(marker) == expected == 32
    assert all(0 < f["rows"] <= 5 for f in marker["views"][0]["files"])  # a file per decode batch of <= 5
    cached = by_video(clip_cache.batches(marker, 0, 7))
    assert cached.keys() == live.keys()
    assert all(np.array_equal(cached[v], live[v]) for v in live)

    # ranks split the clips between them, every clip once, within one file's rows of each other
    shares = [list(by_video(clip_cache.batches(marker, 0, 4, rank=r, world=3))) for r in range(3)]
    assert sorted(v for share in shares for v in share) == sorted(live)
    assert max(map(len, shares)) - min(map(len, shares)) <= 5  # one file
    # a training pass shuffles by its seed: the same seed, the same order
    orders = [[v for b in clip_cache.batches(marker, 0, 4, shuffle_seed=s) for v in b["video_id"]] for s in (1, 1, 2)]
    assert orders[0] == orders[1] != orders[2] and sorted(orders[2]) == sorted(live)

    # built once: asking again reads the marker, whatever happened to the videos since
    for uri in shard_uris(shards_root(cfg), read_manifest(shards_root(cfg)), "train"):
        os.remove(uri)
    assert clip_cache.ensure(cfg, "train") == marker


def test_random_sampling_trains_each_epoch_on_its_own_window(tmp_path):
    with pytest.raises(ConfigError, match="data.clip_cache=true"):
        tiny_config(tmp_path, "data.sampling=random", "data.clip_cache=false")
    cfg = tiny_config(tmp_path, "data.sampling=random", "data.frame_interval=1", "data.views_per_video=2")
    run_prepare(cfg)
    marker = clip_cache.ensure(cfg, "train")
    epochs = [by_video(clip_cache.batches(marker, e, 8)) for e in range(3)]
    moved = sum(not np.array_equal(epochs[0][v], epochs[1][v]) for v in epochs[0])
    assert moved >= len(epochs[0]) // 2  # 9 windows per video: most of them differ
    assert all(np.array_equal(epochs[0][v], epochs[2][v]) for v in epochs[0])  # epoch 2 reads view 0 again
    tested = clip_cache.ensure(cfg, "test", num_views=1)
    assert len(tested["views"]) == 1


def test_a_second_teacher_epoch_decodes_nothing(tmp_path):
    """Teacher epochs read the cache: with the videos gone after the first run, a two-epoch
    teacher still trains, so neither of its epochs decoded a video."""
    first = tiny_config(tmp_path, *TEACHER, "teacher.epochs=1")
    run_prepare(first)
    assert len(run_teacher(first)["history"]) == 1
    root = shards_root(first)
    for uri in shard_uris(root, read_manifest(root), "train"):
        os.remove(uri)
    with pytest.raises(storage.NotFound):  # nothing else could decode them now
        storage.read_bytes(shard_uris(root, read_manifest(root), "train")[0])
    marker = run_teacher(tiny_config(tmp_path, *TEACHER, "teacher.epochs=2"))
    assert [h["bad_videos"] for h in marker["history"]] == [0, 0]
    assert all(np.isfinite(h["loss"]) for h in marker["history"])


def test_teacher_workers_read_a_remote_cache_through_the_node_cache(s3_root, tmp_path):
    """On S3 with data.node_cache_dir set: the teacher's worker keeps every file it read in the
    node's folder, and a later pass over them reads no byte from the store."""
    node_dir = tmp_path / "node"
    cfg = tiny_config(s3_root, *TEACHER, "teacher.epochs=2", f"data.node_cache_dir={node_dir}")
    run_prepare(cfg)
    history = run_teacher(cfg)["history"]
    assert history[0]["store_bytes"] > 0 and history[1]["store_bytes"] == 0  # the second epoch: none
    marker = clip_cache.ensure(cfg, "train")
    node = NodeCache.for_config(cfg)
    kept = {p for _, _, p in node.files()}
    assert {node.path(storage.join(marker["folder"], f["path"])) for f in marker["views"][0]["files"]} <= kept
    remote = [b for b in clip_cache.batches(marker, 0, 8, node=node)]
    assert sum(len(b["video_id"]) for b in remote) == clip_cache.rows(marker)
    assert node.counters["remote_bytes"] == 0 and node.counters["hits"] == len(marker["views"][0]["files"])


def test_live_decoding_still_trains_without_a_cache(tmp_path):
    """data.clip_cache=false: the teacher decodes through Ray Data on every pass and writes no cache."""
    cfg = tiny_config(tmp_path, *TEACHER, "teacher.epochs=2", "data.clip_cache=false")
    run_prepare(cfg)
    marker = run_teacher(cfg)
    assert [h["bad_videos"] for h in marker["history"]] == [0, 0]
    assert not (tmp_path / "clips").exists()


def test_once_prepared_a_whole_run_decodes_nothing_more(tmp_path):
    """prepare decodes every clip a run trains or tests on, once per view (random sampling, two
    views): with every video then gone, the teacher, stats, init, distill, merge and the students
    of tsgd, random_real and full all run, on clips read from the cache."""
    cfg = tiny_config(
        tmp_path,
        *TEACHER,
        "teacher.epochs=1",
        "data.sampling=random",
        "data.views_per_video=2",
        "data.frame_interval=1",
        "distill.ipc=1",
        "distill.iterations=3",
        "distill.cpus_per_actor=0.5",
        "evaluate.epochs=1",
        "evaluate.full.epochs=1",
        "evaluate.seeds=[0]",
        "evaluate.baselines=[random_real,full]",
    )
    run_prepare(cfg)
    caches = decode_once(cfg)
    counts = {split: sum(c.values()) for split, c in read_manifest(shards_root(cfg))["counts"].items()}
    assert counts == {"train": 32, "test": 16}
    assert {split: clip_cache.decodes(m) for split, m in caches.items()} == {"train": 2 * 32, "test": 16}
    assert decode_once(cfg) == caches  # built once
    root = shards_root(cfg)
    for split in counts:
        for uri in shard_uris(root, read_manifest(root), split):
            os.remove(uri)

    results = run_stages(cfg, STAGES[1:])
    assert [r["method"] for r in results] == ["tsgd", "random_real", "full"]
    assert all(np.isfinite(r["top1_mean"]) for r in results)
    tsgd = method_config(cfg, Method.tsgd)
    stats = storage.read_json(storage.join(layout.of(tsgd).stats, layout.STATS_MARKER))
    init = storage.read_json(storage.join(layout.of(tsgd).init, layout.INIT_MARKER))
    assert stats["source"] == "clip_cache" and stats["clips"] == 32 and stats["decodes"] == 0
    assert init["videos"] == 8 and init["decodes"] == 0
