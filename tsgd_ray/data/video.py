"""Video bytes in and out: probe, decode clips (decord), encode and transcode (PyAV).

Frames are uint8 arrays of shape (T, H, W, 3), RGB. Decoding samples frame indices from the
number of frames the reader really finds (real files have irregular timestamps and headers that
promise more frames than are coded), and resizes in torch (decord's own resize returns
4-channel frames for some widths).
"""

from __future__ import annotations

import functools
import io
import math
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from tsgd_ray.config import TemporalSampling


class VideoDecodeError(RuntimeError):
    """A video could not be opened or decoded.

    `reason` is one of REASONS, short and actionable; `detail` keeps the decoders' own text.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


EMPTY = "empty file"
NOT_A_VIDEO = "not a video file"  # no container format recognised
TRUNCATED = "truncated file"  # e.g. an MP4 cut off before its index (moov) was written
NO_VIDEO_STREAM = "no video stream"  # e.g. audio only
UNSUPPORTED_CODEC = "unsupported video codec"
NO_FRAMES = "no decodable frames"
BAD_FRAMES = "frames fail to decode"
REASONS = (EMPTY, NOT_A_VIDEO, TRUNCATED, NO_VIDEO_STREAM, UNSUPPORTED_CODEC, NO_FRAMES, BAD_FRAMES)


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    fps: float


class _Video:
    """An opened video: `num_frames`, `fps` and `frames(indices)`.

    decord decodes. PyAV takes over where decord cannot: files whose duration or frame count decord
    cannot measure ("broken metadata": raw H.264 streams, Ogg, MPEG-4 part 2 elementary streams,
    ...; PyAV then counts the frames it can decode), frames decord fails on (e.g. at the end of an
    MPEG-TS), and the frame widths where decord's copy fails (16, 24, 32, 48, 96, 144 pixels
    among others: "DECORDArrayCopyFromTo: The size must exactly match"). A file neither can read
    raises VideoDecodeError with a reason from REASONS.
    """

    def __init__(self, data: bytes):
        import decord

        if not data:
            raise VideoDecodeError(EMPTY)
        self._data = data
        self._reader = None
        try:
            self._reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
            self.num_frames = len(self._reader)
            self.fps = float(self._reader.get_avg_fps())
        except Exception as exc:  # noqa: BLE001 - decord raises RuntimeError and DECORDError (not one)
            self._reader = None
            self._open_pyav(_text(exc))
        if self.num_frames < 1:
            self._reader = None
            self._open_pyav("decord found no frames")

    def _open_pyav(self, decord_text: str) -> None:
        """Measure the video with PyAV (decord could not): num_frames = frames it decodes."""
        import av

        try:
            container = av.open(io.BytesIO(self._data))
        except Exception as exc:  # noqa: BLE001
            reason = TRUNCATED if _cut_off(self._data) else NOT_A_VIDEO
            raise VideoDecodeError(reason, f"decord: {decord_text}; pyav: {_text(exc)}") from None
        with container:
            if not container.streams.video:
                raise VideoDecodeError(NO_VIDEO_STREAM, f"decord: {decord_text}")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise VideoDecodeError(UNSUPPORTED_CODEC, f"decord: {decord_text}")
            count, error = 0, ""
            try:
                for _ in container.decode(stream):
                    count += 1
            except Exception as exc:  # noqa: BLE001 - keep the frames before a damaged one
                error = _text(exc)
            if count == 0:
                raise VideoDecodeError(NO_FRAMES, f"decord: {decord_text}; pyav: {error or 'no frames'}")
            self.num_frames = count
            self.fps = float(stream.average_rate or stream.guessed_rate or 0.0)

    def frames(self, indices: list[int]) -> np.ndarray:
        """Frames at `indices` (each < num_frames) as (len(indices), H, W, 3) uint8."""
        if self._reader is None:
            frames = self._pyav_frames(indices)
        else:
            try:
                frames = self._reader.get_batch(indices).asnumpy()
            except Exception as exc:  # noqa: BLE001 - PyAV tries before the video is given up
                frames = self._pyav_frames(indices, f"decord: {_text(exc)}")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise VideoDecodeError(
                BAD_FRAMES, f"decoder returned frames of shape {frames.shape}, expected (T, H, W, 3)"
            )
        return frames

    def _pyav_frames(self, indices: list[int], decord_text: str = "") -> np.ndarray:
        import av

        wanted, found, error = set(indices), {}, ""
        try:
            with av.open(io.BytesIO(self._data)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i in wanted:
                        found[i] = frame.to_ndarray(format="rgb24")
                    if i >= max(wanted):
                        break
        except Exception as exc:  # noqa: BLE001
            error = _text(exc)
        if not found:
            raise VideoDecodeError(
                BAD_FRAMES, "; ".join(t for t in (decord_text, f"pyav: {error or 'no frames'}") if t)
            )
        last = found[max(found)]  # frames counted but not reached (a damaged tail): repeat the last
        return np.stack([found.get(i, last) for i in indices])


def _cut_off(data: bytes) -> bool:
    """Whether a file that starts as a video container ends early: an MP4/MOV without its index
    (moov, written last), or an AVI shorter than its RIFF header says."""
    if data[4:8] == b"ftyp":
        return b"moov" not in data
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def _text(exc: BaseException) -> str:
    """The last line of a decoder's message, without decord's source location prefix."""
    lines = str(exc).strip().splitlines()
    text = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*(\[[^\]]*\]\s*)?", "", text).strip()[:200]


def probe(data: bytes) -> VideoInfo:
    """Open the video and decode its first, middle and last frames.

    Raises:
        VideoDecodeError: if it cannot be opened, has no frames, or those frames fail to decode.
    """
    video = _Video(data)
    n = video.num_frames
    frames = video.frames(sorted({0, n // 2, n - 1}))
    return VideoInfo(num_frames=n, height=int(frames.shape[1]), width=int(frames.shape[2]), fps=video.fps)


def clip_indices(
    num_available: int,
    num_frames: int,
    interval: int,
    sampling: TemporalSampling,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """Frame indices of one clip of `num_frames` from a video with `num_available` frames.

    ``center``/``random`` take every `interval`-th frame (the interval shrinks when the video is
    too short, and the last frame repeats when it has fewer than `num_frames`); ``uniform``
    spreads the frames evenly over the whole video. ``random`` needs `rng`.
    """
    if num_available < 1:
        raise ValueError("a video needs at least one frame")
    if sampling == TemporalSampling.uniform:
        positions = np.linspace(0, num_available - 1, num_frames)
        return [int(round(p)) for p in positions]
    step = max(1, min(interval, (num_available - 1) // max(1, num_frames - 1)))
    span = (num_frames - 1) * step + 1
    slack = max(0, num_available - span)
    if sampling == TemporalSampling.random:
        if rng is None:
            raise ValueError("random sampling needs an rng")
        start = int(rng.integers(0, slack + 1))
    else:
        start = slack // 2
    return [min(start + i * step, num_available - 1) for i in range(num_frames)]


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (T, H, W, 3) uint8 frames to cover (height, width) and centre-crop; uint8 out."""
    t, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    new_h, new_w = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def decode_clip(
    data: bytes,
    num_frames: int,
    height: int,
    width: int,
    interval: int = 1,
    sampling: TemporalSampling = TemporalSampling.center,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Decode one clip: (num_frames, height, width, 3) uint8.

    Raises:
        VideoDecodeError: if the video cannot be opened or its frames decoded.
    """
    video = _Video(data)
    indices = clip_indices(video.num_frames, num_frames, interval, sampling, rng)
    unique = sorted(set(indices))
    frames = video.frames(unique)
    frames = frames[[unique.index(i) for i in indices]]
    return resize_frames(frames, height, width)


#: the random streams of the extra views start here, far from any epoch number
VIEW_STREAM = 2**20
VIEW_SCALE = (0.5, 1.0)  # the area share of a view's spatial crop


def decode_view(
    data: bytes, num_frames: int, height: int, width: int, interval: int, seed: int, video_id: str, view: int
) -> np.ndarray:
    """Candidate view `view` >= 1 of one video for init selection (RDED-style): a temporal window
    at a random offset and a crop of VIEW_SCALE of the frame's area (its aspect kept), both drawn
    from (seed, video id, view), resized to (num_frames, height, width, 3) uint8. View 0 is the
    clip as the data config samples it (`decode_clip`).

    Raises:
        VideoDecodeError: as `decode_clip`.
    """
    rng = clip_rng(seed, video_id, VIEW_STREAM + view)
    video = _Video(data)
    indices = clip_indices(video.num_frames, num_frames, interval, TemporalSampling.random, rng)
    unique = sorted(set(indices))
    frames = video.frames(unique)[[unique.index(i) for i in indices]]
    _, h, w, _ = frames.shape
    side = math.sqrt(rng.uniform(*VIEW_SCALE))
    ch, cw = max(1, round(h * side)), max(1, round(w * side))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return resize_frames(np.ascontiguousarray(frames[:, top : top + ch, left : left + cw]), height, width)


def clip_rng(seed: int, video_id: str, epoch: int = 0) -> np.random.Generator:
    """The random stream of one video's temporal offset: a pure function of (seed, id, epoch)."""
    return np.random.default_rng([seed, zlib.crc32(video_id.encode()), epoch])


#: x264's instruction sets up to AVX2, by x264's names: every CPU with AVX-512 has all of them
X264_AVX2 = "MMX2,SSE,SSE2,SSE3,SSSE3,SSE4.1,SSE4.2,LZCNT,AVX,FMA3,BMI1,BMI2,AVX2"


@functools.lru_cache(maxsize=1)
def x264_params() -> dict[str, str]:
    """Options that make libx264 deterministic here: on a CPU with AVX-512, x264's AVX-512 code
    encodes the same frames to different bytes from call to call (measured with PyAV 18's x264 on
    an AMD EPYC with AVX-512: 4 of 120 clips differed over 6 passes in one process, 10-24 of the
    built-in set's 640 between two processes), so x264 is held to the AVX2 level there (0 of 120;
    x264's assembly is bit-exact with its C code, so the bytes are those of any AVX2 machine).
    Elsewhere x264 picks its own instruction sets. Linux only reads the CPU's flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return {}
    return {"x264-params": f"asm={X264_AVX2}"} if "avx512f" in flags else {}


def encode_mp4(frames: Iterable[np.ndarray], fps: float, crf: int = 18) -> bytes:
    """Encode RGB uint8 frames, each (H, W, 3) with H and W even, as H.264 in an MP4 container;
    the same frames give the same bytes.

    `frames` may be a (T, H, W, 3) array or any iterable of frames (streamed, bounded memory).
    """
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = None
        for frame in frames:
            if stream is None:
                h, w = frame.shape[:2]
                if h % 2 or w % 2:
                    raise ValueError(f"H.264 with yuv420p needs even sizes, got {h}x{w}")
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                # one encoder thread: x264's frame threads made the bytes depend on the machine's load
                # (prepare runs one task per CPU anyway); no AVX-512 (`x264_params`)
                stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", **x264_params()}
            # converted to the encoder's format here: left to `encode`, the conversion made the
            # same frames encode to different bytes from call to call (PyAV 18, libx264)
            av_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24").reformat(
                format="yuv420p"
            )
            for packet in stream.encode(av_frame):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frames to encode")
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def transcode(data: bytes, short_side: int, crf: int = 20) -> bytes:
    """Re-encode a video as H.264/MP4 with its short side scaled to `short_side` (never up).

    Every decodable frame is kept at the source's average frame rate.

    Raises:
        VideoDecodeError: if the source cannot be decoded.
    """
    video = _Video(data)
    n, fps = video.num_frames, video.fps or 25.0
    first = video.frames([0])
    h, w = first.shape[1:3]
    scale = min(1.0, short_side / min(h, w))
    out_h, out_w = 2 * max(1, round(h * scale / 2)), 2 * max(1, round(w * scale / 2))

    def resized_frames():  # decoded and resized 32 at a time: bounded memory for long videos
        for start in range(0, n, 32):
            frames = video.frames(list(range(start, min(n, start + 32))))
            x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=scale < 1)
            yield from x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    return encode_mp4(resized_frames(), fps, crf=crf)
