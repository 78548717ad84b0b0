"""UCF101: UCF-101/<Class>/v_*.avi with the ucfTrainTestlist/ split lists."""

from __future__ import annotations

from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import DatasetKind
from tsgd_ray.data.catalogs.base import Catalog, FileIndex, _annotation_dir, _Builder, _read_text
from tsgd_ray.data.catalogs.registry import register


@register(DatasetKind.ucf101)
def ucf101(data_cfg: DictConfig) -> Catalog:
    """UCF101: classInd.txt, trainlist0N.txt (``Class/v_x.avi 1``), testlist0N.txt (``Class/v_x.avi``)."""
    ann = _annotation_dir(data_cfg, "ucfTrainTestlist")
    classes = [line.split()[1] for line in _read_text(storage.join(ann, "classInd.txt")).splitlines() if line.strip()]
    builder = _Builder(FileIndex(data_cfg.root, data_cfg.extensions), classes)
    for split, name in (("train", "trainlist"), ("test", "testlist")):
        for line in _read_text(storage.join(ann, f"{name}0{data_cfg.split_id}.txt")).splitlines():
            if not line.strip():
                continue
            rel = line.split()[0]
            builder.add(rel, rel.split("/")[0], split)
    return builder.build(data_cfg)
