#!/usr/bin/env python3
"""Feeding: does the teacher wait for clips? One teacher epoch through the pipeline against the
same epoch on tensors in memory, in one run.

    python benchmarks/feeding.py [--epochs 2 6] [overrides ...]

On the embedded default's data (`tsgd-ray run default`'s 512 training clips, 8x32x32):

    pipeline   the teacher stage (Ray Train worker reading the clip cache): the time of a run of
               the second --epochs count minus that of the first, divided by the difference, so
               Ray Train's start-up cancels out (the cache is built before either run)
    memory     `core.training.train_teacher` on the same clips held as one uint8 tensor, in this
               process with the worker's thread count, per epoch

and prints seconds per epoch and pipeline / memory (target <= 1.25), plus Ray Train's fixed
start-up cost per run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs=2, default=[2, 6], help="two teacher runs, short and long")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench-feeding")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import shutil

    import ray
    import torch

    from tsgd_ray.config import load_config
    from tsgd_ray.core import training
    from tsgd_ray.data import clip_cache
    from tsgd_ray.data.in_memory import load_split
    from tsgd_ray.data.prepare import run_prepare
    from tsgd_ray.distributed.artifacts import new_teacher
    from tsgd_ray.distributed.teacher import run_teacher

    shutil.rmtree(args.workdir, ignore_errors=True)  # this benchmark's own outputs of an earlier run
    common = [f"storage.output_root={args.workdir}", *args.overrides]
    cfg = load_config("default", common)
    ray.init(
        num_cpus=cfg.ray.num_cpus or None,
        include_dashboard=False,
        object_store_memory=cfg.ray.object_store_mb * 2**20 or None,
        log_to_driver=False,
        _temp_dir=str(REPO / ".cache" / "ray-bench"),
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_prepare(cfg)
    clip_cache.ensure(cfg, "train")  # decode once, before the timing
    seconds = {}
    for epochs in args.epochs:
        run_cfg = load_config("default", [*common, f"teacher.epochs={epochs}"])
        started = time.perf_counter()
        run_teacher(run_cfg)
        seconds[epochs] = time.perf_counter() - started
        print(f"teacher stage, {epochs} epochs: {seconds[epochs]:.1f} s", flush=True)
    short, long = args.epochs
    pipeline = (seconds[long] - seconds[short]) / (long - short)
    startup = seconds[short] - short * pipeline
    ray.shutdown()

    clips, labels, classes = load_split(cfg, "train")
    torch.set_num_threads(max(1, math.ceil(cfg.teacher.cpus_per_worker)))
    memory_cfg = load_config("default", [*common, "teacher.epochs=1"])
    settings = training.TeacherSettings.from_config(memory_cfg)
    training.train_teacher(new_teacher(memory_cfg, len(classes)), clips[:64], labels[:64], settings)  # warm-up
    started = time.perf_counter()
    training.train_teacher(new_teacher(memory_cfg, len(classes)), clips, labels, settings)
    memory = time.perf_counter() - started
    print(
        f"{len(clips)} clips of {tuple(clips.shape[1:])}, batch {cfg.teacher.batch_size}, {torch.get_num_threads()} threads"
    )
    print(
        f"seconds per epoch: pipeline {pipeline:.2f}, memory {memory:.2f}; Ray Train start-up {startup:.1f} s per run"
    )
    target("feeding_teacher_epoch_pipeline_over_memory", pipeline / memory, "<=", 1.25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
