"""Dataset catalogs: a dataset layout -> a list of VideoRecord, one module per layout
(UCF101, HMDB51, Kinetics, SSv2, a CSV, class folders), found through a registry
keyed by data.dataset (`CATALOGS`). The built-in set is a class-folder tree generated first.

Files are found with one recursive listing of the dataset root, matched by file name (case
insensitive). Missing files and unknown labels either stop with a CatalogError listing a few
examples, or are skipped and counted (data.on_catalog_error=skip).
"""

from __future__ import annotations

from omegaconf import DictConfig

from tsgd_ray.config import DatasetKind
from tsgd_ray.data.catalogs import csv_file, folder, hmdb51, kinetics, ssv2, ucf101  # noqa: F401 - they register
from tsgd_ray.data.catalogs.base import (
    SPLITS,
    Catalog,
    CatalogError,
    FileIndex,
    VideoRecord,
    normalise_split,
    restrict_classes,
)
from tsgd_ray.data.catalogs.registry import CATALOGS


def build_catalog(cfg: DictConfig) -> Catalog:
    """The catalog of the configured dataset (generating the built-in dataset first if needed).

    Raises:
        CatalogError: for a layout that does not match, or missing files / unknown labels when
            data.on_catalog_error=error.
    """
    if cfg.data.dataset == DatasetKind.builtin:
        from tsgd_ray.data.builtin import ensure_builtin_dataset

        return folder.folder(cfg.data, ensure_builtin_dataset(cfg))
    return CATALOGS[cfg.data.dataset](cfg.data)
