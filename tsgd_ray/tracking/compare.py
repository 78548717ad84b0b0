"""`tsgd-ray compare`: the finished runs of an experiment side by side."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from tsgd_ray.config import ConfigError
from tsgd_ray.tracking.runs import redact, tracking_uri

log = logging.getLogger(__name__)


def compare_runs(cfg: DictConfig, limit: int = 10) -> str:
    """A Markdown table of the newest `limit` finished `tsgd-ray run` invocations in the config's
    experiment: run name and id, the params whose values differ between them, then every
    `<method>/top1_mean` and `top5_mean` (with std, in %).

    Raises:
        ConfigError: when the experiment does not exist at the tracking URI.
    """
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        raise ConfigError(f"tracking.experiment: no experiment {cfg.tracking.experiment!r} at {redact(uri)}")
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.command = 'run' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][:limit]
    if not runs:
        return f"no finished `tsgd-ray run` in experiment {cfg.tracking.experiment!r} at {redact(uri)}"
    keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1 and k != "tracking.run_name"]
    methods = sorted({m.split("/")[0] for r in runs for m in r.data.metrics if m.endswith("/top1_mean")})

    def score(run, method: str, k: str) -> str:
        m = run.data.metrics
        if f"{method}/{k}_mean" not in m:
            return ""
        return f"{100 * m[f'{method}/{k}_mean']:.1f} +- {100 * m.get(f'{method}/{k}_std', 0.0):.1f}"

    header = ["run", *differing, *(f"{m} top-1 %" for m in methods), *(f"{m} top-5 %" for m in methods)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [
            f"{r.info.run_name} ({r.info.run_id[:8]})",
            *(r.data.params.get(k, "") for k in differing),
            *(score(r, m, "top1") for m in methods),
            *(score(r, m, "top5") for m in methods),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
