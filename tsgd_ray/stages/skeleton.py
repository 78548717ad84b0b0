"""The stage skeleton every stage runs in: skip if finished, take the folder's lease, open the
stage's MLflow child run, do the work, write the marker once."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, NamedTuple, Optional, Sequence

from omegaconf import DictConfig

from tsgd_ray import lease, storage

log = logging.getLogger(__name__)


class StageSpec(NamedTuple):
    """One stage of a joint run: its `name` (the MLflow child run), `marker_uri` and run `tags`."""

    name: str
    marker_uri: str
    tags: Optional[dict[str, str]] = None


def run_stage(
    cfg: DictConfig,
    name: str,
    marker_uri: str,
    work: Callable[[Optional[str]], dict],
    tracker=None,
    tags: Optional[dict[str, str]] = None,
) -> dict:
    """Skip if `marker_uri` exists (returning it, marked "skipped"); else take the stage folder's
    lease (`tsgd_ray.lease`: another run of the same stage is waited for, or refused with
    storage.wait_for_lease=false), look again, open the stage's MLflow child run, call
    `work(run_id)` (which writes the outputs and returns the marker's content), add the seconds,
    write the marker once, close the run and return the marker."""
    (marker,) = run_stages(cfg, [StageSpec(name, marker_uri, tags)], lambda todo, run_ids: [work(run_ids[0])], tracker)
    return marker


def run_stages(
    cfg: DictConfig,
    specs: Sequence[StageSpec],
    work: Callable[[list[int], list[Optional[str]]], list[dict]],
    tracker=None,
) -> list[dict]:
    """`run_stage` for stages whose work is done together (the evaluation fleet trains the
    students of several methods at once): the finished ones are skipped; the leases of the others
    are taken (in folder order, so two runs never wait on each other), their child runs opened,
    and `work(todo, run_ids)` (the indices of the unfinished stages in `specs`, and their runs)
    returns their markers, each written once. Returns every stage's marker, in the order of
    `specs`."""
    markers: list[Optional[dict]] = [_finished(spec) for spec in specs]
    todo = [i for i, m in enumerate(markers) if m is None]
    if not todo:
        return markers
    folders = {i: specs[i].marker_uri.rsplit("/", 1)[0] for i in todo}
    with contextlib.ExitStack() as leases:
        for i in sorted(todo, key=folders.get):
            leases.enter_context(
                lease.hold(folders[i], cfg.storage.lease_seconds, cfg.storage.wait_for_lease, specs[i].name)
            )
        for i in todo:  # a run we waited for may have finished some
            markers[i] = _finished(specs[i], "by another run ")
        todo = [i for i in todo if markers[i] is None]
        if todo:
            for i, marker in zip(todo, _run_work(todo, specs, work, tracker)):
                markers[i] = marker
    return markers


def _finished(spec: StageSpec, by: str = "") -> Optional[dict]:
    if not storage.exists(spec.marker_uri):
        return None
    log.info("%s: finished %sat %s, skipped", spec.name, by, spec.marker_uri.rsplit("/", 1)[0])
    return {**storage.read_json(spec.marker_uri), "skipped": True}


def _run_work(todo: list[int], specs: Sequence[StageSpec], work, tracker) -> list[dict]:
    started = time.time()
    specs = [specs[i] for i in todo]
    run_ids = [tracker.child(spec.name, tags=spec.tags) if tracker else None for spec in specs]
    try:
        markers = work(todo, run_ids)
    except BaseException:
        if tracker:
            for run_id in run_ids:
                tracker.finish(run_id, "FAILED")
        raise
    for spec, run_id, marker in zip(specs, run_ids, markers):
        marker["seconds"] = round(time.time() - started, 3)
        storage.write_json_once(spec.marker_uri, marker)
        if tracker:
            tracker.log_metrics(run_id, {"seconds": marker["seconds"]})
            tracker.finish(run_id)
        log.info("%s: done in %.1f s -> %s", spec.name, marker["seconds"], spec.marker_uri.rsplit("/", 1)[0])
    return markers
