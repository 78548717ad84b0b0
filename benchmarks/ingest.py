#!/usr/bin/env python3
"""Ingest throughput: the shard -> clip pipeline against plain decord, measured side by side.

    python benchmarks/ingest.py [--copies 40] [--frames 16] [--size 112] [--transcode 128]

Builds a shard set from the real footage (scripts/fetch_footage.py; the built-in dataset when
the cache is empty), `--copies` copies of each file, transcoded to `--transcode` short side like a
production `prepare`. Then decodes every video once into an F x S x S clip three ways, in one run:

    limit     plain decord, one process per core, no Ray (each process reads its shards)
    local     the Ray Data pipeline (read_parquet -> ClipDecoder actors) from local shards
    s3        the same pipeline from the same shards on a loopback S3 server (moto_server)

and prints clips/s, frames/s and the ratios local/limit and s3/limit (targets: local >= 0.8,
s3 >= 0.7). Then it builds the clip cache of the split (decode once) and reads it back the way a
training pass does (`clip_cache.batches`, shuffled batches of 32), against batches gathered
from the same clips held in memory: the cache read's clips/s and its ratio to both.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target  # noqa: E402


def _decode_shards(args) -> int:
    """Worker of the limit: decode every video of the given shard files; returns clips decoded."""
    paths, frames, size = args
    import pyarrow.parquet as pq
    import torch

    from tsgd_ray.config import TemporalSampling
    from tsgd_ray.data.video import decode_clip

    torch.set_num_threads(1)
    n = 0
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=16, columns=["video"]):
            for data in batch.column(0).to_pylist():
                decode_clip(data, frames, size, size, sampling=TemporalSampling.uniform)
                n += 1
    return n


def measure_limit(shard_paths: list[str], frames: int, size: int, processes: int) -> tuple[int, float]:
    groups = [shard_paths[i::processes] for i in range(processes)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        pool.map(_decode_shards, [([], frames, size)] * processes)  # start-up outside the timing
        start = time.perf_counter()
        counts = pool.map(_decode_shards, [(g, frames, size) for g in groups])
        return sum(counts), time.perf_counter() - start


def measure_pipeline(cfg) -> tuple[int, float]:
    from tsgd_ray.data.pipeline import ClipStream, clip_dataset, expected_rows

    start = time.perf_counter()
    stream = ClipStream(clip_dataset(cfg, "train"), expected_rows(cfg, "train"), 0.0, batch_size=32)
    n = sum(len(b["label"]) for b in stream)
    return n, time.perf_counter() - start


def measure_cache(cfg) -> tuple[int, float, float]:
    """(clips, seconds of a shuffled pass over the clip cache, seconds of the same pass over the
    clips in memory); the cache is built first, outside the timing."""
    import numpy as np

    from tsgd_ray.data import clip_cache

    marker = clip_cache.ensure(cfg, "train")
    start = time.perf_counter()
    held = [b["clip"] for b in clip_cache.batches(marker, 0, 32, shuffle_seed=1)]
    cache_seconds = time.perf_counter() - start
    clips = np.concatenate([h.numpy() for h in held])
    order = np.random.default_rng(1).permutation(len(clips))
    start = time.perf_counter()
    n = sum(len(clips[order[i : i + 32]]) for i in range(0, len(clips), 32))
    return n, cache_seconds, time.perf_counter() - start


def _source_tree(workdir: Path, copies: int) -> tuple[Path, str]:
    sys.path.insert(0, str(REPO / "scripts"))
    from fetch_footage import FOOTAGE, default_cache

    cache = default_cache()
    names = [n for n in FOOTAGE if (cache / n).is_file()]
    root = workdir / "videos"
    if not names:
        return root, "builtin"
    if not root.exists():
        for i in range(copies):
            for j, name in enumerate(names):
                dest = root / "train" / f"class{j}" / f"{i:04d}_{name}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(cache / name, dest)  # no extra disk for the copies
                except OSError:
                    shutil.copy(cache / name, dest)
    return root, "footage"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--copies", type=int, default=40, help="copies of each footage file")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--transcode", type=int, default=128, help="short side of the prepared videos (0: keep)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch", type=int, default=64, help="data.decode_batch_size (videos per decoder call)")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench-ingest")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)  # before Ray starts, so its workers reach the S3 server
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import ray

        from tsgd_ray import storage
        from tsgd_ray.config import load_config
        from tsgd_ray.data.shards import shards_root
        from tsgd_ray.stages.prepare import run_prepare

        args.workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(args.workdir / "out", ignore_errors=True)  # shards and cache of an earlier run
        root, source = _source_tree(args.workdir, args.copies)
        common = [
            f"data.num_frames={args.frames}",
            f"data.height={args.size}",
            f"data.width={args.size}",
            "data.sampling=uniform",
            f"data.decode_actors={args.cpus}",
            "data.decode_cpus_per_actor=0.5",
            f"data.decode_batch_size={args.batch}",
            "data.shard_target_mb=16",
            f"data.transcode_short_side={args.transcode}",
            f"storage.output_root={args.workdir / 'out'}",
        ]
        if source == "footage":
            common += ["data.dataset=folder", f"data.root={root}"]
        ray.init(
            num_cpus=args.cpus,
            include_dashboard=False,
            object_store_memory=512 * 2**20,
            log_to_driver=False,
            _temp_dir=str(REPO / ".cache" / "ray-bench"),
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg_local = load_config(None, common)
        print(f"preparing shards from {source} ...", flush=True)
        manifest = run_prepare(cfg_local)
        local_root = shards_root(cfg_local)
        for _ in range(30):
            try:
                import s3fs

                s3fs.S3FileSystem.clear_instance_cache()
                s3fs.S3FileSystem().mkdir("bench")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.5)
        s3_root = "s3://bench/shards"
        for path in storage.list_files(local_root):
            storage.write_once(storage.join(s3_root, path[len(local_root) + 1 :]), storage.read_bytes(path))
        cfg_s3 = load_config(None, common + [f"data.shards={s3_root}"])
        shard_paths = [storage.join(local_root, s["path"]) for s in manifest["shards"] if s["split"] == "train"]
        videos = sum(s["rows"] for s in manifest["shards"] if s["split"] == "train")
        mb = sum(s["bytes"] for s in manifest["shards"]) / 2**20
        print(
            f"{videos} videos in {len(shard_paths)} shards ({mb:.0f} MB); clips of {args.frames}x{args.size}x{args.size}; "
            f"{args.cpus} CPUs",
            flush=True,
        )

        measure_pipeline(cfg_local)  # warm caches and imports
        results = {
            "limit": measure_limit(shard_paths, args.frames, args.size, args.cpus),
            "local": measure_pipeline(cfg_local),
            "s3": measure_pipeline(cfg_s3),
        }
        print(f"{'path':8} {'clips':>6} {'seconds':>8} {'clips/s':>8} {'frames/s':>9} {'ratio':>6}")
        limit_rate = results["limit"][0] / results["limit"][1]
        for name, (n, seconds) in results.items():
            assert n == videos, f"{name} decoded {n} of {videos} clips"
            rate = n / seconds
            print(f"{name:8} {n:6d} {seconds:8.2f} {rate:8.1f} {rate * args.frames:9.0f} {rate / limit_rate:6.2f}")
        n, cache_seconds, memory_seconds = measure_cache(cfg_local)
        assert n == videos, f"the clip cache holds {n} of {videos} clips"
        cache_rate = n / cache_seconds
        print(
            f"clip cache read: {cache_rate:.0f} clips/s, {cache_rate / limit_rate:.1f}x the decode limit; "
            f"in-memory batches {n / memory_seconds:.0f} clips/s (cache / memory {memory_seconds / cache_seconds:.3f})"
        )
        target("ingest_local_over_limit", results["local"][0] / results["local"][1] / limit_rate, ">=", 0.8)
        target("ingest_s3_over_limit", results["s3"][0] / results["s3"][1] / limit_rate, ">=", 0.7)
        target("clip_cache_read_over_decode_limit", cache_rate / limit_rate, ">=", 1.0)
        ray.shutdown()
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
