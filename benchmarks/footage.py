"""Motion footage: a benchmark dataset whose classes are camera motions over real footage.

Six classes in three pairs; in each pair the second class holds exactly the frames of the first
in reverse order, so only the ORDER of frames tells a pair apart:

    pan_right / pan_left, pan_down / pan_up, zoom_in / zoom_out

A clip is a square window moving over real frames while the scene's own motion (pedestrians,
cars, leaves) goes on inside it. Every state a class does not move is drawn from the law its
moving counterpart has at a uniformly random frame (the window's position and its size), so a
single-frame classifier stays at chance. Whole source videos are held out: train on SOURCES
"train" (pedestrians, a street with hard cuts, leaves), val and test on other footage.

The sources come from scripts/fetch_footage.py (a cache outside the repo). The clips are written
as H.264 MP4 in a class-folder tree (data.dataset=folder) under a root named by the settings;
a marker is written last, so a second call returns at once.

    python benchmarks/footage.py [--cache DIR] [--seed N]    # writes the tree, prints its root
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tsgd_ray.data.video import encode_mp4, resize_frames  # noqa: E402

#: split -> source files (whole videos; none is in two splits)
SOURCES = {
    "train": ["vtest.avi", "bikes.mp4", "tree.avi"],
    "val": ["carphone_pristine.mp4"],
    "test": ["cityCC0.mpg"],
}
PAIRS = [("pan_right", "pan_left"), ("pan_down", "pan_up"), ("zoom_in", "zoom_out")]
CLASSES = [name for pair in PAIRS for name in pair]
PER_CLASS = {"train": 60, "val": 100, "test": 100}
SIZE = 48  # clip side (pixels)
FRAMES = 8
SOURCE_SIDE = 128  # sources are scaled to this short side first
PAN = 3.0  # window travel per frame, in source pixels
LOG_SIDE = (math.log(32), math.log(48))  # the window side's law (source pixels)
ZOOM = 0.4  # log of the window side's change over a zoom clip
STRIDE = (1, 2)  # source frames between clip frames, drawn per clip
#: what names the tree (the first entry: the version of the generator)
SETTINGS = [2, SOURCES, PER_CLASS, SIZE, FRAMES, SOURCE_SIDE, PAN, LOG_SIDE, ZOOM, STRIDE]


def _fetcher():
    spec = importlib.util.spec_from_file_location("fetch_footage", REPO / "scripts" / "fetch_footage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source_frames(path: Path) -> np.ndarray:
    """Every decodable frame of a video, scaled to SOURCE_SIDE on its short side: (T, H, W, 3) uint8."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
    h, w = frames[0].shape[:2]
    scale = SOURCE_SIDE / min(h, w)
    return resize_frames(np.stack(frames), round(h * scale), round(w * scale))


def forward_clip(pair: int, rng: np.random.Generator, video: np.ndarray) -> np.ndarray:
    """The forward clip of class pair `pair` from `video` (T, H, W, 3): (FRAMES, SIZE, SIZE, 3) uint8."""
    progress = np.linspace(-0.5, 0.5, FRAMES)  # symmetric: reversing flips the sign
    offset = rng.choice(progress)
    log_side = rng.uniform(*LOG_SIDE)
    sides = np.exp(log_side - ZOOM * (progress if pair == 2 else np.full(FRAMES, offset)))  # shrinks: zoom in
    travel = PAN * (FRAMES - 1)
    t, h, w, _ = video.shape
    margin = sides.max() / 2 + travel / 2 + 1
    centre = np.array([rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)])
    # (y, x) per frame: a pan travels along one axis; every other axis sits where a pan along it
    # is at a random frame
    path = travel * rng.choice(progress, size=2)[None].repeat(FRAMES, 0)
    if pair < 2:
        path[:, 1 - pair] = travel * progress
    stride = int(rng.integers(STRIDE[0], STRIDE[1] + 1))
    start = int(rng.integers(0, t - stride * (FRAMES - 1)))
    out = []
    for i in range(FRAMES):
        cy, cx = centre + path[i]
        half = sides[i] / 2
        top, left = int(round(cy - half)), int(round(cx - half))
        side = int(round(sides[i]))
        crop = video[start + stride * i, top : top + side, left : left + side]
        out.append(resize_frames(np.ascontiguousarray(crop[None]), SIZE, SIZE)[0])
    return np.stack(out)


def dataset_root(cache: Path) -> Path:
    digest = hashlib.sha256(json.dumps(SETTINGS, sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"motion_footage-{digest}"


def ensure_footage_dataset(cache: Path = REPO / ".cache" / "footage-benchmark", seed: int = 0) -> Path:
    """Write the dataset unless its marker is there; returns its root (a data.dataset=folder tree).

    Raises:
        SystemExit: a source video is missing and cannot be fetched.
    """
    root = dataset_root(cache) / f"seed{seed}"
    marker = root / "_COMPLETE.json"
    if marker.exists():
        return root
    fetch = _fetcher()
    sources = fetch.default_cache()
    missing = [name for names in SOURCES.values() for name in names if not (sources / name).exists()]
    if missing and fetch.fetch(sources):
        raise SystemExit(f"footage sources {missing} are not in {sources}: run python scripts/fetch_footage.py")
    for split_index, (split, names) in enumerate(SOURCES.items()):
        videos = [source_frames(sources / name) for name in names]
        weights = np.array([len(v) for v in videos], dtype=float)
        for pair, (forward_name, backward_name) in enumerate(PAIRS):
            for index in range(PER_CLASS[split]):
                rng = np.random.default_rng([seed, split_index, pair, index])
                video = videos[rng.choice(len(videos), p=weights / weights.sum())]
                clip = forward_clip(pair, rng, video)
                for name, frames in ((forward_name, clip), (backward_name, clip[::-1])):
                    path = root / split / name / f"{name}_{index:05d}.mp4"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(encode_mp4(frames, 10))
    marker.write_text(json.dumps({"classes": CLASSES, "per_class": PER_CLASS, "sources": SOURCES}))
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "footage-benchmark")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(ensure_footage_dataset(args.cache, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
