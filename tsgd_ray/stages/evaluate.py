"""Evaluate stage: a fleet of Ray Train students on a training set, tested on the real evaluation shards.

The training set is the merged synthetic set of a method (tsgd, sre2l_video, random_real), of
which each Ray Train worker reads only its own row groups, or, for a method that does not distil
(`full`), every real training clip from the clip cache. Students learn with the labels of
`evaluate.labels` and TSGFA (`evaluate.*`) in `training.fit`. Every (method, seed) student is its
own Ray Train run; the fleet starts them all and trains as many at a time as the cluster holds (`Fleet`), each
checkpointing every few epochs (a rerun after a lost node resumes it). The evaluation split
(`data.eval_split`: test, or val for Kinetics and SSv2) is read from the clip cache and never
seen by teacher or distiller::

    <evaluate_dir>/ray_train/seed-<seed>/  one student's Ray Train run and checkpoints
    <evaluate_dir>/seed-00000.json   one seed's top-1/top-5 and loss curve (written when it ends;
                                     a restarted run skips finished seeds)
    <evaluate_dir>/results.json      the marker: per-seed and mean +- std top-1/top-5
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Optional

import torch
from omegaconf import DictConfig

from tsgd_ray import artifacts, layout, methods, storage
from tsgd_ray.artifacts import load_teacher
from tsgd_ray.config import ConfigError, LabelKind, Method
from tsgd_ray.console import Progress
from tsgd_ray.core import training
from tsgd_ray.core.clips import InputSettings
from tsgd_ray.core.device import reserved_gpus
from tsgd_ray.core.models import build_model
from tsgd_ray.data.shards import eval_split, read_manifest, shards_root
from tsgd_ray.layout import clip_size, seed_uri
from tsgd_ray.runtime import ray_train
from tsgd_ray.runtime.cluster import check_gpus
from tsgd_ray.stages import skeleton
from tsgd_ray.tracking import live_curve

log = logging.getLogger(__name__)

_SOURCES = threading.Lock()


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
    model, source: ray_train.ClipSource, rank: int, world: int, cfg: DictConfig, device
) -> tuple[float, float, int]:
    """(top-1, top-5, clips) of `model` on the evaluation clips, summed over all workers."""
    counts = torch.zeros(3, dtype=torch.float64)
    inputs = InputSettings.from_config(cfg)
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


def _student_worker(loop_config: dict) -> None:
    """Ray Train loop of one (method, seed) student: train it, resuming from its run's latest
    checkpoint (one every few epochs, `ray_train.report_due`), test it on the evaluation clips
    (and the teacher too, when `loop_config["teacher_too"]`) and write its seed file."""
    import ray.train
    import ray.train.torch

    cfg, classes, method = loop_config["cfg"], loop_config["classes"], Method(loop_config["method"])
    source, seed = loop_config["source"], loop_config["seed"]
    rank, world, device = ray_train.worker_setup(cfg.evaluate, "evaluate", cfg.device)
    settings = training.StudentSettings.from_config(cfg)
    distils = methods.get(method).distils
    if settings.labels == LabelKind.stored and not distils:
        settings = replace(settings, labels=LabelKind.soft_kl)  # no stored set: the teacher labels online
    per_worker = replace(settings.fit, batch_size=ray_train.per_worker_batch(settings.fit.batch_size, world))
    settings = replace(settings, fit=per_worker)  # evaluate.batch_size is global
    teacher = load_teacher(cfg, classes, device)
    student = ray.train.torch.prepare_model(new_student(cfg, len(classes), seed))
    resume = ray_train.latest_state()
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
            rows = [h for h in state.history if h["step"] > sent[0]]  # the live curve's new rows
            ray_train.report({"seed": seed, "started": started, "rows": rows}, state, rank)
            sent[0] = state.epoch

    worker_seed = seed * world + rank
    fit_options = {"callbacks": [checkpoint_and_report], "resume": resume}
    if distils:
        heat = mine["heat"].float() / 255 if mine["heat"] is not None else None  # TSGFA's init maps
        stored = (mine["view_params"], mine["logits"]) if mine["view_params"] is not None else None
        training.train_student(
            student,
            teacher,
            mine["clips"],
            mine["labels"],
            settings,
            worker_seed,
            heat=heat,
            epoch_context=lambda: ray_train.uneven_inputs(student),
            stored=stored,
            **fit_options,
        )
    else:
        _fit_on_stream(student, teacher, source, rank, world, settings, worker_seed, device, **fit_options)
    top1, top5, n = _test(student, source, rank, world, cfg, device)
    teacher_scores = _test(teacher, source, rank, world, cfg, device) if loop_config["teacher_too"] else None
    if rank == 0:
        storage.write_json_once(
            seed_uri(cfg, method, seed),
            {
                "seed": seed,
                "top1": top1,
                "top5": top5,
                "test_clips": n,
                "history": history,
                **({"teacher_top1": teacher_scores[0], "teacher_top5": teacher_scores[1]} if teacher_scores else {}),
                "started": started,
                "seconds": round(time.time() - started, 1),
                "workers": world,
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
    """What the students of `method` learn from, as recorded in MLflow: online (soft_kl or
    soft_mse), stored(K=...) or hard."""
    labels = LabelKind(cfg.evaluate.labels)
    if labels == LabelKind.stored and methods.get(method).distils:
        return f"stored(K={cfg.evaluate.views})"
    if labels == LabelKind.hard:
        return "hard"
    return f"online({LabelKind.soft_kl.value if labels == LabelKind.stored else labels.value})"


def _check_stored(cfg: DictConfig, method: Method) -> None:
    if cfg.evaluate.labels != LabelKind.stored or not methods.get(method).distils:
        return
    held = (artifacts.read_synthetic_manifest(cfg).get("stored_labels") or {}).get("views", 0)
    if held < cfg.evaluate.views:
        raise ConfigError(
            f"evaluate.labels=stored: the {method.value} set stores {held} views per clip, evaluate.views asks "
            f"for {cfg.evaluate.views}; distil with distill.labels.views >= {cfg.evaluate.views}"
        )


class Fleet:
    """The evaluation fleet's room: at most `students` students at once, holding at most `workers`
    Ray Train workers between them (a student of more workers than that trains alone). Bounding
    it here, not by Ray's queue, keeps a waiting student from timing out its worker group's start."""

    def __init__(self, students: int, workers: int):
        self.students, self.workers = students, workers
        self._busy = [0, 0]  # students, workers
        self._free = threading.Condition()

    @classmethod
    def for_config(cls, cfg: DictConfig) -> "Fleet":
        """Room for evaluate.students_at_once students whatever their workers (Ray, and an
        autoscaler, place them), or (0) for as many student workers as the cluster's CPUs and GPUs
        hold now (at least one student). A source decoding live keeps one CPU for Ray Data,
        whose decode tasks would otherwise wait for ever behind the students."""
        import ray

        e = cfg.evaluate
        if e.students_at_once:
            return cls(int(e.students_at_once), 2**31)
        have = ray.cluster_resources()
        fits = [(have.get("CPU", 0) - (0 if cfg.data.clip_cache else 1)) / e.cpus_per_worker]
        gpus = reserved_gpus(cfg.device, e.gpus_per_worker)
        if gpus:
            fits.append(have.get("GPU", 0) / gpus)
        workers = max(1, int(min(fits) + 1e-9))
        return cls(workers, workers)

    @contextlib.contextmanager
    def room(self, workers: int):
        """Hold room for one student of `workers` workers while inside (waits for it)."""
        need = min(workers, self.workers)
        with self._free:
            self._free.wait_for(lambda: self._busy[0] < self.students and self._busy[1] + need <= self.workers)
            self._busy[0] += 1
            self._busy[1] += need
        try:
            yield
        finally:
            with self._free:
                self._busy[0] -= 1
                self._busy[1] -= need
                self._free.notify_all()


def run_evaluate(cfg: DictConfig, method: Method, tracker=None, fleet: Optional[Fleet] = None) -> dict:
    """Train and test the students of `method` (cfg: `methods.method_config(cfg, method)`) unless
    finished; returns the results (see `summarise`). Each seed's student is its own Ray Train run
    (`<evaluate_dir>/ray_train/seed-<seed>`), all started at once, each training while it has room
    in `fleet` (shared by the methods of a run; default: `Fleet.for_config`).

    Raises:
        ConfigError: the dataset has no data.eval_split split, or stored labels are asked of a set
        that holds fewer than evaluate.views.
    """
    manifest = read_manifest(shards_root(cfg))
    classes, split = manifest["classes"], eval_split(cfg, manifest["counts"])

    seed_name = f"evaluate/{method.value}/seed-{{}}"

    def work(run_id) -> dict:
        check_gpus(cfg, "evaluate.gpus_per_worker", cfg.evaluate.gpus_per_worker)
        _check_stored(cfg, method)
        splits = {"eval": split, **({"train": "train"} if not methods.get(method).distils else {})}
        with _SOURCES:  # one thread at a time builds (or finds) a clip cache
            source = ray_train.ClipSource(cfg, splits, tested=["eval"])
        curve = [live_curve(tracker.uri, run_id, step="step", child=("seed", seed_name))] if tracker else []
        room = fleet or Fleet.for_config(cfg)

        def train(seed: int) -> None:
            from ray.train.torch import TorchTrainer

            trainer = TorchTrainer(
                _student_worker,
                train_loop_config={
                    "cfg": cfg,
                    "classes": classes,
                    "method": method.value,
                    "source": source,
                    "seed": seed,
                    "teacher_too": seed == cfg.evaluate.seeds[0],
                },
                scaling_config=ray_train.scaling_config(cfg.evaluate, cfg.device),
                torch_config=ray_train.torch_config(cfg.evaluate, cfg.device),
                run_config=ray_train.run_config(
                    storage.join(layout.evaluate_dir(cfg, method), "ray_train"),
                    f"seed-{seed}",
                    cfg.ray.max_failures,
                    curve,
                ),
                datasets=source.datasets,
                dataset_config=ray_train.data_config(source.datasets),
            )
            with room.room(cfg.evaluate.num_workers):
                trainer.fit()

        todo = [s for s in cfg.evaluate.seeds if not storage.exists(seed_uri(cfg, method, s))]
        pool = ThreadPoolExecutor(max(1, len(todo)), thread_name_prefix=f"evaluate-{method.value}")
        try:
            for done in [pool.submit(train, s) for s in todo]:
                done.result()  # the first failure, once the students before it have ended
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # an interrupt does not wait for the others
            if tracker:
                tracker.fail_children(run_id)  # seed runs the live curve opened
            raise
        pool.shutdown()
        per_seed = [storage.read_json(seed_uri(cfg, method, s)) for s in cfg.evaluate.seeds]
        results = {**summarise(method, cfg.distill.ipc, per_seed), "eval_split": split, "labels": regime}
        if tracker:
            for r in per_seed:
                name, started = seed_name.format(r["seed"]), r.get("started")
                seed_run = tracker.find_child(run_id, name)  # opened live when the seed started
                if seed_run is None:  # `full` (no per-epoch reports), or a seed of an earlier invocation
                    seed_run = tracker.child(name, parent=run_id, start_time=started)
                    tracker.log_history(seed_run, r["history"])
                tracker.log_metrics(seed_run, {"top1": r["top1"], "top5": r["top5"]})
                tracker.finish(seed_run, end_time=started + r["seconds"] if started else None)
            tracker.log_metrics(
                run_id,
                {
                    k: results[k]
                    for k in ("top1_mean", "top1_std", "top5_mean", "top5_std", "teacher_top1", "teacher_top5")
                    if k in results
                },
            )
        log.info(
            "evaluate %s: top-1 %.3f +- %.3f over %d seeds on %s",
            method.value,
            results["top1_mean"],
            results["top1_std"],
            len(per_seed),
            split,
        )
        return results

    regime = label_regime(cfg, method)
    return skeleton.run_stage(
        cfg,
        f"evaluate/{method.value}",
        layout.results_uri(cfg, method),
        work,
        tracker,
        {"method": method.value, "labels": regime},
    )
