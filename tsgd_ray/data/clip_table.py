"""The one format of decoded clips on disk (the clip cache, init clips, synthetic videos) and its
one reader.

A clip table is a Parquet file of CLIP_SCHEMA rows: the clip as uint8 (F, H, W, 3) bytes, RGB,
frames first (the layout of decoded clips), its label, its index within its class, the video it
came from, which decoded window of that video it is, and an optional heat map. Every clip of a
table has the same size, so the values of the `clip` column lie back to back in its data buffer:
`rows` reads them as one (N, F, H, W, 3) view of that buffer, not N Python bytes objects.

Init clips and synthetic videos are written `by_class`: rows sorted by (label, index), row groups
that never mix classes and stay under ROW_GROUP_BYTES, so a reader takes just the classes (or the
rows) it needs, one row group at a time. A clip-cache file is one decoded block, rows as decoded,
one row group per clip, so `read_rows` fetches just the clips it names (init's chosen clips).
"""

from __future__ import annotations

import io
import itertools
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tsgd_ray import storage

ROW_GROUP_BYTES = 128 * 2**20

CLIP_SCHEMA = pa.schema(
    [
        ("label", pa.int32()),
        ("index", pa.int32()),  # the video's index within its class (its random stream); 0 in the clip cache
        ("video_id", pa.string()),  # the real video it came from ("" for noise init)
        ("view", pa.int16()),  # which decoded window of that video (the clip cache's views; 0 elsewhere)
        ("clip", pa.binary()),  # uint8 (F, H, W, 3), RGB, frames first: the layout of decoded clips
        # synthetic videos: uint8 (H, W), 255 * the time-mean of the init clip's saliency (TSGFA's map);
        # empty elsewhere
        ("heat", pa.binary()),
        # synthetic videos with stored labels (tsgd_ray.core.labels): float32 (K, 7) view parameters
        # and float16 (K, classes) teacher logits on those views; empty elsewhere
        ("view_params", pa.binary()),
        ("logits", pa.binary()),
    ]
)


def _binary(values: Optional[np.ndarray], rows: np.ndarray) -> pa.Array:
    return pa.array([values[i].tobytes() if values is not None else b"" for i in rows], pa.binary())


def _table(
    clips: np.ndarray,
    labels: np.ndarray,
    video_ids: Sequence[str],
    rows: np.ndarray,
    indices: Optional[np.ndarray],
    views: Optional[np.ndarray],
    heats: Optional[np.ndarray],
    stored: Optional[tuple[np.ndarray, np.ndarray]],
) -> pa.Table:
    return pa.table(
        {
            "label": pa.array(labels[rows], pa.int32()),
            "index": pa.array(indices[rows] if indices is not None else np.zeros(len(rows)), pa.int32()),
            "video_id": pa.array([str(video_ids[i]) for i in rows], pa.string()),
            "view": pa.array(views[rows] if views is not None else np.zeros(len(rows)), pa.int16()),
            "clip": _binary(clips, rows),
            "heat": _binary(heats, rows),
            "view_params": _binary(stored[0] if stored else None, rows),
            "logits": _binary(stored[1] if stored else None, rows),
        },
        schema=CLIP_SCHEMA,
    )


def clip_table_bytes(
    clips: np.ndarray,
    labels: np.ndarray,
    indices: Optional[np.ndarray],
    video_ids: Sequence[str],
    heats: Optional[np.ndarray] = None,
    views: Optional[np.ndarray] = None,
    by_class: bool = True,
    compression: str = "none",
    stored: Optional[tuple[np.ndarray, np.ndarray]] = None,
    group_rows: int = 0,
) -> bytes:
    """A Parquet clip table of uint8 clips (N, F, H, W, 3) (and uint8 heat maps (N, H, W), and
    stored labels: view parameters float32 (N, K, 7) with logits float16 (N, K, classes), if
    given; `views` is the decoded window of each clip). by_class: rows in (label, index) order,
    row groups of one class each (split further to stay under ROW_GROUP_BYTES); else rows as
    given, in row groups of `group_rows` rows (0: one row group)."""
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, CLIP_SCHEMA, compression=compression, use_dictionary=False) as writer:
        if by_class:
            order = np.lexsort((indices, labels))
            per_group = max(1, ROW_GROUP_BYTES // max(1, clips[0].nbytes)) if len(clips) else 1
            groups = [
                part
                for label in np.unique(labels)
                for rows in [order[labels[order] == label]]
                for part in np.split(rows, range(per_group, len(rows), per_group))
            ]
        else:
            cuts = range(group_rows, len(labels), group_rows) if group_rows else []
            groups = np.split(np.arange(len(labels)), cuts)
        for part in groups:
            table = _table(clips, labels, video_ids, part, indices, views, heats, stored)
            writer.write_table(table, row_group_size=len(part))
    return buf.getvalue()


def _packed(column: pa.ChunkedArray, shape: Sequence[int], dtype=np.uint8) -> Optional[np.ndarray]:
    """The values of a binary column of equal-sized items as one (N, *shape) array of `dtype`: a
    view of its data buffer for uint8 (no copy for a single chunk), a copy for wider types (the
    buffer need not be aligned); None when the items are empty. `shape` may hold one -1."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return None if -1 in shape else np.empty((0, *shape), dtype)
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset : array.offset + len(array) + 1]
    if offsets[-1] == offsets[0]:
        return None
    values = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    if dtype != np.uint8:
        values = values.copy().view(dtype)
    return values.reshape(len(array), *shape)


def rows(table: pa.Table, shape: Sequence[int]) -> dict[str, Any]:
    """A clip table's rows as arrays: {"clip": (N, *shape) uint8 view of the column's buffer,
    "label", "index", "view": (N,) int64, "video_id": [N], "heat": (N, H, W) uint8 view or None,
    "view_params": (N, K, 7) float32 or None, "logits": (N, K, classes) float16 or None}.
    Columns missing from `table` (read with `columns=`, or a table written before they existed)
    are left out, except that "view_params" and "logits" are then None."""
    out: dict[str, Any] = {}
    names = table.column_names
    if "clip" in names:
        out["clip"] = _packed(table.column("clip"), shape)
    if "heat" in names:
        out["heat"] = _packed(table.column("heat"), shape[1:3])
    params = table.column("view_params") if "view_params" in names else None
    out["view_params"] = _packed(params, (-1, 7), np.float32) if params is not None else None
    out["logits"] = None
    if out["view_params"] is not None and "logits" in names:
        out["logits"] = _packed(table.column("logits"), (out["view_params"].shape[1], -1), np.float16)
    for name in ("label", "index", "view"):
        if name in names:
            out[name] = table.column(name).to_numpy().astype(np.int64)
    if "video_id" in names:
        out["video_id"] = table.column("video_id").to_pylist()
    return out


def read_rows(uri: str, wanted: Sequence[int], shape: Sequence[int]) -> dict[str, Any]:
    """Rows `wanted` (indices within the file, any order, repeats allowed) of the clip table at
    `uri` as `rows` gives them, in that order, reading only the row groups that hold them."""
    with storage.open_parquet(uri) as f:
        parquet = pq.ParquetFile(f)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        wanted = np.asarray(wanted, dtype=np.int64)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= starts[-1]):
            raise IndexError(f"{uri} holds {starts[-1]} rows, not rows {sorted(set(wanted.tolist()))}")
        groups = sorted(set((np.searchsorted(starts, wanted, side="right") - 1).tolist()))
        table = parquet.read_row_groups(groups, columns=["clip", "label", "index", "video_id", "view"])
    read_starts = np.cumsum([0, *[sizes[g] for g in groups]])
    position = {g: int(read_starts[i] - starts[g]) for i, g in enumerate(groups)}
    at = [position[int(np.searchsorted(starts, w, side="right") - 1)] + int(w) for w in wanted]
    return rows(table.take(at), shape)


def read_clip_tables(
    uris: Sequence[str], shape: Sequence[int], classes: Optional[set[int]] = None, rank: int = 0, world: int = 1
) -> Iterator[dict[str, Any]]:
    """Rows of clip tables, one row group at a time: only the row groups of `classes` (all when
    None), and of those only the share of reader `rank` of `world`: whole row groups, dealt
    largest first to the reader with the fewest rows, when there are at least `world` of them (a
    reader then reads 1/world of the bytes; a synthetic set's groups hold one class each, so a
    reader's rows cover about 1/world of the classes), else every `world`-th row (every group read).

    Yields {"clips": (n, F, H, W, 3) uint8 tensor, "labels": (n,), "indices": (n,), "video_ids": [n],
    "heat": (n, H, W) uint8 tensor, "view_params": (n, K, 7) float32, "logits": (n, K, classes) float16,
    each of the last three None where the table holds none}.
    """
    groups = _row_groups(uris, classes)
    dealt = world > 1 and len(groups) >= world
    seen = 0
    for uri, of_file in itertools.groupby(_deal(groups, world)[rank] if dealt else groups, key=lambda t: t[0]):
        with storage.open_parquet(uri) as f:
            parquet = pq.ParquetFile(f)
            for _, g, _ in of_file:
                group = rows(parquet.read_row_group(g), shape)
                labels = group["label"]
                keep = np.ones(len(labels), bool) if classes is None else np.isin(labels, list(classes))
                positions = np.flatnonzero(keep)
                take = positions if dealt else positions[(seen + np.arange(len(positions))) % world == rank]
                seen += len(positions)
                if not len(take):
                    continue
                optional = {
                    name: torch.from_numpy(group[name][take]) if group.get(name) is not None else None
                    for name in ("heat", "view_params", "logits")
                }
                yield {
                    "clips": torch.from_numpy(group["clip"][take]),
                    **optional,
                    "labels": torch.from_numpy(labels[take]),
                    "indices": torch.from_numpy(group["index"][take]),
                    "video_ids": [group["video_id"][i] for i in take],
                }


def _row_groups(uris: Sequence[str], classes: Optional[set[int]]) -> list[tuple[str, int, int]]:
    """(uri, row group, rows) of every row group that may hold `classes` (all when None; by the
    label column's statistics), in file order; reads only the files' footers."""
    found = []
    for uri in uris:
        with storage.open_parquet(uri) as f:
            metadata = pq.ParquetFile(f).metadata
        label_column = metadata.schema.to_arrow_schema().get_field_index("label")
        for g in range(metadata.num_row_groups):
            meta = metadata.row_group(g)
            st = meta.column(label_column).statistics
            if (
                classes is not None
                and st is not None
                and st.has_min_max
                and not any(st.min <= c <= st.max for c in classes)
            ):
                continue
            found.append((uri, g, meta.num_rows))
    return found


def _deal(groups: list[tuple[str, int, int]], world: int) -> list[list[tuple[str, int, int]]]:
    """`groups` (uri, group, rows) dealt to `world` readers, largest first to the reader with the
    fewest rows (ties: the lower rank), each reader's share back in file order."""
    load, shares = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(groups)), key=lambda i: (-groups[i][2], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += groups[i][2]
    return [[groups[i] for i in sorted(share)] for share in shares]


def concat_clips(parts: Sequence[dict[str, Any]], shape: Sequence[int]) -> dict[str, Any]:
    """The batches of `read_clip_tables` as one (possibly empty) batch."""
    if not parts:
        return {
            "clips": torch.empty((0, *shape), dtype=torch.uint8),
            "labels": torch.empty(0, dtype=torch.int64),
            "indices": torch.empty(0, dtype=torch.int64),
            "video_ids": [],
            "heat": None,
            "view_params": None,
            "logits": None,
        }
    optional = {}
    for name in ("heat", "view_params", "logits"):
        values = [p.get(name) for p in parts]
        optional[name] = torch.cat(values) if all(v is not None for v in values) else None
    return {
        "clips": torch.cat([p["clips"] for p in parts]),
        "labels": torch.cat([p["labels"] for p in parts]),
        "indices": torch.cat([p["indices"] for p in parts]),
        "video_ids": [v for p in parts for v in p["video_ids"]],
        **optional,
    }
