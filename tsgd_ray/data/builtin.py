"""The built-in dataset: real handwritten digits moving over textured backgrounds.

Eight classes, four pairs; in each pair the second class holds exactly the frames of the first in
reverse order, so only the ORDER of frames tells the classes of a pair apart:

    translate_right / translate_left, translate_down / translate_up,
    rotate_ccw / rotate_cw, zoom_in / zoom_out

The `cluttered` variant adds static distractor digits to the background, a camera that pans
(whole pixels per frame, random direction) and shakes (+-1 pixel), and per-frame flicker of the
brightness: raw frame differences then fire everywhere, and only the digit moves relative to the
scene. Reversing a clip reverses the pan, which has no preferred direction, so the pair property
and the single-frame control hold for it too.

The `scenes` variant has 16 classes: the four pairs above and

    translate_diagonal / translate_diagonal_back, translate_antidiagonal / translate_antidiagonal_back,
    orbit_ccw / orbit_cw (the digit circles a random point), spiral_in / spiral_out (zoom and turn)

over a scene with 1-3 smaller distractor digits that move too (a uniformly random direction, speed
and spin each), and a per-clip contrast; its val videos use other held-out digits than its test
videos (test: every fourth digit from 1, val: every fourth from 3). Its parameters (SCENES) are
under tuning (teacher 60-90 %, random real clips at IPC 10 below 0.7 of `full`, with the teacher,
`full` and random_real alone) and are frozen in a commit before any distilled arm runs on it.

The `bursty` variant moves the digit only during a burst of BURST of the video's frames that starts
at a uniformly random frame (the whole motion of the plain clip, done faster); before and after it
the digit is still. A short temporal window of a long video may then miss the motion, so where a
clip starts matters. The start's law is symmetric, so reversing keeps every frame's law.

Every frame of every class is drawn from the same distribution (position uniform on a torus with
wrap-around, angle uniform, scale from one shared law; digit, colour and background texture
random), so a single-frame classifier stays at chance. Digits are scikit-learn's 1797 real 8x8
handwritten digits: even indices for the train split, odd for the test and val splits (val: other
videos of the same held-out digits, generated only when data.builtin.val_per_class > 0).

Videos are written as H.264 MP4 files in a class-folder layout ``<split>/<class>/<id>.mp4``,
deterministically from the seed, then prepared like any real dataset.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from tsgd_ray import storage
from tsgd_ray.data.video import encode_mp4

CLASS_PAIRS = [
    ("translate_right", "translate_left"),
    ("translate_down", "translate_up"),
    ("rotate_ccw", "rotate_cw"),
    ("zoom_in", "zoom_out"),
]
SCENE_PAIRS = CLASS_PAIRS + [
    ("translate_diagonal", "translate_diagonal_back"),
    ("translate_antidiagonal", "translate_antidiagonal_back"),
    ("orbit_ccw", "orbit_cw"),
    ("spiral_in", "spiral_out"),
]
CLASSES = [name for pair in CLASS_PAIRS for name in pair]
_SPLIT_CODE = {"train": 0, "test": 1, "val": 2}
# which digit images each split draws from (start, step): even ones for train, odd ones for the
# held-out splits; the scenes variant splits the odd ones between test and val
_DIGITS = {"train": (0, 2), "test": (1, 2), "val": (1, 2)}
_SCENE_DIGITS = {"train": (0, 2), "test": (1, 4), "val": (3, 4)}

TRANSLATION = 0.5  # of the frame size, over the clip
ROTATION = math.pi  # radians over the clip
ZOOM = math.log(2.0)  # log-scale over the clip
LOG_SCALE_RANGE = (math.log(0.8), math.log(1.25))
DIGIT_SIZE = 0.4  # of the frame size, at scale 1
# the cluttered variant
DISTRACTORS = (2, 4)  # static distractor digits per clip, [low, high)
PAN = 0.15  # most camera travel over the clip, of the frame size
SHAKE = 1  # camera shake, pixels either way
FLICKER = 0.08  # brightness factor in 1 +- this, per frame
# the bursty variant
BURST = 0.5  # of the video's frames, the motion's duration
# the scenes variant: moving distractors per clip [low, high), their scale (of a digit's), their
# most travel over the clip (of the frame size), the orbit's radius (of the frame size), and the
# per-clip contrast range
SCENES = {
    "distractors": (1, 4),
    "distractor_scale": 0.7,
    "distractor_travel": 0.5,
    "orbit": 0.2,
    "contrast": (0.6, 1.0),
}


def pairs(variant: str) -> list[tuple[str, str]]:
    """The variant's class pairs (forward, reversed): SCENE_PAIRS for scenes, else CLASS_PAIRS."""
    return SCENE_PAIRS if variant == "scenes" else CLASS_PAIRS


def classes(variant: str) -> list[str]:
    return [name for pair in pairs(variant) for name in pair]


def _digits(split: str, variant: str = "plain") -> np.ndarray:
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    start, step = (_SCENE_DIGITS if variant == "scenes" else _DIGITS)[split]
    return images[start::step]


def _texture(rng: np.random.Generator, size: int) -> torch.Tensor:
    """A static random colour texture: smooth blobs plus a grating plus fine grain, (3, S, S) in [0, 1]."""
    coarse = torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32))
    blobs = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    theta, freq = rng.uniform(0, math.pi), rng.uniform(0.15, 0.5)
    grating = torch.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    grain = torch.from_numpy(rng.random((3, size, size), dtype=np.float32))
    tex = 0.55 * blobs + 0.2 * grating * torch.from_numpy(rng.uniform(0.3, 1.0, 3).astype(np.float32))[:, None, None]
    tex = tex + 0.15 * grain
    return (0.15 + 0.6 * (tex - tex.min()) / (tex.max() - tex.min() + 1e-6)).clamp(0, 1)


def render_sequence(
    digit: np.ndarray,
    background: torch.Tensor,
    colour: np.ndarray,
    centre: np.ndarray,
    angle: np.ndarray,
    log_scale: np.ndarray,
) -> np.ndarray:
    """Render a digit over a static background, one frame per entry of the state arrays.

    Args:
        digit: (8, 8) in [0, 1]. background: (3, S, S), or (T, 3, S, S) per frame, in [0, 1].
        colour: (3,) in [0, 1].
        centre: (T, 2) pixel (x, y), wrapped onto the torus. angle: (T,) radians. log_scale: (T,).
    Returns:
        (T, S, S, 3) uint8 frames.
    """
    size = background.shape[-1]
    t = len(angle)
    background = background if background.dim() == 4 else background[None]  # (T or 1, 3, S, S)
    digit_t = torch.from_numpy(digit)[None, None].float()
    # Output pixel p -> digit coordinates: wrap (p - centre) onto the torus, undo rotation and scale.
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    cx = torch.from_numpy(centre[:, 0]).float()[:, None, None]
    cy = torch.from_numpy(centre[:, 1]).float()[:, None, None]
    dx = torch.remainder(px[None] - cx + size / 2, size) - size / 2
    dy = torch.remainder(py[None] - cy + size / 2, size) - size / 2
    cos = torch.from_numpy(np.cos(angle)).float()[:, None, None]
    sin = torch.from_numpy(np.sin(angle)).float()[:, None, None]
    half = DIGIT_SIZE * size / 2 * torch.from_numpy(np.exp(log_scale)).float()[:, None, None]
    u = (cos * dx + sin * dy) / half  # in [-1, 1] inside the digit's square
    v = (-sin * dx + cos * dy) / half
    grid = torch.stack([u, v], dim=-1)
    alpha = F.grid_sample(digit_t.expand(t, 1, 8, 8), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    colour_t = torch.from_numpy(colour).float()[None, :, None, None]
    frames = background * (1 - alpha) + colour_t * alpha
    return (frames * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _colour(rng: np.random.Generator) -> np.ndarray:
    colour = rng.uniform(0.6, 1.0, 3) * rng.choice([0.0, 1.0], 3, p=[0.25, 0.75])
    return np.where(colour.max() < 0.5, np.ones(3), colour).astype(np.float32)


def _clutter(rng: np.random.Generator, background: torch.Tensor, digits: np.ndarray) -> torch.Tensor:
    """The background with static distractor digits drawn in, (3, S, S) in [0, 1]."""
    size = background.shape[-1]
    for _ in range(rng.integers(*DISTRACTORS)):
        frame = render_sequence(
            digits[rng.integers(len(digits))],
            background,
            _colour(rng),
            rng.uniform(0, size, (1, 2)),
            np.array([rng.uniform(0, 2 * math.pi)]),
            np.array([rng.uniform(*LOG_SCALE_RANGE)]),
        )
        background = torch.from_numpy(frame[0]).permute(2, 0, 1).float() / 255
    return background


def _moving_clutter(
    rng: np.random.Generator, background: torch.Tensor, digits: np.ndarray, frames: int
) -> torch.Tensor:
    """The background with SCENES["distractors"] smaller digits drawn in, each moving in a straight
    line (uniform direction, travel up to SCENES["distractor_travel"] of the frame) and spinning at
    a uniform rate: (frames, 3, S, S) in [0, 1]. Every law is symmetric, so reversing keeps it."""
    size = background.shape[-1]
    scene = background[None].expand(frames, -1, -1, -1)
    progress = np.linspace(-0.5, 0.5, frames)
    for _ in range(rng.integers(*SCENES["distractors"])):
        direction = rng.uniform(0, 2 * math.pi)
        travel = rng.uniform(0, SCENES["distractor_travel"]) * size
        centre = rng.uniform(0, size, 2) + travel * progress[:, None] * [math.cos(direction), math.sin(direction)]
        angle = rng.uniform(0, 2 * math.pi) + rng.uniform(-ROTATION, ROTATION) * progress
        log_scale = np.full(frames, rng.uniform(*LOG_SCALE_RANGE) + math.log(SCENES["distractor_scale"]))
        layer = render_sequence(digits[rng.integers(len(digits))], scene, _colour(rng), centre % size, angle, log_scale)
        scene = torch.from_numpy(layer).permute(0, 3, 1, 2).float() / 255
    return scene


def _camera(rng: np.random.Generator, frames: np.ndarray) -> np.ndarray:
    """Pan and shake (whole pixels, wrapping around the torus) and flicker: (T, S, S, 3) uint8."""
    t, size = len(frames), frames.shape[1]
    direction = rng.uniform(0, 2 * math.pi)
    travel = (
        rng.uniform(0, PAN) * size * np.linspace(-0.5, 0.5, t)[:, None] * [math.cos(direction), math.sin(direction)]
    )
    offsets = np.round(travel + rng.integers(-SHAKE, SHAKE + 1, (t, 2))).astype(int)
    gain = 1 + rng.uniform(-FLICKER, FLICKER, t)
    out = np.stack([np.roll(f, (dy, dx), axis=(0, 1)) for f, (dx, dy) in zip(frames, offsets)]).astype(np.float32)
    return (out * gain[:, None, None, None]).round().clip(0, 255).astype(np.uint8)


def burst_progress(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Per frame, the motion's progress in [-0.5, 0.5]: -0.5 (still), a linear run over BURST of the
    frames from a uniformly random start, then 0.5 (still)."""
    length = max(2, round(BURST * frames))
    start = int(rng.integers(0, frames - length + 1))
    return np.clip((np.arange(frames) - start) / (length - 1), 0.0, 1.0) - 0.5


def generate_pair(
    pair: int, rng: np.random.Generator, digits: np.ndarray, frames: int, size: int, variant: str = "plain"
) -> np.ndarray:
    """The forward clip of class pair `pair`: (frames, size, size, 3) uint8.

    The pair's second class is this clip reversed in time. Every state variable that a class does
    not move is drawn from the law its moving counterpart has at a uniformly random frame.
    variant="cluttered" adds distractors, camera motion and flicker, variant="bursty" moves only
    during a burst, variant="scenes" has pairs 4-7 and moving distractors (the module's docstring).
    """
    # symmetric laws: reversing flips the sign
    progress = burst_progress(rng, frames) if variant == "bursty" else np.linspace(-0.5, 0.5, frames)
    centre = rng.uniform(0, size, 2)[None].repeat(frames, 0)
    angle = np.full(frames, rng.uniform(0, 2 * math.pi))
    base_log_scale, offset = rng.uniform(*LOG_SCALE_RANGE), rng.choice(progress)
    log_scale = np.full(frames, base_log_scale + ZOOM * offset)
    if pair == 0:
        centre[:, 0] += TRANSLATION * size * progress
    elif pair == 1:
        centre[:, 1] += TRANSLATION * size * progress
    elif pair == 2:
        angle = angle + ROTATION * progress
    elif pair == 3:
        log_scale = base_log_scale + ZOOM * progress
    elif pair in (4, 5):  # the diagonals
        centre += TRANSLATION * size * progress[:, None] * np.array([1.0, 1.0 if pair == 4 else -1.0]) / math.sqrt(2)
    elif pair == 6:  # once round a circle from a random phase
        theta = rng.uniform(0, 2 * math.pi) + 2 * math.pi * progress
        centre += SCENES["orbit"] * size * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    else:  # the spiral: turn and zoom together
        angle = angle + ROTATION * progress
        log_scale = base_log_scale + ZOOM * progress
    colour = _colour(rng)
    digit = digits[rng.integers(len(digits))]
    background = _texture(rng, size)
    if variant == "scenes":
        scene = _moving_clutter(rng, background, digits, frames)
        clip = render_sequence(digit, scene, colour, centre % size, angle, log_scale).astype(np.float32)
        contrast = rng.uniform(*SCENES["contrast"])
        mean = clip.mean(axis=(0, 1, 2), keepdims=True)
        return (mean + contrast * (clip - mean)).round().clip(0, 255).astype(np.uint8)
    if variant != "cluttered":
        return render_sequence(digit, background, colour, centre % size, angle, log_scale)
    clip = render_sequence(digit, _clutter(rng, background, digits), colour, centre % size, angle, log_scale)
    return _camera(rng, clip)


def builtin_root(cfg: DictConfig) -> str:
    """Where the built-in videos of this config live: under the cache root, keyed by their settings."""
    settings = OmegaConf.to_container(cfg.data.builtin, resolve=True)
    if not settings["val_per_class"]:  # no val videos: the same videos as before the split existed
        del settings["val_per_class"]
    settings["generator"] = [TRANSLATION, ROTATION, ZOOM, LOG_SCALE_RANGE, DIGIT_SIZE, DISTRACTORS, PAN, SHAKE, FLICKER]
    if settings["variant"] == "bursty":  # a key of its own, so the other variants keep their folders
        settings["generator"].append(BURST)
    if settings["variant"] == "scenes":
        settings["generator"].append(SCENES)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache = cfg.storage.cache_root or storage.join(cfg.storage.output_root, "cache")
    return storage.join(storage.absolute(cache), f"motion_digits-{digest}")


def generate_split(b: DictConfig, split: str) -> Iterator[tuple[str, int, np.ndarray]]:
    """The videos of `split` under the built-in settings `b` (cfg.data.builtin), in memory:
    (class name, index, (frames, size, size, 3) uint8) for each forward clip and its reverse, the
    same arrays `ensure_builtin_dataset` encodes."""
    digits = _digits(split, b.variant)
    per_class = {"train": b.train_per_class, "test": b.test_per_class, "val": b.val_per_class}[split]
    for pair, (forward_name, backward_name) in enumerate(pairs(b.variant)):
        for index in range(per_class):
            rng = np.random.default_rng([b.seed, _SPLIT_CODE[split], pair, index])
            clip = generate_pair(pair, rng, digits, b.frames, b.size, b.variant)
            yield forward_name, index, clip
            yield backward_name, index, clip[::-1]


#: videos encoded and written at once (x264 and the disk release the GIL), and rendered ahead
WRITERS, AHEAD = 4, 64


def ensure_builtin_dataset(cfg: DictConfig) -> str:
    """Write the built-in dataset's videos unless they are complete already; returns their root.

    Idempotent: each file is written once, and a completion marker is written last.
    """
    root = builtin_root(cfg)
    marker = storage.join(root, "_COMPLETE.json")
    if storage.exists(marker):
        return root
    b = cfg.data.builtin
    counts = {"train": b.train_per_class, "test": b.test_per_class, "val": b.val_per_class}
    counts = {split: n for split, n in counts.items() if n}

    def write(split: str, name: str, index: int, clip: np.ndarray) -> None:
        uri = storage.join(root, split, name, f"{name}_{index:05d}.mp4")
        if not storage.exists(uri):  # a generation cut short resumes where it stopped
            storage.write_once(uri, encode_mp4(clip, b.fps))

    videos = ((split, *video) for split in counts for video in generate_split(b, split))
    with ThreadPoolExecutor(WRITERS) as pool:
        while chunk := list(itertools.islice(videos, AHEAD)):
            for done in [pool.submit(write, *video) for video in chunk]:
                done.result()
    storage.write_json_once(
        marker, {"classes": classes(b.variant), "counts": counts, "settings": OmegaConf.to_container(b)}
    )
    return root
