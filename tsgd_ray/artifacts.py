"""The typed readers and writers of what the stages write (teacher, statistics, init candidates,
init clips, synthetic set, seeds), shared by the stages, `plan` and `SyntheticVideos`; where each
file lives is `tsgd_ray.layout`'s, the clip-table format `tsgd_ray.data.clip_table`'s."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from tsgd_ray import layout, storage
from tsgd_ray.core.bn_stats import ClassStatistics
from tsgd_ray.core.models import build_model, load_checkpoint
from tsgd_ray.data.clip_table import clip_table_bytes, concat_clips, read_clip_tables
from tsgd_ray.errors import UserError
from tsgd_ray.layout import (
    CANDIDATES,
    INIT_MARKER,
    STATISTICS,
    SYNTHETIC_MANIFEST,
    clip_shape,
    clip_size,
    partition_file,
)


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
    load_checkpoint(model, storage.read_bytes(require(layout.of(cfg).teacher_file, "teacher")), classes)
    return model.to(device).eval().requires_grad_(False)


def write_statistics(cfg: DictConfig, stats: ClassStatistics) -> None:
    write_tensors(storage.join(layout.of(cfg).stats, STATISTICS), stats.state_dict())


def read_statistics(cfg: DictConfig) -> ClassStatistics:
    """Raises MissingInput when the stats stage has not finished."""
    return ClassStatistics.from_state_dict(
        read_tensors(require(storage.join(layout.of(cfg).stats, STATISTICS), "stats"))
    )


def write_candidates(cfg: DictConfig, candidates: dict[str, list[list[dict]]]) -> None:
    """{init kind: per class, its best candidates in order: {video_id, shard, row, loss}}."""
    storage.write_once(storage.join(layout.of(cfg).stats, CANDIDATES), json.dumps(candidates).encode())


def read_candidates(cfg: DictConfig) -> dict[str, list[list[dict]]]:
    """Raises MissingInput when the stats stage has not finished."""
    return storage.read_json(require(storage.join(layout.of(cfg).stats, CANDIDATES), "stats"))


def read_init(cfg: DictConfig, classes: Sequence[int]) -> dict[str, Any]:
    """The init clips of `classes` only (see `read_clip_tables`), reading only the parts that hold them.

    Raises:
        FileNotFoundError: when the init set of this (ipc, init) has not been written.
    """
    folder = layout.of(cfg).init
    marker = storage.read_json(require(storage.join(folder, INIT_MARKER), "init"))
    wanted = set(int(c) for c in classes)
    uris = [
        storage.join(folder, p["path"])
        for p in marker["parts"]
        if any(p["first_class"] <= c <= p["last_class"] for c in wanted)
    ]
    return concat_clips(list(read_clip_tables(uris, clip_shape(cfg), wanted)), clip_shape(cfg))


def write_synthetic_part(
    cfg: DictConfig,
    partition_id: int,
    clips: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    video_ids: Sequence[str],
    heats: np.ndarray,
    stored: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> dict:
    """Write a partition's synthetic clips, their init heat maps (uint8 (N, H, W)) and stored
    labels (view parameters (N, K, 7) float32, logits (N, K, classes) float16; None: none),
    write-once; returns {path, sha256, bytes, rows} of the file that is in storage (another
    writer's, if it won the race: then its hash)."""
    data = clip_table_bytes(clips, labels, indices, video_ids, heats, stored=stored)
    uri = storage.join(layout.of(cfg).synthetic, partition_file(partition_id))
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
    folder = cfg_or_dir if isinstance(cfg_or_dir, str) else layout.of(cfg_or_dir).synthetic
    return storage.read_json(storage.join(folder, SYNTHETIC_MANIFEST))


def read_synthetic(
    cfg_or_dir: DictConfig | str, classes: Optional[set[int]] = None, rank: int = 0, world: int = 1
) -> tuple[dict[str, Any], list[str]]:
    """The merged synthetic set (or `classes` of it, or the rows of one of `world` readers), read
    one row group at a time: (batch as `concat_clips`, class names).

    Raises:
        FileNotFoundError: when merge has not finished.
    """
    folder = cfg_or_dir if isinstance(cfg_or_dir, str) else layout.of(cfg_or_dir).synthetic
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
