"""Clip-consistent augmentation: one box, one flip, one roll per clip, the same for all its frames.

Boxes are in normalised image coordinates: centre (cx, cy) and size (w, h) with the whole image
being centre (0, 0), size (2, 2) (grid_sample's convention, align_corners=False). Everything is
batched with `grid_sample`, differentiable with respect to the clip, and runs on any device.
The random numbers come in as a tensor of uniforms so that callers choose where they come from
(one generator per batch, or one per synthetic video in recovery).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: how many uniforms `random_params` reads per clip
UNIFORMS_PER_CLIP = 6


@dataclass(frozen=True)
class CropSettings:
    """One clip transform family: random resized crop (area fraction `scale`, aspect ratio
    `ratio`), horizontal flip when `hflip`, horizontal roll of at most `roll` of the width."""

    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: bool
    roll: float

    def params(self, u: torch.Tensor) -> torch.Tensor:
        """`random_params` of uniforms u (N, 6) under these settings."""
        return random_params(u, self.scale, self.ratio, self.hflip, self.roll)


def box_sizes(
    u_scale: torch.Tensor, u_ratio: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random-resized-crop box sizes (w, h) in normalised units from uniforms in [0, 1).

    Area fraction ~ U(scale), aspect ratio log-uniform in `ratio`; each side is at most 2 (the image).
    """
    area = scale[0] + (scale[1] - scale[0]) * u_scale
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = (2 * torch.sqrt(area * aspect)).clamp(max=2.0)
    h = (2 * torch.sqrt(area / aspect)).clamp(max=2.0)
    return w, h


def random_params(
    u: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], hflip: bool, roll: float
) -> torch.Tensor:
    """Map uniforms (N, 6) to clip transforms (N, 6): cx, cy, w, h, flip (+1/-1), roll (normalised)."""
    w, h = box_sizes(u[:, 0], u[:, 1], scale, ratio)
    cx = (2 - w) * (u[:, 2] - 0.5)  # the box stays inside the image
    cy = (2 - h) * (u[:, 3] - 0.5)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0).to(u.dtype) if hflip else torch.ones_like(u[:, 4])
    shift = (2 * u[:, 5] - 1) * roll * 2  # up to `roll` of the width (2 units)
    return torch.stack([cx, cy, w, h, flip, shift], dim=1)


def apply_params(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Crop the box of `params` (N, 6) from every frame of x (N, C, F, H, W), resize it back to
    (H, W) bilinearly, flip it and roll it horizontally (wrapping around). Returns (N, C, F, H, W)."""
    return sample(x, *grid_axes(params.to(x.dtype), x.shape[3], x.shape[4]))


def grid_axes(params: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling grid of transforms `params` (M, 6), which is separable: its x coordinate per
    output column (M, W) and its y coordinate per output row (M, H), in `params`' dtype. Computing
    them ahead for many steps leaves `sample` two operations per step."""
    cx, cy, w, h, flip, shift = params.unbind(1)
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=params.device, dtype=params.dtype)
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=params.device, dtype=params.dtype)
    # the roll moves output columns; whole pixels so that pixel centres map onto pixel centres
    shift_px = torch.round(shift * width / 2) * 2 / width
    out_x = torch.remainder(xs.view(1, -1) + 1 + shift_px.view(-1, 1), 2) - 1  # (M, W)
    grid_x = cx.view(-1, 1) + flip.view(-1, 1) * out_x * w.view(-1, 1) / 2  # (M, W)
    grid_y = cy.view(-1, 1) + ys.view(1, -1) * h.view(-1, 1) / 2  # (M, H)
    return grid_x, grid_y


def sample(x: torch.Tensor, grid_x: torch.Tensor, grid_y: torch.Tensor) -> torch.Tensor:
    """x (N, C, F, H, W) resampled bilinearly (border padding) at the separable grid
    `grid_axes` gives, grid_x (N, W) and grid_y (N, H). Returns (N, C, F, H, W)."""
    n, c, f, height, width = x.shape
    grid = torch.stack(torch.broadcast_tensors(grid_x.view(n, 1, width), grid_y.view(n, height, 1)), dim=-1)
    out = F.grid_sample(
        x.reshape(n, c * f, height, width), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.view(n, c, f, height, width)


def keyed_uniforms(seed: int, keys: list[str], count: int = UNIFORMS_PER_CLIP, stream: str = "view") -> torch.Tensor:
    """(N, count) uniforms in [0, 1), count <= 8, each row fixed by (seed, stream, key): a clip's
    view that does not depend on the batch, shard or order it is seen in."""
    rows = []
    for key in keys:
        digest = hashlib.blake2b(f"{seed}:{stream}:{key}".encode(), digest_size=8 * count).digest()
        rows.append([int.from_bytes(digest[8 * i : 8 * i + 8], "big") / 2.0**64 for i in range(count)])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(keys), count)


def keyed_views(x: torch.Tensor, keys: list[str], seed: int, crop: CropSettings) -> torch.Tensor:
    """Each clip of x (N, C, F, H, W) under a `crop` transform drawn from its own (seed, key)
    stream (stats.augment: class statistics as recovery sees clips)."""
    return apply_params(x, crop.params(keyed_uniforms(seed, keys).to(x.device)))


def identity_params(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Transforms that leave a clip unchanged: the whole image, no flip, no roll."""
    return torch.tensor([0.0, 0.0, 2.0, 2.0, 1.0, 0.0], device=device).repeat(n, 1)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 4) boxes (cx, cy, w, h) -> (N, 1, 1, H, W) float mask, 1 on pixels whose centre is inside."""
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=boxes.device)
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=boxes.device)
    cx, cy, w, h = boxes.unbind(1)
    inside_x = (xs.view(1, -1) - cx.view(-1, 1)).abs() <= w.view(-1, 1) / 2
    inside_y = (ys.view(1, -1) - cy.view(-1, 1)).abs() <= h.view(-1, 1) / 2
    return (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).float().view(-1, 1, 1, height, width)
