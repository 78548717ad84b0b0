"""The shard -> clip pipeline on Ray Data: clips, class filter, bad rows, Ray Train workers."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config, write_video

from tsgd_ray import storage
from tsgd_ray.data.pipeline import ClipStream, TooManyBadVideos, clip_dataset, expected_rows
from tsgd_ray.data.shards import SCHEMA_VERSION, SHARD_SCHEMA
from tsgd_ray.runtime import ray_train
from tsgd_ray.stages.prepare import run_prepare

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_session):
    cfg = tiny_config(tmp_path_factory.mktemp("prepared"))
    run_prepare(cfg)
    return cfg


def _all(cfg, split, labels=None, overrides=(), batch_size=16):
    from omegaconf import OmegaConf

    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    stream = ClipStream(clip_dataset(cfg, split, labels), expected_rows(cfg, split, labels), 0.0, batch_size)
    batches = list(stream)
    return stream, {
        vid: (clip, int(label))
        for b in batches
        for vid, clip, label in zip(b["video_id"], b["clip"].numpy(), b["label"])
    }


def test_clips_have_the_configured_shape_and_every_video_once(prepared):
    stream, clips = _all(prepared, "train")
    assert len(clips) == stream.seen == 8 * 4 and stream.bad == []
    for clip, label in clips.values():
        assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8 and 0 <= label < 8
        assert clip.std() > 10  # real pictures, not the zeros of a failed decode


def test_class_filter(prepared):
    stream, clips = _all(prepared, "test", labels=[1, 6])
    assert {label for _, label in clips.values()} == {1, 6} and len(clips) == 4 == expected_rows(
        prepared, "test", [1, 6]
    )


def test_random_offsets_are_reproducible_per_seed_and_epoch(prepared):
    opts = ["data.sampling=random", "data.num_frames=4", "data.frame_interval=2"]
    _, a = _all(prepared, "test", overrides=opts)
    _, b = _all(prepared, "test", overrides=opts)
    _, c = _all(prepared, "test", overrides=opts + ["seed=1"])
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)
    assert any(not np.array_equal(a[k][0], c[k][0]) for k in a)


def test_two_decoders_deliver_clips_in_the_same_order_every_pass(prepared):
    """Reproducible runs: the order in which clips reach a teacher or a student does not depend on
    which decoder finishes first (data.preserve_order)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(prepared, OmegaConf.from_dotlist(["data.decode_actors=2", "data.decode_batch_size=2"]))
    orders = [
        [v for b in ClipStream(clip_dataset(cfg, "train"), expected_rows(cfg, "train"), 0.0, 4) for v in b["video_id"]]
        for _ in range(2)
    ]
    assert orders[0] == orders[1] and len(orders[0]) == 32


def _shard_set_with_bad_videos(root, tmp_path, good, bad):
    rows = []
    for i in range(good):
        data = write_video(tmp_path / f"g{i}.mp4", seed=i)
        rows.append(
            {
                "video_id": f"good/{i}",
                "label": i % 2,
                "class_name": "ab"[i % 2],
                "split": "train",
                "source_uri": f"x/g{i}.mp4",
                "video": data,
                "num_frames": 12,
                "height": 48,
                "width": 64,
                "fps": 10.0,
            }
        )
    for i in range(bad):
        rows.append({**rows[0], "video_id": f"bad/{i}", "video": b"\x00\x00\x00\x18ftypmp42" + bytes(500)})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), buf)
    storage.write_once(f"{root}/train/part-00000.parquet", buf.getvalue())
    storage.write_json_once(
        f"{root}/manifest.json",
        {
            "schema_version": SCHEMA_VERSION,
            "classes": ["a", "b"],
            "counts": {"train": {"a": (good + bad + 1) // 2, "b": (good + bad) // 2}},
            "shards": [{"path": "train/part-00000.parquet", "split": "train", "rows": len(rows), "bytes": buf.tell()}],
            "skipped": [],
        },
    )


def test_a_bad_video_is_a_flagged_counted_row_and_too_many_is_an_error(tmp_path, ray_session):
    root = str(tmp_path / "shards")
    _shard_set_with_bad_videos(root, tmp_path, good=6, bad=2)
    cfg = tiny_config(tmp_path / "out", f"data.shards={root}")
    rows = clip_dataset(cfg, "train").take_all()
    assert sorted(r["video_id"] for r in rows if not r["ok"]) == ["bad/0", "bad/1"]
    assert all("bad/" in r["error"] for r in rows if not r["ok"]) and all(r["error"] == "" for r in rows if r["ok"])

    stream = ClipStream(clip_dataset(cfg, "train"), expected=8, max_bad_fraction=0.25, batch_size=4)
    good = sum(len(b["label"]) for b in stream)
    assert (good, len(stream.bad), stream.seen) == (6, 2, 8)

    with pytest.raises(TooManyBadVideos, match="2 of 8 videos failed to decode"):
        for _ in ClipStream(clip_dataset(cfg, "train"), expected=8, max_bad_fraction=0.2, batch_size=4):
            pass


@pytest.mark.timeout(300)
def test_ray_train_workers_stream_clips(prepared, tmp_path):
    import json
    import os
    import tempfile

    import ray.train
    from omegaconf import OmegaConf
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    expected = expected_rows(prepared, "train")

    def loop(config):
        stream = ClipStream(ray.train.get_dataset_shard("train"), config["expected"], 0.0, batch_size=8)
        ids, shapes = [], set()
        for batch in stream:
            ids.extend(batch["video_id"])
            shapes.add(tuple(batch["clip"].shape[1:]))
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "seen.json"), "w") as f:
                json.dump({"ids": ids, "shapes": sorted(shapes)}, f)
            ray.train.report({"clips": len(ids)}, checkpoint=Checkpoint.from_directory(d))

    cfg = OmegaConf.merge(prepared, OmegaConf.from_dotlist(["data.decode_actors=2", "data.decode_batch_size=2"]))
    datasets = {"train": clip_dataset(cfg, "train")}
    trainer = TorchTrainer(
        loop,
        train_loop_config={"expected": expected},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets=datasets,
        dataset_config=ray_train.data_config(datasets),
        run_config=RunConfig(storage_path=str(tmp_path / "train"), name="feed"),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        seen = json.load(open(os.path.join(d, "seen.json")))
    assert len(seen["ids"]) == len(set(seen["ids"])) == expected
    assert seen["shapes"] == [[8, 32, 32, 3]]
    # the worker sees shard order, as a direct pass does (reproducible teachers and students)
    assert seen["ids"] == [v for b in ClipStream(clip_dataset(cfg, "train"), expected, 0.0, 8) for v in b["video_id"]]


def test_ray_train_keeps_the_datasets_own_order_option(prepared):
    """Ray Train would replace a dataset's execution options with the driver's global ones (where
    preserve_order is off); `data_config` hands each dataset's own options through."""
    from ray.data import DataContext
    from ray.train import DataConfig

    ds = clip_dataset(prepared, "train")
    assert (
        ds.context.execution_options.preserve_order and not DataContext.get_current().execution_options.preserve_order
    )
    assert not DataConfig()._resolve_execution_options("train").preserve_order  # what Ray Train does unless told
    assert ray_train.data_config({"train": ds})._resolve_execution_options("train").preserve_order
