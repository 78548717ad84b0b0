"""Teachers in MLflow: `teacher.checkpoint=models:/...` or `runs:/...` fetched from the config's own store."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from tsgd_ray.config import ConfigError
from tsgd_ray.tracking.runs import redact, tracking_uri

log = logging.getLogger(__name__)


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("runs:/", "models:/"))


def read_mlflow_checkpoint(cfg: DictConfig, uri: str) -> bytes:
    """The checkpoint behind an MLflow URI at the config's tracking URI: ``runs:/<run id>/<path>``,
    ``models:/<model id>`` (a teacher `Tracker.log_teacher` logged) or ``models:/<name>/<version>``.
    A folder must hold exactly one .pt or .safetensors file.

    Raises:
        ConfigError: the URI cannot be fetched, or names no single checkpoint file.
    """
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        try:
            store = tracking_uri(cfg)
            source = _artifact_source(uri, store)
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=store))
        except Exception as exc:  # noqa: BLE001 - MlflowException, OSError, ...: all say the URI is unusable
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"teacher.checkpoint: cannot fetch {uri} from {redact(tracking_uri(cfg))}: {message}"
            ) from None
        files = [path] if path.is_file() else sorted([*path.rglob("*.pt"), *path.rglob("*.safetensors")])
        if len(files) != 1:
            raise ConfigError(f"teacher.checkpoint: {uri} holds {len(files)} checkpoint files, expected one")
        return files[0].read_bytes()


def _artifact_source(uri: str, store: str) -> str:
    """Where the artifacts behind a ``models:/`` URI live, looked up in `store` (MLflow's own
    resolution of a logged model's id asks the process-wide tracking URI, not the one given)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = uri.removeprefix("models:/")
    if not uri.startswith("models:/"):
        return uri
    if re.fullmatch(r"m-[0-9a-f]+", name):  # a logged model
        return client.get_logged_model(name).artifact_location
    if re.fullmatch(r"[^/@]+/[0-9]+", name):  # a registered model's version
        return _artifact_source(client.get_model_version_download_uri(*name.split("/")), store)
    return uri
