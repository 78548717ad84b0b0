"""Where tensors run: the configured device, and mixed precision on CUDA."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when enabled; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", torch.bfloat16)
    return contextlib.nullcontext()
