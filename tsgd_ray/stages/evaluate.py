"""Evaluate stage: a fleet of Ray Train students on a training set, tested on the real evaluation shards.

The training set is the merged synthetic set of a method (tsgd, sre2l_video, random_real), of
which each Ray Train worker reads only its own row groups, or, for a method that does not distil
(`full`), every real training clip from the clip cache. Students learn with the labels of
`evaluate.labels` and TSGFA (`evaluate.*`) in `training.fit`. The (method, seed) students of a
run form one fleet (`tsgd_ray.runtime.fleet`): as many slots as the cluster holds, each slot one
Ray Train run that trains its students one after another, each student checkpointing every few
epochs (a restart after a lost worker, or a rerun, resumes it). The evaluation split
(`data.eval_split`: test, or val for Kinetics and SSv2) is read from the clip cache and never
seen by teacher or distiller::

    <evaluate_dir>/checkpoints/seed-<seed>/  one student's latest checkpoints
    <evaluate_dir>/seed-00000.json   one seed's top-1/top-5 and loss curve (written when it ends;
                                     a restarted run skips finished seeds)
    <evaluate_dir>/results.json      the marker: per-seed and mean +- std top-1/top-5
    <output_root>/fleet/<key>/slot-<n>/   the fleet's Ray Train runs
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import replace
from typing import Sequence

import torch
from omegaconf import DictConfig

from tsgd_ray import artifacts, layout, methods, storage
from tsgd_ray.artifacts import load_teacher
from tsgd_ray.config import ConfigError, Method, regimes
from tsgd_ray.console import Progress
from tsgd_ray.core import training
from tsgd_ray.core.models import build_model
from tsgd_ray.data.shards import eval_split, read_manifest, shards_root
from tsgd_ray.layout import clip_size, fleet_dir
from tsgd_ray.methods import arm_name, method_config
from tsgd_ray.runtime import ray_train
from tsgd_ray.runtime.cluster import check_gpus
from tsgd_ray.runtime.fleet import Fleet, Student
from tsgd_ray.settings import input_settings, student_settings
from tsgd_ray.stages import skeleton
from tsgd_ray.tracking import OFF, RunContext, live_curve

log = logging.getLogger(__name__)

Arm = tuple[Method, int]  # (method, init draw): `methods.arms`


def new_student(cfg: DictConfig, num_classes: int, seed: int) -> torch.nn.Module:
    """The student architecture (evaluate.model/width/depth, the teacher's unless set), seeded."""
    e = cfg.evaluate
    torch.manual_seed(seed)
    return build_model(e.model, num_classes, clip_size(cfg), e.width, e.depth)


def _fit_on_stream(
    student, teacher, source: ray_train.ClipSource, rank: int, world: int, settings, seed: int, device, **fit_options
) -> None:
    """A method that does not distil (`full`): `training.fit` over evaluate.epochs passes of this
    worker's share of the real training clips (labelled by the teacher as the synthetic sets are);
    fit_options: `fit`'s callbacks, resume."""
    batch_size = settings.fit.batch_size
    generator = torch.Generator().manual_seed(seed)

    def step(batch: dict, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        x = settings.inputs.model_input(batch["clip"].to(device, non_blocking=True))  # uint8 over the bus
        return training.student_step(student, teacher, optimizer, x, batch["label"].to(device), settings, generator)

    training.fit(
        student,
        lambda epoch: source.batches(
            "train", epoch, batch_size, rank, world, seed * 1000 + epoch, device.type == "cuda"
        ),
        step,
        settings.fit,
        source.steps("train", world, batch_size),
        ema=settings.ema,
        epoch_context=lambda: ray_train.uneven_inputs(student),
        generator=generator,
        **fit_options,
    )


def _test(
    model, source: ray_train.ClipSource, rank: int, world: int, device, cfg: DictConfig
) -> tuple[float, float, int]:
    """(top-1, top-5, clips) of `model` on the evaluation clips, summed over all workers."""
    counts = torch.zeros(3, dtype=torch.float64)
    inputs = input_settings(cfg)
    for batch in source.batches("eval", 0, 64, rank, world):
        logits = training.predict(ray_train.unwrap(model), batch["clip"], inputs)
        n = len(batch["label"])
        counts += torch.tensor(
            [
                training.topk_accuracy(logits, batch["label"], 1) * n,
                training.topk_accuracy(logits, batch["label"], 5) * n,
                n,
            ],
            dtype=torch.float64,
        )
    if world > 1:
        import torch.distributed as dist

        reduced = counts.to(device)
        dist.all_reduce(reduced)
        counts = reduced.cpu()
    top1, top5, n = counts.tolist()
    return top1 / max(n, 1), top5 / max(n, 1), int(round(n))


def _slot_worker(loop_config: dict) -> None:
    """Ray Train loop of one fleet slot: its students one after another (`_train_student`); a
    student whose seed file exists is done (a restart after a lost worker skips it)."""
    cfg, classes = loop_config["cfg"], loop_config["classes"]
    rank, world, device = ray_train.worker_setup(cfg.evaluate, "evaluate", cfg.device)
    teacher = load_teacher(cfg, classes, device)
    for student in loop_config["students"]:
        if not storage.exists(student["where"].seed(student["seed"])):
            _train_student(student, teacher, loop_config["source"], classes, rank, world, device)


def _train_student(student: dict, teacher, source: ray_train.ClipSource, classes, rank, world, device) -> None:
    """Train one (method, seed) student, resuming from its latest checkpoint (one every few
    epochs, `ray_train.report_due`, under `Layout.student_checkpoints`), test it on the evaluation
    clips (and the teacher too, when student["teacher_too"]) and write its seed file."""
    import ray.train
    import ray.train.torch

    cfg, method, seed = student["cfg"], student["method"], student["seed"]
    settings = student_settings(cfg)
    distils = methods.get(method).distils
    settings = replace(settings, regime=settings.regime.for_student(distils))  # no stored set: its fallback
    per_worker = replace(settings.fit, batch_size=ray_train.per_worker_batch(settings.fit.batch_size, world))
    settings = replace(settings, fit=per_worker)  # evaluate.batch_size is global
    model = ray.train.torch.prepare_model(new_student(cfg, len(classes), seed))
    checkpoints = student["where"].student_checkpoints(seed)
    resume = ray_train.load_state(checkpoints)
    started = resume["history"][0]["time"] if resume and resume["history"] else time.time()
    history = list(resume["history"]) if resume else []
    progress = Progress(f"evaluate {method.value} seed {seed}", cfg.evaluate.epochs, "epoch")
    if distils:
        mine, _ = artifacts.read_synthetic(cfg, rank=rank, world=world)  # only this worker's row groups, uint8
        # the report cadence must be the same on every rank (a report is a collective), and ranks
        # may hold different row counts: steps of an even share of the set
        steps = math.ceil(len(classes) * cfg.distill.ipc / world / per_worker.batch_size)
    else:
        steps = source.steps("train", world, per_worker.batch_size)
    sent = [resume["epoch"] if resume else -1]  # the last epoch reported

    def checkpoint_and_report(state: training.FitState) -> None:  # after DDP's join: every rank is here
        history[:] = state.history
        if rank == 0:
            progress.update(state.epoch + 1, loss=state.history[-1]["loss"])
        if ray_train.report_due(state.epoch, cfg.evaluate.epochs, steps):
            if rank == 0:
                ray_train.save_state(checkpoints, state)
            rows = [h for h in state.history if h["step"] > sent[0]]  # the live curve's new rows
            ray.train.report({"student": student["key"], "started": started, "rows": rows})  # a collective
            sent[0] = state.epoch

    worker_seed = seed * world + rank
    fit_options = {"callbacks": [checkpoint_and_report], "resume": resume}
    if distils:
        heat = mine["heat"].float() / 255 if mine["heat"] is not None else None  # TSGFA's init maps
        stored = (mine["view_params"], mine["logits"]) if mine["view_params"] is not None else None
        training.train_student(
            model,
            teacher,
            mine["clips"],
            mine["labels"],
            settings,
            worker_seed,
            heat=heat,
            epoch_context=lambda: ray_train.uneven_inputs(model),
            stored=stored,
            **fit_options,
        )
    else:
        _fit_on_stream(model, teacher, source, rank, world, settings, worker_seed, device, **fit_options)
    _write_seed(student, model, teacher, source, (rank, world, device), history, started, resume)


def _write_seed(student: dict, model, teacher, source, where: tuple, history: list, started: float, resume) -> None:
    """Test a trained student (and the teacher, for the method's first seed) on the evaluation
    clips; rank 0 writes the seed file. `where`: (rank, world, device)."""
    cfg, rank = student["cfg"], where[0]
    top1, top5, n = _test(model, source, *where, cfg)
    teacher_scores = _test(teacher, source, *where, cfg) if student["teacher_too"] else None
    if rank == 0:
        storage.write_json_once(
            student["where"].seed(student["seed"]),
            {
                "seed": student["seed"],
                "top1": top1,
                "top5": top5,
                "test_clips": n,
                "history": history,
                **({"teacher_top1": teacher_scores[0], "teacher_top5": teacher_scores[1]} if teacher_scores else {}),
                "started": started,
                "seconds": round(time.time() - started, 1),
                "workers": where[1],
                "resumed_at": resume["epoch"] if resume else None,  # the checkpoint's epoch after a restart
            },
        )


def summarise(method: Method, ipc: int, per_seed: list[dict]) -> dict:
    """Per-seed and mean +- sample std (0 for one seed) top-1/top-5 of a method."""
    out: dict = {
        "method": method.value,
        "ipc": ipc if methods.get(method).distils else None,
        "seeds": [r["seed"] for r in per_seed],
        "test_clips": per_seed[0]["test_clips"],
    }
    for k in ("top1", "top5"):
        values = [r[k] for r in per_seed]
        out[k] = values
        out[f"{k}_mean"] = statistics.fmean(values)
        out[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        teacher = [r[f"teacher_{k}"] for r in per_seed if f"teacher_{k}" in r]  # tested with one seed
        if teacher:  # the teacher's own test accuracy: the ceiling
            out[f"teacher_{k}"] = teacher[0]
    return out


def label_regime(cfg: DictConfig, method: Method) -> str:
    """What the students of `method` learn from, as results and MLflow record it
    (`LabelRegime.recorded`: online(soft_kl), stored(K=16), hard, ...)."""
    return regimes.get(cfg.evaluate.labels).recorded(cfg, methods.get(method).distils)


def _check_stored(cfg: DictConfig, method: Method) -> None:
    if not regimes.get(cfg.evaluate.labels).for_student(methods.get(method).distils).replays_views:
        return
    held = (artifacts.read_synthetic_manifest(cfg).get("stored_labels") or {}).get("views", 0)
    if held < cfg.evaluate.views:
        raise ConfigError(
            f"evaluate.labels={cfg.evaluate.labels}: the {method.value} set stores {held} views per clip, evaluate.views asks "
            f"for {cfg.evaluate.views}; distil with distill.labels.views >= {cfg.evaluate.views}"
        )


def _cost(cfg: DictConfig, method: Method, classes: int, train_clips: int, eval_clips: int) -> float:
    """A student's clips through the model: its epochs over its training clips, then the test."""
    clips = classes * cfg.distill.ipc if methods.get(method).distils else train_clips
    return cfg.evaluate.epochs * clips + eval_clips


def train_students(
    cfg: DictConfig,
    manifest: dict,
    evaluated: Sequence[Arm],
    wheres: Sequence[layout.Layout],
    stages: Sequence[RunContext] = (),
) -> None:
    """Train every unfinished student (one per seed) of the arms `evaluated`, (method, init draw)
    pairs whose configs are made from `cfg` (`wheres`: their layouts; `manifest`: the shards'), in
    one evaluation fleet (`runtime.fleet`): as many Ray Train runs at once as the cluster holds,
    each training its students one after another; each student writes its seed file. stages (one per arm, or empty): the MLflow runs under which
    each student's live curve gets a child run "evaluate/<arm>/seed-<seed>".

    Raises:
        ConfigError: stored labels asked of a set that holds fewer than evaluate.views.
    """
    from ray.train.torch import TorchTrainer

    classes, split = manifest["classes"], eval_split(cfg, manifest["counts"])
    todo, routes = _unfinished(cfg, evaluated, wheres, stages)
    if not todo:
        return
    check_gpus(cfg, "evaluate.gpus_per_worker", cfg.evaluate.gpus_per_worker)
    streamed = any(not methods.get(student["method"]).distils for student in todo.values())
    source = ray_train.ClipSource(cfg, {"eval": split, **({"train": "train"} if streamed else {})}, tested=["eval"])
    counts = {name: sum(c.values()) for name, c in manifest["counts"].items()}
    fleet = Fleet.for_config(cfg)
    slots = fleet.slots(
        [
            Student(
                key,
                _cost(s["cfg"], s["method"], len(classes), counts.get("train", 0), counts.get(split, 0)),
                s["cfg"].evaluate.num_workers,
            )
            for key, s in todo.items()
        ]
    )
    folder = fleet_dir(cfg, [s["where"].seed(s["seed"]) for s in todo.values()])
    curve = [live_curve(stages[0].uri, step="step", children=routes)] if routes else []

    def train(index: int, slot) -> None:
        section = todo[slot[0].key]["cfg"].evaluate  # the students of a slot share their width
        log.info("evaluate: slot %d trains %s", index, ", ".join(s.key for s in slot))
        TorchTrainer(
            _slot_worker,
            train_loop_config={
                "cfg": cfg,
                "classes": classes,
                "source": source,
                "students": [todo[s.key] for s in slot],
            },
            scaling_config=ray_train.scaling_config(section, cfg.device),
            torch_config=ray_train.torch_config(section, cfg.device),
            run_config=ray_train.run_config(folder, f"slot-{index}", cfg.ray.max_failures, curve),
            datasets=source.datasets,
            dataset_config=ray_train.data_config(source.datasets),
        ).fit()

    fleet.run(slots, train)


def _unfinished(
    cfg: DictConfig, evaluated: Sequence[Arm], wheres: Sequence[layout.Layout], stages: Sequence[RunContext]
) -> tuple[dict, dict]:
    """The students of the arms `evaluated` without a seed file, {key: {key, cfg, where, method,
    seed, teacher_too}}, and their live curves' routes {key: (the arm's run id, child name)}."""
    todo, routes = {}, {}
    for (method, draw), where, stage in zip(evaluated, wheres, stages or [OFF] * len(evaluated)):
        mcfg = method_config(cfg, method, draw)
        _check_stored(mcfg, method)
        for seed in mcfg.evaluate.seeds:
            key = f"{arm_name(method, draw)}/seed-{seed}"
            if not storage.exists(where.seed(seed)):
                teacher_too = seed == mcfg.evaluate.seeds[0] and draw == cfg.distill.draw  # once per method
                todo[key] = {"key": key, "cfg": mcfg, "where": where, "method": method, "seed": seed}
                todo[key]["teacher_too"] = teacher_too
                if stage:
                    routes[key] = (stage.run_id, f"evaluate/{key}")
    return todo, routes


def _report(cfg: DictConfig, where: layout.Layout, method: Method, split: str, stage: RunContext) -> dict:
    """The results of `method`'s students from cfg's draw (`summarise`; `where`: their layout),
    logged to the arm's run `stage`: a child run per seed, the means on `stage` itself."""
    per_seed = [storage.read_json(where.seed(s)) for s in cfg.evaluate.seeds]
    results = {**summarise(method, cfg.distill.ipc, per_seed), "eval_split": split, "labels": label_regime(cfg, method)}
    results["draw"] = cfg.distill.draw
    arm = arm_name(method, cfg.distill.draw)
    for r in per_seed if stage else []:
        name, started = f"evaluate/{arm}/seed-{r['seed']}", r.get("started")
        seed_run = stage.find_child(name)  # opened live when the seed started
        if seed_run is None:  # `full` (no per-epoch reports), or a seed of an earlier invocation
            seed_run = stage.child(name, start_time=started)
            seed_run.log_history(r["history"])
        seed_run.log_metrics({"top1": r["top1"], "top5": r["top5"]})
        seed_run.finish(end_time=started + r["seconds"] if started else None)
    keys = ("top1_mean", "top1_std", "top5_mean", "top5_std", "teacher_top1", "teacher_top5")
    stage.log_metrics({k: results[k] for k in keys if k in results})
    log.info(
        "evaluate %s: top-1 %.3f +- %.3f over %d seeds on %s",
        arm,
        results["top1_mean"],
        results["top1_std"],
        len(per_seed),
        split,
    )
    return results


def evaluate_methods(cfg: DictConfig, evaluated: Sequence[Arm], run: RunContext = OFF) -> list[dict]:
    """Train and test the students of every arm of `evaluated`, (method, init draw) pairs
    (`methods.arms`; each arm's config made from `cfg` by `methods.method_config`), unless
    finished, every student in one fleet (`train_students`); returns each arm's results (see
    `summarise`, with its "draw"), in order. Each arm is a stage of its own (`evaluate/<arm>`: its
    marker, lease and MLflow child run of `run`).

    Raises:
        ConfigError: the dataset has no data.eval_split split, or stored labels are asked of a set
        that holds fewer than evaluate.views.
    """
    manifest = read_manifest(shards_root(cfg))
    split = eval_split(cfg, manifest["counts"])
    configs = [method_config(cfg, m, d) for m, d in evaluated]
    wheres = [layout.of(c, m) for (m, _), c in zip(evaluated, configs)]
    specs = [
        skeleton.StageSpec(
            f"evaluate/{arm_name(m, d)}",
            w.results,
            {"method": m.value, "labels": label_regime(c, m), "draw": str(d)},
        )
        for (m, d), c, w in zip(evaluated, configs, wheres)
    ]

    def work(todo: list[int], stages: list[RunContext]) -> list[dict]:
        try:
            train_students(cfg, manifest, [evaluated[i] for i in todo], [wheres[i] for i in todo], stages)
        except BaseException:
            for stage in stages:
                stage.fail_children()  # seed runs the live curve opened
            raise
        return [_report(configs[i], wheres[i], evaluated[i][0], split, stage) for i, stage in zip(todo, stages)]

    return skeleton.run_stages(cfg, specs, work, run)


def run_evaluate(cfg: DictConfig, method: Method, run: RunContext = OFF) -> dict:
    """`evaluate_methods` of one method, from cfg's init draw: its results."""
    return evaluate_methods(cfg, [(method, cfg.distill.draw)], run)[0]
