"""Merge stage: the finished partitions become the synthetic dataset.

The distill actors already wrote the videos (``synthetic/pNNNNN.parquet``, clip tables); merge
reads only the partition markers, checks that every class has exactly `distill.ipc` videos, and
writes once::

    <synthetic_dir>/manifest.json     the files with their sha256, sizes and class ranges, the class
                                      map, clip shape and dtype, ipc, stored labels (views per
                                      clip), config hash, teacher sha256
    <synthetic_dir>/previews/grid.mp4 the first 16 classes (rows): up to 4 videos each, beside
                                      their saliency maps (read from those classes' files only)

Its memory does not grow with the set: markers are small, and the preview reads 16 classes.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from tsgd_ray import artifacts, layout, storage
from tsgd_ray.config import config_hash
from tsgd_ray.core import tsgf
from tsgd_ray.core.labels import PARAM_NAMES
from tsgd_ray.data import clip_table
from tsgd_ray.data.shards import read_manifest, shards_root
from tsgd_ray.data.video import encode_mp4
from tsgd_ray.errors import UserError
from tsgd_ray.settings import input_settings, saliency_settings
from tsgd_ray.stages import skeleton
from tsgd_ray.tracking import OFF, RunContext

log = logging.getLogger(__name__)

PREVIEW_CLASSES, PREVIEW_VIDEOS, PREVIEW_MIN_SIDE = 16, 4, 64


class MergeError(UserError, ValueError):
    """The partitions do not make a complete synthetic set; the message names the classes."""


def _files(cfg: DictConfig, where: layout.Layout, classes: list[str]) -> list[dict]:
    """The synthetic file of every partition, from the markers; checks the per-class counts."""
    if not storage.exists(where.plan):  # merge only reads: the plan is the distill stage's
        raise MergeError(f"no partition plan at {where.plan}: run the distill stage first")
    plan = storage.read_json(where.plan)["partitions"]
    counts = np.zeros(len(classes), dtype=np.int64)
    files = []
    for p, part in enumerate(plan):
        uri = where.partition_marker(p)
        if not storage.exists(uri):
            continue
        marker = storage.read_json(uri)
        for c, n in marker["counts"].items():
            counts[int(c)] += n
        files.append({**marker["file"], "first_class": min(part), "last_class": max(part)})
    wrong = [f"{classes[c]} ({int(n)})" for c, n in enumerate(counts) if n != cfg.distill.ipc]
    if wrong:
        raise MergeError(
            f"every class needs exactly distill.ipc={cfg.distill.ipc} videos; these have another "
            f"count (run the distill stage to finish them): {', '.join(wrong[:20])}"
            f"{' ...' if len(wrong) > 20 else ''}"
        )
    return files


def preview_frames(cfg: DictConfig, clips: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """A (F, H', W', 3) uint8 grid of uint8 clips (N, F, H, W, 3): a row per class (first 16), up to
    4 videos per row, each followed by its TSGF saliency map (white = moving); cells upscaled to at
    least 64 px."""
    rows = []
    inputs, saliency = input_settings(cfg), saliency_settings(cfg.tsgf)
    for c in sorted(set(labels.tolist()))[:PREVIEW_CLASSES]:
        rgb = clips[labels == c][:PREVIEW_VIDEOS]
        heat = tsgf.saliency(inputs.model_input(rgb), saliency)  # (n, 1, F, H, W) in [0, 1]
        heat = (heat.squeeze(1) * 255).round().to(torch.uint8).unsqueeze(-1).expand(-1, -1, -1, -1, 3)
        cells = [cell for pair in zip(rgb, heat) for cell in pair]
        rows.append(torch.cat(cells, dim=2))  # (F, H, n * 2W, 3)
    width = max(r.shape[2] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[2])) for r in rows]
    grid = torch.cat(rows, dim=1)
    scale = max(1, -(-PREVIEW_MIN_SIDE // min(clips.shape[2:4])))
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    h, w = grid.shape[1] - grid.shape[1] % 2, grid.shape[2] - grid.shape[2] % 2
    return grid[:, :h, :w].numpy()


def _first_classes(cfg: DictConfig, folder: str, files: list[dict]) -> dict:
    """The synthetic videos of the first PREVIEW_CLASSES classes (as `concat_clips`) in `folder`."""
    wanted = set(range(PREVIEW_CLASSES))
    uris = [storage.join(folder, f["path"]) for f in files if f["first_class"] < PREVIEW_CLASSES]
    parts = list(clip_table.read_clip_tables(uris, layout.clip_shape(cfg), wanted))
    return clip_table.concat_clips(parts, layout.clip_shape(cfg))


def contact_sheet(cfg: DictConfig, init: Optional[torch.Tensor], synthetic: torch.Tensor) -> np.ndarray:
    """One video's frames as an (H', W', 3) uint8 image, a frame per column; rows: the init clip,
    the synthetic clip, what recovery changed (|synthetic - init|, x4), and TSGF's saliency of the
    init clip (white = moving; of the synthetic clip for a noise init, `init` None). Clips are
    uint8 (F, H, W, 3); cells are upscaled to >= 64 px."""
    rows = [init] if init is not None else []
    rows.append(synthetic)
    if init is not None:
        rows.append(((synthetic.float() - init.float()).abs() * 4).clamp(0, 255).to(torch.uint8))
    source = (init if init is not None else synthetic).unsqueeze(0)
    saliency = tsgf.saliency(input_settings(cfg).model_input(source), saliency_settings(cfg.tsgf))
    saliency = saliency[0, 0]  # (F, H, W)
    rows.append((saliency * 255).round().to(torch.uint8).unsqueeze(-1).expand(-1, -1, -1, 3))
    image = torch.cat([torch.cat(list(row), dim=1) for row in rows], dim=0)  # (rows * H, F * W, 3)
    scale = max(1, -(-PREVIEW_MIN_SIDE // min(synthetic.shape[1:3])))
    return image.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1).numpy()


def _preview(cfg: DictConfig, batch: dict) -> Optional[bytes]:
    """The preview video (H.264 MP4), or None where PyAV is not installed (a node run from an
    offline bundle's prepared output root, which never encodes video): the set is whole without it."""
    try:
        import av  # noqa: F401
    except ImportError:
        log.warning("merge: no preview video: PyAV is not installed here (pip install av)")
        return None
    return encode_mp4(preview_frames(cfg, batch["clips"], batch["labels"]), fps=4)


def _log_sheets(cfg: DictConfig, run: RunContext, batch: dict, preview: Optional[bytes], classes: list[str]) -> None:
    """On `run` (the invocation's): the preview video (where there is one) and a contact sheet per
    class (first video)."""
    method = cfg.distill.method.value
    if preview is not None:
        run.log_bytes(f"synthetic/{method}/preview.mp4", preview)
    try:
        init = artifacts.read_init(cfg, sorted(set(batch["labels"].tolist())))
    except artifacts.MissingInput:  # noise init: no init clips
        init = None
    for c in sorted(set(batch["labels"].tolist())):
        row = int((batch["labels"] == c).nonzero()[0])
        start = None
        if init is not None:
            same = ((init["labels"] == c) & (init["indices"] == batch["indices"][row])).nonzero()
            start = init["clips"][int(same[0])] if len(same) else None
        run.log_image(
            f"synthetic/{method}/classes/{c:04d}-{classes[c]}.png",
            contact_sheet(cfg, start, batch["clips"][row]),
        )


def _manifest(cfg: DictConfig, where: layout.Layout, classes: list[str], files: list[dict]) -> dict:
    """The synthetic set's manifest: what it holds, its files, its stored labels and its teacher."""
    return {
        "method": cfg.distill.method.value,
        "ipc": cfg.distill.ipc,
        "num_videos": cfg.distill.ipc * len(classes),
        "classes": classes,
        "clip_shape": list(layout.clip_shape(cfg)),
        "dtype": "uint8",
        "layout": "uint8 RGB (F, H, W, 3) per row of a clip table; model input = (x / 255 - mean) / std",
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "files": files,
        "bytes": sum(f["bytes"] for f in files),
        "stored_labels": {  # what `SyntheticVideos(..., stored_labels=True)` and evaluate.labels=stored read
            "views": cfg.distill.labels.views,
            "view_params": list(PARAM_NAMES),
            "logits": "float16 (views, classes) per clip: the teacher's logits on each view",
        }
        if cfg.distill.labels.views
        else None,
        "config_hash": config_hash(cfg, ["seed", "data", "augment", "teacher", "tsgf", "distill"]),
        "teacher_sha256": storage.read_json(where.teacher_marker)["sha256"],
        "teacher": {
            "uri": where.teacher_file,
            "model": cfg.teacher.model,
            "width": cfg.teacher.width,
            "depth": cfg.teacher.depth,
        },  # what `SyntheticVideos(..., soft_labels=True)` loads
        "preview": layout.PREVIEW,
    }


def run_merge(cfg: DictConfig, run: RunContext = OFF) -> dict:
    """Check the partitions and write the synthetic set's manifest and preview unless it exists;
    returns the manifest. Logs the preview and manifest to a child "merge" of `run`, and the
    preview and a contact sheet per class to `run` itself.

    Raises:
        MergeError: a class without exactly distill.ipc videos (the message names them).
    """
    classes = read_manifest(shards_root(cfg))["classes"]
    where = layout.of(cfg)
    folder = where.synthetic

    def work(stage: RunContext) -> dict:
        files = _files(cfg, where, classes)
        batch = _first_classes(cfg, folder, files)
        preview = _preview(cfg, batch)
        if preview is not None:
            storage.write_once(storage.join(folder, layout.PREVIEW), preview)
        manifest = _manifest(cfg, where, classes, files)
        if stage:
            if preview is not None:
                stage.log_bytes("synthetic/previews/grid.mp4", preview)
            stage.log_text("synthetic/manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
            _log_sheets(cfg, stage.parent, batch, preview, classes)
        log.info(
            "merge: %d videos of %d classes in %d files -> %s", manifest["num_videos"], len(classes), len(files), folder
        )
        return manifest

    return skeleton.run_stage(
        cfg,
        "merge",
        where.synthetic_manifest,
        work,
        run,
        {"method": cfg.distill.method.value},
    )
