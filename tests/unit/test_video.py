"""Video bytes: probing, clip sampling, resizing, decoding, encoding and transcoding."""

import numpy as np
import pytest
from conftest import moving_square_frames, write_video

from tsgd_ray.config import TemporalSampling
from tsgd_ray.data.video import (
    VideoDecodeError,
    clip_indices,
    clip_rng,
    decode_clip,
    encode_mp4,
    probe,
    resize_frames,
    transcode,
)


def test_clip_indices_center_random_uniform():
    assert clip_indices(100, 4, 2, TemporalSampling.center) == [46, 48, 50, 52]
    assert clip_indices(10, 4, 1, TemporalSampling.uniform) == [0, 3, 6, 9]
    # too short for the interval: the interval shrinks; shorter than the clip: the last frame repeats
    assert clip_indices(7, 4, 4, TemporalSampling.center) == [0, 2, 4, 6]
    assert clip_indices(3, 5, 2, TemporalSampling.center) == [0, 1, 2, 2, 2]
    starts = {clip_indices(50, 4, 2, TemporalSampling.random, clip_rng(0, f"v{i}"))[0] for i in range(40)}
    assert len(starts) > 10 and max(starts) <= 50 - 7
    a = clip_indices(50, 4, 2, TemporalSampling.random, clip_rng(3, "video-a", epoch=1))
    assert a == clip_indices(50, 4, 2, TemporalSampling.random, clip_rng(3, "video-a", epoch=1))
    with pytest.raises(ValueError):
        clip_indices(0, 4, 1, TemporalSampling.center)


def test_decode_clip_shape_and_content(tmp_path):
    data = write_video(tmp_path / "v.mp4", num_frames=20, height=48, width=64)
    info = probe(data)
    assert (info.num_frames, info.height, info.width, info.fps) == (20, 48, 64, 10.0)
    clip = decode_clip(data, 8, 48, 64, interval=2, sampling=TemporalSampling.center)
    assert clip.shape == (8, 48, 64, 3) and clip.dtype == np.uint8
    # The square (16 px, rows 16..31) sits at x = 3 * source frame index: find it in every frame.
    expected_x = [3 * i for i in clip_indices(20, 8, 2, TemporalSampling.center)]
    row_profile = clip[:, 18:30, :, 0].mean(axis=1)  # red channel across the square's rows
    found_x = [int(np.argmax(profile > 150)) for profile in row_profile]
    assert all(abs(f - e) <= 1 for f, e in zip(found_x, expected_x)), (found_x, expected_x)
    small = decode_clip(data, 8, 32, 32)
    assert small.shape == (8, 32, 32, 3)


@pytest.mark.parametrize("width", [16, 24, 32, 48, 96])
def test_widths_where_decord_fails_still_decode(tmp_path, width):
    data = write_video(tmp_path / "narrow.mp4", num_frames=6, height=32, width=width)
    assert probe(data).width == width
    assert decode_clip(data, 4, 16, 16).shape == (4, 16, 16, 3)


def test_resize_covers_and_centre_crops():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 255  # a white band in the middle third... of the width
    out = resize_frames(frames, 20, 20)
    assert out.shape == (2, 20, 20, 3)
    assert out[:, :, 5:15].min() > 200  # the centre crop is inside the band


def _encoded(container: str, codec: str, frames: int = 30, pix_fmt: str = "yuv420p") -> bytes:
    """A bright bar moving right over `frames` frames (64x48), in `container` with `codec`."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, pix_fmt
        for i in range(frames):
            f = np.zeros((48, 64, 3), np.uint8)
            f[:, i : i + 4] = 255
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format=pix_fmt)):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()


def _audio_only() -> bytes:
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*s.encode(frame), *s.encode()]:
            c.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize(
    "container,codec", [("h264", "libx264"), ("ogg", "libvpx"), ("m4v", "mpeg4"), ("mpegts", "libx264")]
)
def test_valid_files_decord_cannot_read_are_decoded_by_pyav(container, codec):
    """decord cannot measure raw H.264, Ogg or MPEG-4 part 2 streams ("broken metadata") and fails
    on the last frames of an MPEG-TS; PyAV decodes them, so the videos are kept."""
    data = _encoded(container, codec)
    assert probe(data).num_frames == 30
    clip = decode_clip(data, 30, 48, 64, sampling=TemporalSampling.uniform)
    bar = clip[..., 0].mean(axis=1).argmax(axis=1)  # the bright column of each frame
    assert clip.shape == (30, 48, 64, 3) and np.all(np.abs(bar - (np.arange(30) + 1.5)) <= 2)


@pytest.mark.parametrize(
    "bad,reason",
    [
        (b"", "empty file"),
        (b"not a video at all" * 50, "not a video file"),
        ("truncated", "truncated file"),
        ("audio", "no video stream"),
    ],
)
def test_corrupt_videos_raise_video_decode_error_with_a_reason(tmp_path, bad, reason):
    if bad == "truncated":
        data = write_video(tmp_path / "t.mp4", num_frames=30)
        bad = data[: len(data) // 3]  # cut before the index an MP4 writes last
    elif bad == "audio":
        bad = _audio_only()
    with pytest.raises(VideoDecodeError) as caught:
        probe(bad)
    assert caught.value.reason == reason and str(caught.value).startswith(reason)
    assert "video_reader.cc" not in str(caught.value)  # the decoders' text is kept, their source paths are not
    with pytest.raises(VideoDecodeError, match=reason):
        decode_clip(bad, 4, 16, 16)


def test_encode_and_transcode_roundtrip(tmp_path):
    frames = moving_square_frames(10, 64, 96)
    data = encode_mp4(frames, fps=12)
    assert probe(data).num_frames == 10
    small = transcode(data, short_side=32)
    info = probe(small)
    assert (info.height, info.width, info.num_frames) == (32, 48, 10)
    assert len(small) < len(data)
    with pytest.raises(ValueError, match="even"):
        encode_mp4(moving_square_frames(2, 31, 32), fps=5)
