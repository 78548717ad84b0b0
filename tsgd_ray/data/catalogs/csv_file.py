"""A generic path,label[,split] CSV (data.dataset=csv)."""

from __future__ import annotations

import csv
import io
import posixpath

from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import DatasetKind
from tsgd_ray.data.catalogs.base import Catalog, CatalogError, FileIndex, _Builder, _read_text, normalise_split
from tsgd_ray.data.catalogs.registry import register


@register(DatasetKind.csv)
def manifest_csv(data_cfg: DictConfig) -> Catalog:
    """A CSV with header ``path,label[,split]``; paths relative to data.root or absolute URIs."""
    csv_uri = storage.absolute(data_cfg.annotations or data_cfg.root)
    if not csv_uri.lower().endswith(".csv"):
        raise CatalogError(f"data.annotations: expected the path of a .csv file, got {csv_uri}")
    reader = csv.DictReader(io.StringIO(_read_text(csv_uri)))
    if not {"path", "label"} <= set(reader.fieldnames or []):
        raise CatalogError(f"{csv_uri}: the header must be path,label[,split], got {reader.fieldnames}")
    rows = list(reader)
    root = data_cfg.root if data_cfg.annotations else posixpath.dirname(csv_uri)
    classes = sorted({r["label"].strip() for r in rows if (r["label"] or "").strip()})
    builder = _Builder(FileIndex(root, data_cfg.extensions), classes)
    present = set(builder.index.files)
    for r in rows:
        split = normalise_split(r.get("split") or "train")
        path = r["path"].strip()
        absolute = "://" in path or path.startswith("/")
        uri = path if absolute else storage.join(builder.index.root, path)
        if split is None:
            builder.problems.append({"uri": uri, "reason": f"unknown split {r.get('split')!r}"})
            continue
        if not (storage.exists(uri) if absolute else uri in present):
            builder.problems.append({"uri": uri, "reason": "missing file"})
            continue
        builder.add(path, (r["label"] or "").strip(), split, uri=uri)
    return builder.build(data_cfg)
