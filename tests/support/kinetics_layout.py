"""A generated dataset in the Kinetics layout, of any size, for tests and the scale benchmark.

    <root>/videos/<split>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4
    <root>/annotations/train.csv, validate.csv   (label,youtube_id,time_start,time_end,split)

Videos are real H.264 files: `distinct` of them are encoded (a square moving at a class-dependent
speed and direction over noise), and the rest are hard links to those (or copies where links are
not possible), so 16k clips cost what 64 encodes cost. `missing` rows per split name files that do
not exist, as every real copy of Kinetics has.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

SPLITS = {"train": "train.csv", "val": "validate.csv"}


def encode_clip(path: Path, seed: int, frames: int = 8, size: int = 32) -> None:
    """A real H.264 MP4: a bright square crossing a noisy background in a seed-given direction."""
    import av

    rng = np.random.default_rng(seed)
    dx, dy = rng.integers(-3, 4, size=2)
    side = max(4, size // 4)
    x0, y0 = rng.integers(0, size - side, size=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            frame = (rng.random((size, size, 3)) * 60 + 40).astype(np.uint8)
            x, y = (x0 + dx * t) % (size - side), (y0 + dy * t) % (size - side)
            frame[y : y + side, x : x + side] = (230, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_kinetics_layout(
    root: Path,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    missing: int = 0,
    distinct: int = 64,
    frames: int = 8,
    size: int = 32,
) -> dict:
    """Write the layout under `root`; returns {"classes": [...], "present": {split: n}, "missing": {split: n}}."""
    pool = root / "_encoded"
    sources = [pool / f"{i:04d}.mp4" for i in range(distinct)]
    for i, path in enumerate(sources):
        if not path.exists():
            encode_clip(path, i, frames, size)
    labels = [f"action {c:04d}" for c in range(classes)]  # Kinetics labels hold spaces
    counts = {"train": train_per_class, "val": val_per_class}
    present = {s: 0 for s in SPLITS}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, file_name in SPLITS.items():
        with open(root / "annotations" / file_name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for c, label in enumerate(labels):
                for i in range(counts[split]):
                    youtube_id = f"{split[0]}{c:04d}x{i:05d}"
                    writer.writerow([label, youtube_id, 10 * i, 10 * i + 10, split])
                    target = root / "videos" / split / label / f"{youtube_id}_{10 * i:06d}_{10 * i + 10:06d}.mp4"
                    if not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        _link(sources[(c * 7 + i) % distinct], target)
                    present[split] += 1
            for m in range(missing):
                writer.writerow([labels[m % classes], f"gone{split}{m:05d}", 0, 10, split])
    return {"classes": labels, "present": present, "missing": {s: missing for s in SPLITS}}


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())
