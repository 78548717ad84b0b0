"""Storage on the local disk and on a real S3 server on loopback (moto)."""

import os
import threading

import pytest

from tsgd_ray import storage


def test_write_once_never_overwrites(store_root):
    uri = storage.join(store_root, "a", "b.bin")
    assert not storage.exists(uri)
    assert storage.write_once(uri, b"first") is True
    assert storage.write_once(uri, b"second") is False
    assert storage.read_bytes(uri) == b"first"
    assert storage.size(uri) == 5


def test_json_roundtrip_and_listing(store_root):
    storage.write_json_once(storage.join(store_root, "x", "m.json"), {"k": [1, 2]})
    storage.write_once(storage.join(store_root, "x", "v.mp4"), b"\x00" * 10)
    storage.write_once(storage.join(store_root, "y", "w.AVI"), b"\x00" * 3)
    assert storage.read_json(storage.join(store_root, "x", "m.json")) == {"k": [1, 2]}
    videos = storage.list_files(store_root, ["mp4", "avi"])
    assert [v.rsplit("/", 2)[-2:] for v in videos] == [["x", "v.mp4"], ["y", "w.AVI"]]
    assert all(v.startswith(storage.absolute(store_root)) for v in videos)
    sizes = storage.file_sizes(store_root)
    assert sorted(sizes.values()) == [3, 10, sorted(sizes.values())[2]] and len(sizes) == 3
    assert storage.list_files(storage.join(store_root, "nothing-here")) == []


def test_missing_object_raises_file_not_found(store_root):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(store_root, "missing.bin"))


def test_concurrent_writers_leave_exactly_one_whole_object(store_root, monkeypatch):
    """Eight writers race for one object; on S3 each also misses the others' objects in its
    existence check (as a zombie actor and its replacement can), so only the conditional create
    (If-None-Match) can keep the first write. The winner's bytes stay."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "exists", lambda self, path, **kw: False)
    uri = storage.join(store_root, "race.bin")
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    results = {}
    barrier = threading.Barrier(len(payloads))

    def write(i: int) -> None:
        barrier.wait()
        results[i] = storage.write_once(uri, payloads[i])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(results) == len(payloads) and len(winners) == 1
    assert storage.read_bytes(uri) == payloads[winners[0]]
    for i in range(len(payloads)):  # later writers, the check missing the object too, change nothing
        assert storage.write_once(uri, payloads[i]) is False
    assert storage.read_bytes(uri) == payloads[winners[0]]
    monkeypatch.undo()
    assert storage.list_files(store_root) == [storage.absolute(uri)]  # no temporary object left behind


def test_output_root_refuses_to_leave_the_root(tmp_path):
    out = storage.OutputRoot(str(tmp_path / "run"))
    assert out.uri("shards", "train", "part-00000.parquet") == f"{tmp_path}/run/shards/train/part-00000.parquet"
    for bad in (["..", "etc"], ["/etc/passwd"], ["a/../../b"], ["s3://other/x"]):
        with pytest.raises(ValueError, match="outside the output root"):
            out.uri(*bad)
    assert storage.OutputRoot("s3://bucket/run/").uri("a") == "s3://bucket/run/a"


def test_transient_errors_are_retried_then_reported(monkeypatch):
    calls = []

    @storage.with_retries
    def flaky(uri):
        calls.append(uri)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    monkeypatch.setattr(storage, "RETRY_BASE_SECONDS", 0.001)
    assert flaky("s3://b/k") == "ok" and len(calls) == 3

    @storage.with_retries
    def dead(uri):
        raise TimeoutError("read timed out")

    with pytest.raises(storage.StorageError, match=r"dead\(s3://b/k\) failed after 4 tries"):
        dead("s3://b/k")


def test_credentials_never_reach_error_messages(s3_root):
    # A missing bucket gives an error that names the URI but not the secret key.
    with pytest.raises(Exception) as info:
        storage.read_bytes("s3://no-such-bucket-xyz/k")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(info.value)


def test_parquet_is_read_natively_from_disk_and_s3(store_root):
    """Parquet on local disk and S3 is read through pyarrow's own filesystems (no fsspec shim in
    the read loop), configured from the same AWS environment as s3fs (the loopback server here)."""
    import io

    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(1000))}), buf, row_group_size=100)
    uri = storage.join(store_root, "t.parquet")
    storage.write_once(uri, buf.getvalue())
    fs, _ = storage.arrow_filesystem(uri)
    assert isinstance(fs, pafs.S3FileSystem if uri.startswith("s3://") else pafs.LocalFileSystem)
    with storage.open_parquet(uri) as f:
        parquet = pq.ParquetFile(f)
        assert parquet.num_row_groups == 10
        assert parquet.read_row_group(3).column("x").to_pylist() == list(range(300, 400))


def test_the_native_s3_filesystem_takes_each_buckets_region(monkeypatch):
    """One pyarrow S3 filesystem serves one region: on AWS each bucket gets its own region's (a
    bucket in another region would fail every Parquet read while s3fs listings work)."""
    import pyarrow.fs as pafs

    regions = {"eu-data": "eu-central-1", "us-data": "us-west-2"}

    def resolve(bucket):
        if bucket not in regions:
            raise OSError("no such bucket")
        return regions[bucket]

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(pafs, "resolve_s3_region", resolve)
    storage._native_s3.cache_clear()
    try:
        assert storage.arrow_filesystem("s3://eu-data/k400/a.parquet")[0].region == "eu-central-1"
        assert storage.arrow_filesystem("s3://us-data/x.parquet")[0].region == "us-west-2"
        assert storage.arrow_filesystem("s3://elsewhere/x.parquet")[0].region == "us-east-1"  # the configured one
    finally:
        storage._native_s3.cache_clear()
