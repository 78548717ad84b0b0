#!/usr/bin/env python3
"""Object-storage reads of training passes over a remote clip cache, counted by the store.

    python benchmarks/object_reads.py [--files 16] [--clips 64] [--epochs 3] [--workers 1 2 4]

A loopback S3 server (moto's, in this process) behind a counter of requests and response bytes
holds a clip cache of `--files` files of `--clips` clips (16x112x112, Kinetics' clip size). Workers
read it the way Ray Train workers do (`clip_cache.batches`: their own files, shuffled batches),
one after another in this process (the counts do not depend on timing), in three setups:

    direct      no node cache: every pass reads its files from the store
    per node    each worker on its own node, with its own node cache (`data.node_cache_dir`)
    shared      all workers on one node, sharing its cache; then a later stage on that node (a
                `full` student, say) reads every file with one worker

and prints per epoch the bytes and requests the store served, per worker and per node. Targets:
epochs 2 and later read 0 bytes per node; per-worker bytes of epoch 1 fall as 1/workers (log-log
slope against the worker count <= -0.9); a later stage on a warm node reads 0 bytes.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target  # noqa: E402

BUCKET = "tsgd-bench"


class Counted:
    """WSGI middleware: requests and response bytes the store served (GETs and HEADs)."""

    def __init__(self, app):
        self.app, self.requests, self.bytes = app, 0, 0
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        counted = environ["REQUEST_METHOD"] in ("GET", "HEAD")
        for chunk in self.app(environ, start_response):
            if counted:
                with self._lock:
                    self.bytes += len(chunk)
            yield chunk
        if counted:
            with self._lock:
                self.requests += 1

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.bytes, self.requests


def serve() -> tuple[str, Counted]:
    """Start the counted S3 server on a free loopback port; (endpoint, counter)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    counter = Counted(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, counter, True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", counter


def write_cache(root: str, files: int, clips: int) -> dict:
    """A clip-cache marker over `files` files of `clips` random 16x112x112 clips at `root`."""
    import numpy as np

    from tsgd_ray import storage
    from tsgd_ray.data.clip_table import clip_table_bytes

    shape = [16, 112, 112, 3]
    rng = np.random.default_rng(0)
    entries = []
    for i in range(files):
        ids = [f"v{i}-{j}" for j in range(clips)]
        data = rng.integers(0, 256, (clips, *shape), dtype=np.uint8)
        body = clip_table_bytes(data, np.arange(clips) % 10, None, ids, views=np.zeros(clips), by_class=False)
        path = f"view-0/{i:02x}/part-{i}.parquet"
        storage.write_once(storage.join(root, path), body)
        entries.append({"path": path, "rows": clips})
    return {"views": [{"files": entries, "rows": files * clips}], "shape": shape, "folder": root}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--clips", type=int, default=64, help="clips per file")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    endpoint, counter = serve()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import s3fs

    from tsgd_ray.data import clip_cache
    from tsgd_ray.data.node_cache import NodeCache

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    marker = write_cache(f"s3://{BUCKET}/clips", args.files, args.clips)
    total = sum(s3fs.S3FileSystem().size(f"{BUCKET}/clips/{f['path']}") for f in marker["views"][0]["files"])
    print(f"clip cache: {args.files} files, {args.files * args.clips} clips, {total / 2**20:.1f} MiB on the store")

    def epoch(nodes: list, workers: int, e: int) -> list[tuple[int, int]]:
        """Each worker's pass of epoch e; the store's (bytes, requests) per worker."""
        served = []
        for rank in range(workers):
            before = counter.snapshot()
            for _ in clip_cache.batches(marker, e, 8, rank, workers, shuffle_seed=e, node=nodes[rank]):
                pass
            after = counter.snapshot()
            served.append((after[0] - before[0], after[1] - before[1]))
        return served

    later_per_node, first_per_worker, later_stage = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in ("direct", "per node", "shared"):
            for workers in args.workers:
                if setup == "direct":
                    nodes = [None] * workers
                elif setup == "per node":
                    nodes = [NodeCache(f"{tmp}/{workers}-node{r}", 2**40) for r in range(workers)]
                else:
                    nodes = [NodeCache(f"{tmp}/{workers}-shared", 2**40)] * workers
                for e in range(args.epochs):
                    served = epoch(nodes, workers, e)
                    per_worker = [b for b, _ in served]
                    print(
                        f"{setup:>8} {workers} worker(s) epoch {e + 1}: store served "
                        f"{sum(per_worker) / 2**20:7.1f} MiB in {sum(r for _, r in served):4d} requests; "
                        f"per worker {max(per_worker) / 2**20:6.1f} MiB at most"
                    )
                    if setup == "per node":
                        if e == 0:
                            first_per_worker[workers] = sum(per_worker) / workers
                        else:
                            later_per_node.append(max(per_worker))
                if setup == "shared":
                    served = epoch(nodes[:1], 1, 0)
                    later_stage.append(served[0][0])
                    print(f"  shared then 1 worker, a later stage: store served {served[0][0] / 2**20:.1f} MiB")
    xs = sorted(first_per_worker)
    slope = (math.log(first_per_worker[xs[-1]]) - math.log(first_per_worker[xs[0]])) / (
        math.log(xs[-1]) - math.log(xs[0])
    )
    print()
    target("epoch2plus_store_bytes_per_node", max(later_per_node), "<=", 0, 0)
    target("epoch1_per_worker_bytes_slope_vs_workers", slope, "<=", -0.9)
    target("later_stage_store_bytes_on_a_warm_node", max(later_stage), "<=", 0, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
