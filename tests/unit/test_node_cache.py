"""The node-local cache: remote files come down once per node by ranged reads, stay within their
bound by least-recent use, and are shared by the node's workers; local files are read in place."""

from __future__ import annotations

import threading

import pytest

from tsgd_ray import storage
from tsgd_ray.data import node_cache
from tsgd_ray.data.node_cache import NodeCache

MB = 2**20


def remote_files(root: str, count: int, size: int) -> dict[str, bytes]:
    files = {
        storage.join(root, f"view-0/{i:02d}/part-{i}.parquet"): bytes([i]) * (size - 7) + b"tail-%02d" % i
        for i in range(count)
    }
    for uri, data in files.items():
        storage.write_once(uri, data)
    return files


def read(cache: NodeCache, uri: str) -> bytes:
    with cache.open(uri) as f:
        return f.read()


def test_a_remote_file_comes_down_once_then_reads_touch_no_store(s3_root, tmp_path, monkeypatch):
    monkeypatch.setattr(node_cache, "RANGE_BYTES", MB)  # 3 ranged reads per file, in parallel
    files = remote_files(s3_root, 3, 3 * MB)
    cache = NodeCache(str(tmp_path / "node"), 100 * MB)
    assert all(read(cache, uri) == data for uri, data in files.items())
    first = dict(cache.counters)
    assert first["remote_bytes"] == 9 * MB and first["misses"] == 3 and first["hits"] == 0
    assert first["remote_requests"] == 3 * (1 + 3)  # a size, then three ranges, per file

    for uri in files:  # the store loses them: a second epoch must not need it
        storage.remove(uri)
    assert all(read(cache, uri) == data for uri, data in files.items())
    assert cache.counters["remote_bytes"] == first["remote_bytes"] and cache.counters["hits"] == 3
    assert not list((tmp_path / "node").rglob("*.part"))


def test_the_folder_stays_within_its_bound_evicting_the_least_recently_used(s3_root, tmp_path):
    files = list(remote_files(s3_root, 4, MB))
    cache = NodeCache(str(tmp_path / "node"), int(2.5 * MB))
    read(cache, files[0])
    read(cache, files[1])
    read(cache, files[0])  # files[1] is now the least recently used
    read(cache, files[2])
    kept = {p for _, _, p in cache.files()}
    assert kept == {cache.path(files[0]), cache.path(files[2])} and cache.counters["evictions"] == 1
    assert sum(size for _, size, _ in cache.files()) <= 2.5 * MB
    read(cache, files[1])  # evicted: it comes down again
    assert cache.counters["misses"] == 4


def test_workers_of_a_node_share_one_download(s3_root, tmp_path):
    """Four workers (each its own NodeCache on the same folder, as in four processes) ask for the
    same cold file at once: one downloads it, the others wait for it and read the copy."""
    ((uri, data),) = remote_files(s3_root, 1, 2 * MB).items()
    workers = [NodeCache(str(tmp_path / "node"), 100 * MB) for _ in range(4)]
    out = [None] * 4
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, read(workers[i], uri))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out == [data] * 4
    assert sum(w.counters["remote_bytes"] for w in workers) == 2 * MB
    assert sum(w.counters["misses"] for w in workers) == 1


def test_local_files_are_read_in_place_and_a_missing_remote_file_says_so(s3_root, tmp_path):
    local = tmp_path / "part.parquet"
    local.write_bytes(b"local bytes")
    cache = NodeCache(str(tmp_path / "node"), MB)
    assert read(cache, str(local)) == b"local bytes"
    assert not (tmp_path / "node").exists() and cache.counters["remote_bytes"] == 0
    with pytest.raises(storage.NotFound):
        cache.open(storage.join(s3_root, "no-such-file.parquet"))
    assert not list((tmp_path / "node").rglob("*.part"))
