"""A node-local, bounded, least-recently-used copy of remote files, shared by the processes of a node.

    <folder>/<h[:2]>/<h>.<ext>     a whole remote file, named by a hash h of its URI
    <folder>/<h[:2]>/<h>.lock      held (flock) by the one process downloading it
    <folder>/evict.lock            held while a process evicts

`NodeCache.open(uri)` opens a file's bytes for reading: a local URI where it is; a remote one from
the folder, downloaded first when it is not there (cold) by ranged reads of `RANGE_BYTES`,
`PARALLEL` at a time, into a temporary file renamed into place, so a reader never sees part of a
file and the workers of a node download each file once. A hit refreshes the file's modification
time (the LRU order). After downloads the least recently used files are removed until the folder
holds at most `max_bytes` (scanned once per max_bytes / 64 a process downloads, so the folder may
pass the bound by that much per process); a file already opened stays readable (it is memory-mapped).

Only write-once URIs may be cached (the clip cache's files are): the cache never checks whether the
remote object changed. Counters of this process: `NodeCache.counters` (remote bytes and requests,
hits, misses, evictions).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from omegaconf import DictConfig

from tsgd_ray import storage

log = logging.getLogger(__name__)

RANGE_BYTES = 8 * 2**20
PARALLEL = 8
#: the longest a process waits for another's download of the same file before fetching it itself
LOCK_WAIT_SECONDS = 600.0


@contextmanager
def _locked(path: Path, wait: float = LOCK_WAIT_SECONDS) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created), polling up to `wait` seconds; yields whether
    the lock was taken (False: waited out, the caller goes on without it). A dead holder's lock is
    released by the kernel."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("node cache: %s still locked after %.0f s; going on without it", path, wait)
                    yield False
                    return
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)  # releases the lock


@storage.with_retries
def _read_range(uri: str, start: int, end: int) -> bytes:
    fs, path = storage.filesystem(uri)
    return fs.cat_file(path, start=start, end=end)


class NodeCache:
    """The node's cache at `folder`, bounded to `max_bytes`."""

    def __init__(self, folder: str, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.counters = {"remote_bytes": 0, "remote_requests": 0, "hits": 0, "misses": 0, "evictions": 0}
        self._unscanned = 0  # bytes this process downloaded since it last scanned the folder
        self._lock = threading.Lock()  # the counters, across a reader's prefetch threads

    @staticmethod
    def for_config(cfg: DictConfig) -> Optional["NodeCache"]:
        """This process's cache of `data.node_cache_dir` / `data.node_cache_gib` (one per folder, so
        its counters add up over passes); None when the folder is empty."""
        d = cfg.data
        return _instance(d.node_cache_dir, int(d.node_cache_gib * 2**30)) if d.node_cache_dir else None

    def _count(self, **add: int) -> None:
        with self._lock:
            for key, n in add.items():
                self.counters[key] += n

    def path(self, uri: str) -> Path:
        """Where `uri`'s copy lives in the folder (whether or not it is there)."""
        digest = hashlib.sha256(uri.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}{Path(uri).suffix}"

    def open(self, uri: str):
        """A pyarrow file (memory-mapped) of `uri`'s bytes; a local URI is opened where it is.

        Raises:
            storage.NotFound: no object at `uri`.
            storage.StorageError: the store failed after retries.
        """
        import pyarrow as pa

        if storage.is_local(uri):
            return pa.memory_map(storage.filesystem(uri)[1])
        for _ in range(3):  # a file evicted between fetch and open is fetched again
            local = self.fetch(uri)
            try:
                return pa.memory_map(str(local))
            except FileNotFoundError:
                continue
        raise storage.StorageError(
            f"node cache: {uri} was evicted as soon as it was fetched; raise data.node_cache_gib"
        )

    def fetch(self, uri: str) -> Path:
        """The local copy of remote `uri`, downloaded unless the folder has it."""
        local = self.path(uri)
        if self._touch(local):
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        with _locked(local.with_suffix(".lock")):
            if self._touch(local):  # another worker of this node downloaded it meanwhile
                return local
            size = self._download(uri, local)
        # a scan stats every file of the folder: do it once per 1/64 of the bound downloaded here,
        # not after every file (thousands per node at Kinetics size); the folder may pass its bound
        # by that much per process of the node
        self._unscanned += size
        if self._unscanned >= self.max_bytes / 64:
            self._unscanned = 0
            self._evict(keep=local)
        return local

    def _touch(self, local: Path) -> bool:
        try:
            _stamp(local)
        except FileNotFoundError:
            return False
        self._count(hits=1)
        return True

    def _download(self, uri: str, local: Path) -> int:
        size = storage.size(uri)
        ranges = [(start, min(start + RANGE_BYTES, size)) for start in range(0, size, RANGE_BYTES)]
        part = local.with_name(f"{local.name}.{uuid.uuid4().hex}.part")
        fd = os.open(part, os.O_CREAT | os.O_WRONLY, 0o644)
        try:

            def copy(span: tuple[int, int]) -> None:
                data = _read_range(uri, *span)
                if len(data) != span[1] - span[0]:
                    raise storage.StorageError(f"node cache: short read of {uri} at {span}")
                os.pwrite(fd, data, span[0])

            with ThreadPoolExecutor(min(PARALLEL, max(1, len(ranges)))) as pool:
                list(pool.map(copy, ranges))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
        os.close(fd)
        _stamp(part)
        os.replace(part, local)
        self._count(remote_bytes=size, remote_requests=1 + len(ranges), misses=1)
        return size

    def files(self) -> list[tuple[float, int, Path]]:
        """(modification time, bytes, path) of every cached file, oldest first."""
        found = []
        for p in self.folder.glob("*/*"):
            if p.suffix in (".lock", ".part"):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime, st.st_size, p))
        return sorted(found)

    def _evict(self, keep: Path) -> None:
        with _locked(self.folder / "evict.lock", wait=60) as held:
            if not held:
                return
            files = self.files()
            total = sum(size for _, size, _ in files)
            for _, size, p in files:
                if total <= self.max_bytes:
                    break
                if p == keep:
                    continue
                p.unlink(missing_ok=True)
                total -= size
                self._count(evictions=1)


def _stamp(path: Path) -> None:
    """Set `path`'s modification time (the LRU order) to now from the nanosecond clock: the
    kernel's own file times tick coarsely (milliseconds), so two uses in one tick would tie."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


@functools.lru_cache(maxsize=None)
def _instance(folder: str, max_bytes: int) -> NodeCache:
    return NodeCache(folder, max_bytes)
