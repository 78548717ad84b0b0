"""A Ray worker setup hook for clusters whose nodes declare GPUs this machine does not have: the
stages still ask Ray for their GPUs (so an autoscaler adds GPU node types), and compute on the CPU.
It replaces `tsgd_ray.core.device`'s device choice before any stage imports it, Ray Train's (which
follows the GPU ids Ray assigned), and the Ray Train process group's NCCL (which a CPU build of
torch lacks) by gloo; the driver runs it too."""

from __future__ import annotations


def setup() -> None:
    import torch
    from ray.train.torch import TorchConfig

    from tsgd_ray.core import device
    from tsgd_ray.runtime import ray_train

    device.require_cuda = lambda report, key, gpus: None
    device.resolve_device = lambda name, gpus=0.0, key="": torch.device("cpu")
    ray_train.torch_config = lambda section, name: TorchConfig(backend="gloo")
    import ray.train.torch
    from ray.train.v2.torch import train_loop_utils

    train_loop_utils.get_device = ray.train.torch.get_device = lambda: torch.device("cpu")
