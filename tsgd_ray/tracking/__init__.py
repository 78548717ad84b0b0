"""MLflow, driver side only, one concept per module: `runs` (the parent and child runs of an
invocation, the run context a stage logs to, redaction), `curves` (live curves from Ray Train),
`models` (teachers as logged models), `compare` (runs side by side)."""

from tsgd_ray.tracking.compare import compare_runs
from tsgd_ray.tracking.curves import live_curve
from tsgd_ray.tracking.models import is_mlflow_uri, read_mlflow_checkpoint
from tsgd_ray.tracking.runs import OFF, RunContext, Tracker, flatten, redact, run_name, tracking_uri
