"""The Ray Data pipeline from shards to clips, and its consumer side.

``read shard rows -> map_batches(decode_batch) -> {clip, label, video_id, ok, error}``

A clip is (F, H, W, 3) uint8 (frames last-channel, as decoded); `ok` is False for a video that
failed to decode (its clip is zeros and `error` says why). Consumers use :class:`ClipStream`,
which drops and counts those rows and stops with :class:`TooManyBadVideos` once more than
``data.max_bad_fraction`` of the split has failed. It works on a Dataset as well as on the
DataIterator a Ray Train worker gets from ``ray.train.get_dataset_shard``.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import TemporalSampling
from tsgd_ray.data.shards import ManifestError, read_manifest, shard_uris, shards_root
from tsgd_ray.data.video import VideoDecodeError, clip_rng, decode_clip, decode_view
from tsgd_ray.errors import UserError

log = logging.getLogger(__name__)

READ_CPUS = 0.25


class TooManyBadVideos(UserError, RuntimeError):
    """More than data.max_bad_fraction of a split's videos failed to decode."""


class ClipDecoder:
    """A batch of shard rows -> a batch of clips (in Ray Data's decode tasks, `decode_batch`, and
    in the stats and init stages).

    Output columns: clip (N, F, H, W, 3) uint8, label (N,) int64, video_id (N,) str,
    ok (N,) bool, error (N,) str. Never raises for a bad video. `decodes` counts the videos it
    has tried to decode (every view, failures too).
    """

    def __init__(
        self,
        num_frames: int,
        height: int,
        width: int,
        interval: int,
        sampling: str,
        seed: int = 0,
        epoch: int = 0,
        threads: int = 1,
    ):
        torch.set_num_threads(1)
        self.shape = (num_frames, height, width, 3)
        self.interval = interval
        self.sampling = TemporalSampling(sampling)
        self.seed, self.epoch = seed, epoch
        # decord and PyAV release the GIL while decoding: threads decode videos side by side
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.decodes = 0

    @classmethod
    def from_config(cls, cfg: DictConfig, epoch: int = 0, threads: int = 1) -> "ClipDecoder":
        d = cfg.data
        return cls(d.num_frames, d.height, d.width, d.frame_interval, d.sampling.value, cfg.seed, epoch, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An optional `view` column (int) asks for `decode_view`'s candidate views instead of the
        configured clip where it is >= 1."""
        n = len(batch["video_id"])
        views = batch.get("view")
        clips = np.zeros((n, *self.shape), dtype=np.uint8)
        ok = np.ones(n, dtype=bool)
        errors = np.full(n, "", dtype=object)

        def decode(i: int) -> None:
            video_id = str(batch["video_id"][i])
            rng = clip_rng(self.seed, video_id, self.epoch) if self.sampling == TemporalSampling.random else None
            view = 0 if views is None else int(views[i])
            try:
                if view:
                    clips[i] = decode_view(
                        bytes(batch["video"][i]), *self.shape[:3], self.interval, self.seed, video_id, view
                    )
                else:
                    clips[i] = decode_clip(bytes(batch["video"][i]), *self.shape[:3], self.interval, self.sampling, rng)
            except VideoDecodeError as exc:
                ok[i], errors[i] = False, f"{video_id}: {exc}"

        list(self.pool.map(decode, range(n)) if self.pool else map(decode, range(n)))
        self.decodes += n
        return {
            "clip": clips,
            "label": batch["label"].astype(np.int64),
            "video_id": batch["video_id"],
            "ok": ok,
            "error": errors,
        }


def decode_batch(batch: dict[str, np.ndarray], **settings) -> dict[str, np.ndarray]:
    """A Ray Data task UDF: `ClipDecoder(**settings)(batch)`.

    Tasks, not an actor pool: Ray Data hands a decoder actor its constructor arguments through the
    object store, and with the actor restarts it asks for by default Ray warns on every run that
    such a restart can fail (ray-project/ray#53727); a decode task lost with its worker is simply
    run again. The decoder holds no state worth keeping between batches."""
    return ClipDecoder(**settings)(batch)


def read_shard_rows(
    batch: dict[str, np.ndarray], rows_per_block: int, labels: Optional[list[int]] = None
) -> Iterator[dict]:
    """A Ray Data generator UDF: shard URIs in, their rows (video_id, label, video) out, one
    Parquet row group slice of at most `rows_per_block` rows at a time, optionally only `labels`."""
    wanted = None if labels is None else np.asarray(labels, dtype=np.int64)
    for uri in batch["uri"]:
        with storage.open_parquet(str(uri)) as f:
            for part in pq.ParquetFile(f).iter_batches(
                batch_size=rows_per_block, columns=["video_id", "label", "video"]
            ):
                out = {k: part.column(k).to_numpy(zero_copy_only=False) for k in ("video_id", "label", "video")}
                if wanted is not None:
                    keep = np.isin(out["label"].astype(np.int64), wanted)
                    out = {k: v[keep] for k, v in out.items()}
                if len(out["label"]):
                    yield out


def clip_dataset(cfg: DictConfig, split: str, labels: Optional[Sequence[int]] = None, epoch: int = 0):
    """A lazy Ray Dataset of decoded clips of `split`, optionally only the given labels.

    The shards are read by our own tasks (a quarter CPU each, from the manifest's file list), not by
    `ray.data.read_parquet`: Ray 2.60's reader lists the files in a task that needs a whole CPU,
    which a Ray Train worker and the decoders can leave unavailable on a small machine (a silent
    deadlock).

    Raises:
        ManifestError: if the shards are not prepared or the split has none.
    """
    import ray

    root = shards_root(cfg)
    manifest = read_manifest(root)
    paths = shard_uris(root, manifest, split)
    if not paths:
        raise ManifestError(f"no shards for split {split!r} under {root} (splits: {sorted(manifest['counts'])})")
    d = cfg.data
    ds = ray.data.from_items([{"uri": p} for p in paths], override_num_blocks=len(paths)).map_batches(
        read_shard_rows,
        batch_size=1,
        num_cpus=READ_CPUS,
        fn_kwargs={
            "rows_per_block": d.decode_batch_size,
            "labels": None if labels is None else [int(x) for x in labels],
        },
    )
    # One block feeds one decoder actor: blocks of about decode_batch_size rows keep every actor
    # busy (Ray would otherwise pack a shard into one block; `repartition` would need a whole CPU).
    shards = [s for s in manifest["shards"] if s["split"] == split and s["rows"] > 0]
    row_bytes = sum(s["bytes"] for s in shards) / max(1, sum(s["rows"] for s in shards))
    ds.context.target_max_block_size = max(2**16, int(d.decode_batch_size * row_bytes))
    ds.context.execution_options.preserve_order = d.preserve_order  # a seed fixes the order students see
    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "num_frames": d.num_frames,
            "height": d.height,
            "width": d.width,
            "interval": d.frame_interval,
            "sampling": d.sampling.value,
            "seed": cfg.seed,
            "epoch": epoch,
        },
        batch_size=d.decode_batch_size,
        compute=ray.data.TaskPoolStrategy(size=d.decode_actors),
        num_cpus=d.decode_cpus_per_actor,
    )


def expected_rows(cfg: DictConfig, split: str, labels: Optional[Sequence[int]] = None) -> int:
    """How many videos `split` holds (for the given labels), from the manifest."""
    manifest = read_manifest(shards_root(cfg))
    names = manifest["classes"]
    wanted = None if labels is None else {names[i] for i in labels}
    return sum(n for c, n in manifest["counts"].get(split, {}).items() if wanted is None or c in wanted)


class ClipStream:
    """Iterate good clips as torch batches, counting (and bounding) the bad ones.

    Args:
        source: a Ray Dataset or DataIterator of :class:`ClipDecoder` rows.
        expected: how many rows the full pass holds (the bound is a fraction of it).
        max_bad_fraction: more bad rows than this fraction of `expected` raises TooManyBadVideos.
    Yields:
        {"clip": (B, F, H, W, 3) uint8 tensor, "label": (B,) int64 tensor, "video_id": list[str]}
    """

    def __init__(
        self, source, expected: int, max_bad_fraction: float, batch_size: int = 32, shuffle_seed: Optional[int] = None
    ):
        self.source, self.expected, self.batch_size = source, expected, batch_size
        # A local shuffle (a buffer of a few batches) when a seed is given: for training passes.
        self.shuffle = (
            {}
            if shuffle_seed is None
            else {"local_shuffle_buffer_size": 4 * batch_size, "local_shuffle_seed": shuffle_seed}
        )
        self.max_bad = int(max_bad_fraction * expected)
        self.seen = 0
        self.bad: list[str] = []

    def __iter__(self) -> Iterator[dict]:
        for batch in self.source.iter_batches(batch_size=self.batch_size, batch_format="numpy", **self.shuffle):
            ok = batch["ok"].astype(bool)
            self.seen += len(ok)
            if not ok.all():
                self.bad.extend(str(e) for e in batch["error"][~ok])
                log.warning(
                    "skipped %d undecodable video(s): %s",
                    int((~ok).sum()),
                    "; ".join(map(str, batch["error"][~ok]))[:500],
                )
                if len(self.bad) > self.max_bad:
                    raise TooManyBadVideos(
                        f"{len(self.bad)} of {self.expected} videos failed to decode, more than "
                        f"data.max_bad_fraction allows ({self.max_bad}); e.g. {self.bad[:3]}"
                    )
            if ok.any():
                yield {
                    "clip": torch.from_numpy(np.ascontiguousarray(batch["clip"][ok])),
                    "label": torch.from_numpy(batch["label"][ok]),
                    "video_id": [str(v) for v in batch["video_id"][ok]],
                }
