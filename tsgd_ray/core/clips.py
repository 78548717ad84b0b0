"""Between decoded clips (uint8, frames last) and model inputs (normalised float, channels first)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def _per_channel(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


def to_model_input(clips: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, F, H, W, 3) uint8 RGB -> (N, 3, F, H, W) float32, (x/255 - mean) / std per channel."""
    x = clips.permute(0, 4, 1, 2, 3).float().div_(255.0)
    return (x - _per_channel(mean, x)) / _per_channel(std, x)


def to_uint8_clips(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of `to_model_input`: (N, 3, F, H, W) float -> (N, F, H, W, 3) uint8 (rounded, clamped)."""
    rgb = x.detach().float() * _per_channel(std, x.float()) + _per_channel(mean, x.float())
    return rgb.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


def valid_range(mean: Sequence[float], std: Sequence[float], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) of the normalised space, shaped (1, 3, 1, 1, 1): the images of 0 and 1."""
    m, s = _per_channel(mean, like), _per_channel(std, like)
    return (0 - m) / s, (1 - m) / s


@dataclass(frozen=True)
class InputSettings:
    """How decoded clips become model input: per-channel `mean` and `std` of x/255 (RGB), and
    whether the model runs under bfloat16 autocast on CUDA (`amp`)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    amp: bool = False

    def model_input(self, clips: torch.Tensor) -> torch.Tensor:
        """`to_model_input` of uint8 clips (N, F, H, W, 3)."""
        return to_model_input(clips, self.mean, self.std)

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 clips (N, F, H, W, 3) -> model input; model input is returned as it is."""
        return self.model_input(x) if x.dtype == torch.uint8 else x

    def valid_range(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`valid_range` of these settings on `like`'s device and dtype."""
        return valid_range(self.mean, self.std, like)
