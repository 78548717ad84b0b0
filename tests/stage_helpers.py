"""Shared set-up for the stage and fault tests: a tiny dataset, a quickly trained teacher imported
as a checkpoint (so these tests do not pay for Ray Train), and the undisturbed reference result."""

from __future__ import annotations

from pathlib import Path

import torch

from tsgd_ray.config import Method
from tsgd_ray.core.models import checkpoint_bytes
from tsgd_ray.core.recovery import recover
from tsgd_ray.core.training import train_teacher
from tsgd_ray.data.in_memory import load_split
from tsgd_ray.distributed.layout import method_config

from conftest import tiny_config

DISTILL = ["distill.iterations=40", "distill.partitions=4", "distill.actors=1", "distill.cpus_per_actor=0.5",
           "teacher.width=8", "teacher.depth=2", "evaluate.epochs=2", "evaluate.seeds=[0]"]


def teacher_file(folder: Path) -> Path:
    """A small teacher trained in-process on the tiny dataset, saved as a user's checkpoint."""
    cfg = tiny_config(folder / "scratch", "teacher.width=8", "teacher.depth=2", "teacher.epochs=3")
    clips, labels, classes = load_split(cfg, "train")
    from tsgd_ray.distributed.teacher import new_teacher

    model = train_teacher(new_teacher(cfg, len(classes)), clips, labels, cfg)
    path = folder / "teacher.pt"
    path.write_bytes(checkpoint_bytes(model, classes))
    return path


def imported_config(output_root: Path, teacher: Path, *overrides: str):
    return method_config(tiny_config(output_root, f"teacher.checkpoint={teacher}", *DISTILL, *overrides), Method.tsgd)


def reference_videos(cfg) -> torch.Tensor:
    """The synthetic set of an undisturbed run, recovered in this process partition by partition
    (the run's plan: forward passes hold the same videos, so the float rounding is the same):
    (N, 3, F, H, W) in (class, index) order."""
    from tsgd_ray.core.clips import to_model_input
    from tsgd_ray.data.prepare import shards_root
    from tsgd_ray.data.shards import read_manifest
    from tsgd_ray.distributed.distill import load_plan
    from tsgd_ray.distributed.stats import load_init, load_statistics
    from tsgd_ray.distributed.teacher import load_teacher

    classes = read_manifest(shards_root(cfg))["classes"]
    teacher, init, stats = load_teacher(cfg, classes), load_init(cfg), load_statistics(cfg)
    out = torch.empty(init["clips"].shape[0], 3, *init["clips"].shape[1:4])
    for partition in load_plan(cfg, len(classes)):
        rows = torch.isin(init["labels"], torch.tensor(partition))
        x0 = to_model_input(init["clips"][rows], cfg.data.mean, cfg.data.std)
        out[rows] = recover(teacher, x0, init["labels"][rows], init["indices"][rows], cfg, stats)
    return out


def assert_same_videos(a: torch.Tensor, b: torch.Tensor, cfg) -> None:
    """The same synthetic set: bit-identical, or - when another process or node computed a
    partition - within one grey level of 255 once rendered. CPU kernels may round the last bit
    differently in another process (memory alignment), and recovery's steps amplify it."""
    from tsgd_ray.core.clips import to_uint8_clips

    assert a.shape == b.shape
    if torch.equal(a, b):
        return
    diff = (to_uint8_clips(a, cfg.data.mean, cfg.data.std).int() - to_uint8_clips(b, cfg.data.mean, cfg.data.std).int()).abs()
    assert diff.max() <= 1, f"videos differ by up to {int(diff.max())} grey levels"
