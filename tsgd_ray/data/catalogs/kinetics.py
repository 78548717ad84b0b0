"""Kinetics-400/600/700: annotation CSVs, nested or flat video folders."""

from __future__ import annotations

import csv
import io

from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import DatasetKind
from tsgd_ray.data.catalogs.base import Catalog, CatalogError, FileIndex, _Builder, _read_text, normalise_split
from tsgd_ray.data.catalogs.registry import register


@register(DatasetKind.kinetics)
def kinetics(data_cfg: DictConfig) -> Catalog:
    """Kinetics-400/600/700: CSVs ``label,youtube_id,time_start,time_end,split[,is_cc]``.

    Files are ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` anywhere under the root. Rows with no
    label (the test release) are left out.
    """
    ann = data_cfg.annotations or data_cfg.root
    ann = storage.absolute(ann)
    csv_uris = [ann] if ann.lower().endswith(".csv") else storage.list_files(ann, ["csv"])
    if not csv_uris:
        raise CatalogError(f"no Kinetics annotation CSV under {ann} (set data.annotations)")
    rows = []
    for uri in csv_uris:
        reader = csv.DictReader(io.StringIO(_read_text(uri)))
        missing = {"youtube_id", "time_start", "time_end"} - set(reader.fieldnames or [])
        if missing:
            raise CatalogError(f"{uri}: not a Kinetics CSV, missing columns {sorted(missing)}")
        rows.extend(reader)
    labelled = [r for r in rows if (r.get("label") or "").strip()]
    classes = sorted({r["label"].strip() for r in labelled})
    builder = _Builder(FileIndex(data_cfg.root, data_cfg.extensions), classes)
    for r in labelled:
        split = normalise_split(r.get("split") or "train")
        if split is None:
            builder.problems.append({"uri": r["youtube_id"], "reason": f"unknown split {r.get('split')!r}"})
            continue
        name = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        builder.add(name, r["label"].strip(), split)
    return builder.build(data_cfg)
