"""The distilled set as a product: `SyntheticVideos`, a torch Dataset over a merged set read by
URI, and `export`, which writes it as MP4 files, safetensors or WebDataset shards.

A merged set is the folder `tsgd-ray merge` writes (`<output_root>/distill/<hash>/synthetic`, local
or object storage): manifest.json and Parquet clip tables (see `tsgd_ray.artifacts`).
Both read it one row group at a time, so memory stays at one group whatever the set's size.

Train a model on one::

    from torch.utils.data import DataLoader
    from tsgd_ray import SyntheticVideos

    data = SyntheticVideos("s3://bucket/tsgd/ucf101/distill/3f2a.../synthetic")
    for clips, labels in DataLoader(data, batch_size=16, shuffle=True, num_workers=2):
        loss = torch.nn.functional.cross_entropy(model(clips), labels)  # clips (16, 3, F, H, W)

or with the labels stored in the set (no teacher needed; evaluate.labels=stored does the same)::

    from tsgd_ray import replay

    data = SyntheticVideos(uri, stored_labels=True)
    for clips, labels, views, logits in DataLoader(data, batch_size=16, shuffle=True):
        x, target = replay(clips, views, logits, generator)  # one stored view per clip, its logits
        loss = kl_div(log_softmax(model(x) / 4, 1), softmax(target / 4, 1), reduction="batchmean") * 16
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from tsgd_ray import artifacts, layout, storage
from tsgd_ray.data import clip_table
from tsgd_ray.errors import UserError

FORMATS = ("mp4", "safetensors", "webdataset")
PART_BYTES = 1 << 30  # safetensors files and WebDataset shards of about 1 GiB


class ExportError(UserError, ValueError):
    """Not a merged synthetic set, or an export that would overwrite another."""


def read_manifest(uri: str) -> dict:
    """The manifest of the merged set at `uri`.

    Raises:
        ExportError: no merged set there.
    """
    try:
        return artifacts.read_synthetic_manifest(uri)
    except FileNotFoundError:
        raise ExportError(
            f"no merged synthetic set at {uri} (no {layout.SYNTHETIC_MANIFEST}; run `tsgd-ray merge` first)"
        ) from None


class SyntheticVideos(Dataset):
    """A merged synthetic set as a map-style torch Dataset.

    `dataset[i]` is (clip, label): the clip float32 (3, F, H, W) normalised with the set's mean and
    std (the teacher's input), or uint8 (F, H, W, 3) with `normalize=False`; the label an int.
    With `stored_labels=True` two more items: the stored views' parameters (K, 7) float32 and the
    teacher's logits on them (K, num_classes) float32 (`tsgd_ray.replay` applies one per clip).
    With `soft_labels=True` one more: the set's teacher's logits (num_classes,) on the clip as is
    (this loads the teacher). `classes` names the labels; `clip_shape` is (F, H, W, 3);
    `manifest` is the set's manifest; `stored_views` is K (0: the set stores no labels).
    Items are read one Parquet row group at a time (one class per group), cached per process.

    Raises:
        ExportError: no merged set at `uri`, or stored labels asked of a set that has none.
    """

    def __init__(self, uri: str, normalize: bool = True, soft_labels: bool = False, stored_labels: bool = False):
        self.uri = uri.rstrip("/")
        self.manifest = read_manifest(self.uri)
        self.stored_views = (self.manifest.get("stored_labels") or {}).get("views", 0)
        if stored_labels and not self.stored_views:
            raise ExportError(f"{self.uri}: this set stores no labels (distill.labels.views was 0, or an older set)")
        self.stored_labels = stored_labels
        self.classes: list[str] = self.manifest["classes"]
        self.clip_shape = tuple(self.manifest["clip_shape"])
        self.normalize = normalize
        self._rows: list[tuple[int, int, int]] = []  # (file, row group, row in group)
        labels = []
        for f, entry in enumerate(self.manifest["files"]):
            with storage.open_parquet(storage.join(self.uri, entry["path"])) as handle:
                parquet = pq.ParquetFile(handle)
                for g in range(parquet.num_row_groups):
                    group = parquet.read_row_group(g, columns=["label"]).column("label").to_numpy()
                    labels.append(group)
                    self._rows += [(f, g, r) for r in range(len(group))]
        self.labels = (
            torch.from_numpy(np.concatenate(labels).astype(np.int64)) if labels else torch.empty(0, dtype=torch.int64)
        )
        self._cached: tuple[tuple[int, int], Any] = ((-1, -1), None)
        self._teacher = self._load_teacher() if soft_labels else None

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int):
        f, g, r = self._rows[i]
        if self._cached[0] != (f, g):
            columns = ["clip", "view_params", "logits"] if self.stored_labels else ["clip"]
            with storage.open_parquet(storage.join(self.uri, self.manifest["files"][f]["path"])) as handle:
                group = pq.ParquetFile(handle).read_row_group(g, columns=columns)
            self._cached = ((f, g), clip_table.rows(group, self.clip_shape))
        rows = self._cached[1]
        clip = torch.from_numpy(rows["clip"][r].copy())
        label = int(self.labels[i])
        if self.normalize or self._teacher is not None:
            model_input = self._model_input(clip)
        item = (model_input if self.normalize else clip, label)
        if self.stored_labels:
            item += (torch.from_numpy(rows["view_params"][r]), torch.from_numpy(rows["logits"][r]).float())
        if self._teacher is not None:
            with torch.no_grad():
                item += (self._teacher(model_input[None])[0],)
        return item

    def _model_input(self, clip: torch.Tensor) -> torch.Tensor:
        from tsgd_ray.core.clips import to_model_input

        return to_model_input(clip[None], self.manifest["mean"], self.manifest["std"])[0]

    def _load_teacher(self) -> torch.nn.Module:
        from tsgd_ray.core.models import build_model, load_checkpoint

        teacher = self.manifest.get("teacher")
        if not teacher:
            raise ExportError(
                f"{self.uri}: this set's manifest does not name its teacher (merged by an older "
                "tsgd-ray); soft labels need it"
            )
        model = build_model(
            teacher["model"], len(self.classes), self.clip_shape[:3], teacher["width"], teacher["depth"]
        )
        return load_checkpoint(model, storage.read_bytes(teacher["uri"]), self.classes).eval()

    def __getstate__(self) -> dict:  # DataLoader workers start with an empty cache
        return {**self.__dict__, "_cached": ((-1, -1), None)}

    def groups(self) -> Iterator[dict[str, Any]]:
        """The set one row group at a time, as `clip_table.read_clip_tables` yields it."""
        uris = [storage.join(self.uri, f["path"]) for f in self.manifest["files"]]
        yield from clip_table.read_clip_tables(uris, self.clip_shape)


def export(uri: str, to: str, fmt: str) -> dict:
    """Write the merged set at `uri` under `to` as `fmt` (one of FORMATS); returns a summary.

    - mp4: `<class>/<index>-<init video id>.mp4` (H.264 crf 18: lossy) per video, and classes.json;
      stored labels in labels.safetensors (`view_params`, `logits` in the order of the metadata's
      `files`);
    - safetensors: `part-00000.safetensors` ... with `clips` uint8 (N, F, H, W, 3) and `labels`
      int64 (N,), and the stored labels `view_params` float32 (N, K, 7) and `logits` float16
      (N, K, classes), the class names in each file's metadata;
    - webdataset: `shard-00000.tar` ... with `<key>.npy` (uint8 clip), `<key>.cls`, `<key>.json`,
      and the stored labels `<key>.view_params.npy`, `<key>.logits.npy`.

    Every file is written once: an export into a folder that already holds one stops.

    Raises:
        ExportError: no merged set at `uri`, an unknown format, or `to` already holds an export.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format: one of {', '.join(FORMATS)}, got {fmt!r}")
    data = SyntheticVideos(uri, normalize=False)
    to = storage.absolute(to).rstrip("/")
    index = storage.join(to, "export.json")
    if storage.exists(index):
        raise ExportError(f"{to} already holds an export ({index}); choose another --to")
    files = {"mp4": _mp4, "safetensors": _safetensors, "webdataset": _webdataset}[fmt](data, to)
    summary = {
        "stored_labels": data.manifest.get("stored_labels"),
        "source": uri,
        "format": fmt,
        "videos": len(data),
        "classes": data.classes,
        "clip_shape": list(data.clip_shape),
        "files": files,
        "method": data.manifest["method"],
        "ipc": data.manifest["ipc"],
        "mean": data.manifest["mean"],
        "std": data.manifest["std"],
    }
    storage.write_once(index, json.dumps(summary, indent=2).encode())
    return summary


def _write(to: str, name: str, payload: bytes) -> str:
    if not storage.write_once(storage.join(to, name), payload):
        raise ExportError(f"{storage.join(to, name)} exists; choose another --to")
    return name


def _mp4(data: SyntheticVideos, to: str) -> list[str]:
    from tsgd_ray.data.video import encode_mp4

    files, stored = [], []
    for group in data.groups():
        for clip, label, index, video_id in zip(group["clips"], group["labels"], group["indices"], group["video_ids"]):
            frames = clip.numpy()
            frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
            source = re.sub(r"[^\w.-]+", "_", video_id)  # the init clip's video id, as a file name
            name = f"{data.classes[int(label)]}/{int(index):03d}{'-' + source if source else ''}.mp4"
            files.append(_write(to, name, encode_mp4(frames, fps=8)))
        if group["view_params"] is not None:
            stored.append(group)
    _write(to, "classes.json", json.dumps(data.classes).encode())
    if stored:  # one small file beside the videos: the labels of every one, in `files` order
        from safetensors.torch import save

        tensors = {name: torch.cat([g[name] for g in stored]) for name in ("view_params", "logits")}
        files.append(_write(to, "labels.safetensors", save(tensors, metadata={"files": json.dumps(files)})))
    return files


def _batches(data: SyntheticVideos) -> Iterator[dict[str, Any]]:
    """Row groups gathered into batches of about PART_BYTES."""
    pending: list[dict] = []
    size = 0
    for group in data.groups():
        pending.append(group)
        size += group["clips"].numel()
        if size >= PART_BYTES:
            yield clip_table.concat_clips(pending, data.clip_shape)
            pending, size = [], 0
    if pending:
        yield clip_table.concat_clips(pending, data.clip_shape)


def _safetensors(data: SyntheticVideos, to: str) -> list[str]:
    from safetensors.torch import save

    files = []
    for part, batch in enumerate(_batches(data)):
        tensors = {"clips": batch["clips"].contiguous(), "labels": batch["labels"]}
        if batch["view_params"] is not None:
            tensors.update(view_params=batch["view_params"], logits=batch["logits"])
        payload = save(
            tensors,
            metadata={"classes": json.dumps(data.classes), "layout": "uint8 RGB (N, F, H, W, 3)"},
        )
        files.append(_write(to, f"part-{part:05d}.safetensors", payload))
    return files


def _npy(tensor: torch.Tensor) -> bytes:
    array = io.BytesIO()
    np.save(array, tensor.numpy())
    return array.getvalue()


def _webdataset(data: SyntheticVideos, to: str) -> list[str]:
    files = []
    for part, batch in enumerate(_batches(data)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for row, (clip, label, index) in enumerate(zip(batch["clips"], batch["labels"], batch["indices"])):
                key = f"{int(label):05d}-{int(index):03d}"
                meta = {"label": int(label), "class": data.classes[int(label)], "index": int(index)}
                members = [("npy", _npy(clip)), ("cls", str(int(label)).encode()), ("json", json.dumps(meta).encode())]
                if batch["view_params"] is not None:
                    members += [
                        ("view_params.npy", _npy(batch["view_params"][row])),
                        ("logits.npy", _npy(batch["logits"][row])),
                    ]
                for suffix, payload in members:
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        files.append(_write(to, f"shard-{part:05d}.tar", buffer.getvalue()))
    return files
