"""benchmarks/footage.py: each class moves its window over the footage its own way."""

import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("footage", Path(__file__).parents[2] / "benchmarks" / "footage.py")
footage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(footage)


def ramps(frames=40, height=128, width=170):
    """Static frames: red rises with x, green with y (0..255 over the frame)."""
    ys, xs = np.mgrid[0:height, 0:width]
    frame = np.stack([xs * 255 / width, ys * 255 / height, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    return np.repeat(frame[None], frames, axis=0)


def test_pans_move_along_their_axis_and_zoom_in_narrows_the_window():
    video = ramps()
    for seed in range(5):
        clips = [footage.forward_clip(pair, np.random.default_rng(seed), video).astype(float) for pair in range(3)]
        assert all(c.shape == (footage.FRAMES, footage.SIZE, footage.SIZE, 3) for c in clips)
        red, green = ([c[..., k].mean(axis=(1, 2)) for c in clips] for k in (0, 1))
        span = [c[..., 0].max(axis=(1, 2)) - c[..., 0].min(axis=(1, 2)) for c in clips]  # the window's width
        assert (np.diff(red[0]) > 0).all() and np.ptp(green[0]) < 1  # pan_right: the window moves right
        assert (np.diff(green[1]) > 0).all() and np.ptp(red[1]) < 1  # pan_down: it moves down
        assert (np.diff(span[2]) < 0).all() and np.ptp(span[0]) < 2  # zoom_in: it narrows; pans keep it
        assert np.ptp(red[2]) < 3 and np.ptp(green[2]) < 3  # and stays where it is
