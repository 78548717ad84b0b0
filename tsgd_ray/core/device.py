"""Where tensors run: the configured device, and mixed precision on CUDA."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn

from tsgd_ray.config import ConfigError


class DeviceError(ConfigError):
    """A stage asked Ray for GPUs, but torch where it runs cannot use CUDA."""


def cuda_report() -> dict:
    """What this process's torch sees: {cuda, torch, cuda_build, visible} (visible: CUDA_VISIBLE_DEVICES)."""
    return {
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }


def require_cuda(report: dict, key: str, gpus: float) -> None:
    """Raise DeviceError naming `key` when `gpus` > 0 were requested but `report` has no CUDA."""
    if gpus > 0 and not report["cuda"]:
        build = f"CUDA {report['cuda_build']} build" if report["cuda_build"] else "a CPU-only build"
        raise DeviceError(
            f"{key}={gpus:g} gives this stage a GPU, but torch {report['torch']} ({build}) sees no CUDA "
            f"device there (CUDA_VISIBLE_DEVICES={report['visible']!r}): install a CUDA torch that fits "
            f"the node's driver, or set {key}=0 to run this stage on CPU"
        )


def resolve_device(name: str, gpus: float = 0.0, key: str = "") -> torch.device:
    """The device of a process that Ray gave `gpus` GPUs: `auto` -> cuda when `gpus` > 0, else cpu
    (recent Ray no longer hides a node's GPUs from actors that reserved none, and such an actor must
    not run on a GPU Ray lent to another); otherwise the named device.

    Raises:
        DeviceError: `gpus` > 0 were requested (under config key `key`) for a device other than
        cpu, and this process has no CUDA: never a silent CPU fallback on a GPU node.
    """
    if name != "cpu":
        require_cuda(cuda_report(), key, gpus)
    if name == "auto":
        return torch.device("cuda" if gpus > 0 else "cpu")
    return torch.device(name)


def reserved_gpus(device: str, gpus: float) -> float:
    """The GPUs to ask Ray for: `gpus`, or none when the config's device is cpu (a CPU run must not
    hold GPUs it will not use)."""
    return 0.0 if device == "cpu" else gpus


def tune_for(device: torch.device, gpus: float = 1.0) -> None:
    """Per-process CUDA settings for fixed clip shapes: cuDNN picks its fastest kernels once per
    shape (cudnn.benchmark); where Ray lent this process a fraction of a GPU (0 < gpus < 1), torch's
    allocator is held to that fraction of the device's memory, so processes sharing a GPU cannot
    starve one another (one past its share gets CUDA's out-of-memory error itself). A no-op elsewhere."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if 0 < gpus < 1:
            torch.cuda.set_per_process_memory_fraction(gpus, device)


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when enabled; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", torch.bfloat16)
    return contextlib.nullcontext()


def frozen_bf16(model: nn.Module, device: torch.device, enabled: bool):
    """Where `autocast` runs bf16 (CUDA, enabled): a frozen model's conv and linear weights and
    biases held in bfloat16 for the duration, BN layers kept in float32, the float32 tensors put
    back on exit. autocast would otherwise cast every weight again at every forward (its cast cache
    keeps only tensors that require grad). A no-op elsewhere."""
    return bf16_weights(model) if enabled and device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def bf16_weights(model: nn.Module):
    """`frozen_bf16` on any device: the swap itself (tests run it on the CPU)."""
    kept = []
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            for p in (module.weight, module.bias):
                if p is not None and p.dtype == torch.float32:
                    kept.append((p, p.data))
                    p.data = p.data.to(torch.bfloat16)
    try:
        yield model
    finally:
        for p, data in kept:
            p.data = data
