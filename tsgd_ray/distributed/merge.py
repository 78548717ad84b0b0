"""Merge stage: the finished partitions become the synthetic dataset, written once::

    <synthetic_dir>/data.parquet      one row per video: label, class_name, index,
                                      video (float32 (3, F, H, W) bytes, normalised space)
    <synthetic_dir>/manifest.json     shape, class map, ipc, config hash, teacher sha256, data sha256
    <synthetic_dir>/previews/grid.mp4 per class (rows): up to 4 videos, each beside its saliency map
"""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import config_hash
from tsgd_ray.core import tsgf
from tsgd_ray.core.clips import to_uint8_clips
from tsgd_ray.data.prepare import shards_root
from tsgd_ray.data.shards import read_manifest
from tsgd_ray.data.video import encode_mp4
from tsgd_ray.distributed.distill import partition_uri, plan_uri
from tsgd_ray.distributed.layout import read_tensors, synthetic_dir, teacher_dir
from tsgd_ray.distributed.teacher import MARKER as TEACHER_MARKER

log = logging.getLogger(__name__)

DATA = "data.parquet"
MANIFEST = "manifest.json"
PREVIEW = "previews/grid.mp4"
PREVIEW_CLASSES, PREVIEW_VIDEOS, PREVIEW_MIN_SIDE = 16, 4, 64


class MergeError(ValueError):
    """The partitions do not make a complete synthetic set; the message names the classes."""


def _collect(cfg: DictConfig, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not storage.exists(plan_uri(cfg)):  # merge only reads: the plan is the distill stage's to make
        raise MergeError(f"no partition plan at {plan_uri(cfg)}: run the distill stage first")
    plan = storage.read_json(plan_uri(cfg))["partitions"]
    parts = [read_tensors(partition_uri(cfg, p, ".pt")) for p in range(len(plan))
             if storage.exists(partition_uri(cfg, p, ".json"))]
    if not parts:
        raise MergeError(f"no finished partition under {partition_uri(cfg, 0, '')}: run the distill stage first")
    videos = torch.cat([p["videos"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    indices = torch.cat([p["indices"] for p in parts])
    counts = torch.bincount(labels, minlength=len(classes))
    wrong = [f"{classes[c]} ({int(n)})" for c, n in enumerate(counts) if n != cfg.distill.ipc]
    if wrong:
        raise MergeError(f"every class needs exactly distill.ipc={cfg.distill.ipc} videos; these have another "
                         f"count (run the distill stage to finish them): {', '.join(wrong[:20])}"
                         f"{' ...' if len(wrong) > 20 else ''}")
    order = sorted(range(len(labels)), key=lambda i: (int(labels[i]), int(indices[i])))
    return videos[order], labels[order], indices[order]


def _parquet_bytes(videos: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, classes: list[str]) -> bytes:
    table = pa.table({
        "label": pa.array(labels.numpy(), pa.int64()),
        "class_name": pa.array([classes[int(c)] for c in labels]),
        "index": pa.array(indices.numpy(), pa.int64()),
        "video": pa.array([v.numpy().astype(np.float32).tobytes() for v in videos], pa.binary()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, use_dictionary=["class_name"])
    return buf.getvalue()


def preview_frames(cfg: DictConfig, videos: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """A (F, H', W', 3) uint8 grid: a row per class (first 16), up to 4 videos per row, each followed
    by its TSGF saliency map (white = moving); cells upscaled to at least 64 px."""
    rows = []
    for c in sorted(set(labels.tolist()))[:PREVIEW_CLASSES]:
        x = videos[labels == c][:PREVIEW_VIDEOS]
        rgb = to_uint8_clips(x, cfg.data.mean, cfg.data.std)  # (n, F, H, W, 3)
        heat = tsgf.saliency(x, cfg.tsgf)  # (n, 1, F, H, W) in [0, 1]
        heat = (heat.squeeze(1) * 255).round().to(torch.uint8).unsqueeze(-1).expand(-1, -1, -1, -1, 3)
        cells = [cell for pair in zip(rgb, heat) for cell in pair]
        rows.append(torch.cat(cells, dim=2))  # (F, H, n * 2W, 3)
    width = max(r.shape[2] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[2])) for r in rows]
    grid = torch.cat(rows, dim=1)
    scale = max(1, -(-PREVIEW_MIN_SIDE // min(videos.shape[-2:])))
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    h, w = grid.shape[1] - grid.shape[1] % 2, grid.shape[2] - grid.shape[2] % 2
    return grid[:, :h, :w].numpy()


def load_synthetic(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The merged synthetic set: (videos (N, 3, F, H, W) float32, labels (N,), class names).

    Raises:
        FileNotFoundError: when the merge stage has not finished.
    """
    folder = synthetic_dir(cfg)
    manifest = storage.read_json(storage.join(folder, MANIFEST))
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(folder, DATA))))
    shape = tuple(manifest["video_shape"])
    videos = torch.stack([torch.from_numpy(np.frombuffer(b, np.float32).reshape(shape).copy())
                          for b in table.column("video").to_pylist()])
    return videos, torch.tensor(table.column("label").to_pylist()), manifest["classes"]


def run_merge(cfg: DictConfig, tracker=None) -> dict:
    """Check the partitions and write the synthetic dataset unless it exists; returns its manifest.

    Raises:
        MergeError: a class without exactly distill.ipc videos (the message names them).
    """
    folder = synthetic_dir(cfg)
    manifest_uri = storage.join(folder, MANIFEST)
    if storage.exists(manifest_uri):
        log.info("merge: finished at %s, skipped", folder)
        return {**storage.read_json(manifest_uri), "skipped": True}
    classes = read_manifest(shards_root(cfg))["classes"]
    videos, labels, indices = _collect(cfg, classes)
    data = _parquet_bytes(videos, labels, indices, classes)
    storage.write_once(storage.join(folder, DATA), data)
    preview = encode_mp4(preview_frames(cfg, videos, labels), fps=4)
    storage.write_once(storage.join(folder, PREVIEW), preview)
    manifest = {
        "method": cfg.distill.method.value, "ipc": cfg.distill.ipc, "num_videos": len(labels),
        "classes": classes, "video_shape": list(videos.shape[1:]), "layout": "normalised float32 (3, F, H, W)",
        "mean": list(cfg.data.mean), "std": list(cfg.data.std),
        "config_hash": config_hash(cfg, ["seed", "data", "augment", "teacher", "tsgf", "distill"]),
        "teacher_sha256": storage.read_json(storage.join(teacher_dir(cfg), TEACHER_MARKER))["sha256"],
        "data_sha256": hashlib.sha256(data).hexdigest(), "preview": PREVIEW,
    }
    storage.write_json_once(manifest_uri, manifest)
    if tracker:
        run_id = tracker.child("merge", tags={"method": cfg.distill.method.value})
        tracker.log_text(run_id, "synthetic/manifest.json", storage.read_bytes(manifest_uri).decode())
        tracker.log_bytes(run_id, "synthetic/previews/grid.mp4", preview)
        tracker.finish(run_id)
    log.info("merge: %d videos of %d classes -> %s", len(labels), len(classes), folder)
    return manifest
