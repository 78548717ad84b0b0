"""Every artifact the Ray stages write: where it lives, its file names, its typed reader and writer.

A stage's folder is named by a hash of exactly the settings its result depends on, chained to the
hash of the stage before it::

    <output_root>/teacher/<key>/    teacher.pt, teacher.json (marker), ray_train/ (checkpoints)
    <output_root>/stats/<key>/      statistics.pt, candidates.json, stats.json (marker)
        init/<ipc>-<kind>/          part-00000.parquet ... (clip tables), init.json (marker)
    <output_root>/distill/<key>/    plan.json, partitions/p00000.json (marker per partition)
        synthetic/                  p00000.parquet ... (clip tables, written by the distill actors),
                                    manifest.json (merge's marker), previews/grid.mp4
    <output_root>/evaluate/<key>/   seed-00000.json, results.json (marker)

So a rerun of the same config finds its finished stages and skips them, and two runs that differ
in one key share every stage upstream of it. The statistics depend on the teacher, the data and
the seed only: an IPC sweep shares them, and each (ipc, init kind) gets its own init folder.
Settings that change only how fast or where work runs are left out of the keys.

A *clip table* (init clips, synthetic videos) is a Parquet file of CLIP_SCHEMA rows sorted by
(label, index), with row groups that never mix classes and stay under ROW_GROUP_BYTES, so a
reader takes just the classes (or the rows) it needs, one row group at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf

from tsgd_ray import lease, storage
from tsgd_ray.config import InitKind, Method, to_dict, validate
from tsgd_ray.core.bn_stats import ClassStatistics
from tsgd_ray.core.models import build_model, load_checkpoint
from tsgd_ray.errors import UserError
from tsgd_ray.storage import OutputRoot

log = logging.getLogger(__name__)

KEY_LENGTH = 16
ROW_GROUP_BYTES = 128 * 2**20

TEACHER, TEACHER_MARKER = "teacher.pt", "teacher.json"
STATISTICS, CANDIDATES, STATS_MARKER = "statistics.pt", "candidates.json", "stats.json"
INIT_MARKER = "init.json"
PLAN = "plan.json"
SYNTHETIC_MANIFEST, PREVIEW = "manifest.json", "previews/grid.mp4"
RESULTS = "results.json"

# Settings that do not change a stage's result.
_EXECUTION_ONLY = {
    "data": (
        "shards",  # where the shards live, not what they hold (their manifest names that)
        "decode_actors",
        "decode_cpus_per_actor",
        "decode_batch_size",
        "prepare_concurrency",
        "eval_split",
    ),
    "teacher": ("cpus_per_worker", "gpus_per_worker"),
    "distill": ("actors", "partitions", "max_videos_per_partition", "cpus_per_actor", "gpus_per_actor", "log_every"),
    "evaluate": ("cpus_per_worker", "gpus_per_worker", "baselines"),
    "stats": ("actors", "cpus_per_actor", "gpus_per_actor", "batch_size"),  # integer sums: exact in any batching
}


# --- keys and folders -------------------------------------------------------------------------


def _settings(cfg: DictConfig, sections: tuple[str, ...]) -> dict[str, Any]:
    data = to_dict(cfg)
    out = {}
    for name in sections:
        value = data[name]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _EXECUTION_ONLY.get(name, ())}
        out[name] = value
    return out


def _key(parent: str, cfg: DictConfig, sections: tuple[str, ...]) -> str:
    text = json.dumps({"parent": parent, **_settings(cfg, sections)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def teacher_key(cfg: DictConfig) -> str:
    if cfg.teacher.checkpoint:  # an imported teacher is named by its file, not by training settings
        return _key(cfg.teacher.checkpoint, cfg, ("data",))
    return _key("", cfg, ("seed", "amp", "data", "augment", "teacher"))


def stats_key(cfg: DictConfig) -> str:
    return _key(teacher_key(cfg), cfg, ("seed", "stats"))


def init_kind(cfg: DictConfig) -> InitKind:
    """Which real clips this config starts from: `noise` init records the seeded real clips
    (random_real's set), so it shares them with `real`."""
    return InitKind.lowest_loss if cfg.distill.init == InitKind.lowest_loss else InitKind.real


def init_name(cfg: DictConfig) -> str:
    return f"{cfg.distill.ipc}-{init_kind(cfg).value}"


def distill_key(cfg: DictConfig) -> str:
    return _key(f"{stats_key(cfg)}/{init_name(cfg)}", cfg, ("amp", "augment", "tsgf", "distill"))


def evaluate_key(cfg: DictConfig, method: Method) -> str:
    parent = teacher_key(cfg) if method == Method.full else distill_key(cfg)
    return _key(parent, cfg, ("amp", "augment", "tsgf", "evaluate")) + f"-{method.value}"


def teacher_dir(cfg: DictConfig) -> str:
    return OutputRoot(cfg.storage.output_root).uri("teacher", teacher_key(cfg))


def stats_dir(cfg: DictConfig) -> str:
    return OutputRoot(cfg.storage.output_root).uri("stats", stats_key(cfg))


def init_dir(cfg: DictConfig) -> str:
    return storage.join(stats_dir(cfg), "init", init_name(cfg))


def distill_dir(cfg: DictConfig) -> str:
    return OutputRoot(cfg.storage.output_root).uri("distill", distill_key(cfg))


def synthetic_dir(cfg: DictConfig) -> str:
    return storage.join(distill_dir(cfg), "synthetic")


def evaluate_dir(cfg: DictConfig, method: Method) -> str:
    return OutputRoot(cfg.storage.output_root).uri("evaluate", evaluate_key(cfg, method))


def method_config(cfg: DictConfig, method: Method) -> DictConfig:
    """The run's config as it distils (or, for `full`, evaluates) with `method`.

    tsgd: the config as it is; sre2l_video: TSGF off; random_real: the seeded real init clips themselves
    (init=real, 0 iterations, TSGF off); full: no distillation, evaluate.full_epochs epochs.
    Returns a read-only config.
    """
    overrides: dict[str, Any] = {"distill": {"method": method.value}}
    if method in (Method.sre2l_video, Method.random_real):
        overrides["tsgf"] = {"enabled": False}
    if method == Method.random_real:
        overrides["distill"].update(init="real", iterations=0)
    if method == Method.full:
        overrides = {"evaluate": {"epochs": cfg.evaluate.full_epochs or cfg.evaluate.epochs}}
    out = OmegaConf.merge(cfg, overrides)
    validate(out)
    OmegaConf.set_readonly(out, True)
    return out


# --- the stage skeleton ----------------------------------------------------------------------


def run_stage(
    cfg: DictConfig,
    name: str,
    marker_uri: str,
    work: Callable[[Optional[str]], dict],
    tracker=None,
    tags: Optional[dict[str, str]] = None,
) -> dict:
    """Skip if `marker_uri` exists (returning it, marked "skipped"); else take the stage folder's
    lease (`tsgd_ray.lease`: another run of the same stage is waited for, or refused with
    storage.wait_for_lease=false), look again, open the stage's MLflow child run, call
    `work(run_id)` (which writes the outputs and returns the marker's content), add the seconds,
    write the marker once, close the run and return the marker."""
    folder = marker_uri.rsplit("/", 1)[0]
    if storage.exists(marker_uri):
        log.info("%s: finished at %s, skipped", name, folder)
        return {**storage.read_json(marker_uri), "skipped": True}
    with lease.hold(folder, cfg.storage.lease_seconds, cfg.storage.wait_for_lease, name):
        if storage.exists(marker_uri):  # the run we waited for finished it
            log.info("%s: finished by another run at %s, skipped", name, folder)
            return {**storage.read_json(marker_uri), "skipped": True}
        return _run_work(name, marker_uri, work, tracker, tags)


def _run_work(name: str, marker_uri: str, work: Callable[[Optional[str]], dict], tracker, tags) -> dict:
    started = time.time()
    run_id = tracker.child(name, tags=tags) if tracker else None
    try:
        marker = work(run_id)
    except BaseException:
        if tracker:
            tracker.finish(run_id, "FAILED")
        raise
    marker["seconds"] = round(time.time() - started, 3)
    storage.write_json_once(marker_uri, marker)
    if tracker:
        tracker.log_metrics(run_id, {"seconds": marker["seconds"]})
        tracker.finish(run_id)
    log.info("%s: done in %.1f s -> %s", name, marker["seconds"], marker_uri.rsplit("/", 1)[0])
    return marker


# --- tensors ---------------------------------------------------------------------------------


def write_tensors(uri: str, tensors: dict[str, Any]) -> bool:
    """torch.save `tensors` (tensors, numbers, strings, lists) to `uri`, write-once."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return storage.write_once(uri, buf.getvalue())


class MissingInput(UserError, FileNotFoundError):
    """A stage's input is not there: the stage before it has not finished with this config."""


def require(uri: str, stage: str) -> str:
    """`uri`, once it exists; else MissingInput naming the stage that writes it."""
    if not storage.exists(uri):
        raise MissingInput(f"no {stage} output at {uri}: run the {stage} stage first (with this config)")
    return uri


def read_tensors(uri: str) -> dict[str, Any]:
    """Load what `write_tensors` wrote, with weights_only=True (no code is ever unpickled)."""
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)


# --- teacher ---------------------------------------------------------------------------------


def teacher_uri(cfg: DictConfig) -> str:
    return storage.join(teacher_dir(cfg), TEACHER)


def clip_size(cfg: DictConfig) -> tuple[int, int, int]:
    return cfg.data.num_frames, cfg.data.height, cfg.data.width


def new_teacher(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """The teacher architecture with its seeded initial weights."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.teacher.model, num_classes, clip_size(cfg), cfg.teacher.width, cfg.teacher.depth)


def load_teacher(cfg: DictConfig, classes: list[str], device: torch.device | str = "cpu") -> torch.nn.Module:
    """The finished teacher of this config, frozen, in eval mode on `device`.

    Raises:
        MissingInput: when the teacher stage has not finished.
    """
    model = build_model(cfg.teacher.model, len(classes), clip_size(cfg), cfg.teacher.width, cfg.teacher.depth)
    load_checkpoint(model, storage.read_bytes(require(teacher_uri(cfg), "teacher")), classes)
    return model.to(device).eval().requires_grad_(False)


# --- statistics and init candidates ----------------------------------------------------------


def write_statistics(cfg: DictConfig, stats: ClassStatistics) -> None:
    write_tensors(storage.join(stats_dir(cfg), STATISTICS), stats.state_dict())


def read_statistics(cfg: DictConfig) -> ClassStatistics:
    """Raises MissingInput when the stats stage has not finished."""
    return ClassStatistics.from_state_dict(read_tensors(require(storage.join(stats_dir(cfg), STATISTICS), "stats")))


def write_candidates(cfg: DictConfig, candidates: dict[str, list[list[dict]]]) -> None:
    """{init kind: per class, its best candidates in order: {video_id, shard, row, loss}}."""
    storage.write_once(storage.join(stats_dir(cfg), CANDIDATES), json.dumps(candidates).encode())


def read_candidates(cfg: DictConfig) -> dict[str, list[list[dict]]]:
    return storage.read_json(storage.join(stats_dir(cfg), CANDIDATES))


# --- clip tables: init clips and synthetic videos ---------------------------------------------

CLIP_SCHEMA = pa.schema(
    [
        ("label", pa.int32()),
        ("index", pa.int32()),  # the video's index within its class (its random stream)
        ("video_id", pa.string()),  # the real clip it started from ("" for noise init)
        ("clip", pa.binary()),  # uint8 (F, H, W, 3), RGB, frames first: the layout of decoded clips
        # synthetic videos: uint8 (H, W), 255 * the time-mean of the init clip's saliency (TSGFA's map);
        # empty in init tables
        ("heat", pa.binary()),
    ]
)


def clip_table_bytes(
    clips: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    video_ids: Sequence[str],
    heats: Optional[np.ndarray] = None,
) -> bytes:
    """A Parquet clip table of uint8 clips (N, F, H, W, 3) (and uint8 heat maps (N, H, W), if
    given): rows in (label, index) order, row groups of one class each (split further to stay under
    ROW_GROUP_BYTES)."""
    order = np.lexsort((indices, labels))
    per_group = max(1, ROW_GROUP_BYTES // max(1, clips[0].nbytes)) if len(clips) else 1
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, CLIP_SCHEMA, compression="none", use_dictionary=False) as writer:
        for label in np.unique(labels):
            rows = order[labels[order] == label]
            for start in range(0, len(rows), per_group):
                part = rows[start : start + per_group]
                writer.write_table(
                    pa.table(
                        {
                            "label": pa.array(labels[part], pa.int32()),
                            "index": pa.array(indices[part], pa.int32()),
                            "video_id": pa.array([str(video_ids[i]) for i in part], pa.string()),
                            "clip": pa.array([clips[i].tobytes() for i in part], pa.binary()),
                            "heat": pa.array(
                                [heats[i].tobytes() if heats is not None else b"" for i in part], pa.binary()
                            ),
                        },
                        schema=CLIP_SCHEMA,
                    ),
                    row_group_size=len(part),
                )
    return buf.getvalue()


def read_clip_tables(
    uris: Sequence[str], shape: Sequence[int], classes: Optional[set[int]] = None, rank: int = 0, world: int = 1
) -> Iterator[dict[str, Any]]:
    """Rows of clip tables, one row group at a time: only the row groups of `classes` (all when
    None), and of those rows only every `world`-th from `rank` (counted over all rows read).

    Yields {"clips": (n, F, H, W, 3) uint8 tensor, "labels": (n,), "indices": (n,), "video_ids": [n],
    "heat": (n, H, W) uint8 tensor, or None where the table holds no heat maps}.
    """
    seen = 0
    for uri in uris:
        with storage.open_parquet(uri) as f:
            parquet = pq.ParquetFile(f)
            label_column = parquet.schema_arrow.get_field_index("label")
            for g in range(parquet.num_row_groups):
                meta = parquet.metadata.row_group(g)
                st = meta.column(label_column).statistics
                if (
                    classes is not None
                    and st is not None
                    and st.has_min_max
                    and not any(st.min <= c <= st.max for c in classes)
                ):
                    continue
                table = parquet.read_row_group(g)
                labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
                keep = np.ones(len(labels), bool) if classes is None else np.isin(labels, list(classes))
                positions = np.flatnonzero(keep)
                take = positions[(seen + np.arange(len(positions))) % world == rank]
                seen += len(positions)
                if not len(take):
                    continue
                blobs = table.column("clip").take(pa.array(take)).to_pylist()
                heat = table.column("heat").take(pa.array(take)).to_pylist() if "heat" in table.column_names else []
                yield {
                    "clips": torch.from_numpy(np.stack([np.frombuffer(b, np.uint8).reshape(shape) for b in blobs])),
                    "heat": torch.from_numpy(np.stack([np.frombuffer(h, np.uint8).reshape(shape[1:3]) for h in heat]))
                    if heat and all(heat)
                    else None,
                    "labels": torch.from_numpy(labels[take]),
                    "indices": torch.from_numpy(np.asarray(table.column("index").to_numpy(), dtype=np.int64)[take]),
                    "video_ids": table.column("video_id").take(pa.array(take)).to_pylist(),
                }


def concat_clips(parts: Sequence[dict[str, Any]], shape: Sequence[int]) -> dict[str, Any]:
    """The batches of `read_clip_tables` as one (possibly empty) batch."""
    if not parts:
        return {
            "clips": torch.empty((0, *shape), dtype=torch.uint8),
            "labels": torch.empty(0, dtype=torch.int64),
            "indices": torch.empty(0, dtype=torch.int64),
            "video_ids": [],
            "heat": None,
        }
    heats = [p["heat"] for p in parts]
    return {
        "clips": torch.cat([p["clips"] for p in parts]),
        "labels": torch.cat([p["labels"] for p in parts]),
        "indices": torch.cat([p["indices"] for p in parts]),
        "video_ids": [v for p in parts for v in p["video_ids"]],
        "heat": torch.cat(heats) if all(h is not None for h in heats) else None,
    }


def clip_shape(cfg: DictConfig) -> tuple[int, int, int, int]:
    return (*clip_size(cfg), 3)


def init_part_uri(cfg: DictConfig, part: int) -> str:
    return storage.join(init_dir(cfg), f"part-{part:05d}.parquet")


def read_init(cfg: DictConfig, classes: Sequence[int]) -> dict[str, Any]:
    """The init clips of `classes` only (see `read_clip_tables`), reading only the parts that hold them.

    Raises:
        FileNotFoundError: when the init set of this (ipc, init) has not been written.
    """
    marker = storage.read_json(require(storage.join(init_dir(cfg), INIT_MARKER), "stats"))
    wanted = set(int(c) for c in classes)
    uris = [
        storage.join(init_dir(cfg), p["path"])
        for p in marker["parts"]
        if any(p["first_class"] <= c <= p["last_class"] for c in wanted)
    ]
    return concat_clips(list(read_clip_tables(uris, clip_shape(cfg), wanted)), clip_shape(cfg))


# --- partitions and the synthetic set ---------------------------------------------------------


def plan_uri(cfg: DictConfig) -> str:
    return storage.join(distill_dir(cfg), PLAN)


def partition_name(partition_id: int) -> str:
    return f"p{partition_id:05d}"


def partition_marker_uri(cfg: DictConfig, partition_id: int) -> str:
    return storage.join(distill_dir(cfg), "partitions", partition_name(partition_id) + ".json")


def partition_file(partition_id: int) -> str:
    """The synthetic file of a partition, relative to the synthetic folder."""
    return partition_name(partition_id) + ".parquet"


def write_synthetic_part(
    cfg: DictConfig,
    partition_id: int,
    clips: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    video_ids: Sequence[str],
    heats: np.ndarray,
) -> dict:
    """Write a partition's synthetic clips and their init heat maps (uint8 (N, H, W)), write-once;
    returns {path, sha256, bytes, rows} of the file that is in storage (another writer's, if it won
    the race: then its hash)."""
    data = clip_table_bytes(clips, labels, indices, video_ids, heats)
    uri = storage.join(synthetic_dir(cfg), partition_file(partition_id))
    if not storage.write_once(uri, data):
        data = storage.read_bytes(uri)
    return {
        "path": partition_file(partition_id),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "rows": len(labels),
    }


def read_synthetic_manifest(cfg_or_dir: DictConfig | str) -> dict:
    """The merged set's manifest. Raises FileNotFoundError when merge has not finished."""
    folder = cfg_or_dir if isinstance(cfg_or_dir, str) else synthetic_dir(cfg_or_dir)
    return storage.read_json(storage.join(folder, SYNTHETIC_MANIFEST))


def read_synthetic(
    cfg_or_dir: DictConfig | str, classes: Optional[set[int]] = None, rank: int = 0, world: int = 1
) -> tuple[dict[str, Any], list[str]]:
    """The merged synthetic set (or `classes` of it, or the rows of one of `world` readers), read
    one row group at a time: (batch as `concat_clips`, class names).

    Raises:
        FileNotFoundError: when merge has not finished.
    """
    folder = cfg_or_dir if isinstance(cfg_or_dir, str) else synthetic_dir(cfg_or_dir)
    manifest = read_synthetic_manifest(folder)
    files = [
        f
        for f in manifest["files"]
        if classes is None or any(f["first_class"] <= c <= f["last_class"] for c in classes)
    ]
    shape = manifest["clip_shape"]
    batch = concat_clips(
        list(read_clip_tables([storage.join(folder, f["path"]) for f in files], shape, classes, rank, world)), shape
    )
    return batch, manifest["classes"]


# --- evaluation ------------------------------------------------------------------------------


def seed_uri(cfg: DictConfig, method: Method, seed: int) -> str:
    return storage.join(evaluate_dir(cfg, method), f"seed-{seed:05d}.json")


def results_uri(cfg: DictConfig, method: Method) -> str:
    return storage.join(evaluate_dir(cfg, method), RESULTS)
