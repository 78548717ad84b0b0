"""Distill stage: a pool of actors, each holding the frozen teacher, recovers class partitions.

The driver plans partitions (contiguous class ranges of near-equal size, `distill.partitions` or
4 per actor, so a slow actor does not hold the rest) and hands them out one at a time to
whichever actor is free. Each partition is written once::

    <distill_dir>/plan.json                 the partition plan (a rerun keeps the first plan)
    <distill_dir>/partitions/p00003.pt      videos (n, 3, F, H, W) float32, labels, indices
    <distill_dir>/partitions/p00003.json    the completion marker: classes, seconds, loss curve

A partition with a marker is never recomputed. An actor that dies is restarted by Ray (its
`__init__` reloads the teacher) and its partition retried, up to `ray.max_failures` times; after
that the driver starts a fresh actor and retries. Because recovery draws every video's random
numbers from its own (seed, class, index) stream, a retried partition gives the same videos.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import time
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import InitKind
from tsgd_ray.core.clips import to_model_input, valid_range
from tsgd_ray.core.device import resolve_device
from tsgd_ray.core.recovery import noise_init, recover
from tsgd_ray.data.prepare import shards_root
from tsgd_ray.data.shards import read_manifest
from tsgd_ray.distributed.layout import distill_dir, write_tensors
from tsgd_ray.distributed.stats import load_init, load_statistics
from tsgd_ray.distributed.teacher import load_teacher

log = logging.getLogger(__name__)

PLAN = "plan.json"


class DistillError(RuntimeError):
    """A partition failed on every retry; the message names it."""


def plan_partitions(num_classes: int, num_partitions: int) -> list[list[int]]:
    """Classes 0..K-1 split into min(P, K) contiguous ranges whose sizes differ by at most one."""
    parts = np.array_split(np.arange(num_classes), min(num_partitions, num_classes))
    return [p.tolist() for p in parts]


def partition_name(partition_id: int) -> str:
    return f"p{partition_id:05d}"


def partition_uri(cfg: DictConfig, partition_id: int, suffix: str) -> str:
    return storage.join(distill_dir(cfg), "partitions", partition_name(partition_id) + suffix)


def plan_uri(cfg: DictConfig) -> str:
    return storage.join(distill_dir(cfg), PLAN)


def load_plan(cfg: DictConfig, num_classes: int) -> list[list[int]]:
    """The partition plan of this run: the one already written, else a new one (written now)."""
    uri = plan_uri(cfg)
    wanted = cfg.distill.partitions or 4 * cfg.distill.actors
    storage.write_json_once(uri, {"partitions": plan_partitions(num_classes, wanted)})
    return storage.read_json(uri)["partitions"]


def recover_partition(cfg: DictConfig, teacher: torch.nn.Module, init: dict, stats, partition_id: int, classes: list[int]) -> dict:
    """Recover the videos of `classes` and write them and their marker (write-once); return the
    marker. A partition whose marker exists is returned as is, marked "skipped"."""
    marker_uri = partition_uri(cfg, partition_id, ".json")
    if storage.exists(marker_uri):
        return {**storage.read_json(marker_uri), "skipped": True}
    started = time.time()
    rows = torch.isin(init["labels"], torch.tensor(classes))
    labels, indices = init["labels"][rows], init["indices"][rows]
    device = next(teacher.parameters()).device
    if cfg.distill.init == InitKind.noise:
        low, high = valid_range(cfg.data.mean, cfg.data.std, torch.zeros(1))
        x0 = noise_init((3, *init["clips"].shape[1:4]), labels, indices, cfg.seed, low, high)
    else:
        x0 = to_model_input(init["clips"][rows], cfg.data.mean, cfg.data.std)
    history: list[dict] = []
    videos = recover(teacher, x0.to(device), labels, indices, cfg, stats,
                     callback=lambda step, metrics: history.append({"step": step, **metrics}))
    write_tensors(partition_uri(cfg, partition_id, ".pt"), {"videos": videos, "labels": labels, "indices": indices})
    marker = {"partition": partition_id, "classes": classes, "videos": len(labels), "iterations": cfg.distill.iterations,
              "seconds": round(time.time() - started, 3), "history": history,
              "pid": os.getpid(), "node_id": _node_id()}
    storage.write_json_once(marker_uri, marker)
    return marker


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class PartitionWorker:
    """A Ray actor: loads the frozen teacher, the statistics and the init clips once, then
    recovers one partition per call."""

    def __init__(self, cfg: DictConfig, classes: list[str], threads: int):
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.teacher = load_teacher(cfg, classes, resolve_device(cfg.device))
        self.init = load_init(cfg)
        self.stats = load_statistics(cfg)

    def recover(self, partition_id: int, classes: list[int]) -> dict:
        return recover_partition(self.cfg, self.teacher, self.init, self.stats, partition_id, classes)


def _start_actor(cfg: DictConfig, classes: list[str], name: str):
    import ray

    d = cfg.distill
    threads = max(1, math.floor(d.cpus_per_actor)) if d.gpus_per_actor == 0 else 1
    options = {"num_cpus": d.cpus_per_actor, "max_restarts": cfg.ray.max_failures,
               "max_task_retries": cfg.ray.max_failures, "name": name, "get_if_exists": False}
    if d.gpus_per_actor:
        options["num_gpus"] = d.gpus_per_actor
    return ray.remote(PartitionWorker).options(**options).remote(cfg, classes, threads)


class _Progress:
    """Partitions done, synthetic video-iterations per second, and ETA, on the driver's log."""

    def __init__(self, total: int, already_done: int):
        self.total, self.done, self.started = total, already_done, time.time()
        self.recovered = self.video_iterations = 0

    def update(self, marker: dict) -> None:
        self.done += 1
        self.recovered += 1
        self.video_iterations += marker["videos"] * marker["iterations"]
        elapsed = time.time() - self.started
        eta = elapsed / self.recovered * (self.total - self.done)
        log.info("distill: %d/%d partitions, %.1f video-iterations/s, ETA %.0f s",
                 self.done, self.total, self.video_iterations / max(elapsed, 1e-9), eta)


def run_distill(cfg: DictConfig, tracker=None, actor_prefix: Optional[str] = None) -> dict:
    """Recover every unfinished partition with the actor pool; returns a summary.

    `actor_prefix` names the actors (`<prefix>-<i>`) so that a test or an operator can find them.
    Raises:
        DistillError: a partition failed on every retry.
    """
    import ray
    from ray.exceptions import RayActorError

    classes = read_manifest(shards_root(cfg))["classes"]
    plan = load_plan(cfg, len(classes))
    finished = [p for p in range(len(plan)) if storage.exists(partition_uri(cfg, p, ".json"))]
    pending = collections.deque(p for p in range(len(plan)) if p not in finished)
    progress = _Progress(len(plan), len(finished))
    summary = {"partitions": len(plan), "skipped": len(finished), "recovered": 0, "actor_failures": 0, "markers": []}
    log.info("distill: %d partitions, %d finished, %d to do -> %s", len(plan), len(finished), len(pending), distill_dir(cfg))
    run_id = tracker.child("distill", tags={"method": cfg.distill.method.value}) if tracker else None
    prefix = actor_prefix or f"tsgd-distill-{os.getpid()}"
    actors = [_start_actor(cfg, classes, f"{prefix}-{i}") for i in range(min(cfg.distill.actors, len(pending)))]
    idle = list(range(len(actors)))
    in_flight: dict = {}
    failures: collections.Counter = collections.Counter()
    generation = collections.Counter()
    try:
        while pending or in_flight:
            while pending and idle:
                slot, partition = idle.pop(), pending.popleft()
                in_flight[actors[slot].recover.remote(partition, plan[partition])] = (slot, partition)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            slot, partition = in_flight.pop(ready[0])
            try:
                marker = ray.get(ready[0])
            except RayActorError as exc:
                failures[partition] += 1
                summary["actor_failures"] += 1
                if failures[partition] > cfg.ray.max_failures:
                    raise DistillError(f"partition {partition} (classes {plan[partition]}) failed "
                                       f"{failures[partition]} times; last error: {exc}") from exc
                log.warning("distill: actor %d lost on partition %d (%s); starting a new one", slot, partition, type(exc).__name__)
                generation[slot] += 1
                actors[slot] = _start_actor(cfg, classes, f"{prefix}-{slot}-r{generation[slot]}")
                pending.appendleft(partition)
                idle.append(slot)
                continue
            idle.append(slot)
            summary["recovered" if not marker.get("skipped") else "skipped"] += 1
            summary["markers"].append(marker)
            progress.update(marker)
            if tracker:
                tracker.log_history(run_id, marker["history"], prefix=f"{partition_name(partition)}/")
    finally:
        for actor in actors:
            ray.kill(actor)
    if tracker:
        tracker.log_metrics(run_id, {"partitions": len(plan), "recovered": summary["recovered"],
                                     "actor_failures": summary["actor_failures"]})
        tracker.finish(run_id)
    return summary
