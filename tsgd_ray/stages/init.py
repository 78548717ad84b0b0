"""Init stage: the init clips of the run's (ipc, init kind), chosen from the statistics pass's
candidates (`stats`), fetched by Ray tasks by (clip-cache file, row), reading just those clips, or
decoded by (shard, row) where the pass read shards (no second pass over the data either way), and
written as clip tables whose row groups hold one class each, so a distill actor reads only its
partition's classes::

    <stats_dir>/init/<n>-<kind>/part-00000.parquet ..., init.json (marker: parts and class ranges)

where n is layout.init_per_class: distill.ipc, or 4 x that under distill.pack.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
from omegaconf import DictConfig

from tsgd_ray import artifacts, layout, storage
from tsgd_ray.config import ConfigError
from tsgd_ray.data import clip_cache, clip_table
from tsgd_ray.data.pipeline import ClipDecoder, TooManyBadVideos
from tsgd_ray.data.shards import read_manifest, shards_root, train_shards
from tsgd_ray.stages import skeleton
from tsgd_ray.tracking import OFF, RunContext

INIT_PART_BYTES = 64 * 2**20  # about this many bytes of init clips per part file (whole classes)


def fetch_rows(cfg: DictConfig, rows: list[dict]) -> tuple[dict, int]:
    """The clips of `rows` (candidates with video_id, row, and either the URI of the clip-cache
    file that holds them, read, or of the shard, decoded: see `decode_rows`).

    Returns ({video_id: (F, H, W, 3) uint8}, videos decoded).
    Raises:
        TooManyBadVideos: a chosen clip is no longer there (or no longer decodes).
    """
    out: dict[str, np.ndarray] = {}
    by_file: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if "file" in r:
            by_file[r["uri"]].append(r)
    for uri, wanted in by_file.items():
        try:
            got = clip_table.read_rows(uri, [r["row"] for r in wanted], layout.clip_shape(cfg))
        except (FileNotFoundError, IndexError) as exc:
            raise TooManyBadVideos(f"init clips are gone from the clip cache ({exc}); run prepare again") from exc
        for r, vid, clip in zip(wanted, got["video_id"], got["clip"]):
            if vid != r["video_id"]:
                raise TooManyBadVideos(f"init clip {r['video_id']} is no longer at {uri} row {r['row']}")
            out[vid] = clip
    decoded = [r for r in rows if "file" not in r]
    return {**out, **decode_rows(cfg, decoded)}, len(decoded)


def decode_rows(cfg: DictConfig, rows: list[dict]) -> dict:
    """Decode the clips at (shard uri, row) of `rows` (dicts with uri, row, video_id and optionally
    view, see `decode_view`), reading only the row groups that hold them. Returns {video_id: (F, H, W, 3) uint8}.

    Raises:
        TooManyBadVideos: a chosen clip is no longer there or no longer decodes.
    """
    decoder = ClipDecoder.from_config(cfg)
    out: dict[str, np.ndarray] = {}
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_shard[r["uri"]].append(r)
    for uri, wanted in by_shard.items():
        with storage.open_parquet(uri) as f:
            parquet = pq.ParquetFile(f)
            starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            for g in sorted({int(np.searchsorted(starts, r["row"], side="right") - 1) for r in wanted}):
                here = [r for r in wanted if starts[g] <= r["row"] < starts[g + 1]]
                table = parquet.read_row_group(g, columns=["video_id", "label", "video"])
                take = [r["row"] - int(starts[g]) for r in here]
                columns = {
                    k: table.column(k).to_numpy(zero_copy_only=False)[take] for k in ("video_id", "label", "video")
                }
                decoded = decoder({**columns, "view": np.array([r.get("view", 0) for r in here], dtype=np.int64)})
                for r, vid, ok, clip, error in zip(
                    here, decoded["video_id"], decoded["ok"], decoded["clip"], decoded["error"]
                ):
                    if str(vid) != r["video_id"] or not ok:
                        raise TooManyBadVideos(
                            f"init clip {r['video_id']} at {uri} row {r['row']} could not be "
                            f"decoded again: {error or 'another video is there now'}"
                        )
                    out[r["video_id"]] = clip
    return out


def _write_init_part(cfg: DictConfig, uri: str, chosen: list[dict]) -> dict:
    """A Ray task: fetch the chosen rows of some whole classes and write their clip table to `uri`."""
    clips, decodes = fetch_rows(cfg, chosen)
    table = clip_table.clip_table_bytes(
        np.stack([clips[c["video_id"]] for c in chosen]),
        np.array([c["label"] for c in chosen]),
        np.array([c["index"] for c in chosen]),
        [c["video_id"] for c in chosen],
    )
    storage.write_once(uri, table)
    return {
        "path": uri.rsplit("/", 1)[1],
        "first_class": chosen[0]["label"],
        "last_class": chosen[-1]["label"],
        "rows": len(chosen),
        "bytes": len(table),
        "decodes": decodes,
    }


def _write_init(cfg: DictConfig, where: layout.Layout, manifest: dict) -> dict:
    classes = manifest["classes"]
    kind = layout.init_kind(cfg).value
    kept = artifacts.read_candidates(cfg)
    if kind not in kept:
        raise artifacts.MissingInput(
            f"the statistics pass under {where.stats} kept no {kind} candidates (it ran before "
            "that init existed); delete that folder and run again"
        )
    candidates = kept[kind]
    ipc, offset = layout.init_per_class(cfg), layout.init_offset(cfg)
    short = [f"{classes[c]} ({len(rows)})" for c, rows in enumerate(candidates) if len(rows) < offset + ipc]
    if short:
        wanted = f"distill.ipc={cfg.distill.ipc}" + (f" packed ({ipc} init clips)" if cfg.distill.pack else "")
        wanted += f" at distill.draw={cfg.distill.draw} (from candidate {offset})" if offset else ""
        raise ConfigError(
            f"{wanted}: these classes have fewer decodable training clips: {', '.join(short[:10])}"
            f"{' ...' if len(short) > 10 else ''}"
        )
    shards = train_shards(shards_root(cfg), manifest)
    cache = clip_cache.cache_dir(cfg, "train")

    def uri(entry: dict) -> str:
        return storage.join(cache, entry["file"]) if "file" in entry else shards[entry["shard"]]["uri"]

    chosen = [
        {**entry, "uri": uri(entry), "label": c, "index": i}
        for c, rows in enumerate(candidates)
        for i, entry in enumerate(rows[offset : offset + ipc])
    ]
    clip_bytes = int(np.prod(layout.clip_shape(cfg)))
    per_part = max(1, INIT_PART_BYTES // (clip_bytes * ipc)) * ipc
    import ray

    task = ray.remote(_write_init_part).options(num_cpus=0.5, max_retries=cfg.ray.max_failures)
    parts = ray.get(
        [
            task.remote(cfg, where.init_part(p), chosen[start : start + per_part])
            for p, start in enumerate(range(0, len(chosen), per_part))
        ]
    )
    return {
        "per_class": ipc,
        "draw": cfg.distill.draw,
        "init": kind,
        "parts": parts,
        "videos": len(chosen),
        "decodes": sum(p["decodes"] for p in parts),
    }


def run_init(cfg: DictConfig, run: RunContext = OFF) -> dict:
    """The init clips of this (ipc, init kind), unless written; returns the init marker.

    Raises:
        MissingInput: the stats stage has not finished. TooManyBadVideos: a chosen clip is no longer
        there (or no longer decodes). ConfigError: a class with fewer clips than it needs.
    """
    manifest, where = read_manifest(shards_root(cfg)), layout.of(cfg)
    return skeleton.run_stage(
        cfg,
        "init",
        where.init_marker,
        lambda stage: _write_init(cfg, where, manifest),
        run,
        {"method": cfg.distill.method.value},
    )
