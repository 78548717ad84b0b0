"""Live curves: a Ray Train controller callback that logs workers' reports to MLflow as they arrive."""

from __future__ import annotations

import logging
import time
from typing import Optional

log = logging.getLogger(__name__)


def live_curve(uri: str, run_id: str, step: str = "epoch", child: Optional[tuple[str, str]] = None):
    """A Ray Train callback that logs rank 0's reported metrics to run `run_id` as they come (the
    value of `step` as the step, "time" (s) as the timestamp, every other number as a metric;
    reports without `step` are skipped). A report {"rows": [...]} logs each row so (a worker that
    reports a batch of epochs at once). With `child=(key, name)`, each value v of the reported `key` gets its own child run
    of `run_id`, named `name.format(v)`, opened at its first report (`Tracker.find_child` finds it)
    and started at the report's `started` (unix seconds) where it has one.

    It runs in the Ray Train controller, so the workers hold no MLflow state; the controller's
    client is made on first use. Ray Train pins the controller to the driver's node, so a sqlite
    store on the driver's disk is the same file."""
    from ray.train import UserCallback

    class LiveCurve(UserCallback):
        def __init__(self):
            self.client, self.runs = None, {}

        def after_report(self, run_context, metrics, checkpoint) -> None:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            reported = metrics[0] if metrics else {}
            rows = [r for r in reported.get("rows", [reported]) if step in r]
            if not rows:
                return
            self.client = self.client or MlflowClient(tracking_uri=uri)
            target = run_id
            if child:
                key, name = child
                value = reported.get(key)
                if value not in self.runs:
                    experiment = self.client.get_run(run_id).info.experiment_id
                    tags = {"mlflow.parentRunId": run_id, "stage": name.format(value)}
                    started = reported.get("started")  # the child's own start: it may report late
                    self.runs[value] = self.client.create_run(
                        experiment,
                        run_name=name.format(value),
                        start_time=int(1000 * started) if started else None,
                        tags=tags,
                    ).info.run_id
                target = self.runs[value]
            now = time.time()
            points = [
                Metric(k, float(v), int(1000 * row.get("time", now)), int(row[step]))
                for row in rows
                for k, v in row.items()
                if k not in (step, "time", "started", child and child[0]) and isinstance(v, (int, float))
            ]
            self.client.log_batch(target, metrics=points)

        def __getstate__(self) -> dict:
            return {"client": None, "runs": {}}

    return LiveCurve()
