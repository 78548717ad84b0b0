"""What every dataset catalog shares: the records, the file index and the builder that matches them.

Layouts (one module each in this package): UCF101 split lists, HMDB51 split files, Kinetics
CSVs with downloader file names, Something-Something v2 JSON, a generic ``path,label[,split]``
CSV, and class-folder trees ``root/[train|val|test/]<class>/*.<ext>``.

Files are found with one recursive listing of the dataset root, matched by file name (case
insensitive), so a layout with or without its top folder (``UCF-101/``) and flat or per-class
Kinetics folders all work. Missing files and unknown labels either stop with a
:class:`CatalogError` listing a few examples, or are skipped and counted
(``data.on_catalog_error=skip``).
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.config import OnCatalogError
from tsgd_ray.errors import UserError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
EXAMPLES_SHOWN = 5


class CatalogError(UserError, ValueError):
    """The dataset on disk does not match its layout; the message shows a few examples."""


@dataclass(frozen=True)
class VideoRecord:
    """One labelled video. `label` indexes `Catalog.classes`; `video_id` is unique and stable."""

    uri: str
    label: int
    class_name: str
    split: str
    video_id: str


@dataclass
class Catalog:
    root: str  # where the videos were looked up
    classes: list[str]
    records: list[VideoRecord]
    skipped: list[dict] = field(default_factory=list)  # {"uri": ..., "reason": ...}
    sizes: dict[str, int] = field(default_factory=dict)  # bytes per video URI, from the one listing

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of records per split and class name."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for r in self.records:
            out[r.split][r.class_name] += 1
        return {s: dict(c) for s, c in out.items()}


def normalise_split(name: str) -> Optional[str]:
    return _SPLIT_ALIASES.get(name.strip().lower())


def _stem(path: str) -> str:
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[0] if "." in base else base


class FileIndex:
    """The video files under a root, found by file name (any case, with or without extension)."""

    def __init__(self, root: str, extensions: Iterable[str]):
        self.root = storage.absolute(root).rstrip("/")
        self.sizes = storage.file_sizes(self.root, extensions)  # the one listing of the dataset
        self.files = sorted(self.sizes)
        self._by_stem: dict[str, list[str]] = defaultdict(list)
        for uri in self.files:
            self._by_stem[_stem(uri).lower()].append(uri)
        self._parents: Optional[dict[str, str]] = None

    def expected(self, name: str) -> str:
        """Where the missing file `name` (relative, e.g. ``Class/v_x.avi``) would be: under the
        folder that holds its sibling folders' files (``<root>/UCF-101/Class/v_x.avi`` when the
        others live there), else under the root."""
        if self._parents is None:  # built on the first miss: one pass over the listing
            self._parents = {}
            for uri in self.files:
                parent, folder = posixpath.split(posixpath.dirname(uri))
                self._parents.setdefault(folder.lower(), parent)
        parts = name.strip("/").split("/")
        parent = self._parents.get(parts[0].lower()) if len(parts) > 1 else None
        return storage.join(parent or self.root, *parts)

    def find(self, name: str) -> Optional[str]:
        """The URI of the file called `name` (a relative path or a bare name), or None.

        When several files share the stem, the one whose path ends with `name` wins.
        """
        candidates = self._by_stem.get(_stem(name).lower(), [])
        if len(candidates) == 1:
            return candidates[0]
        suffix = name.lower().lstrip("/")
        suffix_no_ext = suffix.rsplit(".", 1)[0] if "." in posixpath.basename(suffix) else suffix
        for uri in candidates:
            low = uri.lower()
            if low.endswith("/" + suffix) or low.rsplit(".", 1)[0].endswith("/" + suffix_no_ext):
                return uri
        return None

    def video_id(self, uri: str) -> str:
        rel = uri[len(self.root) + 1 :] if uri.startswith(self.root + "/") else uri
        return rel.rsplit(".", 1)[0] if "." in posixpath.basename(rel) else rel


class _Builder:
    """Collects records and problems, then applies the config's policy and class restriction."""

    def __init__(self, index: FileIndex, classes: list[str]):
        self.index = index
        self.classes = classes
        self._class_index = {c: i for i, c in enumerate(classes)}
        self._class_by_lower = {c.lower(): c for c in classes}
        self.records: list[VideoRecord] = []
        self.problems: list[dict] = []
        self._seen: set[str] = set()

    def canonical_class(self, name: str) -> Optional[str]:
        return self._class_by_lower.get(name.strip().lower())

    def add(self, name: str, class_name: str, split: str, uri: Optional[str] = None) -> None:
        """Add the video `name` (found in the index unless `uri` is given) of `class_name`."""
        canonical = self.canonical_class(class_name)
        if canonical is None:
            self.problems.append({"uri": name, "reason": f"unknown label {class_name!r}"})
            return
        if uri is None:
            uri = self.index.find(name)
        if uri is None:
            self.problems.append({"uri": self.index.expected(name), "reason": "missing file"})
            return
        if uri in self._seen:
            return
        self._seen.add(uri)
        self.records.append(VideoRecord(uri, self._class_index[canonical], canonical, split, self.index.video_id(uri)))

    def build(self, data_cfg: DictConfig) -> Catalog:
        if self.problems and data_cfg.on_catalog_error == OnCatalogError.error:
            shown = "\n".join(f"  {p['uri']}: {p['reason']}" for p in self.problems[:EXAMPLES_SHOWN])
            raise CatalogError(
                f"{len(self.problems)} catalog problem(s) under {self.index.root}, e.g.:\n{shown}\n"
                "Fix the dataset, or set data.on_catalog_error=skip to skip and count them."
            )
        records = sorted(self.records, key=lambda r: (r.split, r.label, r.uri))
        sizes = {r.uri: self.index.sizes.get(r.uri, 0) for r in records}
        catalog = Catalog(self.index.root, self.classes, records, self.problems, sizes)
        return restrict_classes(catalog, list(data_cfg.classes))


def restrict_classes(catalog: Catalog, names: list[str]) -> Catalog:
    """Keep only the classes in `names` (kept in the catalog's order, relabelled 0..K-1).

    Raises:
        CatalogError: if a name is not a class of the dataset.
    """
    if not names:
        return catalog
    by_lower = {c.lower(): c for c in catalog.classes}
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown:
        raise CatalogError(
            f"data.classes: {len(unknown)} name(s) are not classes of the dataset: {unknown[:EXAMPLES_SHOWN]}; "
            f"it has {len(catalog.classes)}, e.g. {catalog.classes[:EXAMPLES_SHOWN]}"
        )
    wanted = {by_lower[n.lower()] for n in names}
    kept = [c for c in catalog.classes if c in wanted]
    new_label = {c: i for i, c in enumerate(kept)}
    records = [
        VideoRecord(r.uri, new_label[r.class_name], r.class_name, r.split, r.video_id)
        for r in catalog.records
        if r.class_name in wanted
    ]
    return Catalog(catalog.root, kept, records, catalog.skipped, {r.uri: catalog.sizes.get(r.uri, 0) for r in records})


def _read_text(uri: str) -> str:
    try:
        return storage.read_bytes(uri).decode("utf-8-sig")
    except FileNotFoundError:
        raise CatalogError(f"annotation file not found: {uri}") from None


def _annotation_dir(data_cfg: DictConfig, default_name: str) -> str:
    if data_cfg.annotations:
        return storage.absolute(data_cfg.annotations)
    root = storage.absolute(data_cfg.root)
    candidate = storage.join(root, default_name)
    return candidate if storage.exists(candidate) else root
