"""Distill stage: a pool of actors, each holding the frozen teacher, recovers class partitions.

The driver plans partitions (contiguous class ranges of near-equal size: `distill.partitions`, or
4 per actor, and more when `distill.max_videos_per_partition` asks for it) and hands them out one
at a time through an `ElasticPool`: a partition whose actor dies goes back to the queue for any
free actor, and once the queue is empty a straggler may be run again on an idle actor. Each actor
reads the init clips of its partition's classes only and writes its synthetic videos directly in
the final format (a clip table: uint8 clips, one row group per class, with the labels stored
for each clip: distill.labels.views views and the teacher's logits on each)::

    <distill_dir>/plan.json                    the partition plan (a rerun keeps the first plan)
    <distill_dir>/synthetic/p00003.parquet     the partition's synthetic videos
    <distill_dir>/partitions/p00003.json       the completion marker: classes, per-class counts,
                                               the file's sha256 and size, seconds, loss curve
    <distill_dir>/distill.json                 the stage's marker, once every partition has one

The stage runs in the skeleton the others share (lease, child run, marker); a partition with a
marker is never recomputed, and one whose marker is gone makes the stage unfinished again.
Recovery draws every video's random numbers from its own (seed, class, index) stream, so a
partition recomputed elsewhere gives the same videos up to the last float bits of that machine's
kernels; write-once keeps the first copy and its hash.

Why uint8: the synthetic clips live in [0, 1] RGB (recovery clamps them to the valid range), so
rounding to 8 bits moves a pixel by at most 0.5/255 (0.009 in normalised units), far below the
crop, flip and resampling noise a student sees every step; it makes the set 4x smaller than
float32 and the same format as decoded real clips (docs/sizing.md has the measured effect).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from tsgd_ray import artifacts, layout, storage
from tsgd_ray.config import PACK, ConfigError, InitKind
from tsgd_ray.console import Progress
from tsgd_ray.core.clips import to_uint8_clips
from tsgd_ray.core.device import reserved_gpus, resolve_device, tune_for
from tsgd_ray.core.labels import clip_keys, label_views, view_params
from tsgd_ray.core.packing import pack_init
from tsgd_ray.core.recovery import noise_init, recover
from tsgd_ray.core.training import clip_heat
from tsgd_ray.data.shards import read_manifest, shards_root
from tsgd_ray.runtime.cluster import check_gpus
from tsgd_ray.runtime.pool import ElasticPool, PoolActor, actor_starter
from tsgd_ray.settings import input_settings, recovery_settings, saliency_settings, view_settings
from tsgd_ray.stages import skeleton
from tsgd_ray.tracking import OFF, RunContext

log = logging.getLogger(__name__)


def plan_partitions(num_classes: int, num_partitions: int, ipc: int = 1, max_videos: int = 0) -> list[list[int]]:
    """Classes 0..K-1 in contiguous ranges whose sizes differ by at most one: `num_partitions` of
    them, or more so that none holds more than `max_videos` videos (0: no limit); at most K.

    Raises:
        ConfigError: when one class alone (ipc videos) is more than `max_videos`.
    """
    if max_videos and ipc > max_videos:
        raise ConfigError(
            f"distill.max_videos_per_partition={max_videos} is less than distill.ipc={ipc}: "
            "a partition holds whole classes"
        )
    wanted = max(num_partitions, math.ceil(num_classes * ipc / max_videos) if max_videos else 0)
    parts = np.array_split(np.arange(num_classes), min(wanted, num_classes))
    return [p.tolist() for p in parts]


def load_plan(cfg: DictConfig, where: layout.Layout, num_classes: int) -> list[list[int]]:
    """The partition plan of this run (`where`: cfg's layout): the one already written, else a new
    one (written now)."""
    d = cfg.distill
    uri = where.plan
    storage.write_json_once(
        uri,
        {"partitions": plan_partitions(num_classes, d.partitions, d.ipc, d.max_videos_per_partition)},
    )
    return storage.read_json(uri)["partitions"]


def recover_partition(
    cfg: DictConfig, where: layout.Layout, teacher: torch.nn.Module, stats, partition_id: int, classes: list[int]
) -> dict:
    """Recover the videos of `classes`, write them and their marker (write-once, in `where`, cfg's
    layout); return the marker. A partition whose marker exists is returned as is, marked "skipped"."""
    marker_uri = where.partition_marker(partition_id)
    if storage.exists(marker_uri):
        return {**storage.read_json(marker_uri), "skipped": True}
    started = time.time()
    init = artifacts.read_init(cfg, classes)
    labels, indices = init["labels"], init["indices"]
    device = next(teacher.parameters()).device
    settings = recovery_settings(cfg)
    if cfg.distill.init == InitKind.noise:
        low, high = settings.inputs.valid_range(torch.zeros(1))
        x0 = noise_init((3, *layout.clip_size(cfg)), labels, indices, settings.seed, low, high)
        video_ids = [""] * len(labels)
    else:
        clips, video_ids = init["clips"], init["video_ids"]
        if cfg.distill.pack:
            clips, labels, indices, video_ids = packed_init(cfg, teacher, clips, labels, indices, video_ids)
        x0 = settings.inputs.model_input(clips)
    history: list[dict] = []
    progress = Progress(f"distill partition {partition_id}", cfg.distill.iterations, "iteration", last=False)

    def on_step(step: int, metrics: dict) -> None:
        history.append({"step": step, "time": time.time(), **metrics})
        progress.update(step + 1, loss=metrics["loss"])

    videos = recover(teacher, x0.to(device), labels, indices, settings, stats, callback=on_step)
    clips = to_uint8_clips(videos, settings.inputs.mean, settings.inputs.std)
    heats = (255 * clip_heat(x0, settings.saliency, settings.inputs)).round().to(torch.uint8)  # TSGFA's, of the init
    stored = stored_labels(cfg, teacher, clips, labels, indices, heats)
    file = artifacts.write_synthetic_part(
        cfg, partition_id, clips.numpy(), labels.numpy(), indices.numpy(), video_ids, heats.numpy(), stored
    )
    counts = torch.bincount(labels, minlength=max(classes) + 1)
    marker = {
        "partition": partition_id,
        "classes": classes,
        "counts": {str(c): int(counts[c]) for c in classes},
        "videos": len(labels),
        "iterations": cfg.distill.iterations,
        "file": file,
        "seconds": round(time.time() - started, 3),
        "history": history,
        "pid": os.getpid(),
        "node_id": _node_id(),
    }
    storage.write_json_once(marker_uri, marker)
    return marker


def packed_init(cfg: DictConfig, teacher: torch.nn.Module, clips: torch.Tensor, labels, indices, video_ids):
    """distill.pack: init clips (4n per class) -> n per class (`core.packing.pack_init`); a packed
    clip's id joins its four ids with "+"."""
    out, labels, indices, order, packed = pack_init(
        teacher,
        clips,
        labels,
        indices,
        cfg.distill.pack_confidence,
        saliency_settings(cfg.tsgf),
        input_settings(cfg),
    )
    ids = [video_ids[i] for i in order]
    joined = [
        "+".join(ids[PACK * i : PACK * i + PACK]) if kept else ids[PACK * i] for i, kept in enumerate(packed.tolist())
    ]
    log.info("distill: %d of %d synthetic videos start packed 2 x 2", int(packed.sum()), len(labels))
    return out, labels, indices, joined


def stored_labels(
    cfg: DictConfig, teacher: torch.nn.Module, clips: torch.Tensor, labels, indices, heats: torch.Tensor
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The labels stored with uint8 clips (N, F, H, W, 3) as written (distill.labels): their
    view parameters (N, K, 7) float32 and the teacher's logits (N, K, classes) float16 on each
    view, from the clips' heat maps (N, H, W) uint8; None when distill.labels.views is 0."""
    views = cfg.distill.labels.views
    if not views:
        return None
    inputs, device = input_settings(cfg), next(teacher.parameters()).device
    params = view_params(heats.float() / 255, clip_keys(labels, indices), cfg.seed, views, view_settings(cfg))
    logits = label_views(teacher, inputs.model_input(clips.to(device)), params, inputs.amp)
    return params.numpy(), logits.numpy()


def mean_curve(histories: list[list[dict]]) -> list[dict]:
    """Partitions' curves [{"step", "time", metric: value}] -> one: per step, every metric's mean
    over the partitions that logged it, and the loss's min and max (so 64 partitions read as one)."""
    by_step: dict[int, list[dict]] = {}
    for history in histories:
        for row in history:
            by_step.setdefault(row["step"], []).append(row)
    curve = []
    for step, rows in sorted(by_step.items()):
        keys = {k for r in rows for k in r} - {"step"}
        point = {"step": step, **{k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}}
        if all("loss" in r for r in rows):
            point.update(loss_min=min(r["loss"] for r in rows), loss_max=max(r["loss"] for r in rows))
        curve.append(point)
    return curve


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class PartitionWorker(PoolActor):
    """A Ray actor: loads the frozen teacher and the statistics once, then recovers one partition
    per call (reading only that partition's init clips), of any set that shares them."""

    def setup(self, cfg: DictConfig, classes: list[str], threads: int) -> None:
        torch.set_num_threads(threads)
        device = resolve_device(cfg.device, cfg.distill.gpus_per_actor, "distill.gpus_per_actor")
        tune_for(device, cfg.distill.gpus_per_actor)
        self.teacher = artifacts.load_teacher(cfg, classes, device)
        self.stats = artifacts.read_statistics(cfg)

    def recover(self, cfg: DictConfig, where: layout.Layout, partition_id: int, classes: list[int]) -> dict:
        """Partition `partition_id` of the set `cfg` (a method config with this actor's teacher
        and statistics; `where` its layout)."""
        return recover_partition(cfg, where, self.teacher, self.stats, partition_id, classes)


class _Progress:
    """Partitions done, synthetic video-iterations per second, and ETA, on the driver's log: at
    most one line per EVERY seconds, and the last."""

    EVERY = 30.0

    def __init__(self, total: int, already_done: int):
        self.total, self.done, self.started = total, already_done, time.time()
        self.recovered = self.video_iterations = 0
        self.logged = self.started

    def update(self, marker: dict) -> None:
        self.done += 1
        self.recovered += 1
        self.video_iterations += marker["videos"] * marker["iterations"]
        now = time.time()
        if now - self.logged < self.EVERY and self.done < self.total:
            return
        self.logged = now
        elapsed = now - self.started
        eta = elapsed / self.recovered * (self.total - self.done)
        log.info(
            "distill: %d/%d partitions, %.1f video-iterations/s, ETA %.0f s",
            self.done,
            self.total,
            self.video_iterations / max(elapsed, 1e-9),
            eta,
        )


def run_distill(cfg: DictConfig, run: RunContext = OFF, actor_prefix: Optional[str] = None) -> dict:
    """Recover every unfinished partition of the set `cfg` with the actor pool, unless all are;
    returns the stage's marker (partitions, recovered, skipped, actor_failures, speculated),
    written to ``<distill_dir>/distill.json`` once every partition's marker is. A partition lost
    since (its marker gone) makes the stage unfinished again. Logs the mean recovery curve to a
    child "distill" of `run`.

    `actor_prefix` names the actors (`<prefix>-<i>`, replacements `<prefix>-<i>-r<n>`) so that a
    test or an operator can find them.
    Raises:
        PoolError: a partition lost more than ray.max_failures actors. LeaseHeld: another run
        distils this config and storage.wait_for_lease is false.
    """
    return distill_sets([cfg], run, actor_prefix)[0]


def distill_sets(
    configs: Sequence[DictConfig], run: RunContext = OFF, actor_prefix: Optional[str] = None
) -> list[dict]:
    """`run_distill` of several sets (method configs: a run's methods and init draws) on one actor
    pool: their unfinished partitions form one queue, so the actors start, and load the teacher
    and the statistics, once for all of them. Each set stays a stage of its own (its marker, lease
    and child run); a marker's actor_failures and speculated are the shared pool's. Returns the
    markers in the order of `configs`.

    Raises:
        ValueError: sets that do not share the teacher, the statistics and the distill actors'
        resources (the arms of one run always do). As `run_distill` otherwise.
    """
    first, wheres = configs[0], [layout.of(c) for c in configs]
    shared = {
        (w.stats, c.distill.actors, c.distill.cpus_per_actor, c.distill.gpus_per_actor) for c, w in zip(configs, wheres)
    }
    if len(shared) > 1:
        raise ValueError(f"distill_sets: the sets differ in teacher, statistics or actor resources: {shared}")
    classes = read_manifest(shards_root(first))["classes"]
    specs = [
        skeleton.StageSpec(
            "distill",
            w.distill_marker,
            {"method": c.distill.method.value, "draw": str(c.distill.draw)},
            functools.partial(_stands, w),
        )
        for c, w in zip(configs, wheres)
    ]

    def work(todo: list[int], stages: list[RunContext]) -> list[dict]:
        return _distill([configs[i] for i in todo], [wheres[i] for i in todo], classes, stages, actor_prefix)

    return skeleton.run_stages(first, specs, work, run)


def _stands(where: layout.Layout, marker: dict) -> bool:
    """Whether a finished set still has every partition's marker."""
    return all(storage.exists(where.partition_marker(p)) for p in range(marker["partitions"]))


def _distill(
    configs: list[DictConfig], wheres: list[layout.Layout], classes: list[str], stages: list[RunContext], actor_prefix
) -> list[dict]:
    plans = [load_plan(c, w, len(classes)) for c, w in zip(configs, wheres)]
    markers, curves, pending = [], [[] for _ in configs], []
    for i, (where, plan) in enumerate(zip(wheres, plans)):
        finished = {p for p in range(len(plan)) if storage.exists(where.partition_marker(p))}
        pending += [(i, p) for p in range(len(plan)) if p not in finished]
        markers.append({"partitions": len(plan), "skipped": len(finished), "recovered": 0})
        log.info(
            "distill: %d partitions, %d finished, %d to do -> %s",
            len(plan),
            len(finished),
            len(plan) - len(finished),
            where.distill,
        )
    progress = _Progress(sum(map(len, plans)), sum(m["skipped"] for m in markers))

    def on_result(item: tuple[int, int], result: dict) -> None:
        markers[item[0]]["recovered" if not result.get("skipped") else "skipped"] += 1
        if not result.get("skipped"):
            curves[item[0]].append(result["history"])
        progress.update(result)

    lost = speculated = 0
    if pending:
        cfg, d = configs[0], configs[0].distill
        check_gpus(cfg, "distill.gpus_per_actor", d.gpus_per_actor)
        gpus = reserved_gpus(cfg.device, d.gpus_per_actor)
        threads = max(1, math.floor(d.cpus_per_actor)) if gpus == 0 else 1
        start = actor_starter(PartitionWorker, d.cpus_per_actor, gpus, cfg, classes, threads)
        name = actor_prefix or f"tsgd-distill-{os.getpid()}"
        pool = ElasticPool(start, min(d.actors, len(pending)), name, cfg.ray.max_failures)

        def call(actor, item: tuple[int, int]):
            i, p = item
            return actor.recover.remote(configs[i], wheres[i], p, plans[i][p])

        pool.run(pending, call, on_result, speculate=True)
        lost, speculated = pool.lost, pool.speculated
    for stage, marker, curve in zip(stages, markers, curves):
        marker.update(actor_failures=lost, speculated=speculated)
        stage.log_history(mean_curve(curve))  # one curve, however many partitions
        stage.log_metrics({k: marker[k] for k in ("partitions", "recovered", "actor_failures", "speculated")})
    return markers
