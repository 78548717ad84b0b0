"""Does storing the synthetic set as uint8 (what the distill actors write) cost accuracy against
keeping recovery's float32 output? Measured on the built-in dataset, in one process on the CPU.

A teacher is trained, the synthetic set is recovered once per IPC (the config's method, tsgd), and
students are trained per seed on (a) the float32 videos and (b) the same videos rounded to uint8
and converted back, with identical seeds and batches; top-1 on the test split. The difference
uint8 - float32 is paired per seed and reported as mean +- standard error.

    python benchmarks/synthetic_dtype.py                 # IPC 1 and 5, seeds 0-4
    python benchmarks/synthetic_dtype.py --ipc 1 --seeds 0 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target  # noqa: E402

from tsgd_ray.config import load_config  # noqa: E402
from tsgd_ray.core import bn_stats, recovery, selection, training  # noqa: E402
from tsgd_ray.core.clips import to_model_input, to_uint8_clips  # noqa: E402
from tsgd_ray.core.models import build_model  # noqa: E402
from tsgd_ray.data.in_memory import load_split, split_ids  # noqa: E402
from tsgd_ray.settings import input_settings, recovery_settings, student_settings, teacher_settings  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config("default", ["storage.output_root=.cache/synthetic-dtype", *args.overrides])
    started = time.time()
    x_train, y_train, classes = load_split(cfg, "train")
    x_test, y_test, _ = load_split(cfg, "test")
    k, size = len(classes), (cfg.data.num_frames, cfg.data.height, cfg.data.width)
    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg.teacher.model, k, size, cfg.teacher.width, cfg.teacher.depth)
    training.train_teacher(teacher, x_train, y_train, teacher_settings(cfg))
    real = to_model_input(x_train, cfg.data.mean, cfg.data.std)
    stats = bn_stats.accumulate_statistics(
        teacher, [(real[i : i + 64], y_train[i : i + 64]) for i in range(0, len(real), 64)], k
    )
    print(
        f"[{time.time() - started:5.0f}s] teacher trained; {len(x_train)} train / {len(x_test)} test clips", flush=True
    )

    def student_top1(x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
        torch.manual_seed(seed)
        student = build_model(
            cfg.evaluate.model or cfg.teacher.model,
            k,
            size,
            cfg.evaluate.width or cfg.teacher.width,
            cfg.evaluate.depth or cfg.teacher.depth,
        )
        training.train_student(student, teacher, x, y, student_settings(cfg), seed)
        return training.topk_accuracy(training.predict(student, x_test, input_settings(cfg)), y_test)

    print("| IPC | max pixel change (0-255) | float32 top-1 % | uint8 top-1 % | uint8 - float32 (points, paired) |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for ipc in args.ipc:
        rows, classes_t, indices = selection.flatten(
            selection.random_real(split_ids(cfg, "train"), y_train, k, ipc, cfg.seed)
        )
        videos = recovery.recover(teacher, real[rows], classes_t, indices, recovery_settings(cfg), stats)
        rounded = to_model_input(to_uint8_clips(videos, cfg.data.mean, cfg.data.std), cfg.data.mean, cfg.data.std)
        change = ((rounded - videos).abs() * torch.tensor(cfg.data.std).view(1, 3, 1, 1, 1) * 255).max().item()
        a = [student_top1(videos, classes_t, s) for s in args.seeds]
        b = [student_top1(rounded, classes_t, s) for s in args.seeds]
        diffs = [100 * (u - f) for u, f in zip(b, a)]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        mean = statistics.fmean(diffs)
        worst = max(worst, abs(mean) - 2 * se)
        print(
            f"| {ipc} | {change:.2f} | {100 * statistics.fmean(a):.1f} | {100 * statistics.fmean(b):.1f} | "
            f"{mean:+.1f} +- {se:.1f} |",
            flush=True,
        )
    print(f"[{time.time() - started:5.0f}s] done")
    target("uint8_vs_float32_gap_beyond_2se_points", worst, "<=", 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
