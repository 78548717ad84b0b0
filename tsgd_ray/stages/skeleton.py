"""The stage skeleton every stage runs in: skip if finished, take the folder's lease, open the
stage's MLflow child run, do the work, write the marker once."""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from omegaconf import DictConfig

from tsgd_ray import lease, storage

log = logging.getLogger(__name__)


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
    folder = marker_uri.rsplit("/", 1)[0]
    if storage.exists(marker_uri):
        log.info("%s: finished at %s, skipped", name, folder)
        return {**storage.read_json(marker_uri), "skipped": True}
    with lease.hold(folder, cfg.storage.lease_seconds, cfg.storage.wait_for_lease, name):
        if storage.exists(marker_uri):  # the run we waited for finished it
            log.info("%s: finished by another run at %s, skipped", name, folder)
            return {**storage.read_json(marker_uri), "skipped": True}
        return _run_work(name, marker_uri, work, tracker, tags)


def _run_work(name: str, marker_uri: str, work: Callable[[Optional[str]], dict], tracker, tags) -> dict:
    started = time.time()
    run_id = tracker.child(name, tags=tags) if tracker else None
    try:
        marker = work(run_id)
    except BaseException:
        if tracker:
            tracker.finish(run_id, "FAILED")
        raise
    marker["seconds"] = round(time.time() - started, 3)
    storage.write_json_once(marker_uri, marker)
    if tracker:
        tracker.log_metrics(run_id, {"seconds": marker["seconds"]})
        tracker.finish(run_id)
    log.info("%s: done in %.1f s -> %s", name, marker["seconds"], marker_uri.rsplit("/", 1)[0])
    return marker
