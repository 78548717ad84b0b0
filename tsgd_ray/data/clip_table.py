"""The clip table: a Parquet file of decoded uint8 clips (init clips, synthetic videos), and its reader.

Rows of CLIP_SCHEMA sorted by (label, index), with row groups that never mix classes and stay
under ROW_GROUP_BYTES, so a reader takes just the classes (or the rows) it needs, one row group at
a time.
"""

from __future__ import annotations

import io
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
        ("index", pa.int32()),  # the video's index within its class (its random stream)
        ("video_id", pa.string()),  # the real clip it started from ("" for noise init)
        ("clip", pa.binary()),  # uint8 (F, H, W, 3), RGB, frames first: the layout of decoded clips
        # synthetic videos: uint8 (H, W), 255 * the time-mean of the init clip's saliency (TSGFA's map);
        # empty in init tables
        ("heat", pa.binary()),
    ]
)


def clip_table_bytes(
    clips: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    video_ids: Sequence[str],
    heats: Optional[np.ndarray] = None,
) -> bytes:
    """A Parquet clip table of uint8 clips (N, F, H, W, 3) (and uint8 heat maps (N, H, W), if
    given): rows in (label, index) order, row groups of one class each (split further to stay under
    ROW_GROUP_BYTES)."""
    order = np.lexsort((indices, labels))
    per_group = max(1, ROW_GROUP_BYTES // max(1, clips[0].nbytes)) if len(clips) else 1
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, CLIP_SCHEMA, compression="none", use_dictionary=False) as writer:
        for label in np.unique(labels):
            rows = order[labels[order] == label]
            for start in range(0, len(rows), per_group):
                part = rows[start : start + per_group]
                writer.write_table(
                    pa.table(
                        {
                            "label": pa.array(labels[part], pa.int32()),
                            "index": pa.array(indices[part], pa.int32()),
                            "video_id": pa.array([str(video_ids[i]) for i in part], pa.string()),
                            "clip": pa.array([clips[i].tobytes() for i in part], pa.binary()),
                            "heat": pa.array(
                                [heats[i].tobytes() if heats is not None else b"" for i in part], pa.binary()
                            ),
                        },
                        schema=CLIP_SCHEMA,
                    ),
                    row_group_size=len(part),
                )
    return buf.getvalue()


def read_clip_tables(
    uris: Sequence[str], shape: Sequence[int], classes: Optional[set[int]] = None, rank: int = 0, world: int = 1
) -> Iterator[dict[str, Any]]:
    """Rows of clip tables, one row group at a time: only the row groups of `classes` (all when
    None), and of those rows only every `world`-th from `rank` (counted over all rows read).

    Yields {"clips": (n, F, H, W, 3) uint8 tensor, "labels": (n,), "indices": (n,), "video_ids": [n],
    "heat": (n, H, W) uint8 tensor, or None where the table holds no heat maps}.
    """
    seen = 0
    for uri in uris:
        with storage.open_parquet(uri) as f:
            parquet = pq.ParquetFile(f)
            label_column = parquet.schema_arrow.get_field_index("label")
            for g in range(parquet.num_row_groups):
                meta = parquet.metadata.row_group(g)
                st = meta.column(label_column).statistics
                if (
                    classes is not None
                    and st is not None
                    and st.has_min_max
                    and not any(st.min <= c <= st.max for c in classes)
                ):
                    continue
                table = parquet.read_row_group(g)
                labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
                keep = np.ones(len(labels), bool) if classes is None else np.isin(labels, list(classes))
                positions = np.flatnonzero(keep)
                take = positions[(seen + np.arange(len(positions))) % world == rank]
                seen += len(positions)
                if not len(take):
                    continue
                blobs = table.column("clip").take(pa.array(take)).to_pylist()
                heat = table.column("heat").take(pa.array(take)).to_pylist() if "heat" in table.column_names else []
                yield {
                    "clips": torch.from_numpy(np.stack([np.frombuffer(b, np.uint8).reshape(shape) for b in blobs])),
                    "heat": torch.from_numpy(np.stack([np.frombuffer(h, np.uint8).reshape(shape[1:3]) for h in heat]))
                    if heat and all(heat)
                    else None,
                    "labels": torch.from_numpy(labels[take]),
                    "indices": torch.from_numpy(np.asarray(table.column("index").to_numpy(), dtype=np.int64)[take]),
                    "video_ids": table.column("video_id").take(pa.array(take)).to_pylist(),
                }


def concat_clips(parts: Sequence[dict[str, Any]], shape: Sequence[int]) -> dict[str, Any]:
    """The batches of `read_clip_tables` as one (possibly empty) batch."""
    if not parts:
        return {
            "clips": torch.empty((0, *shape), dtype=torch.uint8),
            "labels": torch.empty(0, dtype=torch.int64),
            "indices": torch.empty(0, dtype=torch.int64),
            "video_ids": [],
            "heat": None,
        }
    heats = [p["heat"] for p in parts]
    return {
        "clips": torch.cat([p["clips"] for p in parts]),
        "labels": torch.cat([p["labels"] for p in parts]),
        "indices": torch.cat([p["indices"] for p in parts]),
        "video_ids": [v for p in parts for v in p["video_ids"]],
        "heat": torch.cat(heats) if all(h is not None for h in heats) else None,
    }
