"""Shared set-up for the stage and fault tests: a tiny dataset, a quickly trained teacher imported
as a checkpoint (so these tests do not pay for Ray Train)."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_config

from tsgd_ray.config import Method
from tsgd_ray.core.models import checkpoint_bytes
from tsgd_ray.core.training import train_teacher
from tsgd_ray.data.in_memory import load_split
from tsgd_ray.methods import method_config
from tsgd_ray.settings import teacher_settings

DISTILL = [
    "distill.iterations=40",
    "distill.partitions=4",
    "distill.actors=1",
    "distill.cpus_per_actor=0.5",
    "teacher.width=8",
    "teacher.depth=2",
    "evaluate.epochs=2",
    "evaluate.seeds=[0]",
]


def teacher_file(folder: Path, *overrides: str) -> Path:
    """A small teacher trained in-process on the tiny dataset (with `overrides`, e.g. fewer
    classes), saved as a user's checkpoint."""
    cfg = tiny_config(folder / "scratch", "teacher.width=8", "teacher.depth=2", "teacher.epochs=3", *overrides)
    clips, labels, classes = load_split(cfg, "train")
    from tsgd_ray.stages.teacher import new_teacher

    model = train_teacher(new_teacher(cfg, len(classes)), clips, labels, teacher_settings(cfg))
    path = folder / "teacher.pt"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(checkpoint_bytes(model, classes))
    return path


def imported_config(output_root: Path, teacher: Path, *overrides: str):
    return method_config(tiny_config(output_root, f"teacher.checkpoint={teacher}", *DISTILL, *overrides), Method.tsgd)
