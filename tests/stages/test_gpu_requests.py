"""GPUs where a stage asks for them: a stage given a GPU that torch cannot use fails at once,
naming the config key, instead of training on CPU while the cluster bills for the GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from support.stage_helpers import imported_config, teacher_file

from tsgd_ray import layout, storage
from tsgd_ray.cli import run_command
from tsgd_ray.config import to_yaml
from tsgd_ray.core.device import DeviceError, resolve_device
from tsgd_ray.stages.stats import run_stats
from tsgd_ray.stages.teacher import run_teacher

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these check the failure on a machine without CUDA")


def test_a_gpu_request_without_cuda_is_an_error_naming_the_key():
    with pytest.raises(DeviceError, match=r"distill.gpus_per_actor=1 .*CPU-only build.*set distill.gpus_per_actor=0"):
        resolve_device("auto", 1, "distill.gpus_per_actor")
    assert resolve_device("auto") == torch.device("cpu")  # a laptop: auto falls back only when no GPU was asked for
    assert resolve_device("cpu", 1, "distill.gpus_per_actor") == torch.device("cpu")  # an explicit cpu device


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_stages_given_a_gpu_torch_cannot_use_stop_before_any_work(prepared, tmp_path, capsys):
    """The test session's Ray declares a GPU that this machine's CPU-only torch cannot use."""
    import ray

    from tsgd_ray.stages.distill import PartitionWorker

    teacher = teacher_file(tmp_path / "teacher")
    cfg = imported_config(tmp_path / "out", teacher)
    prepared(cfg)
    run_teacher(cfg)
    with pytest.raises(DeviceError, match="stats.gpus_per_actor=1"):
        run_stats(imported_config(tmp_path / "out", teacher, "device=auto", "stats.gpus_per_actor=1"))
    trained = tiny_config(
        tmp_path / "out", "device=auto", "teacher.gpus_per_worker=1", "teacher.epochs=1"
    )  # the same shards
    with pytest.raises(DeviceError, match="teacher.gpus_per_worker=1"):
        run_teacher(trained)
    assert not storage.exists(layout.of(trained).teacher_file)
    # the actors check too (a node whose torch differs from the probe's)
    actor = (
        ray.remote(PartitionWorker)
        .options(num_cpus=0.1, num_gpus=1)
        .remote(imported_config(tmp_path / "out", teacher, "device=auto", "distill.gpus_per_actor=1"), ["a"], 1)
    )
    with pytest.raises(DeviceError, match="distill.gpus_per_actor=1 gives this stage a GPU"):
        ray.get(actor.ready.remote())
    ray.kill(actor)  # alive (the error is kept for ready()), it holds the session's one GPU
    # the command line: one line, exit code 2
    path = tmp_path / "gpu.yaml"
    path.write_text(to_yaml(imported_config(tmp_path / "out", teacher)))
    capsys.readouterr()
    assert run_command("stats", str(path), ["device=auto", "stats.gpus_per_actor=1"]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip().splitlines()[-1].startswith("tsgd-ray stats: error: stats.gpus_per_actor=1 gives this stage a GPU")
    )
    assert "Traceback" not in err
