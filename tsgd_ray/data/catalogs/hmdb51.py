"""HMDB51: <class>/*.avi with testTrainMulti_7030_splits/."""

from __future__ import annotations

import posixpath

from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import DatasetKind
from tsgd_ray.data.catalogs.base import Catalog, CatalogError, FileIndex, _annotation_dir, _Builder, _read_text
from tsgd_ray.data.catalogs.registry import register


@register(DatasetKind.hmdb51)
def hmdb51(data_cfg: DictConfig) -> Catalog:
    """HMDB51: ``<class>_test_splitN.txt`` files with lines ``<name>.avi <0|1|2>`` (1 train, 2 test)."""
    ann = _annotation_dir(data_cfg, "testTrainMulti_7030_splits")
    suffix = f"_test_split{data_cfg.split_id}.txt"
    split_files = sorted(u for u in storage.list_files(ann, ["txt"]) if u.endswith(suffix))
    if not split_files:
        raise CatalogError(f"no HMDB51 split files *{suffix} under {ann}")
    classes = sorted(posixpath.basename(u)[: -len(suffix)] for u in split_files)
    builder = _Builder(FileIndex(data_cfg.root, data_cfg.extensions), classes)
    for uri in split_files:
        class_name = posixpath.basename(uri)[: -len(suffix)]
        for line in _read_text(uri).splitlines():
            parts = line.split()
            if len(parts) < 2 or parts[1] not in ("1", "2"):
                continue
            builder.add(f"{class_name}/{parts[0]}", class_name, "train" if parts[1] == "1" else "test")
    return builder.build(data_cfg)
