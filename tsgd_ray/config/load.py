"""Loading a config: schema <- YAML file <- key=value overrides, validated, paths made absolute and
derived defaults filled (each as its schema field's metadata says), read-only."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tsgd_ray.config.schema import Config, ConfigError, fields_meta, keys_where, validate


def shipped_configs() -> Path:
    """The folder of the shipped configs: in an installed wheel the package data `tsgd_ray/configs`,
    else (a checkout, editable or on PYTHONPATH) the top-level configs/ beside the package."""
    packaged = Path(str(importlib.resources.files("tsgd_ray"))) / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def _as_config_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None)
    # OmegaConf's message already says what is wrong and often suggests the right key.
    message = str(exc).split("\n    full_key:")[0].strip()
    return ConfigError(f"{key}: {message}" if key else message)


def config_names() -> list[str]:
    """The names of the shipped configs (``default``, ``ucf101``, ...)."""
    return sorted(p.stem for p in shipped_configs().glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """Find a config by path, else by name among the shipped ones (``default`` ->
    configs/default.yaml), from any directory.

    Raises:
        ConfigError: when no such file exists.
    """
    path = Path(name_or_path)
    candidates = [path, shipped_configs() / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config file not found: {name_or_path} (not a file, nor a shipped config: {', '.join(config_names())})"
    )


def _absolute_local_paths(cfg: DictConfig) -> None:
    for key in keys_where("path"):
        value = OmegaConf.select(cfg, key)
        if value and ":/" not in value and not os.path.isabs(value):  # not s3://..., runs:/..., models:/...
            OmegaConf.update(cfg, key, os.path.abspath(value))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build, merge and validate a config: schema <- YAML at `path` <- ``key=value`` overrides.

    Relative local paths (keys marked path=True) become absolute against the current directory;
    empty derived keys get their derived value.
    Returns a read-only structured DictConfig.

    Raises:
        ConfigError: for an unknown key, a wrong type, a value out of range or a missing URI.
    """
    try:
        cfg = OmegaConf.structured(Config)
        if path is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(resolve_config_path(path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _as_config_error(exc) from None
    validate(cfg)
    _absolute_local_paths(cfg)
    _resolve_derived(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _resolve_derived(cfg: DictConfig) -> None:
    """Fill every empty key whose schema field names a derived default; nothing is created."""
    for key, meta in fields_meta().items():
        if meta["derived"] is not None and not OmegaConf.select(cfg, key):
            OmegaConf.update(cfg, key, meta["derived"](cfg))


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python (enums as strings), for YAML, JSON and MLflow."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def config_hash(cfg: DictConfig, sections: Optional[Sequence[str]] = None) -> str:
    """A stable sha256 hex digest of the resolved config (or of the named top-level sections)."""
    data = to_dict(cfg)
    if sections is not None:
        data = {name: data[name] for name in sections}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
