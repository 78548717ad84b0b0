"""Live curves: a Ray Train controller callback that logs workers' reports to MLflow as they arrive."""

from __future__ import annotations

import logging
import time
from typing import Optional

log = logging.getLogger(__name__)


def live_curve(uri: str, run_id: Optional[str] = None, step: str = "epoch", children: Optional[dict] = None):
    """A Ray Train callback that logs rank 0's reported metrics to run `run_id` as they come (the
    value of `step` as the step, "time" (s) as the timestamp, every other number as a metric;
    reports without `step` are skipped). A report {"rows": [...]} logs each row so (a worker that
    reports a batch of epochs at once). With `children` ({key: (parent run id, name)}), a report
    goes by its "student" key to a child run `name` of that parent, opened at its first report
    (`Tracker.find_child` finds it) and started at the report's `started` (unix seconds) where it
    has one; reports of other keys are skipped.

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
            key = reported.get("student")
            if not rows or (children is not None and key not in children):
                return
            self.client = self.client or MlflowClient(tracking_uri=uri)
            target = run_id
            if children is not None:
                if key not in self.runs:
                    parent, name = children[key]
                    experiment = self.client.get_run(parent).info.experiment_id
                    started = reported.get("started")  # the child's own start: it may report late
                    self.runs[key] = self.client.create_run(
                        experiment,
                        run_name=name,
                        start_time=int(1000 * started) if started else None,
                        tags={"mlflow.parentRunId": parent, "stage": name},
                    ).info.run_id
                target = self.runs[key]
            now = time.time()
            points = [
                Metric(k, float(v), int(1000 * row.get("time", now)), int(row[step]))
                for row in rows
                for k, v in row.items()
                if k not in (step, "time", "started", "student") and isinstance(v, (int, float))
            ]
            self.client.log_batch(target, metrics=points)

        def __getstate__(self) -> dict:
            return {"client": None, "runs": {}}

    return LiveCurve()
