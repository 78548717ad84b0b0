"""`prepare`: a Ray Data job from raw videos to Parquet shards plus a manifest, then the decoded
clips of every split a run uses (`decode_once`).

The driver builds the catalog (one listing of the dataset root, which also gives the sizes) and
plans shards by source size; a Ray Data map writes each shard in one task (read, probe, optionally
transcode, write once), so only small summaries pass through the object store and memory stays
bounded by one shard per task. Rerunning with the same output skips finished shards (their
completion records exist); the manifest is written last, and once it exists `run_prepare` returns
it without listing the dataset again.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from tsgd_ray import lease, storage
from tsgd_ray.config import ConfigError, to_dict
from tsgd_ray.console import Progress
from tsgd_ray.data import clip_cache
from tsgd_ray.data.catalogs import Catalog, build_catalog
from tsgd_ray.data.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    SHARD_SCHEMA,
    ManifestError,
    ShardPlan,
    eval_split,
    finished_manifest,
    plan_hash,
    plan_shards,
    read_manifest,
    relative_source,
    shards_root,
    source_hash,
)
from tsgd_ray.data.video import VideoDecodeError, probe, transcode

log = logging.getLogger(__name__)

ROW_GROUP_BYTES = 32 * 2**20


def _load_video(record_uri: str, transcode_short_side: int) -> tuple[bytes, dict]:
    data = storage.read_bytes(record_uri)
    if transcode_short_side:
        data = transcode(data, transcode_short_side)
    info = probe(data)
    return data, {"num_frames": info.num_frames, "height": info.height, "width": info.width, "fps": info.fps}


def write_shard(plan: ShardPlan, root: str, transcode_short_side: int, digest: str, source_root: str = "") -> dict:
    """Write one shard (unless its completion record exists) and return its summary; each row
    names its video relative to the dataset root `source_root`.

    Videos that cannot be read or decoded are left out and listed in the summary's `skipped`.

    Raises:
        ManifestError: if the shards root holds a shard of a different plan.
    """
    part_uri = storage.join(root, plan.part_name)
    if storage.exists(part_uri):
        summary = storage.read_json(part_uri)
        if summary["plan_hash"] != digest:
            raise ManifestError(f"{part_uri} belongs to another dataset or setting; use a new data.shards")
        return summary
    rows, skipped = _read_videos(plan, transcode_short_side, source_root)
    shard_bytes = _write_table(rows, storage.join(root, plan.name)) if rows else 0
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        counts[row["class_name"]] += 1
    summary = {
        "path": plan.name,
        "split": plan.split,
        "rows": len(rows),
        "bytes": shard_bytes,
        "class_counts": dict(counts),
        "skipped": skipped,
        "plan_hash": digest,
    }
    storage.write_json_once(part_uri, summary)
    return summary


def _read_videos(plan: ShardPlan, transcode_short_side: int, source_root: str) -> tuple[list[dict], list[dict]]:
    """The shard's rows (each video's bytes and probe) and the videos skipped, with why."""
    rows, skipped = [], []
    for record in plan.records:
        try:
            data, info = _load_video(record.uri, transcode_short_side)
        except VideoDecodeError as exc:
            skipped.append({"uri": record.uri, "reason": exc.reason, "detail": exc.detail[:300], "stage": "probe"})
            continue
        except OSError as exc:
            detail = f"{type(exc).__name__}: {exc}"[:300]
            skipped.append({"uri": record.uri, "reason": "unreadable", "detail": detail, "stage": "read"})
            continue
        rows.append(
            {
                "video_id": record.video_id,
                "label": record.label,
                "class_name": record.class_name,
                "split": record.split,
                "source_uri": relative_source(record.uri, source_root),
                "video": data,
                **info,
            }
        )
    return rows, skipped


def _write_table(rows: list[dict], uri: str) -> int:
    """Write the rows as one Parquet shard at `uri` (once); returns its size in bytes."""
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    mean_row = max(1, table.nbytes // len(rows))
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        row_group_size=max(1, ROW_GROUP_BYTES // mean_row),
        compression="none",
        use_dictionary=["video_id", "class_name", "split", "source_uri"],
    )  # never the videos
    storage.write_once(uri, buf.getvalue())
    return buf.tell()


def _write_shard_row(row: dict, root: str, transcode_short_side: int, digest: str, source_root: str) -> dict:
    summary = write_shard(ShardPlan.from_json(row["plan"]), root, transcode_short_side, digest, source_root)
    return {"summary": json.dumps(summary)}


def build_manifest(cfg: DictConfig, catalog: Catalog, summaries: list[dict], digest: str) -> dict:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in summaries:
        for class_name, n in s["class_counts"].items():
            counts[s["split"]][class_name] += n
    skipped = [{**p, "stage": "catalog"} for p in catalog.skipped]
    skipped += [item for s in summaries for item in s["skipped"]]
    return {
        "schema_version": SCHEMA_VERSION,
        "plan_hash": digest,
        "source_hash": source_hash(cfg),
        "dataset": to_dict(cfg)["data"]["dataset"],
        "classes": catalog.classes,
        "counts": {split: dict(sorted(c.items())) for split, c in sorted(counts.items())},
        "num_videos": sum(s["rows"] for s in summaries),
        "shards": [{k: s[k] for k in ("path", "split", "rows", "bytes")} for s in summaries],
        "skipped": skipped,
        "transcode_short_side": cfg.data.transcode_short_side,
    }


def run_prepare(cfg: DictConfig, catalog: Catalog | None = None) -> dict:
    """Catalog the dataset (unless `catalog` is given), write its shards with Ray Data, and write
    the manifest once.

    Needs Ray to be initialised (or lets Ray Data start a local instance). Idempotent: a finished
    shard set is returned as is (without listing the dataset), and finished shards are not
    rewritten.

    Returns:
        The manifest.
    Raises:
        CatalogError, ManifestError: with a message naming the file or URI at fault. LeaseHeld:
        another run prepares these shards and storage.wait_for_lease is false.
    """
    manifest = finished_manifest(cfg)
    if manifest is not None:
        log.info("shards already prepared at %s", shards_root(cfg))
        return manifest
    catalog = catalog or build_catalog(cfg)  # before the lease: a catalog error leaves nothing behind
    if not catalog.records:
        raise ManifestError("the catalog holds no videos: nothing to prepare")
    with lease.hold(shards_root(cfg), cfg.storage.lease_seconds, cfg.storage.wait_for_lease, "prepare"):
        return finished_manifest(cfg) or _prepare(cfg, catalog)


def decode_once(cfg: DictConfig) -> dict[str, dict]:
    """Decode every clip a run trains or tests on, once, before any stage books a GPU: the clip
    caches (`tsgd_ray.data.clip_cache`) of the training split (every view) and of the evaluation
    split (one view), built by Ray Data's CPU decoders. Finished caches are returned as they are.

    Returns:
        {split: its cache marker}; {} with data.clip_cache=false (every pass then decodes).
    Raises:
        ManifestError: the shards are not prepared. TooManyBadVideos: as `clip_cache.ensure`.
    """
    if not cfg.data.clip_cache:
        return {}
    counts = read_manifest(shards_root(cfg))["counts"]
    splits: dict[str, int | None] = {"train": None}  # None: every view
    try:
        splits[eval_split(cfg, counts)] = 1
    except ConfigError:  # nothing to test students on: a run of it stops before evaluation
        pass
    return {split: clip_cache.ensure(cfg, split, views) for split, views in splits.items() if split in counts}


def _prepare(cfg: DictConfig, catalog: Catalog) -> dict:
    import ray

    root = shards_root(cfg)
    plans = plan_shards(catalog, catalog.sizes, int(cfg.data.shard_target_mb * 2**20), cfg.seed)
    digest = plan_hash(plans, cfg.data.transcode_short_side, catalog.root)
    log.info("preparing %d videos into %d shards at %s", len(catalog.records), len(plans), root)
    ds = ray.data.from_items([{"plan": p.to_json()} for p in plans], override_num_blocks=len(plans))
    ds = ds.map(
        _write_shard_row,
        fn_kwargs={
            "root": root,
            "transcode_short_side": cfg.data.transcode_short_side,
            "digest": digest,
            "source_root": catalog.root,
        },
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=cfg.data.prepare_concurrency or None),
    )
    progress = Progress("prepare", len(plans), "shard")
    summaries, videos = [], 0
    for row in ds.iter_rows():  # shards as they are written, in any order
        summaries.append(json.loads(row["summary"]))
        videos += summaries[-1]["rows"]
        progress.update(len(summaries), videos=videos)
    summaries.sort(key=lambda s: s["path"])
    manifest = build_manifest(cfg, catalog, summaries, digest)
    storage.write_json_once(storage.join(root, MANIFEST), manifest)
    if manifest["skipped"]:
        log.warning("%d video(s) skipped; see 'skipped' in %s", len(manifest["skipped"]), storage.join(root, MANIFEST))
    return manifest
