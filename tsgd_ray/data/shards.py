"""The shard format: Parquet files of encoded videos plus one manifest.

Layout under the shards root::

    manifest.json                    written last; its presence means the set is complete
    <split>/part-00000.parquet       rows of SHARD_SCHEMA, classes mixed (seeded order)
    _parts/<split>-00000.json        per-shard completion record (rows, bytes, skipped files)

Shard paths in the manifest are relative to the shards root, so a shard set can be copied
between a local disk and a bucket; a shard names each video's source relative to the dataset
root, so the same videos under two roots give the same shard bytes.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import pyarrow as pa
from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import ConfigError, to_dict
from tsgd_ray.data.catalogs import Catalog, VideoRecord
from tsgd_ray.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

SHARD_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("split", pa.string()),
        ("source_uri", pa.string()),
        ("video", pa.binary()),  # the encoded file (source bytes, or H.264/MP4 when transcoded)
        ("num_frames", pa.int32()),  # frames the decoder really finds
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("fps", pa.float32()),
    ]
)


class ManifestError(UserError, ValueError):
    """A shard set is missing, incomplete, or of another schema version."""


@dataclass(frozen=True)
class ShardPlan:
    """The videos one shard will hold; `name` is its path relative to the shards root."""

    name: str
    split: str
    records: tuple[VideoRecord, ...]
    source_bytes: int

    @property
    def part_name(self) -> str:
        return "_parts/" + self.name.replace("/", "-").replace(".parquet", ".json")

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "split": self.split,
                "source_bytes": self.source_bytes,
                "records": [asdict(r) for r in self.records],
            }
        )

    @staticmethod
    def from_json(text: str) -> "ShardPlan":
        d = json.loads(text)
        return ShardPlan(d["name"], d["split"], tuple(VideoRecord(**r) for r in d["records"]), d["source_bytes"])


def plan_shards(catalog: Catalog, sizes: dict[str, int], target_bytes: int, seed: int) -> list[ShardPlan]:
    """Group the catalog's records into shards of about `target_bytes` of source video each.

    Within a split the order is a seeded hash of the video id, so every shard mixes classes and
    the plan does not depend on listing order. A video larger than the target gets a shard alone.
    """
    plans: list[ShardPlan] = []
    for split in sorted({r.split for r in catalog.records}):
        records = sorted(
            (r for r in catalog.records if r.split == split),
            key=lambda r: (zlib.crc32(f"{seed}:{r.video_id}".encode()), r.video_id),
        )
        groups: list[list[VideoRecord]] = [[]]
        group_bytes = [0]
        for record in records:
            size = sizes.get(record.uri, 0)
            if groups[-1] and group_bytes[-1] + size > target_bytes:
                groups.append([])
                group_bytes.append(0)
            groups[-1].append(record)
            group_bytes[-1] += size
        plans += [
            ShardPlan(f"{split}/part-{i:05d}.parquet", split, tuple(g), b)
            for i, (g, b) in enumerate(zip(groups, group_bytes))
            if g
        ]
    return plans


def relative_source(uri: str, root: str) -> str:
    """A video's URI relative to the dataset root `root` where it lies under it, else as it is."""
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri


def plan_hash(plans: list[ShardPlan], transcode_short_side: int, root: str = "") -> str:
    """Identifies what a shard set holds: the plan (its videos relative to the dataset root `root`,
    so the same dataset under another root is the same set) and the transcode setting."""
    h = hashlib.sha256(f"v{SCHEMA_VERSION}:{transcode_short_side}".encode())
    for plan in plans:
        records = tuple(replace(r, uri=relative_source(r.uri, root)) for r in plan.records)
        h.update(replace(plan, records=records).to_json().encode())
    return h.hexdigest()


def shards_root(cfg: DictConfig) -> str:
    """Where this config's shards live: data.shards (`load_config` fills in <output_root>/shards)."""
    return storage.absolute(cfg.data.shards)


def eval_split(cfg: DictConfig, splits: Iterable[str]) -> str:
    """The split students are tested on: data.eval_split, else `test` if the dataset has one, else `val`.

    Raises:
        ConfigError: when that split is not among `splits` (the dataset's splits).
    """
    present = sorted(set(splits))
    wanted = cfg.data.eval_split or ("test" if "test" in present else "val")
    if wanted not in present:
        raise ConfigError(
            f"data.eval_split: the dataset has no {wanted!r} split to test students on "
            f"(it has {', '.join(present) or 'none'}); set data.eval_split to one of them"
        )
    return wanted


def read_manifest(shards_root: str) -> dict:
    """The manifest of a complete shard set.

    Raises:
        ManifestError: if there is none (prepare has not finished) or its schema is unknown.
    """
    uri = storage.join(shards_root, MANIFEST)
    try:
        manifest = storage.read_json(uri)
    except FileNotFoundError:
        raise ManifestError(f"no shard manifest at {uri}: run `tsgd-ray prepare` first") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"{uri}: shard schema version {manifest.get('schema_version')} is not {SCHEMA_VERSION}; prepare again"
        )
    return manifest


def shard_uris(shards_root: str, manifest: dict, split: str) -> list[str]:
    """The URIs of the non-empty shards of `split`."""
    return [storage.join(shards_root, s["path"]) for s in manifest["shards"] if s["split"] == split and s["rows"] > 0]


def train_shards(shards_root: str, manifest: dict) -> list[dict]:
    """The non-empty training shards of `manifest` (`read_manifest(shards_root)`), each {"uri",
    "rows"}, in manifest order."""
    return [
        {"uri": storage.join(shards_root, s["path"]), "rows": s["rows"]}
        for s in manifest["shards"]
        if s["split"] == "train" and s["rows"] > 0
    ]


# The settings a shard set is made from (the rest of `data` only changes how clips are decoded).
_SHARD_SETTINGS = (
    "dataset",
    "root",
    "annotations",
    "split_id",
    "classes",
    "on_catalog_error",
    "extensions",
    "builtin",
    "shard_target_mb",
    "transcode_short_side",
)


def source_hash(cfg: DictConfig) -> str:
    """Identifies the dataset and settings a shard set was prepared from (without listing it)."""
    data = to_dict(cfg)["data"]
    text = json.dumps(
        {"schema": SCHEMA_VERSION, "seed": cfg.seed, **{k: data[k] for k in _SHARD_SETTINGS}}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def finished_manifest(cfg: DictConfig) -> dict | None:
    """The manifest of this config's finished shard set, or None; nothing is listed.

    Raises:
        ManifestError: the shards root holds a set prepared from another dataset or setting.
    """
    uri = storage.join(shards_root(cfg), MANIFEST)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    if "source_hash" not in manifest:
        raise ManifestError(f"{uri} was written by an older tsgd-ray; prepare again into a new data.shards")
    if manifest["source_hash"] != source_hash(cfg):
        raise ManifestError(f"{uri} describes another dataset or setting; use a new data.shards")
    return manifest
