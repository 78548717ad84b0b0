"""What Ray Train needs around the core steps: scaling, run storage, the worker's device and model.

Shared by the teacher stage and the student evaluation; the per-batch work is in
`tsgd_ray.core.training`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn as nn

from tsgd_ray import storage


def scaling_config(section, device: str):
    """A ScalingConfig from a section with num_workers, cpus_per_worker, gpus_per_worker."""
    from ray.train import ScalingConfig

    use_gpu = section.gpus_per_worker > 0 and device != "cpu"
    resources = {"CPU": section.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = section.gpus_per_worker
    return ScalingConfig(num_workers=section.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def run_config(storage_uri: str, name: str, max_failures: int, callbacks: Sequence = ()):
    """A RunConfig whose checkpoints live at `storage_uri`/`name` (local path or s3://...), with
    controller-side `callbacks` (e.g. `tracking.live_curve`).

    Rerunning with the same `storage_uri` and `name` resumes from the latest checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name,
        storage_path=storage.absolute(storage_uri),
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=list(callbacks),
    )


def data_config(datasets: dict):
    """A DataConfig that keeps each dataset's own execution options.

    Ray Train otherwise replaces them with the driver's global DataContext options, which drops
    `data.preserve_order`: blocks would reach the workers in whichever order the decoders finish
    (and, with several workers, `streaming_split` would deal them out differently run to run).
    """
    from ray.train import DataConfig

    return DataConfig(execution_options={name: ds.context.execution_options for name, ds in datasets.items()})


def worker_setup(section, key: str, device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this Ray Train worker of config section `section` (named
    `key`); torch threads = its CPU share.

    Raises:
        DeviceError: the section asks for GPUs and torch here sees no CUDA.
    """
    import ray.train
    import ray.train.torch

    from tsgd_ray.core.device import resolve_device

    resolve_device(device, section.gpus_per_worker, f"{key}.gpus_per_worker")
    torch.set_num_threads(max(1, math.ceil(section.cpus_per_worker)))
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def uneven_inputs(model: nn.Module):
    """DDP's join context (ranks may see different batch counts after bad clips are dropped)."""
    return model.join() if hasattr(model, "join") else contextlib.nullcontext()


def steps_per_epoch(expected_rows: int, world_size: int, batch_size: int) -> int:
    return max(1, math.ceil(expected_rows / world_size / batch_size))
