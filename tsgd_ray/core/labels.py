"""Labels that ship with a synthetic set (FKD / SRe2L relabel style; docs/method.md, stage 3).

Every synthetic clip carries K views, each a transform of VIEW_PARAMS numbers, with the teacher's
logits on that view. The views of a clip come from its own (seed, key, k) stream, so they do not
depend on the batch, partition or machine, and its first K' < K views are what a set stored with
K' would hold. A student replays them (`replay`) and never needs the teacher.

A view's parameters, per row: cx, cy, w, h (the crop box, normalised as in `augment`), flip
(+1/-1), roll (normalised), reverse (1: the clip played backwards, else 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from tsgd_ray.core import augment, tsgf
from tsgd_ray.core.augment import CropSettings
from tsgd_ray.core.device import autocast

VIEW_PARAMS = 7
UNIFORMS_PER_VIEW = 8  # 6 for the crop, flip and roll, 1 for time reversal, 1 for the box centre
PARAM_NAMES = ("cx", "cy", "w", "h", "flip", "roll", "reverse")


@dataclass(frozen=True)
class ViewSettings:
    """The stored views' family: `crop` (box size, flip, roll), `time_reverse`, and box centres
    drawn from the clip's heat map when `tsgfa` (within `crop_delta`, as TSGFA), else uniformly."""

    crop: CropSettings
    time_reverse: bool
    tsgfa: bool
    crop_delta: float


def clip_keys(labels: Sequence[int], indices: Sequence[int]) -> list[str]:
    """A synthetic clip's stream key: its class and its index within the class."""
    return [f"{int(c)}:{int(i)}" for c, i in zip(labels, indices)]


def view_params(heat: torch.Tensor, keys: list[str], seed: int, views: int, settings: ViewSettings) -> torch.Tensor:
    """(N, views, VIEW_PARAMS) float32 transforms for clips with heat maps (N, H, W) >= 0, view k of
    clip i fixed by (seed, keys[i], k)."""
    n = len(keys)
    streams = [f"{key}:{k}" for key in keys for k in range(views)]
    u = augment.keyed_uniforms(seed, streams, UNIFORMS_PER_VIEW, "label-view").view(n, views, UNIFORMS_PER_VIEW)
    flat_heat = heat.float() if settings.tsgfa else torch.ones_like(heat, dtype=torch.float32)
    out = torch.empty(n, views, VIEW_PARAMS)
    for k in range(views):
        params = settings.crop.params(u[:, k, :6])
        scale, ratio = settings.crop.scale, settings.crop.ratio
        params[:, :4] = tsgf.saliency_boxes(flat_heat, u[:, k, :2], scale, ratio, settings.crop_delta, None, u[:, k, 7])
        reverse = (u[:, k, 6] < 0.5).float() if settings.time_reverse else torch.zeros(n)
        out[:, k] = torch.cat([params, reverse[:, None]], dim=1)
    return out


def apply_view(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Clips x (N, C, F, H, W) under one view each, params (N, VIEW_PARAMS): reversed in time
    where asked, then cropped, resized, flipped and rolled. Returns (N, C, F, H, W)."""
    params = params.to(x.device)
    reverse = (params[:, 6] > 0.5).view(-1, 1, 1, 1, 1)
    return augment.apply_params(torch.where(reverse, x.flip(2), x), params[:, :6])


@torch.no_grad()
def label_views(
    teacher: nn.Module, x: torch.Tensor, params: torch.Tensor, amp: bool = False, chunk: int = 64
) -> torch.Tensor:
    """The teacher's logits (N, K, classes), float16 on the CPU, on every view params (N, K,
    VIEW_PARAMS) of the normalised clips x (N, 3, F, H, W); teacher in eval mode."""
    teacher.eval()
    n, views = params.shape[:2]
    out = []
    for k in range(views):
        logits = []
        for start in range(0, n, chunk):
            view = apply_view(x[start : start + chunk], params[start : start + chunk, k])
            with autocast(x.device, amp):
                logits.append(teacher(view).float().cpu())
        out.append(torch.cat(logits))
    return torch.stack(out, dim=1).half()


def replay(
    x: torch.Tensor, params: torch.Tensor, logits: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stored view per clip, chosen uniformly among its K: clips x (N, C, F, H, W), params
    (N, K, VIEW_PARAMS), logits (N, K, classes) -> (the views (N, C, F, H, W), their logits (N,
    classes) float32), on x's device."""
    n, views = params.shape[:2]
    pick = torch.randint(views, (n,), generator=generator)
    rows = torch.arange(n)
    return apply_view(x, params[rows, pick]), logits[rows, pick].to(x.device).float()
