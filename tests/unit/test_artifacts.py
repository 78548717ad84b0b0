"""The pieces of the bounded-memory stages that need no Ray: partition planning by memory, clip
tables (row groups per class, reads of some classes or of one reader's rows), and the per-class
best-candidate lists that probe actors merge."""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from tsgd_ray.config import ConfigError
from tsgd_ray.core.selection import BestPerClass, seeded_priority
from tsgd_ray.data import clip_table
from tsgd_ray.stages.distill import plan_partitions


def test_partitions_are_planned_by_count_and_by_memory():
    assert plan_partitions(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    by_memory = plan_partitions(700, 4, ipc=50, max_videos=1000)  # 35k videos: at least 35 partitions
    assert len(by_memory) == 35 and max(len(p) for p in by_memory) * 50 <= 1000
    assert sum(by_memory, []) == list(range(700))
    assert plan_partitions(3, 8) == [[0], [1], [2]]  # never more partitions than classes
    with pytest.raises(ConfigError, match="max_videos_per_partition=10 is less than distill.ipc=20"):
        plan_partitions(5, 1, ipc=20, max_videos=10)


def _clips(n: int, shape=(2, 4, 4, 3), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_a_clip_table_has_a_row_group_per_class_and_reads_back_exactly(tmp_path, monkeypatch):
    labels = np.array([2, 0, 1, 0, 2, 1, 0])
    indices = np.array([0, 1, 0, 0, 1, 1, 2])
    clips = _clips(len(labels))
    uri = str(tmp_path / "t.parquet")
    heats = clips[:, 0, :, :, 0]  # any uint8 (N, H, W)
    (tmp_path / "t.parquet").write_bytes(
        clip_table.clip_table_bytes(clips, labels, indices, [f"v{i}" for i in range(7)], heats)
    )
    parquet = pq.ParquetFile(uri)
    assert parquet.num_row_groups == 3  # one per class
    every = clip_table.concat_clips(list(clip_table.read_clip_tables([uri], clips.shape[1:])), clips.shape[1:])
    order = np.lexsort((indices, labels))
    assert every["labels"].tolist() == labels[order].tolist() and every["indices"].tolist() == indices[order].tolist()
    assert np.array_equal(every["clips"].numpy(), clips[order]) and np.array_equal(every["heat"].numpy(), heats[order])
    one = clip_table.concat_clips(list(clip_table.read_clip_tables([uri], clips.shape[1:], {1})), clips.shape[1:])
    assert one["video_ids"] == ["v2", "v5"]
    read_groups = []
    real_read = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, g, *a, **k: read_groups.append(g) or real_read(self, g, *a, **k)
    )

    def shares(world):
        out = []
        for r in range(world):
            read_groups.clear()
            part = clip_table.read_clip_tables([uri], clips.shape[1:], rank=r, world=world)
            out.append((clip_table.concat_clips(list(part), clips.shape[1:]), list(read_groups)))
        return out

    # as many groups as readers or more: whole groups, largest first to the least loaded reader,
    # and a reader reads only its own groups
    (half0, groups0), (half1, groups1) = shares(2)
    assert sorted(half0["video_ids"] + half1["video_ids"]) == sorted(every["video_ids"])
    assert (half0["labels"].unique().tolist(), half1["labels"].unique().tolist()) == ([0], [1, 2])
    assert (groups0, groups1) == ([0], [1, 2])
    # fewer groups than readers: every reader reads every group and keeps every world-th row
    quarters = shares(4)
    assert sorted(v for q, _ in quarters for v in q["video_ids"]) == sorted(every["video_ids"])
    assert [len(q["labels"]) for q, _ in quarters] == [2, 2, 2, 1] and all(g == [0, 1, 2] for _, g in quarters)
    monkeypatch.undo()
    # a class larger than a row group is split, never mixed with another class
    monkeypatch.setattr(clip_table, "ROW_GROUP_BYTES", 2 * clips[0].nbytes)
    (tmp_path / "s.parquet").write_bytes(clip_table.clip_table_bytes(clips, labels, indices, [""] * 7))
    groups = pq.ParquetFile(str(tmp_path / "s.parquet"))
    per_group = [set(groups.read_row_group(g).column("label").to_pylist()) for g in range(groups.num_row_groups)]
    assert all(len(g) == 1 for g in per_group) and groups.num_row_groups == 4  # class 0 (3 rows) in 2 groups


def test_best_per_class_does_not_depend_on_order_or_on_how_it_is_split():
    entries = [(c, random.Random(i).random(), {"video_id": f"c{c}-{i}"}) for i in range(300) for c in range(3)]
    whole = BestPerClass(5)
    for c, key, e in entries:
        whole.add(c, key, e)
    shuffled = entries[:]
    random.Random(1).shuffle(shuffled)
    parts = [BestPerClass(5) for _ in range(4)]
    for i, (c, key, e) in enumerate(shuffled):
        parts[i % 4].add(c, key, e)
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert merged.best(4) == whole.best(4) and whole.best(4)[3] == []
    best0 = sorted((k, e["video_id"]) for c, k, e in entries if c == 0)[:5]
    assert [e["video_id"] for e in whole.best(4)[0]] == [v for _, v in best0]
    assert seeded_priority(0, "a") == seeded_priority(0, "a") != seeded_priority(1, "a")


def test_one_reader_gives_a_tables_clips_as_one_view_of_the_column_buffer():
    """The clip cache's files are clip tables too (rows as decoded, lz4): `clip_table.rows` reads
    them back as they were written, the clips a view of the column's buffer, not a copy per clip."""
    import io

    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (5, 2, 4, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 2, 1, 0])
    data = clip_table.clip_table_bytes(
        clips, labels, None, [f"v{i}" for i in range(5)], views=np.full(5, 2), by_class=False, compression="lz4"
    )
    got = clip_table.rows(pq.read_table(io.BytesIO(data)), clips.shape[1:])
    assert np.array_equal(got["clip"], clips) and got["label"].tolist() == labels.tolist()
    assert got["view"].tolist() == [2] * 5 and got["video_id"] == [f"v{i}" for i in range(5)] and got["heat"] is None
    assert not got["clip"].flags.owndata


def test_a_cache_file_has_a_row_group_per_clip_and_read_rows_fetches_only_the_named_ones(tmp_path, monkeypatch):
    """`clip_table.read_rows` (init's reads of chosen clips): the rows asked for, in that order,
    repeats kept, from the row groups that hold them and no others."""
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (6, 2, 4, 4, 3), dtype=np.uint8)
    ids = [f"v{i}" for i in range(6)]
    path = tmp_path / "cache.parquet"
    path.write_bytes(clip_table.clip_table_bytes(clips, np.arange(6) % 2, None, ids, by_class=False, group_rows=1))
    assert pq.ParquetFile(str(path)).num_row_groups == 6
    read = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_groups", lambda self, gs, *a, **k: read.append(gs) or real(self, gs, *a, **k)
    )
    got = clip_table.read_rows(str(path), [4, 1, 4], clips.shape[1:])
    assert got["video_id"] == ["v4", "v1", "v4"] and np.array_equal(got["clip"], clips[[4, 1, 4]])
    assert got["label"].tolist() == [0, 1, 0] and read == [[1, 4]]
    with pytest.raises(IndexError, match="holds 6 rows"):
        clip_table.read_rows(str(path), [6], clips.shape[1:])
    # groups of several rows: a row is found within its group
    path.write_bytes(clip_table.clip_table_bytes(clips, np.arange(6) % 2, None, ids, by_class=False, group_rows=4))
    assert pq.ParquetFile(str(path)).num_row_groups == 2
    assert clip_table.read_rows(str(path), [5, 2], clips.shape[1:])["video_id"] == ["v5", "v2"]
