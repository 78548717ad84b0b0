"""Quality benchmark: does a TSGD set train a student better than as many real clips picked at random?

The protocol is fixed before the runs (docs/method.md, stage 3; docs/QUALITY.md prints it):

- Data (`--variants`): the built-in motion digits, `plain`, `cluttered` or `bursty` (8 classes in
  time-reversed pairs; bursty: 32-frame videos whose digit moves during a random half, clips of 8
  frames every 2 from the centre, so where a clip starts matters), and `footage` (benchmarks/footage.py: 6 classes of camera motion over real videos, in
  time-reversed pairs, whole source videos held out for val and test). The teacher trains on
  the train split; students are scored on `--split`: `val` (held-out digits, for choosing
  defaults) or `test` (final tables only), at the last step.
- Arms, per IPC and init draw (IPC real clips per class: the first of each class in the
  pipeline's seeded order, `selection.random_real`, under seed `draw`; packed arms take 4 x IPC of
  the same order, random_real's among them. The tables in docs/QUALITY*.md written before this
  rule drew with numpy's generator per (draw, class), so a rerun now draws other clips):
  `random_real` (the draw's clips as they are) and `tsgd` (recovered from them), optionally `sre2l_video`, init
  choices among a seeded pool (`kcenter_*`, `moderate_*`: see METHODS), the draw's videos each from
  its window of the largest motion x margin (`window_*`, as distill.init=motion_window) and tsgd
  arms with their own overrides (`--arms`). Every arm
  gets the same student and augmentation, TSGFA crops included (the parity arm: random_real with
  the same crops); `full` (every real training clip) gets the same student steps too (`--steps`).
- Label regimes (one switch each, any registered in tsgd_ray.config.regimes): `online` (soft_kl:
  the teacher relabels every augmented batch), `stored<K>` (the K views stored with the set and
  their teacher logits, replayed; no teacher), `hard` (class labels, the teacher's
  label-preserving crops; no teacher).
- Student: `--student` (default mini_r2plus1d, another architecture than the mini_c3d teacher).
- Budget: `--steps` per student, every arm and `full` alike. The headline budget is converged by
  a rule fixed before its runs (`--budgets`, CONVERGED_GAIN): the first budget whose doubling
  gains at most 0.5 points for `full` and random_real on val (docs/QUALITY-budget.md).
- Statistics: draws x seeds students per cell; paired differences on the same (draw, seed); the SE
  over the per-draw mean differences (df = draws - 1); per-draw differences and the worst draw
  printed. DD-Ranking's measures: IOR (improvement over random under the same evaluation) and
  HLR (hard-label recovery: full - method, hard labels).
- Diversity of each set: mean within-class cosine of the teacher's penultimate features, and the
  mean entropy (nats) of the teacher's softmax over the stored views.
- Targets (pre-registered): in the teacher-free regimes (stored16, hard), tsgd - random_real > 2 SE
  and >= 0 on every draw; online: tsgd - random_real >= -1 SE; stored16: tsgd at the largest IPC
  >= 0.9 of full at the same steps.

    python benchmarks/quality.py --split test --out docs/QUALITY.md     # the main table (~1 h on 2 cores)
    python benchmarks/quality.py --split val --ipc 10 --regimes stored1 stored4 stored16 stored64 ...
    python benchmarks/quality.py --split val --ipc 10 --regimes stored16 --draws 0 1 --seeds 0 1 \
        --budgets 150 1200 --out docs/QUALITY-budget.md     # the converged budget (CONVERGED_GAIN)
    python benchmarks/quality.py --device cuda ...   # on a GPU: bf16 autocast (amp=false: fp32); its
        # teachers and students cached apart from the CPU's. Not yet run on a GPU.

The table is reproducible: the same command gives the same numbers.
"""

from __future__ import annotations

import argparse
import functools
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

from footage import ensure_footage_dataset  # noqa: E402
from report import target_line  # noqa: E402

from tsgd_ray.config import PACK, load_config, regimes, to_dict  # noqa: E402
from tsgd_ray.core import augment, bn_stats, labels, packing, recovery, selection, training  # noqa: E402
from tsgd_ray.core.clips import to_model_input, to_uint8_clips  # noqa: E402
from tsgd_ray.core.device import tune_for  # noqa: E402
from tsgd_ray.core.models import build_model, load_checkpoint  # noqa: E402
from tsgd_ray.core.tsgf import motion_energy  # noqa: E402
from tsgd_ray.data.in_memory import load_split, split_ids  # noqa: E402
from tsgd_ray.errors import UserError  # noqa: E402
from tsgd_ray.settings import (  # noqa: E402
    crop_settings,
    input_settings,
    recovery_settings,
    saliency_settings,
    student_settings,
    teacher_settings,
    view_settings,
)
from tsgd_ray.storage import read_bytes  # noqa: E402
from tsgd_ray.tracking import is_mlflow_uri, read_mlflow_checkpoint  # noqa: E402

#: the benchmark's data and teacher: 100 held-out clips per class in each of val and test; a
#: teacher of width 16 trained 40 epochs (the cluttered variant needs them)
DATA = [
    "storage.output_root=.cache/quality",
    "data.builtin.test_per_class=100",
    "data.builtin.val_per_class=100",
    "teacher.width=16",
    "teacher.epochs=40",
]
#: method -> (how its init clips are chosen, recovery with TSGFO; None: the clips as they are).
#: random: IPC clips per class drawn with seed `draw`; kcenter / moderate: greedy k-center on the
#: teacher's features / the clips nearest the class's median teacher loss, among a pool of
#: POOL x IPC clips per class drawn with seed `draw`; window: the random draw's videos, each from
#: its view (of --window-views: as sampled, then `decode_view`'s windows) of the largest
#: `selection.window_score`, as the pipeline's distill.init=motion_window; packed: 4 x IPC clips
#: per class drawn with seed `draw`, packed 2 x 2 by their motion where the teacher is confident
#: (`core.packing.pack_init`, as distill.pack with distill.pack_confidence); centre_packed: the
#: same clips and gate, each tile cut at its clip's centre (the control for the motion windows)
METHODS = {
    "random_real": ("random", None),
    "sre2l_video": ("random", False),
    "tsgd": ("random", True),
    "kcenter_real": ("kcenter", None),
    "kcenter_tsgd": ("kcenter", True),
    "moderate_real": ("moderate", None),
    "moderate_tsgd": ("moderate", True),
    "window_real": ("window", None),
    "window_tsgd": ("window", True),
    "packed_real": ("packed", None),
    "packed_tsgd": ("packed", True),
    "centre_packed_real": ("centre_packed", None),
    "centre_packed_tsgd": ("centre_packed", True),
}
POOL = 4
TEACHER_FREE = ("stored16", "hard")
DATASETS = {
    "plain": "the built-in motion digits",
    "cluttered": "the built-in motion digits, cluttered (distractors, camera pan and shake, flicker)",
    "bursty": "the built-in motion digits, bursty (32-frame videos, motion during a random half)",
    "scenes": "the built-in motion digits, scenes (16 classes, moving distractors, contrast; val digits apart from test)",
    "footage": "motion footage (camera pans and zooms over real videos, whole sources held out)",
}
NOTES = "<!-- notes: kept when the tables are regenerated -->"
#: the converged-budget rule, fixed before its runs (`--budgets S0 [CAP]`): student budgets double
#: from S0; the headline budget is the first S whose run at 2 S gains at most CONVERGED_GAIN points of
#: top-1 over its run at S, for `full` (mean over --seeds) and for random_real at the largest --ipc
#: (mean over --draws x --seeds), in every --regimes, on --split (val); each budget a whole run of
#: its own (its own cosine schedule), not a point on a longer run's curve. No S up to CAP: NOT met
CONVERGED_GAIN = 0.5


def regime_overrides(regime: str) -> list[str]:
    """A registered label regime (tsgd_ray.config.regimes) -> its evaluate overrides; `online` is
    soft_kl; `<name><K>` for a regime that replays stored views replays the first K."""
    if regime == "online":
        return ["evaluate.labels=soft_kl"]
    if regime in regimes.registered():
        return [f"evaluate.labels={regime}"]
    name = regime.rstrip("0123456789")
    if name in regimes.registered() and regimes.get(name).replays_views and name != regime:
        return [f"evaluate.labels={name}", f"evaluate.views={int(regime[len(name) :])}"]
    replaying = [n for n in regimes.registered() if regimes.get(n).replays_views]
    raise SystemExit(
        f"--regimes: online, {', '.join(regimes.registered())} or <name><K> for {', '.join(replaying)}, got {regime!r}"
    )


def controls(teacher, clips: torch.Tensor, y: torch.Tensor, cfg, seed: int) -> dict[str, float]:
    """Teacher top-1 on clips as they are, with the middle frame repeated, and shuffled."""
    f = clips.shape[1]
    repeated = clips[:, f // 2 : f // 2 + 1].expand_as(clips).contiguous()
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([c[torch.randperm(f, generator=g)] for c in clips])
    return {
        name: training.topk_accuracy(training.predict(teacher, x, input_settings(cfg)), y)
        for name, x in (("as is", clips), ("single frame repeated", repeated), ("frames shuffled", shuffled))
    }


def diversity(teacher, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Mean within-class cosine of the teacher's features of normalised clips x (classes with >= 2
    clips), and the mean entropy (nats) of the softmax of the stored logits (N, K, classes)."""
    feats = F.normalize(training.embeddings(teacher, x), dim=1)
    cosines = []
    for c in y.unique():
        f = feats[y == c]
        if len(f) > 1:
            sim = f @ f.T
            cosines.append(((sim.sum() - sim.diagonal().sum()) / (len(f) * (len(f) - 1))).item())
    p = F.softmax(logits.float(), dim=-1)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(-1).mean().item()
    return {"cosine": statistics.fmean(cosines) if cosines else float("nan"), "entropy": entropy}


def variant_overrides(variant: str) -> list[str]:
    """plain | cluttered | bursty | scenes (the built-in variants) | footage (benchmarks/footage.py) -> data overrides."""
    if variant == "bursty":
        return ["data.builtin.variant=bursty", "data.builtin.frames=32", "data.sampling=center"]
    if variant == "scenes":  # the generator's own size: 16 frames of 64 x 64
        return ["data.builtin.variant=scenes", "data.num_frames=16", "data.height=64", "data.width=64"]
    if variant == "footage":
        root = ensure_footage_dataset()
        return ["data.dataset=folder", f"data.root={root}", "data.height=48", "data.width=48", "data.frame_interval=1"]
    return [f"data.builtin.variant={variant}"]


def where(device: torch.device, amp: bool) -> str:
    """What ran the benchmark, for its report: the CPU threads, or the GPU's name and precision."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({'bf16 autocast' if amp else 'fp32'})"
    return f"{torch.get_num_threads()} CPU threads"


def placeless(cfg) -> dict:
    """The config as a dict less where things are kept (storage, tracking, data.shards: absolute
    paths of this checkout), so that the caches' keys hold in any checkout."""
    out = {k: v for k, v in to_dict(cfg).items() if k not in ("storage", "tracking")}
    out["data"] = {k: v for k, v in out["data"].items() if k != "shards"}
    return out


def run_variant(variant: str, args, log) -> dict:
    """One dataset variant: teacher controls, and scores[(regime, method, ipc)] = {draw: [per seed]}."""
    base = [*DATA, *variant_overrides(variant), *args.overrides]
    cfg = load_config(args.config, base)
    x_train, y_train, classes = load_split(cfg, "train")
    ids = split_ids(cfg, "train")  # the pipeline's selection rule orders clips by (seed, video id)
    x_eval, y_eval, _ = load_split(cfg, args.split)
    k = len(classes)
    size = (cfg.data.num_frames, cfg.data.height, cfg.data.width)
    inputs = input_settings(cfg)
    log(
        f"{variant}: {len(x_train)} train / {len(x_eval)} {args.split} clips of {tuple(x_train.shape[1:])}, {k} classes"
    )
    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg.teacher.model, k, size, cfg.teacher.width, cfg.teacher.depth).to(args.device)
    trained_on = {} if args.device.type == "cpu" else {"device": args.device.type}  # CPU keys as before
    settings = json.dumps(
        {**{key: placeless(cfg)[key] for key in ("seed", "data", "augment", "teacher")}, **trained_on}, sort_keys=True
    )
    cached = REPO / ".cache" / "quality" / f"teacher-{hashlib.sha256(settings.encode()).hexdigest()[:16]}.pt"
    if args.teacher:  # a teacher trained elsewhere (a GPU run, the pipeline): its architecture from the config
        data = read_mlflow_checkpoint(cfg, args.teacher) if is_mlflow_uri(args.teacher) else read_bytes(args.teacher)
        load_checkpoint(teacher, data, classes)  # refuses another class map or architecture, naming it
        log(f"{variant}: teacher imported from {args.teacher}")
    elif cached.exists():  # the same settings train the same teacher: reuse it across invocations
        teacher.load_state_dict(torch.load(cached, weights_only=True, map_location=args.device))
    else:
        training.train_teacher(teacher, x_train, y_train, teacher_settings(cfg))
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save({n: t.cpu() for n, t in teacher.state_dict().items()}, cached)
    teacher.eval()
    out: dict = {
        "cfg": cfg,
        "classes": k,
        "train_clips": len(y_train),
        "eval_per_class": len(y_eval) // k,
        "controls": controls(teacher, x_eval, y_eval, cfg, cfg.seed),
        "scores": {},
        "sets": {},
    }
    log(f"{variant} teacher on {args.split}: {out['controls']}")
    real = to_model_input(x_train, cfg.data.mean, cfg.data.std)
    viewed = (
        augment.keyed_views(real, [str(i) for i in range(len(real))], cfg.seed, crop_settings(cfg.augment))
        if cfg.stats.augment
        else real
    )
    stats = bn_stats.accumulate_statistics(
        teacher, [(viewed[i : i + 64].to(args.device), y_train[i : i + 64]) for i in range(0, len(real), 64)], k
    )
    views = view_settings(cfg)
    replayed = [load_config(args.config, [*base, *regime_overrides(r)]).evaluate for r in args.regimes]
    most_views = max([e.views for e in replayed if regimes.get(e.labels).replays_views] + [1])

    def stored_labels(x_u8: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, heat: torch.Tensor):
        params = labels.view_params(heat, labels.clip_keys(y, idx), cfg.seed, most_views, views)
        return params, labels.label_views(teacher, inputs.model_input(x_u8.to(args.device)), params, inputs.amp)

    def score(x_u8, y, heat, stored, regime: str, seed: int, steps: int = args.steps) -> float:
        steps_per_epoch = math.ceil(len(y) / cfg.evaluate.batch_size)
        run_cfg = load_config(
            args.config,
            [
                *base,
                *regime_overrides(regime),
                f"evaluate.epochs={math.ceil(steps / steps_per_epoch)}",
                f"evaluate.model={args.student}",
            ],
        )
        torch.manual_seed(seed)
        e = run_cfg.evaluate
        student = build_model(e.model, k, size, e.width, e.depth).to(args.device)
        training.train_student(student, teacher, x_u8, y, student_settings(run_cfg), seed, heat=heat, stored=stored)
        return training.topk_accuracy(training.predict(student, x_eval, inputs), y_eval)

    every = json.dumps([placeless(cfg), args.student, args.teacher, *trained_on.values()], sort_keys=True)

    def scored(key: tuple, train) -> float:
        """A student's top-1 from the cache of finished students (the same config, teacher, student
        and key train the same student: a rerun, or a longer --budgets, skips it), else `train()`."""
        digest = hashlib.sha256(json.dumps([every, *key]).encode()).hexdigest()[:16]
        path = REPO / ".cache" / "quality" / "students" / f"{digest}.json"
        if path.exists():
            return json.loads(path.read_text())["top1"]
        top1 = train()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": list(key), "top1": top1}))
        return top1

    saliency = saliency_settings(cfg.tsgf)
    with torch.no_grad():
        features = training.embeddings(teacher, real)
        losses = F.cross_entropy(training.predict(teacher, x_train, inputs), y_train, reduction="none")
    sources = dict.fromkeys(["random", "kcenter", "moderate", "packed", "centre_packed"], x_train)
    if args.budgets:
        out["budget"] = converged_budget(
            args, score, scored, x_train, y_train, ids, k, (saliency, inputs), stored_labels, log
        )
        return out
    if any(METHODS.get(m, ("random",))[0] == "window" for m in args.methods):
        sources["window"] = best_windows(cfg, teacher, x_train, y_train, args.window_views, log)
    for ipc in args.ipc:
        for draw in args.draws:
            # init draw d: the seeded order under seed d, as the pipeline's (its draws start further down
            # one order; this benchmark's IPC 10 x 6 draws would run past the clips a class has)
            pool = selection.random_real(ids, y_train, k, min(POOL * ipc, int(torch.bincount(y_train).min())), draw)
            inits = {
                "random": selection.random_real(ids, y_train, k, ipc, draw),
                "kcenter": selection.k_center(features, y_train, k, ipc, pool),
                "moderate": selection.moderate(losses, y_train, k, ipc, pool),
            }
            inits["window"] = inits["random"]  # the same videos, other windows
            if any(METHODS.get(m, ("random",))[0].endswith("packed") for m in args.methods):
                # PACK x IPC of the same order: random's IPC clips first among them (paired arms)
                inits["packed"] = inits["centre_packed"] = selection.random_real(ids, y_train, k, PACK * ipc, draw)
            for method in args.methods:
                init, tsgfo = METHODS.get(method, ("random", True))
                rows, y, idx = selection.flatten(inits[init])
                clips = sources[init][rows]
                if init.endswith("packed"):
                    windows = saliency if init == "packed" else None  # None: centre cuts
                    clips, y, idx, _, kept = packing.pack_init(
                        teacher, clips, y, idx, cfg.distill.pack_confidence, windows, inputs
                    )
                    log(f"{variant} ipc={ipc} draw={draw} {method}: {int(kept.sum())} of {len(y)} packed")
                x0 = inputs.model_input(clips)
                heat = training.clip_heat(x0, saliency, inputs)
                if tsgfo is None:
                    x_set = clips
                else:
                    arm = [f"tsgf.enabled={tsgfo}", *args.arm_overrides.get(method, [])]
                    run_cfg = load_config(args.config, [*base, *arm])
                    settings_r = recovery_settings(run_cfg)
                    x_set = to_uint8_clips(
                        recovery.recover(teacher, x0.to(args.device), y, idx, settings_r, stats),
                        inputs.mean,
                        inputs.std,
                    ).cpu()
                stored = stored_labels(x_set, y, idx, heat)
                out["sets"].setdefault((method, ipc), []).append(
                    diversity(teacher, inputs.model_input(x_set), y, stored[1])
                )
                for regime in args.regimes:
                    if regime == "online" and ipc not in (args.online_ipc or args.ipc):
                        continue
                    accs = [score(x_set, y, heat.float(), stored, regime, seed) for seed in args.seeds]
                    out["scores"].setdefault((regime, method, ipc), {})[draw] = accs
                    log(f"{variant} ipc={ipc} draw={draw} {regime} {method}: {[round(100 * a, 1) for a in accs]}")
    if args.full:
        heat = training.clip_heat(x_train, saliency, inputs)
        stored = stored_labels(x_train, y_train, torch.arange(len(y_train)), heat)
        for regime in args.regimes:
            accs = [score(x_train, y_train, heat, stored, regime, seed) for seed in args.seeds]
            out["scores"][(regime, "full", 0)] = {0: accs}
            log(f"{variant} {regime} full: {[round(100 * a, 1) for a in accs]}")
    return out


def converged_budget(args, score, scored, x_train, y_train, ids, k, heat_settings, stored_labels, log) -> dict:
    """The converged-budget rule (CONVERGED_GAIN): {"runs": {(regime, arm, steps): [top-1 per
    student]}, "steps": the headline budget or None}. Arms: `full`, and random_real at the largest
    --ipc of each --draws (heat and stored labels as the benchmark's: heat_settings is the
    (saliency, inputs) pair `training.clip_heat` takes); each student through `scored` (cached)."""
    ipc = max(args.ipc)
    sets = {"full": [(x_train, y_train, torch.arange(len(y_train)))]}
    for draw in args.draws:
        rows, y, idx = selection.flatten(selection.random_real(ids, y_train, k, ipc, draw))
        sets.setdefault("random_real", []).append((x_train[rows], y, idx))
    prepared = {}
    for arm, draws in sets.items():
        prepared[arm] = []
        for x, y, idx in draws:
            heat = training.clip_heat(x, *heat_settings)
            prepared[arm].append((x, y, heat, stored_labels(x, y, idx, heat)))
    runs: dict = {}
    draws = {"full": [0], "random_real": args.draws}

    def mean_top1(regime: str, arm: str, steps: int) -> float:
        if (regime, arm, steps) not in runs:
            runs[(regime, arm, steps)] = [
                scored(
                    (regime, arm, draw, seed, steps),
                    functools.partial(score, x, y, heat.float(), stored, regime, seed, steps),
                )
                for draw, (x, y, heat, stored) in zip(draws[arm], prepared[arm])
                for seed in args.seeds
            ]
            log(f"budget {steps} steps {regime} {arm}: {[round(100 * a, 1) for a in runs[(regime, arm, steps)]]}")
        return 100 * statistics.fmean(runs[(regime, arm, steps)])

    first, cap = args.budgets[0], args.budgets[-1]
    steps = first
    while 2 * steps <= max(cap, 2 * first):
        gains = [mean_top1(r, a, 2 * steps) - mean_top1(r, a, steps) for r in args.regimes for a in prepared]
        if max(gains) <= CONVERGED_GAIN:
            return {"runs": runs, "steps": steps, "ipc": ipc}
        steps *= 2
    return {"runs": runs, "steps": None, "ipc": ipc}


def best_windows(cfg, teacher, x_train: torch.Tensor, y_train: torch.Tensor, views: int, log) -> torch.Tensor:
    """Each training video's view (0: as sampled; 1..views-1: `decode_view`'s) of the largest
    `selection.window_score`, as the stats pass picks distill.init=motion_window's: (N, F, H, W, 3) uint8."""
    inputs = input_settings(cfg)
    candidates = [x_train] + [load_split(cfg, "train", view=v)[0] for v in range(1, views)]
    compensate = saliency_settings(cfg.tsgf).compensate
    scores = torch.stack(
        [
            selection.window_score(
                training.predict(teacher, c, inputs), y_train, motion_energy(inputs.model_input(c), compensate)
            )
            for c in candidates
        ]
    )  # (views, N)
    chosen = scores.argmax(0)
    log(f"windows: {views} views per video, chosen view counts {torch.bincount(chosen, minlength=views).tolist()}")
    return torch.stack(candidates)[chosen, torch.arange(len(x_train))]


def per_draw_differences(s: dict, regime: str, method: str, ipc: int) -> list[float]:
    """Points: per draw, the mean over seeds of method - random_real on the same (draw, seed)."""
    a, b = s[(regime, method, ipc)], s[(regime, "random_real", ipc)]
    return [100 * statistics.fmean(x - y for x, y in zip(a[d], b[d])) for d in sorted(a)]


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("inf")
    return statistics.fmean(values), se


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--variants", nargs="+", default=["plain"], choices=list(DATASETS))
    parser.add_argument("--split", default="val", choices=["val", "test"], help="what students are scored on")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--methods", nargs="+", default=["random_real", "tsgd"], choices=list(METHODS))
    parser.add_argument(
        "--arms",
        nargs="*",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="more tsgd arms, each recovered with its own overrides (e.g. div:distill.diversity=1); students as every arm",
    )
    parser.add_argument("--regimes", nargs="+", default=["stored16", "hard", "online"])
    parser.add_argument("--online-ipc", type=int, nargs="*", default=[], help="IPCs of the online regime (all)")
    parser.add_argument("--student", default="mini_r2plus1d")
    parser.add_argument(
        "--teacher",
        default="",
        help="import the teacher (a checkpoint path or URI, or runs:/... or models:/... at tracking.tracking_uri) "
        "instead of training one; teacher.model/width/depth must describe it",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], help="init clip draws")
    parser.add_argument("--steps", type=int, default=120, help="student optimiser steps, every arm and full")
    parser.add_argument(
        "--budgets",
        type=int,
        nargs="*",
        default=[],
        metavar="S0 [CAP]",
        help="run the converged-budget rule instead of the arms (CONVERGED_GAIN): budgets double from S0 up to CAP",
    )
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--window-views", type=int, default=4, help="views per video the window_* methods choose among")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the teacher, recovery and students run (cuda: bf16 autocast unless amp=false); "
        "the caches keep a CUDA run's teachers and students apart from the CPU's",
    )
    parser.add_argument("--out", default="", help="write the Markdown report here (e.g. docs/QUALITY.md)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    args.arm_overrides = {}
    for arm in args.arms:
        name, _, overrides = arm.partition(":")
        if not name or name in METHODS or not overrides:
            raise SystemExit(f"--arms: NAME:KEY=VALUE[,KEY=VALUE] with a new name, got {arm!r}")
        args.arm_overrides[name] = overrides.split(",")
        args.methods.append(name)
    if "random_real" not in args.methods:
        raise SystemExit("--methods: random_real is the reference every difference is taken against")
    for regime in args.regimes:
        regime_overrides(regime)
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device: cpu, cuda or cuda:N, got {args.device!r}") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here")
    torch.set_num_threads(args.threads)
    tune_for(args.device)
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    results = {variant: run_variant(variant, args, log) for variant in args.variants}
    report = render(args, results, time.time() - started)
    if args.out and Path(args.out).exists() and NOTES in Path(args.out).read_text():  # keep the notes below
        report += "\n" + Path(args.out).read_text().split(NOTES, 1)[1].lstrip("\n")
    print(report)
    for line in report.splitlines():  # end with the target lines alone
        if line.strip().startswith("target "):
            print(line.strip())
    if args.out:
        Path(args.out).write_text(report)
    return 0


def render(args, results: dict, seconds: float) -> str:
    cfg = next(iter(results.values()))["cfg"]
    e, d, lab = cfg.evaluate, cfg.distill, cfg.distill.labels
    lines = [
        "# Quality benchmark (" + ", ".join(DATASETS[v] for v in results) + ")",
        "",
        f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"Run time: {seconds / 60:.1f} min on {where(args.device, cfg.amp)}. Scored on the "
        f"`{args.split}` split; {len(args.draws)} init draws x {len(args.seeds)} student seeds per "
        f"cell. Teacher {cfg.teacher.model} width {cfg.teacher.width}, "
        f"{f'imported from {args.teacher}' if args.teacher else f'{cfg.teacher.epochs} epochs'}. Recovery "
        f"{d.iterations} iterations, lr {d.lr}. Student {args.student} width {e.width or cfg.teacher.width}, "
        f"{'the budgets below' if args.budgets else f'{args.steps} steps'} for every arm and for full, batch {e.batch_size}, lr {e.lr}. Online: "
        f"evaluate.augment crops {list(e.augment.crop_scale)}, hflip {e.augment.hflip}, time_reverse "
        f"{e.augment.time_reverse}, TSGFA {e.tsgfa}, T={e.temperature}. Stored views: crops "
        f"{list(lab.augment.crop_scale)}, hflip {lab.augment.hflip}, TSGFA {lab.tsgfa}. Hard: the teacher's "
        f"crops {list(cfg.augment.crop_scale)}, hflip {cfg.augment.hflip}.",
    ]
    if not args.budgets:  # the arms' tables
        lines += [
            "",
            "Cells: top-1 % mean +- SE over draws (each draw: the mean over seeds). Differences: tsgd - "
            "random_real on the same (draw, seed), mean +- SE over the per-draw means, then each draw's.",
        ]
    if args.arm_overrides:
        lines += [
            "",
            "Arms beyond the methods: "
            + "; ".join(
                f"`{name}` = tsgd with {', '.join(f'`{o}`' for o in overrides)}"
                for name, overrides in args.arm_overrides.items()
            )
            + ".",
        ]
    targets: list[str] = []
    for variant, r in results.items():
        s = r["scores"]
        lines += [
            "",
            f"## Variant `{variant}`",
            "",
            f"{DATASETS[variant]}: clips {r['cfg'].data.num_frames}x{r['cfg'].data.height}x{r['cfg'].data.width}, "
            f"{r['classes']} classes, {r['train_clips']} training clips, {r['eval_per_class']} `{args.split}` clips per class.",
            "",
            f"Teacher controls on `{args.split}` (top-1 %): "
            + ", ".join(f"{name} {100 * v:.1f}" for name, v in r["controls"].items())
            + ".",
            "",
        ]
        if "budget" in r:
            budget_lines, budget_targets = render_budget(args, variant, r)
            lines += budget_lines
            targets += budget_targets
            continue
        lines += [
            "Sets: within-class feature cosine (teacher) and stored-label entropy (nats), mean over draws:",
            "",
            "| method | " + " | ".join(f"IPC {i}" for i in args.ipc) + " |",
            "|---|" + "---|" * len(args.ipc),
        ]
        for method in args.methods:
            cells = []
            for i in args.ipc:
                rows = r["sets"][(method, i)]
                cosine = statistics.fmean(x["cosine"] for x in rows)  # nan: one clip per class
                cosine_text = "-" if math.isnan(cosine) else f"{cosine:.3f}"
                cells.append(f"{cosine_text} / {statistics.fmean(x['entropy'] for x in rows):.2f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for regime in args.regimes:
            ipcs = [i for i in args.ipc if (regime, "random_real", i) in s]
            lines += [
                "",
                f"### Regime `{regime}`",
                "",
                "| method | " + " | ".join(f"IPC {i}" for i in ipcs) + " |",
                "|---|" + "---|" * len(ipcs),
            ]
            for method in args.methods:
                cells = []
                for i in ipcs:
                    m, se = mean_se([100 * statistics.fmean(v) for v in s[(regime, method, i)].values()])
                    cells.append(f"{m:.1f} +- {se:.1f}")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            if (regime, "full", 0) in s:
                full = [100 * a for a in s[(regime, "full", 0)][0]]
                spread = f" +- {statistics.stdev(full):.1f}" if len(full) > 1 else ""
                label = f"full ({len(full)} seeds{', +- std' if spread else ''})"
                lines.append(f"| {label} | " + " | ".join(f"{statistics.fmean(full):.1f}{spread}" for _ in ipcs) + " |")
            for method in [m for m in args.methods if m != "random_real"]:
                lines += ["", f"{method} - random_real (points):", ""]
                for i in ipcs:
                    diffs = per_draw_differences(s, regime, method, i)
                    m, se = mean_se(diffs)
                    lines.append(
                        f"- IPC {i}: {m:+.1f} +- {se:.1f} (SE, df {len(diffs) - 1}); per draw "
                        + ", ".join(f"{x:+.1f}" for x in diffs)
                        + f"; worst {min(diffs):+.1f}"
                    )
                    if method == "tsgd":
                        targets += _targets(variant, regime, i, m, se, min(diffs))
            if regime == "stored16" and (regime, "full", 0) in s and "tsgd" in args.methods:
                top = max(ipcs)
                ratio = statistics.fmean(
                    statistics.fmean(v) for v in s[(regime, "tsgd", top)].values()
                ) / statistics.fmean(s[(regime, "full", 0)][0])
                targets.append(target_line(f"{variant}_ipc{top}_{regime}_tsgd_over_full", ratio, ">=", 0.9))
        if ("hard", "full", 0) in s:
            full_hard = 100 * statistics.fmean(s[("hard", "full", 0)][0])
            lines += ["", "DD-Ranking's hard-label recovery (full - method, hard labels, points):", ""]
            for method in args.methods:
                cells = [
                    f"IPC {i} {full_hard - 100 * statistics.fmean(statistics.fmean(v) for v in s[('hard', method, i)].values()):.1f}"
                    for i in args.ipc
                    if ("hard", method, i) in s
                ]
                lines.append(f"- {method}: " + ", ".join(cells))
    if targets:
        lines += ["", "## Targets (fixed before the runs)", "", *("    " + line for line in targets)]
    return "\n".join(lines) + "\n\n" + NOTES + "\n"


def render_budget(args, variant: str, r: dict) -> tuple[list[str], list[str]]:
    """The converged-budget rule's runs (top-1 % mean +- std over students, and the gain of each
    doubling), the headline budget, and its targets: `full` over the teacher (first --regimes) and,
    for a variant other than plain, random_real over `full` at the rule's IPC."""
    b = r["budget"]
    runs, ipc = b["runs"], b["ipc"]
    budgets = sorted({steps for _, _, steps in runs})
    lines = [
        f"Converged-budget rule (fixed before the runs): budgets double from {args.budgets[0]} steps; the "
        f"headline budget is the first S whose run at 2 S gains at most {CONVERGED_GAIN} points of top-1 over "
        f"its run at S, for `full` ({len(args.seeds)} seeds) and random_real at IPC {ipc} ({len(args.draws)} "
        f"draws x {len(args.seeds)} seeds), in every regime; each budget a whole run with its own schedule.",
        "",
        "| regime | arm | " + " | ".join(f"{n} steps" for n in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for regime in args.regimes:
        for arm in ("full", "random_real"):
            cells = []
            for n in budgets:
                accs = [100 * a for a in runs.get((regime, arm, n), [])]
                spread = f" +- {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
                cells.append(f"{statistics.fmean(accs):.1f}{spread}" if accs else "-")
            lines.append(f"| {regime} | {arm} | " + " | ".join(cells) + " |")
    headline = b["steps"]
    lines += ["", f"Headline budget: {headline} steps." if headline else "No budget met the rule."]
    cap = max(args.budgets[-1], 2 * args.budgets[0])
    targets = [target_line(f"{variant}_converged_budget_steps", headline or float("inf"), "<=", cap, 0)]
    if headline:
        regime = args.regimes[0]
        full = statistics.fmean(runs[(regime, "full", headline)])
        targets.append(target_line(f"{variant}_full_over_teacher", full / r["controls"]["as is"], ">=", 0.85))
        if variant != "plain":
            rand = statistics.fmean(runs[(regime, "random_real", headline)])
            targets.append(target_line(f"{variant}_ipc{ipc}_random_real_over_full", rand / full, "<", 0.7))
    return lines, targets


def _targets(variant: str, regime: str, ipc: int, mean: float, se: float, worst: float) -> list[str]:
    name = f"{variant}_ipc{ipc}_{regime}_tsgd_minus_random_real"
    if regime in TEACHER_FREE:
        return [
            target_line(f"{name}_over_se", mean / max(se, 1e-9), ">", 2.0),
            target_line(f"{name}_worst_draw_points", worst, ">=", 0.0, 1),
        ]
    if regime == "online":
        return [target_line(f"{name}_over_se", mean / max(se, 1e-9), ">=", -1.0)]
    return []


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:  # a teacher that does not fit, a bad key: one line, exit 2
        print(f"quality.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
