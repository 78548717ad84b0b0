#!/usr/bin/env python3
"""Feeding: does training wait for clips? An epoch through the pipeline against the same epoch on
tensors in memory, for the teacher and for an evaluation seed, in one run.

    python benchmarks/feeding.py [--epochs 2 6] [overrides ...]

On the embedded default's data (`tsgd-ray run default`'s 480 training clips, 8x32x32):

    pipeline   the stage as the pipeline runs it: Ray Train workers reading the clip cache. The
               time of a run of the second --epochs count minus that of the first, divided by
               the difference, so Ray Train's start-up and each run's fixed work (the tests of an
               evaluation seed) cancel out; the cache is built before either run
    memory     the same loop in this process on the clips held as one uint8 tensor, with the
               worker's thread count, per epoch

for the teacher (`teacher.epochs`) and for one evaluation seed of the `full` baseline (a student
with online teacher labels and TSGFA over every real training clip, `evaluate.full.epochs`), and
prints seconds per epoch and pipeline / memory (target <= 1.25 each).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target  # noqa: E402

from tsgd_ray.settings import student_settings, teacher_settings  # noqa: E402


def per_epoch(run, counts: list[int]) -> tuple[float, float]:
    """(seconds per epoch, fixed seconds per run) of run(epochs), from runs of the two counts."""
    seconds = {}
    for epochs in counts:
        started = time.perf_counter()
        run(epochs)
        seconds[epochs] = time.perf_counter() - started
    short, long = counts
    epoch = (seconds[long] - seconds[short]) / (long - short)
    return epoch, seconds[short] - short * epoch


def in_memory(fit) -> float:
    """Seconds of fit(), after one warm-up call."""
    fit()
    started = time.perf_counter()
    fit()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs=2, default=[2, 6], help="two runs per stage, short and long")
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench-feeding")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import shutil

    import ray
    import torch

    from tsgd_ray.artifacts import load_teacher, new_teacher
    from tsgd_ray.config import Method, load_config, regimes
    from tsgd_ray.core import training
    from tsgd_ray.data.in_memory import load_split
    from tsgd_ray.methods import method_config
    from tsgd_ray.runtime.cluster import init_ray
    from tsgd_ray.stages.evaluate import new_student, run_evaluate
    from tsgd_ray.stages.prepare import decode_once, run_prepare
    from tsgd_ray.stages.teacher import run_teacher

    shutil.rmtree(args.workdir, ignore_errors=True)  # this benchmark's own outputs of an earlier run
    common = [f"storage.output_root={args.workdir}", "evaluate.seeds=[0]", *args.overrides]

    def config(*more: str):
        return load_config("default", [*common, *more])

    cfg = config()
    init_ray(cfg)  # as `tsgd-ray run` starts it (Ray Train's controller polls every 0.25 s)
    run_prepare(cfg)
    decode_once(cfg)  # the clip caches, before the timing
    teacher_epoch, teacher_fixed = per_epoch(lambda n: run_teacher(config(f"teacher.epochs={n}")), args.epochs)
    run_teacher(config("teacher.epochs=1"))  # the students' teacher

    def evaluate(n: int) -> None:
        run_evaluate(method_config(config("teacher.epochs=1", f"evaluate.full.epochs={n}"), Method.full), Method.full)

    student_epoch, student_fixed = per_epoch(evaluate, args.epochs)
    ray.shutdown()

    clips, labels, classes = load_split(cfg, "train")
    torch.set_num_threads(max(1, math.ceil(cfg.teacher.cpus_per_worker)))
    one = config("teacher.epochs=1", "evaluate.full.epochs=1")
    for_teacher = teacher_settings(one)
    teacher_memory = in_memory(
        lambda: training.train_teacher(new_teacher(one, len(classes)), clips, labels, for_teacher)
    )
    full = method_config(one, Method.full)
    teacher = load_teacher(full, classes)
    # as the pipeline's `full` student: with no stored labels, the teacher labels online
    for_student = replace(student_settings(full), regime=regimes.get("soft_kl"))
    torch.set_num_threads(max(1, math.ceil(cfg.evaluate.cpus_per_worker)))
    student_memory = in_memory(
        lambda: training.train_student(new_student(full, len(classes), 0), teacher, clips, labels, for_student, 0)
    )
    print(f"{len(clips)} clips of {tuple(clips.shape[1:])}, {torch.get_num_threads()} threads")
    print(
        f"teacher: {teacher_epoch:.2f} s per epoch through the pipeline, {teacher_memory:.2f} s in memory "
        f"(batch {cfg.teacher.batch_size}); fixed {teacher_fixed:.1f} s per run"
    )
    print(
        f"evaluation seed (full): {student_epoch:.2f} s per epoch through the pipeline, {student_memory:.2f} s in "
        f"memory (batch {cfg.evaluate.batch_size}); fixed {student_fixed:.1f} s per run"
    )
    target("feeding_teacher_epoch_pipeline_over_memory", teacher_epoch / teacher_memory, "<=", 1.25)
    target("feeding_evaluation_epoch_pipeline_over_memory", student_epoch / student_memory, "<=", 1.25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
