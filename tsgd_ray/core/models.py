"""Video classifiers built by name, and their checkpoints.

Input layout, for every model here: a float tensor (N, 3, F, H, W) (channels, frames, height,
width) in the normalised space of `tsgd_ray.core.clips`; output logits (N, num_classes).
"""

from __future__ import annotations

import io
import json
from typing import Callable, Sequence

import torch
import torch.nn as nn

from tsgd_ray.errors import UserError

ModelBuilder = Callable[..., nn.Module]
MODELS: dict[str, ModelBuilder] = {}


class ModelError(UserError, ValueError):
    """An unknown model name, or a checkpoint that does not fit the model or the class map."""


def register(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def add(builder: ModelBuilder) -> ModelBuilder:
        MODELS[name] = builder
        return builder

    return add


class MiniC3D(nn.Module):
    """The small 3D ConvNet of the video-distillation benchmarks, with BatchNorm3d.

    `depth` blocks of Conv3d(3x3x3) -> BatchNorm3d -> ReLU -> AvgPool3d, then a global average
    pool and a linear layer. Channels are width, 2*width, 4*width, 4*width, ... The first pool is
    spatial only (C3D's pool1); later ones also halve time. A dimension stops being pooled once it
    is 1, so any input of `input_size` = (F, H, W) works. `factorized`: each 3x3x3 convolution is
    (2+1)D instead (R(2+1)D: a 1x3x3 spatial convolution, BatchNorm3d, ReLU, a 3x1x1 temporal one),
    a student of another architecture than the teacher at the same size.
    """

    def __init__(
        self,
        num_classes: int,
        input_size: Sequence[int] = (16, 112, 112),
        width: int = 32,
        depth: int = 4,
        factorized: bool = False,
    ):
        super().__init__()
        frames, height, width_px = input_size
        layers: list[nn.Module] = []
        channels_in = 3
        for i in range(depth):
            channels = width * min(2**i, 4)
            pool_t = 2 if i > 0 and frames >= 2 else 1
            pool_h, pool_w = (2 if height >= 2 else 1), (2 if width_px >= 2 else 1)
            if factorized:
                layers += [
                    nn.Conv3d(channels_in, channels, (1, 3, 3), padding=(0, 1, 1), bias=False),
                    nn.BatchNorm3d(channels),
                    nn.ReLU(inplace=True),
                    nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0), bias=False),
                ]
            else:
                layers.append(nn.Conv3d(channels_in, channels, 3, padding=1, bias=False))
            layers += [nn.BatchNorm3d(channels), nn.ReLU(inplace=True)]
            if (pool_t, pool_h, pool_w) != (1, 1, 1):
                layers.append(nn.AvgPool3d((pool_t, pool_h, pool_w)))
            frames, height, width_px = frames // pool_t, height // pool_h, width_px // pool_w
            channels_in = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


@register("mini_c3d")
def mini_c3d(num_classes: int, input_size: Sequence[int], width: int = 32, depth: int = 4) -> nn.Module:
    return MiniC3D(num_classes, input_size, width, depth)


@register("mini_r2plus1d")
def mini_r2plus1d(num_classes: int, input_size: Sequence[int], width: int = 32, depth: int = 4) -> nn.Module:
    return MiniC3D(num_classes, input_size, width, depth, factorized=True)


def _torchvision_video(name: str) -> ModelBuilder:
    def build(num_classes: int, input_size: Sequence[int], width: int = 0, depth: int = 0) -> nn.Module:
        try:
            from torchvision.models import video
        except ImportError:
            raise ModelError(f"model {name!r} needs torchvision: pip install 'tsgd-ray[vision]'") from None
        return getattr(video, name)(weights=None, num_classes=num_classes)

    return build


for _name in ("r3d_18", "mc3_18", "r2plus1d_18"):
    register(_name)(_torchvision_video(_name))


def build_model(name: str, num_classes: int, input_size: Sequence[int], width: int = 32, depth: int = 4) -> nn.Module:
    """Build a registered model; `width` and `depth` apply to the mini_* models only.

    Raises:
        ModelError: for an unknown name, or a torchvision model without torchvision installed.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes, input_size, width=width, depth=depth)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm3d) for m in model.modules())


def checkpoint_bytes(model: nn.Module, class_names: Sequence[str], meta: dict | None = None) -> bytes:
    """Serialise a model's state dict with its class map, loadable with weights_only=True."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "class_names": list(class_names), "meta": dict(meta or {})}, buffer)
    return buffer.getvalue()


def _is_safetensors(data: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header."""
    return len(data) > 8 and int.from_bytes(data[:8], "little") < len(data) and data[8:9] == b"{"


def _read_checkpoint(data: bytes) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    if _is_safetensors(data):
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError:
            raise ModelError("a safetensors checkpoint needs the safetensors package") from None
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        names = header.get("__metadata__", {}).get("class_names")
        return load_safetensors(data), (json.loads(names) if names else None)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with code, truncated file, not a checkpoint at all
        raise ModelError(f"cannot load the checkpoint with weights_only=True: {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj["state_dict"], obj.get("class_names")
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None  # a bare state dict
    raise ModelError("the checkpoint is neither a state dict nor {'state_dict': ..., 'class_names': ...}")


def load_checkpoint(model: nn.Module, data: bytes, class_names: Sequence[str]) -> nn.Module:
    """Load `data` (torch state dict, or safetensors with a `class_names` JSON metadata entry) into
    `model`, refusing any class map other than `class_names` and any missing or misshapen weight.

    A checkpoint without a class map is accepted when its head has len(class_names) outputs.

    Raises:
        ModelError: naming what does not match.
    """
    state, saved_names = _read_checkpoint(data)
    if saved_names is not None and list(saved_names) != list(class_names):
        missing = sorted(set(class_names) - set(saved_names))
        extra = sorted(set(saved_names) - set(class_names))
        raise ModelError(
            f"checkpoint class map does not match the dataset's {len(class_names)} classes "
            f"(checkpoint has {len(saved_names)}; missing {missing[:5]}, extra {extra[:5]}"
            f"{', same names in another order' if not missing and not extra else ''})"
        )
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshapen:
        raise ModelError(
            f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in misshapen[:3]]}"
        )
    model.load_state_dict(state)
    return model
