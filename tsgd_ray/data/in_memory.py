"""A whole split decoded into memory: for the quality benchmark, tests and small datasets.

Large datasets go through the streaming pipeline (`tsgd_ray.data.pipeline`) instead.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.data.catalogs import build_catalog
from tsgd_ray.data.video import clip_rng, decode_clip, decode_view


def load_split(
    cfg: DictConfig, split: str, threads: int = 2, view: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode every video of `split` at the config's clip size, in catalog order; `view` >= 1:
    that init candidate view of each video instead (`decode_view`).

    Returns (clips (N, F, H, W, 3) uint8, labels (N,) int64, class names).

    Raises:
        CatalogError: as `build_catalog`; VideoDecodeError: for a video that cannot be decoded.
    """
    catalog = build_catalog(cfg)
    records = [r for r in catalog.records if r.split == split]
    d = cfg.data

    def decode(record) -> np.ndarray:
        if view:
            return decode_view(
                storage.read_bytes(record.uri),
                d.num_frames,
                d.height,
                d.width,
                d.frame_interval,
                cfg.seed,
                record.video_id,
                view,
            )
        return decode_clip(
            storage.read_bytes(record.uri),
            d.num_frames,
            d.height,
            d.width,
            d.frame_interval,
            d.sampling,
            clip_rng(cfg.seed, record.video_id),
        )

    with ThreadPoolExecutor(threads) as pool:
        clips = list(pool.map(decode, records))
    return torch.from_numpy(np.stack(clips)), torch.tensor([r.label for r in records]), list(catalog.classes)


def split_ids(cfg: DictConfig, split: str) -> list[str]:
    """The video ids of `split`, in the order `load_split` decodes them (catalog order)."""
    return [r.video_id for r in build_catalog(cfg).records if r.split == split]
