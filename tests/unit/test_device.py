"""Where work runs: a process without a Ray GPU stays on the CPU, the process group suits how GPUs are
shared, and (where CUDA exists) the CUDA path computes what the CPU path computes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_recovery import config, synthetic_set, teacher_and_stats

from tsgd_ray.core import recovery
from tsgd_ray.core.device import reserved_gpus, resolve_device, tune_for
from tsgd_ray.runtime.ray_train import scaling_config, torch_config
from tsgd_ray.settings import recovery_settings

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def section(gpus: float, workers: int) -> SimpleNamespace:
    return SimpleNamespace(gpus_per_worker=gpus, num_workers=workers, cpus_per_worker=1.0)


def test_auto_stays_on_the_cpu_where_ray_gave_no_gpu_even_when_cuda_is_visible(monkeypatch):
    """Recent Ray leaves a node's GPUs visible to actors that reserved none: such an actor must not
    take a GPU that Ray lent to another worker."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", 0, "stats.gpus_per_actor") == torch.device("cpu")
    assert resolve_device("auto", 1, "stats.gpus_per_actor") == torch.device("cuda")
    assert resolve_device("cuda:1", 0) == torch.device("cuda:1")  # an explicit device is the user's choice


def test_a_cpu_run_reserves_no_gpus():
    assert reserved_gpus("cpu", 1) == 0 and reserved_gpus("auto", 0.5) == 0.5
    cpu = scaling_config(section(1, 2), "cpu")
    assert not cpu.use_gpu and "GPU" not in cpu.resources_per_worker
    gpu = scaling_config(section(1, 2), "auto")
    assert gpu.use_gpu and gpu.resources_per_worker["GPU"] == 1


@pytest.mark.parametrize(
    "gpus, workers, device, backend",
    [
        (1, 4, "auto", "nccl"),  # whole GPUs
        (0.5, 1, "auto", "nccl"),  # one worker has no peer on its GPU
        (0.5, 2, "auto", "gloo"),  # two ranks may share a GPU: NCCL would refuse them
        (0, 2, "auto", "gloo"),  # CPU workers
        (1, 2, "cpu", "gloo"),  # GPUs asked for, but the run is on the CPU
    ],
)
def test_the_process_group_backend_suits_how_workers_hold_gpus(gpus, workers, device, backend):
    assert torch_config(section(gpus, workers), device).backend == backend


@cuda
def test_recovery_on_cuda_agrees_with_the_cpu():
    teacher, stats = teacher_and_stats()
    init, labels, indices = synthetic_set(range(6), ipc=2)
    settings = recovery_settings(config())
    on_cpu = recovery.recover(teacher, init, labels, indices, settings, stats)
    on_gpu = recovery.recover(teacher.cuda(), init, labels, indices, settings, stats)
    assert torch.isfinite(on_gpu).all()
    assert (on_gpu - on_cpu).abs().max() < 0.1 * (on_cpu - init).abs().max()  # TF32 convolutions and kernel order


@cuda
def test_the_cuda_device_is_taken_only_with_a_gpu():
    assert resolve_device("auto", 1, "distill.gpus_per_actor").type == "cuda"
    assert resolve_device("auto", 0, "distill.gpus_per_actor").type == "cpu"


def test_a_process_lent_part_of_a_gpu_holds_its_allocator_to_that_part(monkeypatch):
    """torch's caching allocator would otherwise take the whole GPU in whichever of the actors that
    share it allocates first. (CUDA's own call cannot run here: its recorder stands in.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cuda0 = torch.device("cuda", 0)
    tune_for(cuda0, 0.5)
    tune_for(cuda0, 1.0)  # a whole GPU: no limit
    tune_for(torch.device("cpu"), 0.5)  # Ray's fraction means nothing on the CPU
    assert calls == [(0.5, cuda0)] and torch.backends.cudnn.benchmark


def test_a_frozen_teachers_weights_are_cast_to_bf16_once_not_at_every_forward():
    """Under bf16 autocast a frozen model's conv and linear weights are cast at every forward (the
    cast cache keeps only tensors that require grad); `bf16_weights` holds them in bf16 (BN stays
    float32) so that a forward casts only its input, and puts the very float32 tensors back.
    (CPU autocast stands in for CUDA's, which `frozen_bf16` gates it to.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tsgd_ray.core.bn_stats import batchnorm_layers
    from tsgd_ray.core.device import bf16_weights, frozen_bf16

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Casts.count += func.overloadpacket.__name__ == "_to_copy"
            return func(*args, **(kwargs or {}))

    def casts(model, x) -> int:
        Casts.count = 0
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), Casts():
            model(x)
        return Casts.count

    teacher, _ = teacher_and_stats()
    teacher.requires_grad_(False)
    x = torch.randn(2, 3, 8, 32, 32)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in teacher.named_parameters()}
    every_forward = casts(teacher, x)
    with bf16_weights(teacher):
        once = casts(teacher, x)
        assert all(layer.weight.dtype == torch.float32 for layer in batchnorm_layers(teacher))
    assert once < every_forward and every_forward - once >= len(
        [m for m in teacher.modules() if hasattr(m, "weight")]
    ) - len(batchnorm_layers(teacher))
    for name, p in teacher.named_parameters():  # the same float32 storage back, unchanged
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1])
    with frozen_bf16(teacher, torch.device("cpu"), True):  # the CPU runs no autocast: nothing to cast
        assert all(p.dtype == torch.float32 for p in teacher.parameters())
