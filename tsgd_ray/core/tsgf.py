"""The temporal saliency-guided filter (TSGF), as docs/method.md describes it.

`saliency` turns clips into motion maps M in [0, 1] (`motion_energy`: how much a clip moves); `filter_weight`, `filter_update` and
`filter_gradient` are TSGFO (recovery); `motion_diagnostics` says which pixels recovery edited;
`saliency_boxes`, `saliency_crop` and `saliency_cutmix` are TSGFA (student training).
Clips are (N, 3, F, H, W) float tensors on any device; maps are (N, 1, F, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from tsgd_ray.config import Compensation, Granularity
from tsgd_ray.core.augment import box_mask, box_sizes


def temporal_weights(window: int, alpha: Sequence[float]) -> list[float]:
    """alpha_{-k..k} normalised to sum 1: the given weights, else (0.25, 0.5, 0.25) for k=1, else uniform."""
    if alpha:
        weights = list(alpha)
    elif window == 1:
        weights = [0.25, 0.5, 0.25]
    else:
        weights = [1.0] * (2 * window + 1)
    total = sum(weights)
    return [w / total for w in weights]


def _reflect(index: torch.Tensor, length: int) -> torch.Tensor:
    """Reflect-pad indices into [0, length) (t=-1 -> 1, t=length -> length-2), repeatedly if needed."""
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = torch.remainder(index, period)
    return torch.where(index >= length, period - index, index)


def _shift_rows(frames: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Roll each (C, H, W) frame of (B, C, H, W) by its own integer (dy, dx): out[i, j] = in[i-dy, j-dx]."""
    b, c, h, w = frames.shape
    rows = torch.remainder(torch.arange(h, device=frames.device).view(1, -1) - dy.view(-1, 1), h)  # (B, H)
    cols = torch.remainder(torch.arange(w, device=frames.device).view(1, -1) - dx.view(-1, 1), w)  # (B, W)
    out = frames.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def _wrapped_mask(dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H, W) bool: pixels of a rolled frame that did not wrap around the border."""
    i = torch.arange(h, device=dy.device).view(1, -1)
    j = torch.arange(w, device=dy.device).view(1, -1)
    ok_i = (i - dy.view(-1, 1) >= 0) & (i - dy.view(-1, 1) < h)
    ok_j = (j - dx.view(-1, 1) >= 0) & (j - dx.view(-1, 1) < w)
    return ok_i.unsqueeze(2) & ok_j.unsqueeze(1)


def estimate_shift(reference: torch.Tensor, moved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer translation (dy, dx) per pair such that rolling `moved` by it best matches `reference`.

    Phase correlation on (B, H, W) grey images; shifts are in [-H/2, H/2) and [-W/2, W/2).
    """
    h, w = reference.shape[-2:]
    cross = torch.fft.fft2(reference) * torch.fft.fft2(moved).conj()
    response = torch.fft.ifft2(cross / (cross.abs() + 1e-8)).real.flatten(1)
    peak = response.argmax(dim=1)
    dy, dx = peak // w, peak % w
    return (dy + h // 2) % h - h // 2, (dx + w // 2) % w - w // 2


def frame_differences(x: torch.Tensor, compensate: Compensation = Compensation.none) -> torch.Tensor:
    """D_t = mean over channels |x_{t+1} - x_t|, padded to F by repeating the last one: (N, F, H, W).

    compensate=shift aligns x_{t+1} to x_t first (pixels that wrapped around count as 0);
    compensate=median subtracts each difference map's median over pixels (floored at 0).
    A one-frame clip has no motion: zeros.
    """
    n, c, f, h, w = x.shape
    if f == 1:
        return x.new_zeros(n, 1, h, w)
    current, following = x[:, :, :-1], x[:, :, 1:]
    if compensate == Compensation.shift:
        cur = current.transpose(1, 2).reshape(-1, c, h, w)
        nxt = following.transpose(1, 2).reshape(-1, c, h, w)
        dy, dx = estimate_shift(cur.mean(1), nxt.mean(1))
        aligned = _shift_rows(nxt, dy, dx)
        diff = (aligned - cur).abs().mean(1) * _wrapped_mask(dy, dx, h, w)
        diff = diff.view(n, f - 1, h, w)
    else:
        diff = (following - current).abs().mean(1)
        if compensate == Compensation.median:
            median = diff.flatten(2).median(dim=2).values.view(n, f - 1, 1, 1)
            diff = (diff - median).clamp(min=0)
    return torch.cat([diff, diff[:, -1:]], dim=1)


@torch.no_grad()
def motion_energy(x: torch.Tensor, compensate: Compensation = Compensation.none) -> torch.Tensor:
    """How much clips x (N, 3, F, H, W) move: the mean of their frame differences D_t over the
    F - 1 transitions and every pixel, (N,) float32, in x's units per frame (0 for one frame)."""
    d = frame_differences(x.detach().float(), compensate)
    return d[:, :-1].mean(dim=(1, 2, 3)) if d.shape[1] > 1 else d.new_zeros(len(x))


@dataclass(frozen=True)
class SaliencySettings:
    """How `saliency` builds M: camera-motion `compensate`, spatial average-pool `spatial_kernel`
    (pixels, 1 = off), temporal smoothing over `window` frames either side with weights `alpha`
    (empty: the default of `temporal_weights`), `eps` added to the clip maximum, and `granularity`."""

    compensate: Compensation
    spatial_kernel: int
    window: int
    alpha: tuple[float, ...]
    eps: float
    granularity: Granularity


def saliency(x: torch.Tensor, settings: SaliencySettings) -> torch.Tensor:
    """The TSGF saliency map M (N, 1, F, H, W) in [0, 1] of clips x (N, 3, F, H, W), computed
    without gradient, in float32."""
    with torch.no_grad():
        d = frame_differences(x.detach().float(), settings.compensate)  # (N, F, H, W)
        n, f, h, w = d.shape
        k = settings.spatial_kernel
        if k > 1:
            d = F.avg_pool2d(d, k, stride=1, padding=k // 2, count_include_pad=False)
        weights = temporal_weights(settings.window, settings.alpha)
        offsets = torch.arange(-settings.window, settings.window + 1, device=d.device)
        index = _reflect(torch.arange(f, device=d.device).view(-1, 1) + offsets.view(1, -1), f)  # (F, 2k+1)
        alpha = torch.tensor(weights, device=d.device, dtype=d.dtype).view(1, 1, -1, 1, 1)
        s = (d[:, index] * alpha).sum(dim=2)  # (N, F, H, W)
        if settings.granularity == Granularity.frame:
            s = s.mean(dim=(2, 3), keepdim=True).expand(n, f, h, w)
        m = s / (s.flatten(1).amax(dim=1).view(n, 1, 1, 1) + settings.eps)
        return m.unsqueeze(1)


#: diagnostics only: a pixel "really moves" where its init clip's map M is at least this
MOVING = 0.1


def filter_weight(m: torch.Tensor, w_min: float) -> torch.Tensor:
    """TSGFO's weight W = w_min + (1 - w_min) * M, (N, 1, F, H, W): 1 where M = 1, w_min where M = 0."""
    return w_min + (1.0 - w_min) * m


def filter_update(previous: torch.Tensor, new: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """TSGFO on the update (tsgf.apply=update): previous + W * (new - previous), W over channels.

    This is the form that survives Adam: a per-pixel factor on the gradient is divided out again
    by Adam's per-pixel gradient scale, a factor on the step is not."""
    return torch.lerp(previous, new, weight.to(new.dtype))


def filter_gradient(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """TSGFO on the gradient (tsgf.apply=gradient, the paper's words): grad * W."""
    return grad * weight.to(grad.dtype)


@torch.no_grad()
def motion_sums(x: torch.Tensor, x0: torch.Tensor, m0: torch.Tensor, settings: SaliencySettings) -> torch.Tensor:
    """Sums for `motion_diagnostics` over clips x (N, 3, F, H, W) that started as x0 with init map
    m0 (N, 1, F, H, W); add the sums of several batches, then call `motion_diagnostics`. (6,) tensor."""
    moving = (m0 >= MOVING).to(x.dtype)
    static = 1 - moving
    edit = (x - x0).abs().mean(dim=1, keepdim=True)
    m = saliency(x, settings)
    return torch.stack(
        [(edit * static).sum(), static.sum(), (edit * moving).sum(), moving.sum(), (m * moving).sum(), m.sum()]
    )


def motion_diagnostics(sums: torch.Tensor) -> dict[str, float]:
    """What recovery did, from `motion_sums`: edit_static / edit_moving = mean |x - x0| (normalised
    units) over pixels whose init map is below / at least MOVING; motion_share = the share of the
    synthetic clips' own saliency mass on those moving pixels (the init map's share at step 0; it
    falls as recovery invents motion elsewhere)."""
    s = sums.tolist()
    return {
        "edit_static": s[0] / max(s[1], 1.0),
        "edit_moving": s[2] / max(s[3], 1.0),
        "motion_share": s[4] / max(s[5], 1e-12),
    }


def saliency_boxes(
    heat: torch.Tensor,
    u_size: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    delta: float,
    generator: torch.Generator | None = None,
    u_centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boxes (N, 4) = (cx, cy, w, h), normalised, whose centres are drawn from spatial heat maps.

    heat (N, H, W) >= 0 (TSGFA: the time-mean of M); a centre is drawn with probability
    proportional to heat/sum(heat) + delta/(H*W) (an all-zero map gives uniform), then moved the
    least needed to keep the box in the image. Sizes come from uniforms u_size (N, 2) as in a
    random resized crop. The centre comes from uniforms u_centre (N,) by inverse CDF when given
    (a clip's own stream), else from `generator`, which must live on heat's device.
    """
    n, h, w = heat.shape
    flat = heat.flatten(1).float()
    p = flat / flat.sum(dim=1, keepdim=True).clamp(min=1e-12) + delta / (h * w)
    p = torch.where(flat.sum(dim=1, keepdim=True) > 0, p, torch.ones_like(p))
    if u_centre is None:
        pixel = torch.multinomial(p, 1, generator=generator).squeeze(1)
    else:
        cdf = p.cumsum(1)
        target = (u_centre.to(cdf) * cdf[:, -1]).unsqueeze(1)
        pixel = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=h * w - 1)
    cy = (2 * (pixel // w).float() + 1) / h - 1
    cx = (2 * (pixel % w).float() + 1) / w - 1
    bw, bh = box_sizes(u_size[:, 0], u_size[:, 1], scale, ratio)
    cx = torch.maximum(torch.minimum(cx, 1 - bw / 2), -1 + bw / 2)
    cy = torch.maximum(torch.minimum(cy, 1 - bh / 2), -1 + bh / 2)
    return torch.stack([cx, cy, bw, bh], dim=1)


def saliency_cutmix(x: torch.Tensor, boxes: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Paste into clip i the box `boxes[i]` (normalised (cx, cy, w, h)) of clip permutation[i], in
    every frame. x (N, 3, F, H, W) -> (N, 3, F, H, W)."""
    mask = box_mask(boxes, x.shape[-2], x.shape[-1]).to(x.dtype)
    return x * (1 - mask) + x[permutation] * mask
