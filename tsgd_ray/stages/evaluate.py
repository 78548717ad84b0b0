"""Evaluate stage: Ray Train students on a training set, tested on the real evaluation shards.

The training set is the merged synthetic set of a method (tsgd, sre2l_video, random_real), of
which each Ray Train worker reads only its own rows (every world-th, one row group at a time), or,
for a method that does not distil (`full`), every real training clip from the clip cache. Students
learn with online teacher soft labels and TSGFA (`evaluate.*`) in `training.fit`, one student per
seed in `evaluate.seeds`, all in one Ray Train run; the evaluation split (`data.eval_split`: test,
or val for Kinetics and SSv2) is read from the clip cache and never seen by teacher or distiller::

    <evaluate_dir>/seed-00000.json   one seed's top-1/top-5 and loss curve (written when it ends;
                                     a restarted run skips finished seeds)
    <evaluate_dir>/results.json      the marker: per-seed and mean +- std top-1/top-5
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace

import torch
from omegaconf import DictConfig

from tsgd_ray import artifacts, layout, methods, storage
from tsgd_ray.artifacts import load_teacher
from tsgd_ray.config import ConfigError, LabelKind, Method
from tsgd_ray.console import Progress
from tsgd_ray.core import training
from tsgd_ray.core.clips import InputSettings
from tsgd_ray.core.models import build_model
from tsgd_ray.data.shards import eval_split, read_manifest, shards_root
from tsgd_ray.layout import clip_size, seed_uri
from tsgd_ray.runtime import ray_train
from tsgd_ray.runtime.cluster import check_gpus
from tsgd_ray.stages import skeleton
from tsgd_ray.tracking import live_curve

log = logging.getLogger(__name__)


def new_student(cfg: DictConfig, num_classes: int, seed: int) -> torch.nn.Module:
    """The student architecture (evaluate.model/width/depth, the teacher's unless set), seeded."""
    e = cfg.evaluate
    torch.manual_seed(seed)
    return build_model(e.model, num_classes, clip_size(cfg), e.width, e.depth)


def _fit_on_stream(
    student, teacher, source: ray_train.ClipSource, rank: int, world: int, settings, seed: int, device, callbacks
) -> None:
    """A method that does not distil (`full`): `training.fit` over evaluate.epochs passes of this
    worker's share of the real training clips (labelled by the teacher as the synthetic sets are)."""
    batch_size = settings.fit.batch_size
    generator = torch.Generator().manual_seed(seed)

    def step(batch: dict, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        x = settings.inputs.model_input(batch["clip"].to(device))
        return training.student_step(student, teacher, optimizer, x, batch["label"].to(device), settings, generator)

    training.fit(
        student,
        lambda epoch: source.batches("train", epoch, batch_size, rank, world, seed=seed * 1000 + epoch),
        step,
        settings.fit,
        source.steps("train", world, batch_size),
        callbacks,
        settings.ema,
        epoch_context=lambda: ray_train.uneven_inputs(student),
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
    """Ray Train loop: one student per seed (skipping finished seeds), each tested on the test shard."""
    import ray.train
    import ray.train.torch

    cfg, classes, method = loop_config["cfg"], loop_config["classes"], Method(loop_config["method"])
    source = loop_config["source"]
    rank, world, device = ray_train.worker_setup(cfg.evaluate, "evaluate", cfg.device)
    settings = training.StudentSettings.from_config(cfg)
    if settings.labels == LabelKind.stored and not methods.get(method).distils:
        settings = replace(settings, labels=LabelKind.soft_kl)  # no stored set: the teacher labels online
    per_worker = replace(settings.fit, batch_size=ray_train.per_worker_batch(settings.fit.batch_size, world))
    settings = replace(settings, fit=per_worker)  # evaluate.batch_size is global
    teacher = load_teacher(cfg, classes, device)
    if methods.get(method).distils:
        mine, _ = artifacts.read_synthetic(cfg, rank=rank, world=world)  # only this worker's rows, uint8
        x, y = mine["clips"], mine["labels"]
        heat = mine["heat"].float() / 255 if mine["heat"] is not None else None  # TSGFA's init maps
        stored = (mine["view_params"], mine["logits"]) if mine["view_params"] is not None else None
    teacher_scores = None  # the ceiling: the teacher on the same test clips, once per worker group
    for seed in cfg.evaluate.seeds:
        if storage.exists(seed_uri(cfg, method, seed)):
            continue
        if teacher_scores is None:
            teacher_scores = _test(teacher, source, rank, world, cfg, device)
        started = time.time()
        student = ray.train.torch.prepare_model(new_student(cfg, len(classes), seed))
        worker_seed = seed * world + rank
        history: list[dict] = []
        sent = [-1]  # the last epoch reported
        progress = Progress(f"evaluate {method.value} seed {seed}", cfg.evaluate.epochs, "epoch")

        def on_epoch(epoch: int, metrics: dict) -> None:  # after DDP's join: every rank is here
            history.append({"step": epoch, "time": time.time(), **metrics})  # noqa: B023 - called in this iteration
            if rank == 0:
                progress.update(epoch + 1, **metrics)  # noqa: B023
            if ray_train.report_due(epoch, cfg.evaluate.epochs):  # every rank: the live curve
                unsent = [h for h in history if h["step"] > sent[0]]  # noqa: B023
                ray.train.report({"seed": seed, "rows": unsent})  # noqa: B023
                sent[0] = epoch  # noqa: B023

        if not methods.get(method).distils:
            callbacks = training.epoch_callback(on_epoch)
            _fit_on_stream(student, teacher, source, rank, world, settings, worker_seed, device, callbacks)
        else:
            training.train_student(
                student,
                teacher,
                x,
                y,
                settings,
                worker_seed,
                callback=on_epoch,
                heat=heat,
                epoch_context=lambda: ray_train.uneven_inputs(student),  # noqa: B023
                stored=stored,
            )
        top1, top5, n = _test(student, source, rank, world, cfg, device)
        if rank == 0:
            storage.write_json_once(
                seed_uri(cfg, method, seed),
                {
                    "seed": seed,
                    "top1": top1,
                    "top5": top5,
                    "test_clips": n,
                    "history": history,
                    "teacher_top1": teacher_scores[0],
                    "teacher_top5": teacher_scores[1],
                    "started": started,
                    "seconds": round(time.time() - started, 1),
                },
            )
        ray.train.report({"seed": seed, "top1": top1, "top5": top5})


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
        if all(f"teacher_{k}" in r for r in per_seed):  # the teacher's own test accuracy: the ceiling
            out[f"teacher_{k}"] = per_seed[0][f"teacher_{k}"]
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


def run_evaluate(cfg: DictConfig, method: Method, tracker=None) -> dict:
    """Train and test students of `method` (cfg: `methods.method_config(cfg, method)`) unless
    finished; returns the results (see `summarise`).

    Raises:
        ConfigError: the dataset has no data.eval_split split, or stored labels are asked of a set
        that holds fewer than evaluate.views.
    """
    manifest = read_manifest(shards_root(cfg))
    classes, split = manifest["classes"], eval_split(cfg, manifest["counts"])

    seed_name = f"evaluate/{method.value}/seed-{{}}"

    def work(run_id) -> dict:
        from ray.train.torch import TorchTrainer

        check_gpus(cfg, "evaluate.gpus_per_worker", cfg.evaluate.gpus_per_worker)
        _check_stored(cfg, method)
        splits = {"eval": split, **({"train": "train"} if not methods.get(method).distils else {})}
        source = ray_train.ClipSource(cfg, splits, tested=["eval"])
        trainer = TorchTrainer(
            _student_worker,
            train_loop_config={"cfg": cfg, "classes": classes, "method": method.value, "source": source},
            scaling_config=ray_train.scaling_config(cfg.evaluate, cfg.device),
            torch_config=ray_train.torch_config(cfg.evaluate, cfg.device),
            run_config=ray_train.run_config(
                storage.join(layout.evaluate_dir(cfg, method), "ray_train"),
                "students",
                cfg.ray.max_failures,
                [live_curve(tracker.uri, run_id, step="step", child=("seed", seed_name))] if tracker else [],
            ),
            datasets=source.datasets,
            dataset_config=ray_train.data_config(source.datasets),
        )
        try:
            trainer.fit()
        except BaseException:
            if tracker:
                tracker.fail_children(run_id)  # seed runs the live curve opened
            raise
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
