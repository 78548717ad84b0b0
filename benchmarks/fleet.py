#!/usr/bin/env python3
"""Throughput of the evaluation fleet: students trained at once against one student alone.

    python benchmarks/fleet.py [--epochs 150] [--ipc 10] [--workdir DIR]

On the built-in dataset at 8x32x32 (a small teacher and student, the random_real set at `--ipc`), a local Ray of this
machine's cores trains students of one Ray Train worker and one CPU each (`evaluate.cpus_per_worker=1`),
the way `tsgd-ray run` trains them, three times over fresh stage folders:

    alone     one student (seed 0)
    fleet     as many students as there are cores, at once (the fleet's default slots)
    in turn   as many students, one at a time (evaluate.students_at_once=1): the old evaluation

Throughput is students finished per wall second of the stage (Ray Train start-up, the teacher's
test and the students' tests included). For reference it also times the same students' training
in plain processes without Ray, one alone and as many as cores side by side: what this machine's
cores give students at once, the ceiling of the fleet's ratio. Target: the fleet of 2 on this machine's 2 cores delivers
>= 1.8x one student's throughput (the same measure at 8 slots on a bigger machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target  # noqa: E402

from tsgd_ray.settings import student_settings  # noqa: E402

STAGES = ("prepare", "teacher", "stats", "init", "distill", "merge")


def plain_student(config_yaml: str, seed: int) -> None:
    """One student of the run's set trained in this process, one thread, no Ray: the same work
    as a fleet student's training (the machine's own ceiling for students side by side)."""
    import torch
    from omegaconf import OmegaConf

    from tsgd_ray.artifacts import read_synthetic
    from tsgd_ray.core import training
    from tsgd_ray.stages.evaluate import new_student

    torch.set_num_threads(1)
    cfg = OmegaConf.create(config_yaml)
    data, classes = read_synthetic(cfg)
    student = new_student(cfg, len(classes), seed)
    heat = data["heat"].float() / 255 if data["heat"] is not None else None
    stored = (data["view_params"], data["logits"]) if data["view_params"] is not None else None
    settings = student_settings(cfg)
    training.train_student(student, None, data["clips"], data["labels"], settings, seed, heat=heat, stored=stored)


def plain(cfg, count: int) -> float:
    """Wall seconds of `count` plain students (`plain_student`) started at once, each its own process."""
    import multiprocessing

    from tsgd_ray.config import to_yaml

    spawn = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    procs = [spawn.Process(target=plain_student, args=(to_yaml(cfg), s)) for s in range(count)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a plain student failed (exit {p.exitcode})")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=150, help="student epochs (IPC x classes clips each)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--workdir", default="", help="default: a temporary folder, removed at the end")
    args = parser.parse_args()

    import ray

    from tsgd_ray import layout, storage
    from tsgd_ray.config import Method, load_config
    from tsgd_ray.methods import method_config
    from tsgd_ray.runtime.cluster import init_ray
    from tsgd_ray.stages.evaluate import run_evaluate
    from tsgd_ray.stages.pipeline import run_method, run_stages

    cores = os.cpu_count() or 2
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tsgd-fleet-"))
    method = Method.random_real

    def config(seeds: list[int], at_once: int = 0):
        return method_config(
            load_config(
                None,
                [
                    f"storage.output_root={workdir / 'out'}",
                    f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
                    f"ray.temp_dir={tempfile.gettempdir()}/tsgd-fleet-ray",
                    f"ray.num_cpus={cores}",
                    "data.num_frames=8",  # small clips, a small model: the students' steps, not
                    "data.height=32",  # start-up, fill the stage
                    "data.width=32",
                    "data.builtin.train_per_class=16",
                    "teacher.width=16",
                    "teacher.depth=2",
                    "teacher.epochs=3",
                    f"distill.ipc={args.ipc}",
                    f"evaluate.epochs={args.epochs}",
                    f"evaluate.seeds={seeds}",
                    f"evaluate.students_at_once={at_once}",
                    "evaluate.num_workers=1",
                    "evaluate.cpus_per_worker=1",
                ],
            ),
            method,
        )

    def timed(name: str, seeds: list[int], at_once: int = 0) -> float:
        cfg = config(seeds, at_once)
        shutil.rmtree(storage.absolute(layout.of(cfg, method).evaluate), ignore_errors=True)
        started = time.perf_counter()
        run_evaluate(cfg, method)
        wall = time.perf_counter() - started
        trained = [storage.read_json(layout.of(cfg, method).seed(s))["seconds"] for s in seeds]
        print(
            f"{name}: {len(seeds)} student(s) in {wall:.1f} s ({len(seeds) / wall * 3600:.0f} students/h); "
            f"each student's own seconds {', '.join(f'{t:.1f}' for t in trained)}",
            flush=True,
        )
        return len(seeds) / wall

    init_ray(config([0]))
    try:
        run_stages(config([0]), ("prepare", "teacher"))
        run_method(config([0]), method, STAGES)
        alone = timed("alone", [0])
        many = list(range(1, cores + 1))
        fleet = timed(f"fleet of {cores}", many)
        in_turn = timed("in turn", [s + cores for s in many], at_once=1)
        one, side_by_side = plain(config([0]), 1), plain(config([0]), cores)
        print(
            f"plain processes, no Ray: one student {one:.1f} s, {cores} side by side {side_by_side:.1f} s: "
            f"{cores * one / side_by_side:.2f}x one student's throughput (this machine's ceiling for the fleet)"
        )
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"in turn: {in_turn / alone:.2f}x one student's throughput")
    print(f"fleet: {cores} students at once on {cores} cores")
    target("fleet_throughput_over_one_student", fleet / alone, ">=", 0.9 * cores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
