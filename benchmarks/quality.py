"""Quality benchmark: does TSGD beat the obvious baselines where only motion tells classes apart?

On the built-in motion-digits dataset (8 classes in reversed pairs; the test split is never seen by
the teacher or the distiller), in one process on the CPU:

1. train the teacher, and score it on the test clips as they are, with one frame repeated, and
   with the frames shuffled (the controls: a teacher that reads motion collapses on both);
2. at each IPC: random_real (the init clips, no optimisation), sre2l_video (recovery, TSGF off),
   tsgd (recovery with TSGFO); each set trains students with online teacher soft labels and
   TSGFA, one per seed; top-1 on the test split at the last epoch, mean +- std over seeds;
3. full: students trained the same way on every real training clip;
4. the ablation over tsgf.window (k) and tsgf.w_min at the first IPC.

Students train for about --steps optimiser steps whatever the set size (epochs =
ceil(steps / batches per epoch)), so that small and large sets get the same budget.

    python benchmarks/quality.py                      # the table in docs/QUALITY.md
    python benchmarks/quality.py --ipc 1 --seeds 0 --no-ablation distill.lambda_bn=0.1
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target_line  # noqa: E402
from tsgd_ray.config import load_config  # noqa: E402
from tsgd_ray.core import bn_stats, recovery, selection, training  # noqa: E402
from tsgd_ray.core.clips import to_model_input  # noqa: E402
from tsgd_ray.core.models import build_model  # noqa: E402
from tsgd_ray.data.in_memory import load_split  # noqa: E402


def controls(teacher, clips: torch.Tensor, labels: torch.Tensor, cfg, seed: int) -> dict[str, float]:
    """Teacher top-1 on test clips as they are, with the middle frame repeated, and shuffled."""
    f = clips.shape[1]
    repeated = clips[:, f // 2 : f // 2 + 1].expand_as(clips).contiguous()
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([c[torch.randperm(f, generator=g)] for c in clips])
    return {name: training.topk_accuracy(training.predict(teacher, x, cfg), labels)
            for name, x in (("as is", clips), ("single frame repeated", repeated), ("frames shuffled", shuffled))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=240, help="student optimiser steps per run")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="", help="write the Markdown report here (e.g. docs/QUALITY.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["storage.output_root=.cache/quality", *args.overrides])
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    x_train, y_train, classes = load_split(cfg, "train")
    x_test, y_test, _ = load_split(cfg, "test")
    k = len(classes)
    size = (cfg.data.num_frames, cfg.data.height, cfg.data.width)
    log(f"data: {len(x_train)} train / {len(x_test)} test clips of {tuple(x_train.shape[1:])}, {k} classes")

    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg.teacher.model, k, size, cfg.teacher.width, cfg.teacher.depth)
    training.train_teacher(teacher, x_train, y_train, cfg)
    teacher_scores = controls(teacher, x_test, y_test, cfg, cfg.seed)
    log(f"teacher: {teacher_scores}")

    real = to_model_input(x_train, cfg.data.mean, cfg.data.std)
    stats = bn_stats.accumulate_statistics(teacher, [(real[i : i + 64], y_train[i : i + 64]) for i in range(0, len(real), 64)], k)
    student_model = cfg.evaluate.model or cfg.teacher.model
    width, depth = cfg.evaluate.width or cfg.teacher.width, cfg.evaluate.depth or cfg.teacher.depth

    def score_students(x: torch.Tensor, y: torch.Tensor, run_cfg) -> list[float]:
        epochs = math.ceil(args.steps / math.ceil(len(x) / run_cfg.evaluate.batch_size))
        student_cfg = load_config(args.config, ["storage.output_root=.cache/quality", *args.overrides, f"evaluate.epochs={epochs}"])
        scores = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            student = build_model(student_model, k, size, width, depth)
            training.train_student(student, teacher, x, y, student_cfg, seed)
            scores.append(training.topk_accuracy(training.predict(student, x_test, cfg), y_test))
        return scores

    def recovered(ipc: int, extra: list[str]):
        run_cfg = load_config(args.config, ["storage.output_root=.cache/quality", *args.overrides, *extra])
        rows, labels, indices = selection.flatten(selection.random_real(y_train, k, ipc, cfg.seed))
        if not extra:
            return real[rows], labels
        return recovery.recover(teacher, real[rows], labels, indices, run_cfg, stats), labels

    results: dict[tuple[str, int], list[float]] = {}
    for ipc in args.ipc:
        for method, extra in (("random_real", []), ("sre2l_video", ["tsgf.enabled=false"]), ("tsgd", ["tsgf.enabled=true"])):
            x, y = recovered(ipc, extra)
            results[(method, ipc)] = score_students(x, y, cfg)
            log(f"{method} ipc={ipc}: {results[(method, ipc)]}")
    results[("full", 0)] = score_students(real, y_train, cfg)
    log(f"full: {results[('full', 0)]}")

    ablation: dict[tuple[int, float], list[float]] = {}
    if args.ablation:
        ipc = args.ipc[0]
        for window in (0, 1, 2):
            for w_min in (0.0, 0.1, 0.5):
                if (window, w_min) == (1, 0.1) and cfg.tsgf.window == 1 and cfg.tsgf.w_min == 0.1 and not cfg.tsgf.alpha:
                    ablation[(window, w_min)] = results[("tsgd", ipc)]
                    continue
                x, y = recovered(ipc, ["tsgf.enabled=true", f"tsgf.window={window}", f"tsgf.w_min={w_min}"])
                ablation[(window, w_min)] = score_students(x, y, cfg)
                log(f"ablation k={window} w_min={w_min}: {ablation[(window, w_min)]}")

    report = render(args, cfg, teacher_scores, results, ablation, time.time() - started)
    print(report)
    for line in report.splitlines():  # end with the target lines alone
        if line.strip().startswith("target "):
            print(line.strip())
    if args.out:
        Path(args.out).write_text(report)
    return 0


def _cell(scores: list[float]) -> str:
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return f"{100 * statistics.mean(scores):.1f} +- {100 * std:.1f}"


def render(args, cfg, teacher_scores, results, ablation, seconds: float) -> str:
    ipcs = args.ipc
    mean = {key: statistics.mean(v) for key, v in results.items()}
    std = {key: (statistics.stdev(v) if len(v) > 1 else 0.0) for key, v in results.items()}
    lines = [
        "# Quality benchmark (built-in motion-digits dataset)",
        "",
        f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        f"Run time: {seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads. "
        f"Clips {cfg.data.num_frames}x{cfg.data.height}x{cfg.data.width}; teacher {cfg.teacher.model} "
        f"width {cfg.teacher.width} depth {cfg.teacher.depth}, {cfg.teacher.epochs} epochs; recovery "
        f"{cfg.distill.iterations} iterations, lr {cfg.distill.lr}, lambda_bn {cfg.distill.lambda_bn}, "
        f"bn_target {cfg.distill.bn_target.value}; students width {cfg.evaluate.width or cfg.teacher.width} "
        f"depth {cfg.evaluate.depth or cfg.teacher.depth}, ~{args.steps} steps, labels "
        f"{cfg.evaluate.labels.value} (T={cfg.evaluate.temperature}), TSGFA {cfg.evaluate.tsgfa}; seeds {args.seeds}.",
        "",
        "## Teacher controls (top-1 %, test split)",
        "",
        "| input | top-1 |",
        "|---|---|",
        *[f"| {name} | {100 * v:.1f} |" for name, v in teacher_scores.items()],
        "",
        "## Student top-1 % (mean +- std over seeds, last epoch, test split)",
        "",
        "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
        "|---|" + "---|" * len(ipcs),
    ]
    for method in ("random_real", "sre2l_video", "tsgd"):
        lines.append(f"| {method} | " + " | ".join(_cell(results[(method, i)]) for i in ipcs) + " |")
    lines.append(f"| full (all {cfg.data.builtin.train_per_class * 8} real clips) | " + " | ".join(_cell(results[("full", 0)]) for _ in ipcs) + " |")
    lines += ["", "## Targets", ""]
    for i in ipcs:
        margin = mean[("tsgd", i)] - mean[("random_real", i)]
        limit = max(std[("tsgd", i)], std[("random_real", i)])
        lines.append("    " + target_line(f"ipc{i}_tsgd_minus_random_real_over_largest_std", margin / max(limit, 1e-9), ">=", 1.0))
        lines.append("    " + target_line(f"ipc{i}_tsgd_minus_sre2l_video_points",
                                            100 * (mean[("tsgd", i)] - mean[("sre2l_video", i)]), ">=", 0.0, 1))
    top = max(ipcs)
    lines.append("    " + target_line(f"ipc{top}_tsgd_over_full", mean[("tsgd", top)] / mean[("full", 0)], ">=", 0.8))
    if ablation:
        windows = sorted({w for w, _ in ablation})
        w_mins = sorted({m for _, m in ablation})
        lines += ["", f"## Ablation at IPC {ipcs[0]}: tsgf.window (k) x tsgf.w_min, student top-1 %", "",
                  "| k \\ w_min | " + " | ".join(str(m) for m in w_mins) + " |", "|---|" + "---|" * len(w_mins)]
        for w in windows:
            lines.append(f"| {w} | " + " | ".join(_cell(ablation[(w, m)]) for m in w_mins) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
