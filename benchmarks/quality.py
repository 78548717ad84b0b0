"""Quality benchmark: does TSGD beat its baselines, and what does each of its parts do?

On the built-in motion-digits dataset (8 classes in time-reversed pairs; the test split, 100 clips
per class, is never seen by the teacher or the distiller), in one process on the CPU, per variant
(`plain`, `cluttered`):

1. train the teacher; score it on the test clips as they are, with one frame repeated and with
   the frames shuffled (controls: a teacher that reads motion collapses on both);
2. per IPC and init draw (IPC real clips per class drawn with seed `draw`): the recovered sets
   without TSGFO (sre2l_video) and with it, and what recovery edited (mean |x - x0| on static and
   on moving pixels, the share of saliency left on the init's motion); where TSGFA's crops land
   (the share of the init heat inside a crop, TSGFA against the same crops drawn uniformly);
3. students, one per (draw, seed), per protocol (`soft`: online teacher labels with the config's
   evaluate.augment; `soft_forward` / `soft_reversed`: the same without / with time reversal; `hard`: class labels,
   label-preserving crops only) for each method:
       random_real  the init clips, uniform crops
       sre2l_video  recovery without TSGFO, uniform crops
       tsgfo_only   recovery with TSGFO, uniform crops
       tsgfa_only   recovery without TSGFO, TSGFA crops
       tsgd         recovery with TSGFO, TSGFA crops
       views_real   each class's lowest-loss clips at their easiest of --init-views views (RDED-style)
       views_tsgd   tsgd from those clips
   top-1 on the test split at the last step; paired differences (same draw, same seed) +- SE;
4. full: students on every real training clip, for --full-steps steps (the ceiling).

Students train for about --steps optimiser steps whatever the set size, so that small and large
sets get the same budget. The table is reproducible: the same command gives the same numbers.

    python benchmarks/quality.py --steps 120 --out docs/QUALITY.md   # the main table (about 50 min)
    python benchmarks/quality.py --variants plain --ipc 10 --methods random_real sre2l_video tsgfo_only tsgfa_only tsgd \\
        --protocols soft soft_reversed hard --seeds 0 1 2 --full-steps 0 --steps 120 --out docs/QUALITY-arms.md  # ~25 min

(docs/QUALITY*.md say which overrides reproduce the committed tables exactly.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target_line  # noqa: E402

from tsgd_ray.config import load_config, to_dict  # noqa: E402
from tsgd_ray.core import augment, bn_stats, recovery, selection, training, tsgf  # noqa: E402
from tsgd_ray.core.augment import CropSettings  # noqa: E402
from tsgd_ray.core.clips import InputSettings, to_model_input  # noqa: E402
from tsgd_ray.core.models import build_model  # noqa: E402
from tsgd_ray.core.tsgf import SaliencySettings  # noqa: E402
from tsgd_ray.data.in_memory import load_split  # noqa: E402

#: the benchmark's data and teacher: 800 test clips (one clip is worth 0.125 points); a teacher of
#: width 16 (84% on plain, half the cost of 32) trained 40 epochs (the cluttered variant needs them)
DATA = [
    "storage.output_root=.cache/quality",
    "data.builtin.test_per_class=100",
    "teacher.width=16",
    "teacher.epochs=40",
]
#: method -> (recovery with TSGFO? None: no recovery, TSGFA crops?, init: the draw's random real
#: clips, or each class's lowest-loss clips at their easiest of --init-views views)
METHODS = {
    "random_real": (None, False, "draw"),
    "sre2l_video": (False, False, "draw"),
    "tsgfo_only": (True, False, "draw"),
    "tsgfa_only": (False, True, "draw"),
    "tsgd": (True, True, "draw"),
    "views_real": (None, False, "views"),
    "views_tsgd": (True, True, "views"),
}
#: protocol -> student overrides
PROTOCOLS = {
    "soft": [],
    "soft_forward": ["evaluate.augment.time_reverse=false"],  # the same, never playing a clip backwards
    "soft_reversed": ["evaluate.augment.time_reverse=true"],  # the same, half the clips played backwards
    "hard": [
        "evaluate.labels=hard",
        "evaluate.augment.hflip=false",
        "evaluate.augment.time_reverse=false",
        "evaluate.augment.cutmix=0",
        "evaluate.augment.mixup=0",
    ],
}
NOTES = "<!-- notes: kept when the tables are regenerated -->"


def controls(teacher, clips: torch.Tensor, labels: torch.Tensor, cfg, seed: int) -> dict[str, float]:
    """Teacher top-1 on test clips as they are, with the middle frame repeated, and shuffled."""
    f = clips.shape[1]
    repeated = clips[:, f // 2 : f // 2 + 1].expand_as(clips).contiguous()
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([c[torch.randperm(f, generator=g)] for c in clips])
    return {
        name: training.topk_accuracy(training.predict(teacher, x, InputSettings.from_config(cfg)), labels)
        for name, x in (("as is", clips), ("single frame repeated", repeated), ("frames shuffled", shuffled))
    }


def crop_heat_share(heat: torch.Tensor, cfg, tsgfa: bool, draws: int = 64) -> float:
    """Mean share of a clip's heat (N, H, W) inside the student's crop boxes (TSGFA or uniform)."""
    g = torch.Generator().manual_seed(0)
    crop = CropSettings.from_section(cfg.evaluate.augment)
    shares = []
    for _ in range(draws):
        u = torch.rand(len(heat), 2, generator=g)
        boxes = tsgf.saliency_boxes(
            heat if tsgfa else torch.ones_like(heat),
            u,
            crop.scale,
            crop.ratio,
            cfg.tsgf.crop_delta,
            g,
        )
        mask = augment.box_mask(boxes, *heat.shape[1:])[:, 0, 0]
        shares.append(((heat * mask).sum(dim=(1, 2)) / heat.sum(dim=(1, 2)).clamp(min=1e-12)).mean())
    return torch.stack(shares).mean().item()


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the paired differences a - b (points)."""
    diffs = [100 * (x - y) for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("inf")
    return statistics.fmean(diffs), se


def run_variant(variant: str, args, log) -> dict:
    """Everything for one built-in variant: teacher controls, diagnostics, scores per
    (protocol, method, ipc) as lists over (draw, seed), full."""
    base = [*DATA, f"data.builtin.variant={variant}", *args.overrides]
    cfg = load_config(args.config, base)
    x_train, y_train, classes = load_split(cfg, "train")
    x_test, y_test, _ = load_split(cfg, "test")
    k = len(classes)
    size = (cfg.data.num_frames, cfg.data.height, cfg.data.width)
    log(f"{variant}: {len(x_train)} train / {len(x_test)} test clips of {tuple(x_train.shape[1:])}, {k} classes")
    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg.teacher.model, k, size, cfg.teacher.width, cfg.teacher.depth)
    settings = json.dumps({key: to_dict(cfg)[key] for key in ("seed", "data", "augment", "teacher")}, sort_keys=True)
    cached = REPO / ".cache" / "quality" / f"teacher-{hashlib.sha256(settings.encode()).hexdigest()[:16]}.pt"
    if cached.exists():  # the same settings train the same teacher: reuse it across invocations
        teacher.load_state_dict(torch.load(cached, weights_only=True))
    else:
        training.train_teacher(teacher, x_train, y_train, training.TeacherSettings.from_config(cfg))
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), cached)
    teacher.eval()
    out: dict = {
        "cfg": cfg,
        "controls": controls(teacher, x_test, y_test, cfg, cfg.seed),
        "scores": {},
        "edits": {},
        "crops": {},
    }
    log(f"{variant} teacher: {out['controls']}")
    real = to_model_input(x_train, cfg.data.mean, cfg.data.std)
    viewed = (
        augment.keyed_views(real, [str(i) for i in range(len(real))], cfg.seed, CropSettings.from_section(cfg.augment))
        if cfg.stats.augment
        else real
    )
    stats = bn_stats.accumulate_statistics(
        teacher, [(viewed[i : i + 64], y_train[i : i + 64]) for i in range(0, len(real), 64)], k
    )

    def student_cfg(protocol: str, tsgfa: bool, n: int, steps: int):
        probe = load_config(args.config, base)
        epochs = math.ceil(steps / math.ceil(n / probe.evaluate.batch_size))
        return load_config(
            args.config, [*base, *PROTOCOLS[protocol], f"evaluate.tsgfa={tsgfa}", f"evaluate.epochs={epochs}"]
        )

    def score(x, y, heat, run_cfg, seed: int) -> float:
        torch.manual_seed(seed)
        e = run_cfg.evaluate
        student = build_model(
            e.model or run_cfg.teacher.model,
            k,
            size,
            e.width or run_cfg.teacher.width,
            e.depth or run_cfg.teacher.depth,
        )
        training.train_student(student, teacher, x, y, training.StudentSettings.from_config(run_cfg), seed, heat=heat)
        return training.topk_accuracy(training.predict(student, x_test, InputSettings.from_config(run_cfg)), y_test)

    inits = {METHODS[m][2] for m in args.methods}
    if "views" in inits:  # every clip's easiest view: the teacher's loss on each candidate view
        views = torch.stack(
            [real]
            + [
                to_model_input(load_split(cfg, "train", view=v)[0], cfg.data.mean, cfg.data.std)
                for v in range(1, args.init_views)
            ]
        )
        with torch.no_grad():
            view_losses = torch.stack(
                [
                    torch.cat(
                        [
                            F.cross_entropy(teacher(v[i : i + 64]), y_train[i : i + 64], reduction="none")
                            for i in range(0, len(v), 64)
                        ]
                    )
                    for v in views
                ]
            )
        best_loss, best_view = view_losses.min(0)
        out["views"] = {
            "picked_view": (best_view > 0).float().mean().item(),
            "loss_view0": view_losses[0].mean().item(),
            "loss_best": best_loss.mean().item(),
        }
        log(f"{variant} init views: {out['views']}")
    for ipc in args.ipc:
        for draw in args.draws:
            for init in sorted(inits):
                if init == "draw":
                    rows, labels, indices = selection.flatten(selection.random_real(y_train, k, ipc, draw))
                    x0 = real[rows]
                else:  # the same clips for every draw: lowest loss is not random
                    rows, labels, indices = selection.flatten(selection.lowest_loss(best_loss, y_train, k, ipc))
                    x0 = views[best_view[rows], rows]
                heat = training.clip_heat(x0, SaliencySettings.from_section(cfg.tsgf), InputSettings.from_config(cfg))
                mine = [m for m in args.methods if METHODS[m][2] == init]
                sets = {None: x0}
                for tsgfo in sorted({METHODS[m][0] for m in mine} - {None}, key=int):
                    history: list[dict] = []
                    run_cfg = load_config(args.config, [*base, f"tsgf.enabled={tsgfo}"])
                    sets[tsgfo] = recovery.recover(
                        teacher,
                        x0,
                        labels,
                        indices,
                        recovery.RecoverySettings.from_config(run_cfg),
                        stats,
                        callback=lambda s, m, h=history: h.append(m),
                    )
                    if init == "draw":
                        out["edits"].setdefault((tsgfo, ipc), []).append(history[-1] if history else {})
                if init == "draw":
                    for tsgfa in (False, True):
                        out["crops"].setdefault((tsgfa, ipc), []).append(
                            crop_heat_share(heat, student_cfg("soft", tsgfa, 1, 1), tsgfa)
                        )
                for protocol in args.protocols:
                    for method in mine:
                        tsgfo, tsgfa, _ = METHODS[method]
                        for seed in args.seeds:
                            acc = score(
                                sets[tsgfo], labels, heat, student_cfg(protocol, tsgfa, len(labels), args.steps), seed
                            )
                            out["scores"].setdefault((protocol, method, ipc), []).append(acc)
                        log(
                            f"{variant} ipc={ipc} draw={draw} {protocol} {method}: "
                            f"{[round(100 * a, 1) for a in out['scores'][(protocol, method, ipc)][-len(args.seeds) :]]}"
                        )
    if args.full_steps:
        for protocol in args.protocols:
            out["scores"][(protocol, "full", 0)] = [
                score(x_train, y_train, None, student_cfg(protocol, False, len(x_train), args.full_steps), seed)
                for seed in args.full_seeds
            ]
            log(f"{variant} {protocol} full: {out['scores'][(protocol, 'full', 0)]}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--variants", nargs="+", default=["plain", "cluttered"], choices=["plain", "cluttered"])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--methods", nargs="+", default=["random_real", "sre2l_video", "tsgd"], choices=list(METHODS))
    parser.add_argument("--protocols", nargs="+", default=["soft"], choices=list(PROTOCOLS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="student seeds")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2], help="seeds of the init clip draws")
    parser.add_argument("--steps", type=int, default=160, help="student optimiser steps per run")
    parser.add_argument("--full-steps", type=int, default=600, help="optimiser steps of a `full` student; 0: skip")
    parser.add_argument("--full-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--init-views", type=int, default=4, help="candidate views per clip for the views_* methods")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="", help="write the Markdown report here (e.g. docs/QUALITY.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    results = {variant: run_variant(variant, args, log) for variant in args.variants}
    report = render(args, results, time.time() - started)
    if args.out and Path(args.out).exists() and NOTES in Path(args.out).read_text():
        report += Path(args.out).read_text().split(NOTES, 1)[1].lstrip("\n").join([NOTES + "\n\n", ""])
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


def _diff_cell(diff: tuple[float, float]) -> str:
    return f"{diff[0]:+.1f} +- {diff[1]:.1f}"


def render(args, results: dict, seconds: float) -> str:
    cfg = next(iter(results.values()))["cfg"]
    e, d, t = cfg.evaluate, cfg.distill, cfg.tsgf
    lines = [
        "# Quality benchmark (built-in motion-digits dataset)",
        "",
        f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"Run time: {seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads. Clips {cfg.data.num_frames}x"
        f"{cfg.data.height}x{cfg.data.width}, {len(args.draws)} init draws x "
        f"{len(args.seeds)} student seeds per cell, {cfg.data.builtin.test_per_class * 8} test clips. Teacher "
        f"{cfg.teacher.model} width {cfg.teacher.width} depth {cfg.teacher.depth}, {cfg.teacher.epochs} epochs. Recovery "
        f"{d.iterations} iterations, lr {d.lr}, lambda_bn {d.lambda_bn}, bn_target {d.bn_target.value}; TSGFO apply "
        f"{t.apply.value}, source {t.source.value}, w_min {t.w_min}, compensate {t.compensate.value}. Students width "
        f"{e.width or cfg.teacher.width} depth {e.depth or cfg.teacher.depth}, ~{args.steps} steps (full: "
        f"{args.full_steps}), soft protocol: labels {e.labels.value} (T={e.temperature}), crops "
        f"{list(e.augment.crop_scale)}, hflip {e.augment.hflip}, time_reverse {e.augment.time_reverse}, cutmix "
        f"{e.augment.cutmix}, mixup {e.augment.mixup}, ema {e.ema}.",
    ]
    targets: list[str] = []
    for variant, r in results.items():
        lines += [
            "",
            f"## Variant `{variant}`",
            "",
            "Teacher controls (top-1 %): "
            + ", ".join(f"{name} {100 * v:.1f}" for name, v in r["controls"].items())
            + ".",
            "",
        ]
        lines += [
            "What recovery edits (last step, mean over draws; |x - x0| in normalised units) and where crops land:",
            "",
            "| IPC | arm | edit static | edit moving | saliency on init motion |",
            "|---|---|---|---|---|",
        ]
        for (tsgfo, ipc), hist in sorted(r["edits"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
            mean = {
                key: statistics.fmean(h[key] for h in hist) for key in ("edit_static", "edit_moving", "motion_share")
            }
            lines.append(
                f"| {ipc} | {'TSGFO' if tsgfo else 'no TSGFO'} | {mean['edit_static']:.3f} | "
                f"{mean['edit_moving']:.3f} | {100 * mean['motion_share']:.0f}% |"
            )
        if "views" in r:
            v = r["views"]
            lines.append(
                f"\nInit views ({args.init_views} per clip): the easiest view is not the sampled clip for "
                f"{100 * v['picked_view']:.0f}% of clips; mean teacher loss {v['loss_view0']:.3f} on the sampled "
                f"clips, {v['loss_best']:.3f} on each clip's easiest view."
            )
        for ipc in args.ipc:
            if (True, ipc) in r["crops"]:
                lines.append(
                    f"\nIPC {ipc}: share of the init heat inside a student crop: TSGFA "
                    f"{100 * statistics.fmean(r['crops'][(True, ipc)]):.0f}%, uniform "
                    f"{100 * statistics.fmean(r['crops'][(False, ipc)]):.0f}%."
                )
        for protocol in args.protocols:
            s = r["scores"]
            lines += [
                "",
                f"### Student top-1 %, protocol `{protocol}` (mean +- std over draws x seeds)",
                "",
                "| method | " + " | ".join(f"IPC {i}" for i in args.ipc) + " |",
                "|---|" + "---|" * len(args.ipc),
            ]
            for method in args.methods:
                lines.append(f"| {method} | " + " | ".join(_cell(s[(protocol, method, i)]) for i in args.ipc) + " |")
            if (protocol, "full", 0) in s:
                lines.append(
                    f"| full ({len(args.full_seeds)} seeds) | "
                    + " | ".join(_cell(s[(protocol, "full", 0)]) for _ in args.ipc)
                    + " |"
                )
            lines += [
                "",
                "Paired differences (points, mean +- SE over the same draws and seeds):",
                "",
                "| difference | " + " | ".join(f"IPC {i}" for i in args.ipc) + " |",
                "|---|" + "---|" * len(args.ipc),
            ]
            for method, base in [
                (m, b)
                for m in args.methods
                for b in ("sre2l_video", "random_real", "tsgd")
                if b in args.methods and m not in (b, "random_real") and (b != "tsgd" or METHODS[m][2] == "views")
            ]:
                lines.append(
                    f"| {method} - {base} | "
                    + " | ".join(_diff_cell(paired(s[(protocol, method, i)], s[(protocol, base, i)])) for i in args.ipc)
                    + " |"
                )
        if "tsgd" in args.methods:
            targets += _targets(variant, r["scores"], args)
    if targets:
        lines += ["", "## Targets", "", *("    " + line for line in targets)]
    return "\n".join(lines) + "\n\n" + NOTES + "\n"


def _targets(variant: str, s: dict, args) -> list[str]:
    out = []
    for i in args.ipc:
        if "sre2l_video" in args.methods:
            best = max(
                args.protocols,
                key=lambda p: (
                    paired(s[(p, "tsgd", i)], s[(p, "sre2l_video", i)])[0]
                    / max(paired(s[(p, "tsgd", i)], s[(p, "sre2l_video", i)])[1], 1e-9)
                ),
            )
            mean, se = paired(s[(best, "tsgd", i)], s[(best, "sre2l_video", i)])
            out.append(
                target_line(f"{variant}_ipc{i}_tsgd_minus_sre2l_video_over_se_{best}", mean / max(se, 1e-9), ">", 2.0)
            )
        if "random_real" in args.methods:
            worst = min(paired(s[(p, "tsgd", i)], s[(p, "random_real", i)])[0] for p in args.protocols)
            out.append(
                target_line(f"{variant}_ipc{i}_tsgd_minus_random_real_points_worst_protocol", worst, ">", 0.0, 1)
            )
    top = max(args.ipc)
    for p in args.protocols:
        if (p, "full", 0) in s:
            ratio = statistics.fmean(s[(p, "tsgd", top)]) / statistics.fmean(s[(p, "full", 0)])
            out.append(target_line(f"{variant}_ipc{top}_tsgd_over_full_{p}", ratio, ">=", 0.85))
    return out


if __name__ == "__main__":
    sys.exit(main())
