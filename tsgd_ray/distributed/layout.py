"""Where each stage writes: content-addressed folders under the output root.

A stage's folder is named by a hash of exactly the settings its result depends on, chained to the
hash of the stage before it::

    <output_root>/teacher/<key>/    teacher.pt, teacher.json (the marker), ray_train/ (checkpoints)
    <output_root>/stats/<key>/      statistics.pt, init.pt, stats.json (the marker)
    <output_root>/distill/<key>/    plan.json, partitions/p00000.pt + p00000.json (marker), ...
                                    synthetic/ data.parquet, manifest.json, previews/
    <output_root>/evaluate/<key>/   results.json

So a rerun of the same config finds its finished stages and skips them, and two runs that differ
in one key share every stage upstream of it (tsgf.enabled on and off share teacher and stats).
Settings that change only how fast or where work runs (actor counts, CPUs, batch sizes of the
decoder, logging cadence) are left out of the keys.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tsgd_ray import storage
from tsgd_ray.config import Method, to_dict, validate
from tsgd_ray.storage import OutputRoot

KEY_LENGTH = 16

# Settings that do not change a stage's result.
_EXECUTION_ONLY = {
    "data": ("decode_actors", "decode_cpus_per_actor", "decode_batch_size", "prepare_concurrency", "cache_clips"),
    "teacher": ("cpus_per_worker", "gpus_per_worker"),
    "distill": ("actors", "partitions", "cpus_per_actor", "gpus_per_actor", "log_every"),
    "evaluate": ("cpus_per_worker", "gpus_per_worker", "baselines"),
}


def _settings(cfg: DictConfig, sections: tuple[str, ...]) -> dict[str, Any]:
    data = to_dict(cfg)
    out = {}
    for name in sections:
        value = data[name]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _EXECUTION_ONLY.get(name, ())}
        out[name] = value
    return out


def _key(parent: str, cfg: DictConfig, sections: tuple[str, ...]) -> str:
    text = json.dumps({"parent": parent, **_settings(cfg, sections)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def teacher_key(cfg: DictConfig) -> str:
    if cfg.teacher.checkpoint:  # an imported teacher is named by its file, not by training settings
        return _key(cfg.teacher.checkpoint, cfg, ("data",))
    return _key("", cfg, ("seed", "amp", "data", "augment", "teacher"))


def stats_key(cfg: DictConfig) -> str:
    return _key(teacher_key(cfg), cfg, ("seed",)) + f"-ipc{cfg.distill.ipc}-{cfg.distill.init.value}"


def distill_key(cfg: DictConfig) -> str:
    return _key(stats_key(cfg), cfg, ("amp", "augment", "tsgf", "distill"))


def evaluate_key(cfg: DictConfig, method: Method) -> str:
    parent = teacher_key(cfg) if method == Method.full else distill_key(cfg)
    return _key(parent, cfg, ("amp", "augment", "tsgf", "evaluate")) + f"-{method.value}"


def teacher_dir(cfg: DictConfig) -> str:
    return OutputRoot(cfg.storage.output_root).uri("teacher", teacher_key(cfg))


def stats_dir(cfg: DictConfig) -> str:
    return OutputRoot(cfg.storage.output_root).uri("stats", stats_key(cfg))


def distill_dir(cfg: DictConfig) -> str:
    return OutputRoot(cfg.storage.output_root).uri("distill", distill_key(cfg))


def synthetic_dir(cfg: DictConfig) -> str:
    return storage.join(distill_dir(cfg), "synthetic")


def evaluate_dir(cfg: DictConfig, method: Method) -> str:
    return OutputRoot(cfg.storage.output_root).uri("evaluate", evaluate_key(cfg, method))


def method_config(cfg: DictConfig, method: Method) -> DictConfig:
    """The run's config as it distils (or, for `full`, evaluates) with `method`.

    tsgd: the config as it is; sre2l_video: TSGF off; random_real: the seeded real init clips themselves
    (init=real, 0 iterations, TSGF off); full: no distillation. Returns a read-only config.
    """
    overrides: dict[str, Any] = {"distill": {"method": method.value}}
    if method in (Method.sre2l_video, Method.random_real):
        overrides["tsgf"] = {"enabled": False}
    if method == Method.random_real:
        overrides["distill"].update(init="real", iterations=0)
    if method == Method.full:
        overrides = {}
    out = OmegaConf.merge(cfg, overrides)
    validate(out)
    OmegaConf.set_readonly(out, True)
    return out


def write_tensors(uri: str, tensors: dict[str, Any]) -> bool:
    """torch.save `tensors` (tensors, numbers, strings, lists) to `uri`, write-once."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return storage.write_once(uri, buf.getvalue())


def read_tensors(uri: str) -> dict[str, Any]:
    """Load what `write_tensors` wrote, with weights_only=True (no code is ever unpickled)."""
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
