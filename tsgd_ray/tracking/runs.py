"""The MLflow face of a run: one parent run per invocation, a child run per stage (and per seed).

Everything goes through an explicit `MlflowClient` and explicit run ids, so nothing depends on
MLflow's process-global active run or on MLFLOW_EXPERIMENT_ID leaking into Ray workers; only the
driver talks to MLflow. The tracking URI is `tracking.tracking_uri`, else MLFLOW_TRACKING_URI,
else a sqlite file under a local output root (./mlflow.db when the output root is remote).

No credential is ever logged: URIs lose their user-info (``scheme://user:pass@host`` ->
``scheme://***@host``), values under keys that name a secret are replaced, and the params are
the resolved config only (credentials live in the environment, never in the config).
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import ConfigError, config_hash, to_dict, to_yaml

log = logging.getLogger(__name__)

_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.IGNORECASE)
_PACKAGES = ("tsgd-ray", "torch", "ray", "mlflow", "pyarrow", "decord2", "omegaconf", "s3fs")
MAX_PARAM_LENGTH = 6000
# The MLflow UI opens a model-training experiment on its runs, not on GenAI traces.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def redact(text: str) -> str:
    """`text` with the user-info of every URI in it replaced by ***."""
    return _USERINFO.sub(r"\1***@", text)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": str(value)}, redacted (URIs and secret-named keys)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif _SECRET_KEY.search(str(key)):
            out[name] = "***"
        else:
            out[name] = redact(str(value))[:MAX_PARAM_LENGTH]
    return out


def tracking_uri(cfg: DictConfig) -> str:
    """tracking.tracking_uri (`load_config` fills it in when empty); a sqlite file's folder is
    created here, on first use."""
    uri = cfg.tracking.tracking_uri
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
    return uri


def is_local_store(uri: str) -> bool:
    """Whether an MLflow tracking URI is a file on the machine that opens it (sqlite, file, a path);
    servers (http, https) and hosted stores (databricks) are not."""
    if uri.startswith(("sqlite:", "file:")):
        return True
    return "://" not in uri and uri.split(":")[0] not in ("databricks", "databricks-uc")


def check_store(cfg: DictConfig) -> None:
    """Before any work: a job on a Ray cluster (ray.address or RAY_ADDRESS set) whose output root
    is in object storage must not keep MLflow's store in a local file, which stays on the head
    node (in the job's working directory by default) and is lost when the cluster goes down.

    Raises:
        ConfigError: that combination, naming the fix.
    """
    on_cluster = bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    uri = cfg.tracking.tracking_uri
    if on_cluster and not storage.is_local(cfg.storage.output_root) and is_local_store(uri):
        raise ConfigError(
            f"storage.output_root={cfg.storage.output_root} is in object storage but MLflow would keep its "
            f"store in {redact(uri)} on the head node, lost when the cluster goes down: set "
            "tracking.tracking_uri (or MLFLOW_TRACKING_URI) to an MLflow server (infra/mlflow/README.md)"
        )


def _artifact_location(cfg: DictConfig, uri: str) -> Optional[str]:
    """tracking.artifact_location; for a sqlite store, <output_root>/mlartifacts when the output
    root is local (MLflow's default, ./mlruns, would write outside it); else the server's default."""
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    root = storage.absolute(cfg.storage.output_root)
    if uri.startswith("sqlite:") and storage.is_local(root):
        return Path(root, "mlartifacts").as_uri()
    return None


def _git_commit() -> str:
    """The checkout's commit; where there is no .git (the image), the one baked in at build time."""
    baked = os.environ.get("TSGD_RAY_GIT_COMMIT", "") or "unknown"
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() if out.returncode == 0 else baked
    except (OSError, subprocess.SubprocessError):
        return baked


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in a container without /etc/passwd entry
        return "unknown"


def run_name(cfg: DictConfig, command: str) -> str:
    """A readable name: command, dataset, IPC, and a short hash of the config
    (e.g. ``run-builtin-ipc1-3f2a9c``); two runs of one config share it."""
    return f"{command}-{cfg.data.dataset.value}-ipc{cfg.distill.ipc}-{config_hash(cfg)[:6]}"


def _versions() -> dict[str, str]:
    tags = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            tags[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {f"version.{k}": v for k, v in tags.items()}


class Tracker:
    """A parent MLflow run for one invocation (`command`), with child runs for stages and seeds.

    Use as a context manager: the parent ends FINISHED, or FAILED when an exception leaves it.
    """

    def __init__(self, cfg: DictConfig, command: str):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = cfg.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                name, artifact_location=_artifact_location(cfg, self.uri), tags={EXPERIMENT_KIND: MODEL_TRAINING}
            )
        else:
            self.experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND not in experiment.tags:
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        commit = _git_commit()
        tags = {
            "command": command,
            "git_commit": commit,
            **_versions(),
            "output_root": redact(storage.absolute(cfg.storage.output_root)),
            "mlflow.user": _user(),
            "mlflow.source.name": f"tsgd-ray {command}",
            "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_ID") else "LOCAL",
            "mlflow.source.git.commit": commit,
        }
        run = self.client.create_run(
            self.experiment_id, run_name=cfg.tracking.run_name or run_name(cfg, command), tags=tags
        )
        self.run_id = run.info.run_id
        self.log_params(self.run_id, flatten(to_dict(cfg)))
        self.log_text(self.run_id, "config.yaml", redact(to_yaml(cfg)))
        self._open: list[str] = []

    def context(self) -> "RunContext":
        """The invocation's run as the stages log to it."""
        return RunContext(self, self.run_id)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "FAILED"
        for run_id in reversed(self._open):
            self.client.set_terminated(run_id, status)
        self.client.set_terminated(self.run_id, status)

    @property
    def location(self) -> str:
        """Where to find the parent run (tracking URI and run id), credentials removed."""
        return f"{redact(self.uri)} experiment={self.experiment_id} run={self.run_id}"

    def summary(self) -> str:
        """What to open next: the run's page (in the UI's model-training view: MLflow 3's UI opens
        in its GenAI view unless the URL asks otherwise), and `mlflow ui` for a local store."""
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}?workflowType=machine_learning"
        lines = [f"MLflow: {self.location}"]
        if self.uri.startswith("sqlite:"):
            beside = Path(sys.executable).with_name("mlflow")  # .venv/bin/mlflow: works without activating
            program = str(beside) if beside.is_file() else "mlflow"
            lines += [f"  {program} ui --backend-store-uri {self.uri}", f"  then open http://127.0.0.1:5000/{page}"]
        elif self.uri.startswith(("http://", "https://")):
            lines.append(f"  open {redact(self.uri).rstrip('/')}/{page}")
        return "\n".join(lines)

    def child(
        self,
        name: str,
        parent: Optional[str] = None,
        tags: Optional[dict[str, str]] = None,
        start_time: Optional[float] = None,
    ) -> str:
        """Start a child run of `parent` (default: the invocation's run), at `start_time` (unix
        seconds; default now); returns its id."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            start_time=int(1000 * start_time) if start_time else None,
            tags={"mlflow.parentRunId": parent or self.run_id, "stage": name, **(tags or {})},
        )
        self._open.append(run.info.run_id)
        return run.info.run_id

    def find_child(self, parent: str, name: str) -> Optional[str]:
        """The id of `parent`'s child run named `name` (e.g. one `live_curve` opened), or None."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{parent}' and attributes.run_name = '{name}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def fail_children(self, parent: str) -> None:
        """Mark `parent`'s children that are still running FAILED (after the work failed)."""
        for run in self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"):
            if run.info.status == "RUNNING":
                self.finish(run.info.run_id, "FAILED")

    def finish(self, run_id: str, status: str = "FINISHED", end_time: Optional[float] = None) -> None:
        self.client.set_terminated(run_id, status, end_time=int(1000 * end_time) if end_time else None)
        if run_id in self._open:
            self._open.remove(run_id)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, redact(str(value)))

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.log_history(run_id, [{"step": step, **metrics}])

    def log_history(self, run_id: str, rows: Iterable[dict[str, float]], prefix: str = "") -> None:
        """Log rows {"step": s, ["time": unix seconds,] name: value, ...} as metrics `prefix + name`
        at step s, stamped with the row's time (else now)."""
        from mlflow.entities import Metric

        now = time.time()
        metrics = [
            Metric(f"{prefix}{k}", float(v), int(1000 * row.get("time", now)), int(row["step"]))
            for row in rows
            for k, v in row.items()
            if k not in ("step", "time")
        ]
        for start in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[start : start + 900])

    def log_dataset(self, run_id: str, name: str, digest: str, source: str, profile: dict, context: str) -> None:
        """Record a dataset (e.g. the shard manifest) as an input of the run, for the UI's Datasets."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type="tsgd-ray-shards",
            source=json.dumps({"uri": redact(source)}),
            profile=json.dumps(profile),
        )
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_table(self, run_id: str, name: str, rows: list[dict]) -> None:
        """Rows of equal keys as an MLflow table artifact (the UI shows and compares it)."""
        columns = {key: [row.get(key) for row in rows] for key in rows[0]} if rows else {}
        self.client.log_table(run_id, data=columns, artifact_file=name)

    def log_image(self, run_id: str, name: str, image) -> None:
        """An (H, W, 3) uint8 array as a PNG artifact `name`."""
        self.client.log_image(run_id, image, artifact_file=name)

    def log_teacher(self, run_id: str, checkpoint: bytes, meta: dict[str, Any]) -> str:
        """Log a teacher checkpoint (and `meta`: model, width, depth, classes...) as an MLflow model
        of the stage's run; returns its URI ``models:/<model id>``, which `teacher.checkpoint` takes."""
        model = self.client.create_logged_model(
            self.experiment_id,
            name="teacher",
            source_run_id=run_id,
            params={k: str(v) for k, v in meta.items()},
            model_type="tsgd-ray-teacher",
        )
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "teacher.pt").write_bytes(checkpoint)
            Path(tmp, "teacher.json").write_text(json.dumps(meta, indent=2))
            self.client.log_model_artifacts(model.model_id, tmp)
        self.client.finalize_logged_model(model.model_id, "READY")
        return f"models:/{model.model_id}"

    def log_text(self, run_id: str, name: str, text: str) -> None:
        self.log_bytes(run_id, name, text.encode())

    def log_bytes(self, run_id: str, name: str, data: bytes) -> None:
        """Store `data` as the artifact `name` (may contain '/') of the run."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, Path(name).name)
            path.write_bytes(data)
            folder = str(Path(name).parent)
            self.client.log_artifact(run_id, str(path), artifact_path=None if folder == "." else folder)


class RunContext:
    """What a stage logs to: one MLflow run, and the run it is a child of (`parent`).

    The skeleton hands each stage's work its own child run this way; `Tracker.context()` is the
    invocation's run, `OFF` is tracking switched off, where every call is a no-op (`child` returns
    `OFF`, `log_teacher` None). The logging calls are the Tracker's, less the run id:
    log_params, log_metrics, log_history, log_text, log_bytes, log_image, log_table, log_dataset,
    log_teacher, set_tags.
    """

    _CALLS = frozenset(
        ("log_params", "log_metrics", "log_history", "log_text", "log_bytes", "log_image", "log_table")
        + ("log_dataset", "log_teacher", "set_tags")
    )

    def __init__(self, tracker: Optional[Tracker] = None, run_id: Optional[str] = None, parent=None):
        self._tracker, self.run_id, self._parent = tracker, run_id, parent

    def __bool__(self) -> bool:
        """Whether anything is logged (False for `OFF`)."""
        return self._tracker is not None

    def __getattr__(self, name: str):
        if name not in self._CALLS:
            raise AttributeError(name)
        if self._tracker is None:
            return lambda *args, **kwargs: None
        return functools.partial(getattr(self._tracker, name), self.run_id)

    @property
    def parent(self) -> "RunContext":
        """The run this one is a child of (itself for the invocation's run; `OFF` when off)."""
        return self._parent or self

    @property
    def uri(self) -> str:
        """The tracking URI ("" when off), for callbacks that log from another process."""
        return self._tracker.uri if self._tracker else ""

    def child(
        self, name: str, tags: Optional[dict[str, str]] = None, start_time: Optional[float] = None
    ) -> "RunContext":
        """A new child run `name` of this run (started at `start_time`, unix seconds; default now)."""
        if self._tracker is None:
            return self
        return RunContext(self._tracker, self._tracker.child(name, self.run_id, tags, start_time), self)

    def find_child(self, name: str) -> Optional["RunContext"]:
        """This run's child `name` (one a live curve opened), or None (always None when off)."""
        found = self._tracker.find_child(self.run_id, name) if self._tracker else None
        return RunContext(self._tracker, found, self) if found else None

    def finish(self, status: str = "FINISHED", end_time: Optional[float] = None) -> None:
        if self._tracker:
            self._tracker.finish(self.run_id, status, end_time)

    def fail_children(self) -> None:
        """Mark this run's children that are still running FAILED (after the work failed)."""
        if self._tracker:
            self._tracker.fail_children(self.run_id)


OFF = RunContext()
