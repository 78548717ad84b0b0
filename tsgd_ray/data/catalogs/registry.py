"""The catalog registry: data.dataset -> the function that lists that layout's videos."""

from __future__ import annotations

from typing import Callable

from omegaconf import DictConfig

from tsgd_ray.config import DatasetKind

CATALOGS: dict[DatasetKind, Callable[[DictConfig], object]] = {}


def register(kind: DatasetKind):
    """Decorator: `fn(data_cfg) -> Catalog` reads the layout of data.dataset=`kind`."""

    def add(fn):
        CATALOGS[kind] = fn
        return fn

    return add
