"""Something-Something v2: <id>.webm with labels.json, train.json and validation.json."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import DatasetKind
from tsgd_ray.data.catalogs.base import Catalog, FileIndex, _annotation_dir, _Builder, _read_text
from tsgd_ray.data.catalogs.registry import register


def _ssv2_class(template: str) -> str:
    return template.replace("[", "").replace("]", "")


@register(DatasetKind.ssv2)
def ssv2(data_cfg: DictConfig) -> Catalog:
    """Something-Something v2: labels.json, train.json and validation.json; videos ``<id>.webm``."""
    ann = _annotation_dir(data_cfg, "labels")
    labels = json.loads(_read_text(storage.join(ann, "labels.json")))
    classes = [name for name, _ in sorted(labels.items(), key=lambda kv: int(kv[1]))]
    builder = _Builder(FileIndex(data_cfg.root, data_cfg.extensions), classes)
    for split, name in (("train", "train.json"), ("val", "validation.json")):
        for item in json.loads(_read_text(storage.join(ann, name))):
            builder.add(str(item["id"]), _ssv2_class(item["template"]), split)
    return builder.build(data_cfg)
