"""Decode once: a split's decoded clips as Parquet under the output root, read by every later pass.

Teacher epochs, the statistics pass, init, the `full` baseline's epochs and every evaluation seed
read these files instead of decoding the videos again::

    <output_root>/clips/<key>/<split>/view-<v>/<hash[:2]>/part-<hash>.parquet   one decoded block each
    <output_root>/clips/<key>/<split>/cache.json                      the marker (written last)

`prepare` builds the caches of the training and evaluation splits on CPU decoders, before any stage
books a GPU (`tsgd_ray.stages.prepare.decode_once`), so a run decodes every clip once per view.

`key` names the shard set (its plan hash) and the decode settings (frames, size, interval,
sampling, and the seed and view count where sampling is random). A file is a clip table
(`tsgd_ray.data.clip_table`) of the good clips of one decoded block, rows as decoded, a row group
per clip; its name is a hash of its video ids and view, so a rebuild after a failure writes the
same files again (write-once) and orphans of a different block split are never read (only the
marker's files are). Undecodable videos are counted once, at build time.

`data.sampling=random` draws a new window per epoch: the cache holds `data.views_per_video`
windows per video, view v decoded with the random stream of epoch v, and epoch e reads view
e % views_per_video. Other samplings are deterministic: one view.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import TemporalSampling
from tsgd_ray.data import clip_table
from tsgd_ray.data.clip_table import clip_table_bytes
from tsgd_ray.data.node_cache import NodeCache
from tsgd_ray.data.pipeline import READ_CPUS, TooManyBadVideos, clip_dataset, expected_rows
from tsgd_ray.data.shards import read_manifest, shards_root
from tsgd_ray.storage import OutputRoot

log = logging.getLogger(__name__)

MARKER = "cache.json"
FORMAT = 2  # of the files: clip tables (`tsgd_ray.data.clip_table`); part of the key
#: a worker reads this many files ahead of the one it trains on
PREFETCH = 2


def views(cfg: DictConfig) -> int:
    """Windows cached per video: data.views_per_video for random sampling, else 1."""
    return int(cfg.data.views_per_video) if cfg.data.sampling == TemporalSampling.random else 1


def cache_key(cfg: DictConfig) -> str:
    """What the cached clips depend on: the shard set and the decode settings."""
    d = cfg.data
    random_sampling = d.sampling == TemporalSampling.random
    settings = {
        "format": FORMAT,
        "shards": read_manifest(shards_root(cfg))["plan_hash"],
        "frames": d.num_frames,
        "size": [d.height, d.width],
        "interval": d.frame_interval,
        "sampling": d.sampling.value,
        "seed": cfg.seed if random_sampling else None,
        "views": views(cfg),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(cfg: DictConfig, split: str) -> str:
    return OutputRoot(cfg.storage.output_root).uri("clips", cache_key(cfg), split)


def _write_block(batch: dict[str, np.ndarray], folder: str, view: int) -> dict[str, np.ndarray]:
    """A Ray Data UDF after ClipDecoder: write a batch's good clips as one file (write-once);
    returns one row {path, rows, errors (a JSON list)}."""
    ok = batch["ok"].astype(bool)
    errors = [str(e) for e in batch["error"][~ok]]
    ids = [str(v) for v in batch["video_id"][ok]]
    name = hashlib.sha256(json.dumps([view, ids]).encode()).hexdigest()[:20]
    path = f"view-{view}/{name[:2]}/part-{name}.parquet"  # hashed prefixes spread S3's request load
    if ids:
        data = clip_table_bytes(
            np.asarray(batch["clip"][ok]),
            np.asarray(batch["label"][ok]),
            None,
            ids,
            views=np.full(len(ids), view),
            by_class=False,
            compression="lz4",
            group_rows=1,  # init reads just the clips it chose (`clip_table.read_rows`)
        )
        storage.write_once(storage.join(folder, path), data)
    return {"path": np.array([path]), "rows": np.array([len(ids)]), "errors": np.array([json.dumps(errors)])}


def ensure(cfg: DictConfig, split: str, num_views: Optional[int] = None) -> dict:
    """The marker of `split`'s clip cache, building the cache first (with Ray Data) if it has none.

    num_views: how many views to build (default `views(cfg)`; 1 for a split only ever tested).
    Returns {"split", "views": [{"files": [{"path", "rows"}], "rows"}], "bad": int, "errors": [...],
    "shape": [F, H, W, 3], "folder": the cache's folder (not stored)}; file paths are relative to
    that folder, so readers never derive it (and read the shard manifest) again.

    Raises:
        TooManyBadVideos: more than data.max_bad_fraction of the split failed to decode.
        ManifestError: the shards are not prepared.
    """
    folder = cache_dir(cfg, split)
    marker_uri = storage.join(folder, MARKER)
    wanted = views(cfg) if num_views is None else num_views
    if storage.exists(marker_uri):
        marker = storage.read_json(marker_uri)
        if len(marker["views"]) >= wanted:
            return {**marker, "folder": folder}
    expected = expected_rows(cfg, split)
    built, errors = [], []
    for view in range(wanted):
        files = []
        written = clip_dataset(cfg, split, epoch=view).map_batches(
            _write_block,
            batch_size=cfg.data.decode_batch_size,  # Ray splits decoded blocks; a file takes a whole batch
            num_cpus=READ_CPUS,
            fn_kwargs={"folder": folder, "view": view},
        )
        for row in written.iter_rows():
            if int(row["rows"]):
                files.append({"path": str(row["path"]), "rows": int(row["rows"])})
            errors.extend(json.loads(str(row["errors"])))
            if len(errors) > int(cfg.data.max_bad_fraction * expected * (view + 1)):
                raise TooManyBadVideos(
                    f"{len(errors)} of {expected} {split} videos failed to decode, more than "
                    f"data.max_bad_fraction allows; e.g. {errors[:3]}"
                )
        files.sort(key=lambda f: f["path"])
        built.append({"files": files, "rows": sum(f["rows"] for f in files)})
        log.info("clip cache: %s view %d: %d clips decoded once, %d bad", split, view, built[-1]["rows"], len(errors))
    marker = {
        "split": split,
        "views": built,
        "bad": len(errors),
        "errors": errors[:100],
        "shape": [cfg.data.num_frames, cfg.data.height, cfg.data.width, 3],
    }
    if not storage.write_json_once(marker_uri, marker):  # another run finished first, or with fewer views
        existing = storage.read_json(marker_uri)
        if len(existing["views"]) >= wanted:
            return {**existing, "folder": folder}
        storage.remove(marker_uri)  # the files of its views are among ours: replace it with the larger one
        storage.write_json_once(marker_uri, marker)
    return {**marker, "folder": folder}


def decodes(marker: dict) -> int:
    """Videos decoded to build the cache of `marker`: every view's clips and its failures."""
    return sum(v["rows"] for v in marker["views"]) + int(marker["bad"])


def assign_files(files: list[dict], rank: int, world: int) -> list[dict]:
    """This rank's files: largest first to the rank with the fewest rows (deterministic), so ranks
    differ by at most one file's rows (DDP's join context absorbs the difference)."""
    loads = [0] * world
    mine = []
    for f in sorted(files, key=lambda f: (-f["rows"], f["path"])):
        r = min(range(world), key=lambda i: (loads[i], i))
        loads[r] += f["rows"]
        if r == rank:
            mine.append(f)
    return mine


def read_file(uri: str, shape: tuple[int, ...], node: Optional[NodeCache]) -> dict[str, Any]:
    """One cache file's clips (a view of the column's buffer, `clip_table.rows`), labels and ids,
    through the node cache when there is one."""
    with node.open(uri) if node else storage.open_parquet(uri) as f:
        return clip_table.rows(pq.read_table(f, columns=["clip", "label", "video_id"]), shape)


def batches(
    marker: dict,
    epoch: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    shuffle_seed: Optional[int] = None,
    node: Optional[NodeCache] = None,
) -> Iterator[dict]:
    """This rank's share of the cached clips of view `epoch % views`, in batches (marker: from `ensure`).

    node: the node-local cache remote files are read through (`NodeCache.for_config`); None reads
    the output root directly.
    shuffle_seed: None reads files and rows in order (tests); else files in a seeded order and rows
    shuffled within a buffer of about 4 batches. Files are read PREFETCH ahead in threads.
    Yields {"clip": (B, F, H, W, 3) uint8 tensor, "label": (B,) int64 tensor, "video_id": list[str]}
    (the shape `ClipStream` yields).
    """
    view = marker["views"][epoch % len(marker["views"])]
    files = assign_files(view["files"], rank, world)
    rng = random.Random(shuffle_seed)
    if shuffle_seed is not None:
        rng.shuffle(files)
    folder, shape = marker["folder"], tuple(marker["shape"])
    buffer: list[dict] = []
    held = 0

    def drain(final: bool) -> Iterator[dict]:
        nonlocal buffer, held
        if not buffer:
            return
        merged = {
            "clip": np.concatenate([b["clip"] for b in buffer]),
            "label": np.concatenate([b["label"] for b in buffer]),
            "video_id": [v for b in buffer for v in b["video_id"]],
        }
        order = np.arange(len(merged["label"]))
        if shuffle_seed is not None:
            rng.shuffle(order)
        cut = len(order) if final else len(order) - len(order) % batch_size
        for start in range(0, cut, batch_size):
            rows = order[start : min(start + batch_size, cut)]
            yield {
                "clip": torch.from_numpy(merged["clip"][rows]),
                "label": torch.from_numpy(merged["label"][rows]),
                "video_id": [merged["video_id"][i] for i in rows],
            }
        rest = order[cut:]
        buffer = [{k: (v[rest] if k != "video_id" else [v[i] for i in rest]) for k, v in merged.items()}]
        held = len(rest)

    with ThreadPoolExecutor(PREFETCH) as pool:
        pending = [pool.submit(read_file, storage.join(folder, f["path"]), shape, node) for f in files[:PREFETCH]]
        for i in range(len(files)):
            block = pending.pop(0).result()
            if i + PREFETCH < len(files):
                pending.append(pool.submit(read_file, storage.join(folder, files[i + PREFETCH]["path"]), shape, node))
            buffer.append(block)
            held += len(block["label"])
            if held >= 4 * batch_size or shuffle_seed is None:
                yield from drain(final=False)
        yield from drain(final=True)


#: batches assembled ahead of the one training takes
BATCHES_AHEAD = 2
_END = object()


def prefetched(batches: Iterable[dict], pin: bool = False, ahead: int = BATCHES_AHEAD) -> Iterator[dict]:
    """`batches` assembled `ahead` of the consumer in a background thread, their tensors in
    page-locked memory when `pin` (CUDA only), so `.to(device, non_blocking=True)` overlaps the copy
    with compute. The same batches in the same order; the producer's exception is raised here;
    leaving the loop early stops the producer (within 0.1 s of its current batch)."""
    ready: queue.Queue = queue.Queue(ahead)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if pin:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if not offer(batch):
                    return
            offer(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            offer(exc)

    producer = threading.Thread(target=produce, name="tsgd-prefetch", daemon=True)
    producer.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        producer.join(timeout=5)


def rows(marker: dict, epoch: int = 0) -> int:
    """Clips in the view an epoch reads."""
    return int(marker["views"][epoch % len(marker["views"])]["rows"])


def steps(marker: dict, world: int, batch_size: int) -> int:
    """Optimiser steps per epoch of the busiest rank (an upper bound for the schedule)."""
    view = marker["views"][0]
    busiest = max((sum(f["rows"] for f in assign_files(view["files"], r, world)) for r in range(world)), default=0)
    return max(1, math.ceil(busiest / batch_size))
