"""What Ray Train needs around the core steps: scaling, run storage, the worker's device and model.

Shared by the teacher stage and the student evaluation; the per-batch work is in
`tsgd_ray.core.training`.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.core.device import reserved_gpus, resolve_device, tune_for
from tsgd_ray.core.training import FitState
from tsgd_ray.data import clip_cache
from tsgd_ray.data.node_cache import NodeCache
from tsgd_ray.data.pipeline import ClipStream, clip_dataset, expected_rows

STATE_FILE = "state.pt"


def scaling_config(section, device: str):
    """A ScalingConfig from a section with num_workers, cpus_per_worker, gpus_per_worker (no GPUs
    when the device is cpu) and, where it has one, min_workers: a non-zero one below num_workers
    makes the group elastic (Ray Train restarts it on what the cluster holds, between the two)."""
    from ray.train import ScalingConfig

    gpus = reserved_gpus(device, section.gpus_per_worker)
    resources = {"CPU": section.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    least = getattr(section, "min_workers", 0)
    workers = (least, section.num_workers) if 0 < least < section.num_workers else section.num_workers
    return ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources)


def torch_config(section, device: str):
    """The workers' process group: NCCL on whole GPUs; gloo on CPU and where workers share a GPU
    (a fraction of one each), since NCCL refuses two ranks on one device ("Duplicate GPU detected",
    ray-project/ray#48012) while gloo all-reduces CUDA tensors through the host."""
    from ray.train.torch import TorchConfig

    gpus = reserved_gpus(device, section.gpus_per_worker)
    whole = gpus >= 1 or section.num_workers == 1
    return TorchConfig(backend="nccl" if gpus > 0 and whole else "gloo")


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

    resolve_device(device, section.gpus_per_worker, f"{key}.gpus_per_worker")
    torch.set_num_threads(max(1, math.ceil(section.cpus_per_worker)))
    context = ray.train.get_context()
    where = ray.train.torch.get_device()
    tune_for(where, section.gpus_per_worker)
    return context.get_world_rank(), context.get_world_size(), where


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def uneven_inputs(model: nn.Module):
    """DDP's join context (ranks may see different batch counts after bad clips are dropped)."""
    return model.join() if hasattr(model, "join") else contextlib.nullcontext()


#: live-curve reports (and checkpoints) per training run of short epochs. Ray Train's controller
#: takes one report per health check (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default, 0.25 s as
#: the project starts Ray) and a worker's report waits for it, so a report per fast epoch stalls
#: training (240 student epochs of 0.1 s each were heading for 7 min instead of half a minute);
#: each report carries the rows of every epoch since the last one.
REPORTS_PER_RUN = 10
#: and at least this many optimiser steps between two reports (a default student's 240 one-step
#: epochs: 4 reports, not 10, each a wait of up to a health check beside ~3 s of steps)
STEPS_PER_REPORT = 64
#: epochs of at least this many steps report (and checkpoint) every epoch: the wait is then small
#: beside the epoch, and a lost node repeats at most one epoch (hours of `full` at Kinetics size)
LONG_EPOCH_STEPS = 200


def report_due(epoch: int, epochs: int, steps_per_epoch: int = 0) -> bool:
    """Whether 0-based `epoch` of `epochs` ends with a report: every epoch when an epoch has at
    least LONG_EPOCH_STEPS steps, else every ceil(epochs / REPORTS_PER_RUN) epochs but at least
    STEPS_PER_REPORT steps apart, and the last; the same on every rank (a report is a collective
    across workers)."""
    if steps_per_epoch >= LONG_EPOCH_STEPS:
        every = 1
    else:
        every = max(math.ceil(epochs / REPORTS_PER_RUN), math.ceil(STEPS_PER_REPORT / max(1, steps_per_epoch)))
    return (epoch + 1) % every == 0 or epoch == epochs - 1


def latest_state() -> Optional[dict]:
    """The `FitState.state_dict()` of this Ray Train run's latest checkpoint (see `report`),
    loaded with weights_only=True on the CPU; None when the run has none (a fresh start)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else checkpoint_state(checkpoint)


def report(metrics: dict, state: FitState, rank: int) -> None:
    """Report `metrics` with a checkpoint of `state` (written by rank 0; every rank calls this,
    a report is a collective). Ray Train keeps the latest two under the run's storage."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if rank == 0:
            torch.save(state.state_dict(), Path(folder, STATE_FILE))
            saved = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=saved)


#: a run's own checkpoints kept by `save_state` (the latest and the one before it)
KEEP_STATES = 2


def save_state(folder: str, state: FitState) -> None:
    """Write `state` as `folder`/epoch-<epoch>.pt (write-once), then remove all but the latest
    KEEP_STATES: a training run's own checkpoints, for runs that share one Ray Train run (the
    evaluation fleet's students). Called by one rank."""
    import io

    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    storage.write_once(storage.join(folder, f"epoch-{state.epoch:05d}.pt"), buffer.getvalue())
    for old in storage.list_files(folder, ["pt"])[:-KEEP_STATES]:
        storage.remove(old)


def load_state(folder: str) -> Optional[dict]:
    """The `FitState.state_dict()` of `folder`'s latest `save_state` (weights_only, on the CPU);
    None when it has none (a fresh start)."""
    import io

    files = storage.list_files(folder, ["pt"])
    if not files:
        return None
    return torch.load(io.BytesIO(storage.read_bytes(files[-1])), map_location="cpu", weights_only=True)


def checkpoint_state(checkpoint) -> dict:
    """The `FitState.state_dict()` a `report` checkpoint holds (weights_only, on the CPU)."""
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder, STATE_FILE), map_location="cpu", weights_only=True)


def per_worker_batch(batch_size: int, world_size: int) -> int:
    """Each worker's share of a global batch (`teacher.batch_size`, `evaluate.batch_size` are
    global: adding workers does not change the optimisation)."""
    return max(1, math.ceil(batch_size / world_size))


class ClipSource:
    """Where a Ray Train run's real clips come from, by name ("train", "eval"): the clip cache
    (`data.clip_cache`, decoded once by the driver before the run) or Ray Data datasets decoding
    live. Built on the driver, picklable into the train loop config."""

    def __init__(self, cfg: DictConfig, splits: dict[str, str], tested: Iterable[str] = ()):
        """splits: name -> split; names in `tested` are only evaluated (one cached view)."""
        self.cfg = cfg
        self.expected = {name: expected_rows(cfg, split) for name, split in splits.items()}
        self.caches: dict[str, dict] = {}
        self.datasets = {}
        for name, split in splits.items():
            if cfg.data.clip_cache:
                self.caches[name] = clip_cache.ensure(cfg, split, 1 if name in tested else None)
            else:
                self.datasets[name] = clip_dataset(cfg, split)

    def __getstate__(self) -> dict:
        """Workers get the caches' markers; live datasets reach them through Ray Train's `datasets`."""
        return {**self.__dict__, "datasets": {}}

    def steps(self, name: str, world: int, batch_size: int) -> int:
        """Optimiser steps per epoch of the busiest worker."""
        if name in self.caches:
            return clip_cache.steps(self.caches[name], world, batch_size)
        return max(1, math.ceil(self.expected[name] / world / batch_size))

    def batches(
        self,
        name: str,
        epoch: int,
        batch_size: int,
        rank: int,
        world: int,
        seed: Optional[int] = None,
        pin: bool = False,
    ):
        """An iterable of this worker's batches ({"clip", "label", "video_id"}) for one pass;
        seed: shuffled with it (training), None: in order; pin (for a CUDA device): the cache's
        batches come assembled ahead in page-locked memory (`clip_cache.prefetched`). The live
        source has a `bad` list."""
        if name in self.caches:
            node = NodeCache.for_config(self.cfg)
            passes = clip_cache.batches(self.caches[name], epoch, batch_size, rank, world, seed, node)
            # on a CPU device the CPUs that would assemble batches ahead are the ones training
            return clip_cache.prefetched(passes, pin=True) if pin else passes
        import ray.train

        return ClipStream(
            ray.train.get_dataset_shard(name),
            self.expected[name] // world,
            self.cfg.data.max_bad_fraction,
            batch_size,
            shuffle_seed=seed,
        )

    def store_bytes(self) -> int:
        """Bytes this process's node cache has downloaded from the output root so far (0 without one)."""
        node = NodeCache.for_config(self.cfg)
        return node.counters["remote_bytes"] if node else 0

    def bad(self, name: str, batches) -> int:
        """Videos of `name` that failed to decode: when the cache was built, or in this pass
        (`batches`, from `self.batches`) of a live source."""
        return int(self.caches[name]["bad"]) if name in self.caches else len(batches.bad)
