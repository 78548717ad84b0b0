"""The stage skeleton every stage runs in: skip if finished, take the folder's lease, open the
stage's MLflow child run (a `RunContext` its work logs to), do the work, write the marker once."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, NamedTuple, Optional, Sequence

from omegaconf import DictConfig

from tsgd_ray import lease, storage
from tsgd_ray.tracking.runs import OFF, RunContext

log = logging.getLogger(__name__)


class StageSpec(NamedTuple):
    """One stage of a joint run: its `name` (the MLflow child run), `marker_uri` and run `tags`;
    `stands(marker)`, where given, says whether a found marker's outputs are all still there (a
    marker that does not stand counts as unfinished, and is replaced when the work is done)."""

    name: str
    marker_uri: str
    tags: Optional[dict[str, str]] = None
    stands: Optional[Callable[[dict], bool]] = None


def run_stage(
    cfg: DictConfig,
    name: str,
    marker_uri: str,
    work: Callable[[RunContext], dict],
    run: RunContext = OFF,
    tags: Optional[dict[str, str]] = None,
    stands: Optional[Callable[[dict], bool]] = None,
) -> dict:
    """Skip if `marker_uri` exists (returning it, marked "skipped"); else take the stage folder's
    lease (`tsgd_ray.lease`: another run of the same stage is waited for, or refused with
    storage.wait_for_lease=false), look again, open the stage's child run of `run` (the
    invocation's), call `work(stage)` with that child's context (the work writes the outputs, logs
    to `stage` and returns the marker's content), add the seconds, write the marker once, close
    the child run and return the marker."""
    (marker,) = run_stages(cfg, [StageSpec(name, marker_uri, tags, stands)], lambda todo, runs: [work(runs[0])], run)
    return marker


def run_stages(
    cfg: DictConfig,
    specs: Sequence[StageSpec],
    work: Callable[[list[int], list[RunContext]], list[dict]],
    run: RunContext = OFF,
) -> list[dict]:
    """`run_stage` for stages whose work is done together (the evaluation fleet trains the
    students of several methods at once): the finished ones are skipped; the leases of the others
    are taken (in folder order, so two runs never wait on each other), their child runs opened,
    and `work(todo, stages)` (the indices of the unfinished stages in `specs`, and their runs)
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
            for i, marker in zip(todo, _run_work(todo, specs, work, run)):
                markers[i] = marker
    return markers


def _finished(spec: StageSpec, by: str = "") -> Optional[dict]:
    if not storage.exists(spec.marker_uri):
        return None
    marker = storage.read_json(spec.marker_uri)
    if spec.stands and not spec.stands(marker):
        log.info("%s: finished at %s, but some of its outputs are gone: redone", spec.name, spec.marker_uri)
        return None
    log.info("%s: finished %sat %s, skipped", spec.name, by, spec.marker_uri.rsplit("/", 1)[0])
    return {**marker, "skipped": True}


def _run_work(todo: list[int], specs: Sequence[StageSpec], work, run: RunContext) -> list[dict]:
    started = time.time()
    specs = [specs[i] for i in todo]
    stages = [run.child(spec.name, tags=spec.tags) for spec in specs]
    try:
        markers = work(todo, stages)
    except BaseException:
        for stage in stages:
            stage.finish("FAILED")
        raise
    for spec, stage, marker in zip(specs, stages, markers):
        marker["seconds"] = round(time.time() - started, 3)
        if spec.stands and storage.exists(spec.marker_uri):  # it did not stand: replaced, under the lease
            storage.write_json(spec.marker_uri, marker)
        else:
            storage.write_json_once(spec.marker_uri, marker)
        stage.log_metrics({"seconds": marker["seconds"]})
        stage.finish()
        log.info("%s: done in %.1f s -> %s", spec.name, marker["seconds"], spec.marker_uri.rsplit("/", 1)[0])
    return markers
