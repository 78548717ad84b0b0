"""Motion-aware 2 x 2 spatial packing (RDED's packing of several crops into one image, for video;
not in the TSGD paper): a synthetic clip starts as the windows of most motion of four real clips
of its class, each whole in time (every frame; a clip is never spliced in time, which measured
0.96 -> 0.35 teacher confidence), tiled 2 x 2. A packed clip is kept only where the teacher still
names its class with probability >= a threshold; elsewhere the first of its four clips stands as it is.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tsgd_ray.config import PACK  # real clips per packed clip: a 2 x 2 grid
from tsgd_ray.core.clips import InputSettings
from tsgd_ray.core.training import clip_heat, predict
from tsgd_ray.core.tsgf import SaliencySettings


def motion_windows(heat: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Top-left corners (N, 2) = (row, column) of the h x w window holding the most of each heat
    map (N, H, W) >= 0 (the TSGFA map: the time-mean of TSGF's saliency); among equal windows
    (a flat map) the one nearest the centre."""
    n, height, width = heat.shape
    sums = F.avg_pool2d(heat[:, None].float(), (h, w), stride=1)[:, 0]  # (N, H - h + 1, W - w + 1)
    rows = torch.arange(height - h + 1, dtype=torch.float32) - (height - h) / 2
    cols = torch.arange(width - w + 1, dtype=torch.float32) - (width - w) / 2
    off_centre = rows.view(-1, 1) ** 2 + cols.view(1, -1) ** 2
    score = sums - 1e-6 * off_centre / (off_centre.max() + 1)  # a tie-break only: sums lie in [0, 1]
    best = score.flatten(1).argmax(dim=1)
    return torch.stack([best // (width - w + 1), best % (width - w + 1)], dim=1)


def pack(clips: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """Clips (4M, F, H, W, 3) (any dtype; H and W even) and their heat maps (4M, H, W) -> packed
    clips (M, F, H, W, 3): clips 4i .. 4i+3, each cut to its (H/2, W/2) window of most motion in
    every frame, at top-left, top-right, bottom-left, bottom-right of packed clip i.

    Raises:
        ValueError: H or W odd, or a clip count that is not a multiple of 4.
    """
    n, f, height, width, c = clips.shape
    if height % 2 or width % 2 or n % PACK:
        raise ValueError(f"pack: needs H and W even and a multiple of {PACK} clips, got {tuple(clips.shape)}")
    h, w = height // 2, width // 2
    corners = motion_windows(heat, h, w).tolist()
    crops = torch.stack([clip[:, r : r + h, q : q + w] for clip, (r, q) in zip(clips, corners)])
    grid = crops.view(n // PACK, 2, 2, f, h, w, c)
    rows = torch.cat([grid[:, :, 0], grid[:, :, 1]], dim=-2)  # (M, 2, F, h, W, 3): left | right
    return torch.cat([rows[:, 0], rows[:, 1]], dim=-3)  # top over bottom


def pack_where_confident(
    clips: torch.Tensor,
    labels: torch.Tensor,
    heat: torch.Tensor,
    confidence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clips (4M, F, H, W, 3) in groups of four of one class (labels (4M,)), their heat maps
    (4M, H, W) -> (clips (M, F, H, W, 3), their labels (M,), packed (M,) bool): each group's
    `pack`ed clip where `confidence(packed clips, labels)` (M,), the teacher's probability of the
    class, is >= threshold, else the group's first clip as it is.

    Raises:
        ValueError: a group of four holds two classes (or `pack`'s errors).
    """
    groups = labels.view(-1, PACK)
    if not bool((groups == groups[:, :1]).all()):
        raise ValueError("pack: every group of four clips must hold one class")
    packed = pack(clips, heat)
    keep = confidence(packed, groups[:, 0]) >= threshold
    return torch.where(keep.view(-1, 1, 1, 1, 1), packed, clips[::PACK]), groups[:, 0], keep


def pack_init(
    teacher: torch.nn.Module,
    clips: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    threshold: float,
    saliency: SaliencySettings | None,
    inputs: InputSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    """Init clips (4n per class, uint8 (N, F, H, W, 3), labels and within-class indices (N,)) ->
    (n per class: clips, labels, indices i, `order`, packed (N/4,) bool): synthetic video i of a
    class comes from its init clips 4i .. 4i+3 (clips[order] groups them), packed where the
    teacher's probability of the class on the tile is >= threshold (`pack_where_confident`), the
    tiles cut by the TSGFA heat of each clip (`saliency`), or at each clip's centre where
    `saliency` is None (the control that tells what the motion windows add)."""
    order = sorted(range(len(labels)), key=lambda i: (int(labels[i]), int(indices[i])))
    clips, labels = clips[order], labels[order]
    heat = clip_heat(clips, saliency, inputs) if saliency is not None else torch.ones(len(clips), *clips.shape[2:4])

    def confidence(packed: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return predict(teacher, packed, inputs).softmax(dim=1)[torch.arange(len(y)), y]

    out, y, packed = pack_where_confident(clips, labels, heat, confidence, threshold)
    return out, y, indices[order][::PACK] // PACK, order, packed
