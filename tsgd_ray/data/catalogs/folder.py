"""Class-folder trees: root/[train|val|test/]<class>/*.<ext> (data.dataset=folder, and the built-in set)."""

from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig

from tsgd_ray.config import DatasetKind
from tsgd_ray.data.catalogs.base import Catalog, CatalogError, FileIndex, _Builder, normalise_split
from tsgd_ray.data.catalogs.registry import register


@register(DatasetKind.folder)
def folder(data_cfg: DictConfig, root: Optional[str] = None) -> Catalog:
    """A class-folder tree: ``root/<class>/*`` or ``root/<split>/<class>/*``."""
    index = FileIndex(root or data_cfg.root, data_cfg.extensions)
    if not index.files:
        raise CatalogError(f"no video files ({', '.join(data_cfg.extensions)}) under {index.root}")
    entries = []
    for uri in index.files:
        parts = uri[len(index.root) + 1 :].split("/")
        split = normalise_split(parts[0]) if len(parts) >= 3 else None
        if split is not None:
            entries.append((uri, parts[1], split))
        elif len(parts) >= 2:
            entries.append((uri, parts[-2], "train"))
    classes = sorted({class_name for _, class_name, _ in entries})
    builder = _Builder(index, classes)
    for uri, class_name, split in entries:
        builder.add(uri, class_name, split, uri=uri)
    return builder.build(data_cfg)
