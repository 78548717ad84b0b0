"""Motion-aware 2 x 2 packing: each quarter is a whole clip's window of most motion, in every
frame; the teacher's confidence gates each packed clip."""

from __future__ import annotations

import pytest
import torch

from tsgd_ray.config import load_config
from tsgd_ray.core.clips import InputSettings
from tsgd_ray.core.packing import motion_windows, pack, pack_init, pack_where_confident
from tsgd_ray.core.training import clip_heat
from tsgd_ray.settings import saliency_settings


def moving_square(corner: tuple[int, int], frames: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(F, size, size, 3) uint8: still noise, with a 4 x 4 square that moves right one pixel a
    frame from `corner` (row, column)."""
    g = torch.Generator().manual_seed(seed)
    clip = torch.randint(0, 60, (1, size, size, 3), generator=g, dtype=torch.uint8).repeat(frames, 1, 1, 1)
    r, c = corner
    for t in range(frames):
        clip[t, r : r + 4, c + t : c + t + 4] = 250
    return clip


def heat_of(clips: torch.Tensor) -> torch.Tensor:
    """The time-mean of absolute frame differences (N, H, W), as the TSGFA map is up to scale."""
    x = clips.float().mean(-1)
    return (x[:, 1:] - x[:, :-1]).abs().mean(1)


def test_the_window_of_most_motion_and_the_centre_on_a_flat_map():
    clips = torch.stack([moving_square((1, 1)), moving_square((10, 2))])
    corners = motion_windows(heat_of(clips), 8, 8)
    # the square sweeps columns 1..9 (rows 1..4) and 2..10 (rows 10..13): an 8-wide window holds most of it
    for (r, c), (row, col) in zip(corners.tolist(), [(1, 1), (10, 2)]):
        assert r <= row and row + 4 <= r + 8 and c <= col + 1 and col + 8 <= c + 8
    assert motion_windows(torch.zeros(1, 16, 16), 8, 8).tolist() == [[4, 4]]


def test_packing_tiles_four_whole_clips_without_touching_time():
    corners = [(1, 1), (2, 6), (9, 1), (10, 4)]
    clips = torch.stack([moving_square(c, seed=i) for i, c in enumerate(corners)])
    heat = heat_of(clips)
    (packed,) = pack(clips, heat)
    assert packed.shape == clips.shape[1:] and packed.dtype == torch.uint8
    windows = motion_windows(heat, 8, 8).tolist()
    for quarter, (clip, (r, c)) in enumerate(zip(clips, windows)):
        top, left = 8 * (quarter // 2), 8 * (quarter % 2)
        assert torch.equal(packed[:, top : top + 8, left : left + 8], clip[:, r : r + 8, c : c + 8])  # every frame
    with pytest.raises(ValueError, match="even"):
        pack(clips[:, :, :15], heat[:, :15])
    with pytest.raises(ValueError, match="multiple of 4"):
        pack(clips[:3], heat[:3])


def test_the_gate_keeps_a_packed_clip_only_where_the_teacher_is_confident():
    clips = torch.stack([moving_square((i % 12, i % 9), seed=i) for i in range(8)])
    labels = torch.tensor([3, 3, 3, 3, 5, 5, 5, 5])
    seen = []

    def confidence(packed, y):
        seen.append(y.tolist())
        return torch.tensor([0.9, 0.5])

    out, y, kept = pack_where_confident(clips, labels, heat_of(clips), confidence, 0.8)
    assert seen == [[3, 5]] and y.tolist() == [3, 5] and kept.tolist() == [True, False]
    assert torch.equal(out[0], pack(clips[:4], heat_of(clips[:4]))[0])
    assert torch.equal(out[1], clips[4])  # the group's first clip, as it is
    with pytest.raises(ValueError, match="one class"):
        pack_where_confident(clips, torch.tensor([3, 3, 3, 5, 5, 5, 5, 5]), heat_of(clips), confidence, 0.8)


class SureOfClass3(torch.nn.Module):
    """A teacher whose logits name class 3 for any clip (N, C, F, H, W)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((len(x),), 3), 8).float() * self.scale


def test_pack_init_cuts_motion_windows_and_without_saliency_the_centres():
    """The pipeline's init (saliency given) tiles each clip's window of most TSGFA heat; the
    quality benchmark's centre_packed control (saliency None) tiles each clip's centre."""
    corners = [(1, 1), (2, 6), (9, 1), (10, 4)]
    clips = torch.stack([moving_square(c, seed=i) for i, c in enumerate(corners)])
    labels, indices = torch.full((4,), 3), torch.tensor([2, 0, 3, 1])  # grouped by index: clips 1, 3, 0, 2
    inputs = InputSettings((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    saliency = saliency_settings(load_config("default", []).tsgf)
    (moved,), y, _, order, kept = pack_init(SureOfClass3(), clips, labels, indices, 0.8, saliency, inputs)
    (centred,), *_ = pack_init(SureOfClass3(), clips, labels, indices, 0.8, None, inputs)
    assert order == [1, 3, 0, 2] and y.tolist() == [3] and kept.tolist() == [True]
    heat = clip_heat(clips[order], saliency, inputs)
    for quarter, (clip, (r, c)) in enumerate(zip(clips[order], motion_windows(heat, 8, 8).tolist())):
        top, left = 8 * (quarter // 2), 8 * (quarter % 2)
        assert torch.equal(moved[:, top : top + 8, left : left + 8], clip[:, r : r + 8, c : c + 8])
        assert torch.equal(centred[:, top : top + 8, left : left + 8], clip[:, 4:12, 4:12])
    assert not torch.equal(moved, centred)
