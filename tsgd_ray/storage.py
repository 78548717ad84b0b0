"""Object storage: URI -> filesystem, write-once atomic puts, listings.

The only module that knows about fsspec, s3fs and pyarrow filesystems. A URI is a local path,
``file://...``, ``s3://bucket/key`` or anything else fsspec knows. Credentials and endpoints come
from the standard AWS environment and config files (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...);
nothing here reads, prints or logs them.

Writes are write-once: an object appears whole or not at all (local files are written to a
temporary name and linked into place; on S3 a conditional PUT), and an object that exists is never
overwritten, so a crash never leaves a half object that a later stage trusts, and of two writers
racing for one object (a zombie actor and its replacement, two runs of one config) one wins.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import time
import uuid
from typing import Any, Callable, Iterable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tsgd_ray.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRIES = 4
RETRY_BASE_SECONDS = 0.5


class StorageError(UserError, OSError):
    """A storage operation failed after retries; the message names the URI."""


class NotFound(StorageError, FileNotFoundError):
    """No object at the URI (a FileNotFoundError too, so `except FileNotFoundError` still holds)."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError))


_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError")  # botocore's, by name


def with_retries(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry `fn(uri, ...)` on transient I/O errors with exponential backoff."""

    @functools.wraps(fn)
    def wrapper(uri: str, *args: Any, **kwargs: Any) -> T:
        for attempt in range(RETRIES):
            try:
                return fn(uri, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                if type(exc).__name__ in _NO_CREDENTIALS:
                    raise StorageError(
                        f"{fn.__name__}({uri}): no credentials for this store (set AWS_PROFILE, the "
                        "AWS_* variables or an instance role)"
                    ) from None
                if not _transient(exc) or attempt == RETRIES - 1:
                    if _transient(exc):
                        raise StorageError(f"{fn.__name__}({uri}) failed after {RETRIES} tries: {exc}") from exc
                    if isinstance(exc, FileNotFoundError) and not isinstance(exc, NotFound):
                        raise NotFound(f"no such file: {uri}") from exc
                    raise
                delay = RETRY_BASE_SECONDS * 2**attempt
                log.warning("%s(%s) failed (%s); retrying in %.1fs", fn.__name__, uri, type(exc).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    return wrapper


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    return fsspec.core.url_to_fs(uri)


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def _to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def arrow_filesystem(uri: str):
    """A pyarrow filesystem and path for `uri` (for pyarrow and Ray Data readers): pyarrow's own
    for local paths and s3:// (native C++ reads, no Python in the loop), fsspec's through a shim
    for anything else."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    if uri.startswith("s3://"):
        return _native_s3(path.split("/", 1)[0]), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


@functools.lru_cache(maxsize=64)
def _native_s3(bucket: str):
    """pyarrow's S3 filesystem for `bucket`, configured from the same AWS sources as s3fs:
    credentials from the environment, AWS_PROFILE and the config files, the endpoint from
    AWS_ENDPOINT_URL (an S3-compatible store) when set. On AWS it is built for the bucket's own
    region (one filesystem serves one region: a bucket elsewhere would fail every read while s3fs
    listings work); the configured region where that cannot be looked up."""
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        return pafs.S3FileSystem(endpoint_override=host.rstrip("/"), scheme=scheme)
    try:
        return pafs.S3FileSystem(region=pafs.resolve_s3_region(bucket))
    except OSError as exc:  # no network to AWS, or a name S3 does not know: reads will say more
        log.warning("could not look up the region of s3://%s (%s); using the configured one", bucket, exc)
        return pafs.S3FileSystem()


@with_retries
def open_parquet(uri: str):
    """A random-access file for reading the Parquet file at `uri` with pyarrow (caller closes it):
    native reads on local disk and S3 (`arrow_filesystem`)."""
    fs, path = arrow_filesystem(uri)
    return fs.open_input_file(path)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (no normalisation of '..')."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}" if part else out
    return out


def absolute(uri: str) -> str:
    """A local path made absolute; remote URIs unchanged (so Ray workers see the same place)."""
    fs, path = filesystem(uri)
    return os.path.abspath(path) if isinstance(fs, LocalFileSystem) else uri


class OutputRoot:
    """The one place the pipeline writes to; refuses paths that would leave it.

    >>> OutputRoot("s3://bucket/run").uri("shards", "train-00000.parquet")
    's3://bucket/run/shards/train-00000.parquet'
    """

    def __init__(self, root: str):
        self.root = absolute(root).rstrip("/")

    def uri(self, *parts: str) -> str:
        """The URI of `parts` under the root.

        Raises:
            ValueError: if a part is absolute or climbs out with '..'.
        """
        joined = "/".join(p.strip() for p in parts if p)
        rel = posixpath.normpath(joined)
        if rel.startswith("/") or rel == ".." or rel.startswith("../") or "://" in joined:
            raise ValueError(f"refusing to write outside the output root {self.root}: {'/'.join(parts)}")
        return self.root if rel == "." else f"{self.root}/{rel}"

    def __repr__(self) -> str:
        return f"OutputRoot({self.root!r})"


@with_retries
def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


@with_retries
def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


@with_retries
def size(uri: str) -> int:
    fs, path = filesystem(uri)
    return int(fs.size(path))


@with_retries
def write_once(uri: str, data: bytes) -> bool:
    """Write `data` to `uri` atomically unless an object is already there.

    Returns True when written, False when the object already existed (it is left untouched).
    """
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if `path` exists
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    if fs.exists(path):  # cheap, and spares uploading what is there; the create below decides races
        return False
    try:
        # a conditional create (on S3 a PUT with If-None-Match: *, or a multipart upload completed
        # with it): visible whole or not at all, and of two concurrent writers exactly one wins
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def write_json_once(uri: str, obj: Any) -> bool:
    return write_once(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_json(uri: str, obj: Any) -> None:
    """Replace the object at `uri`: remove it, then write once (a reader in between finds none).
    For a stage marker whose outputs were redone, under the stage's lease only."""
    remove(uri)
    write_json_once(uri, obj)


@with_retries
def remove(uri: str) -> None:
    """Remove one object if present (a stage lease's old generations, a marker being replaced)."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm_file(path)


def list_files(uri: str, extensions: Iterable[str] | None = None) -> list[str]:
    """Every file under `uri` (recursive), sorted, as URIs; optionally only these extensions.

    A missing folder gives an empty list.
    """
    return sorted(file_sizes(uri, extensions))


@with_retries
def file_sizes(uri: str, extensions: Iterable[str] | None = None) -> dict[str, int]:
    """Size in bytes of every file under `uri` (recursive), keyed by URI, optionally only these
    extensions; one listing call. A missing folder gives an empty dict."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return {}
    exts = None if extensions is None else {"." + e.lower().lstrip(".") for e in extensions}
    return {
        _to_uri(fs, p): int(info["size"])
        for p, info in sorted(fs.find(path, detail=True).items())
        if (exts is None or os.path.splitext(p)[1].lower() in exts) and ".tmp-" not in p
    }
