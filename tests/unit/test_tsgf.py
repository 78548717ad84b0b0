"""TSGF on hand-made clips whose answer is known (docs/method.md, the temporal saliency-guided filter)."""

import pytest
import torch
from omegaconf import OmegaConf

from tsgd_ray.config import TSGFConfig
from tsgd_ray.core import tsgf
from tsgd_ray.core.augment import box_mask
from tsgd_ray.settings import saliency_settings


def tsgf_cfg(**values) -> tsgf.SaliencySettings:
    return saliency_settings(OmegaConf.merge(OmegaConf.structured(TSGFConfig), values))


def square_clip(frames=8, size=32, start=(4, 4), step=(0, 2), side=4, background=None):
    """(1, 3, F, H, W): a bright square moving `step` pixels per frame over `background` (or 0)."""
    x = torch.zeros(1, 3, frames, size, size) if background is None else background.clone()
    for t in range(frames):
        y0, x0 = start[0] + t * step[0], start[1] + t * step[1]
        x[0, :, t, y0 : y0 + side, x0 : x0 + side] = 1.0
    return x


def test_a_static_clip_has_no_saliency():
    x = torch.rand(1, 1, 1, 24, 24).expand(2, 3, 6, 24, 24).contiguous()
    for compensate in ("none", "median", "shift"):
        m = tsgf.saliency(x, tsgf_cfg(compensate=compensate))
        assert m.shape == (2, 1, 6, 24, 24)
        assert m.abs().max() == 0


def test_a_moving_square_is_salient_on_its_path_and_nowhere_else():
    x = square_clip()  # moves right along rows 4..7, columns 4..21
    m = tsgf.saliency(x, tsgf_cfg(spatial_kernel=1))[0, 0]
    assert m.max() == pytest.approx(1.0, abs=1e-5)
    path = torch.zeros(32, 32, dtype=torch.bool)
    path[4:8, 4:22] = True
    assert (m[:, ~path] == 0).all()  # nothing off the path, in any frame
    for t in range(7):  # the square's leading and trailing edges at each step are salient
        assert m[t, 5, 4 + 2 * t] > 0.2 and m[t, 5, 4 + 2 * t + 5] > 0.2
    smoothed = tsgf.saliency(x, tsgf_cfg(spatial_kernel=3))[0, 0]
    near = torch.zeros(32, 32, dtype=torch.bool)
    near[3:9, 3:23] = True  # a 3x3 box filter reaches one pixel further
    assert (smoothed[:, ~near] == 0).all() and smoothed[:, path].max() > 0.5


def test_temporal_smoothing_uses_alpha_with_reflect_padding():
    values = torch.tensor([0.0, 1.0, 1.0, 4.0, 4.0])  # differences D = 1, 0, 3, 0 (+ pad 0)
    x = values.view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1).contiguous()
    d = torch.tensor([1.0, 0.0, 3.0, 0.0, 0.0])
    reflect = torch.cat([d[1:2], d, d[3:4]])
    expected = 0.25 * reflect[:-2] + 0.5 * reflect[1:-1] + 0.25 * reflect[2:]
    m = tsgf.saliency(x, tsgf_cfg(spatial_kernel=1, window=1, eps=1e-12))[0, 0, :, 0, 0]
    torch.testing.assert_close(m, expected / expected.max())
    raw = tsgf.saliency(x, tsgf_cfg(spatial_kernel=1, window=0, eps=1e-12))[0, 0, :, 0, 0]
    torch.testing.assert_close(raw, d / d.max())
    wide = tsgf.saliency(x, tsgf_cfg(spatial_kernel=1, window=2, alpha=[1.0, 1.0, 2.0, 1.0, 1.0], eps=1e-12))[
        0, 0, :, 0, 0
    ]
    pad = torch.cat([d[[2, 1]], d, d[[3, 2]]])  # reflect: D_-2 = D_2, D_-1 = D_1, D_5 = D_3, D_6 = D_2
    by_hand = torch.stack([(pad[t : t + 5] * torch.tensor([1, 1, 2, 1, 1.0])).sum() / 6 for t in range(5)])
    torch.testing.assert_close(wide, by_hand / by_hand.max())


def test_default_temporal_weights():
    assert tsgf.temporal_weights(1, []) == [0.25, 0.5, 0.25]
    assert tsgf.temporal_weights(2, []) == [0.2] * 5
    assert tsgf.temporal_weights(0, []) == [1.0]
    assert tsgf.temporal_weights(1, [1, 2, 1]) == [0.25, 0.5, 0.25]


def test_frame_granularity_is_one_value_per_frame():
    m = tsgf.saliency(square_clip(), tsgf_cfg(granularity="frame", eps=1e-12))
    per_frame = m[0, 0].flatten(1)
    assert (per_frame == per_frame[:, :1]).all()
    assert per_frame.max() == pytest.approx(1.0, abs=1e-5)


def test_shift_compensation_suppresses_a_panning_background():
    g = torch.Generator().manual_seed(0)
    texture = torch.rand(1, 3, 1, 48, 48, generator=g)
    background = torch.cat([texture.roll(shifts=(t, 2 * t), dims=(3, 4)) for t in range(8)], dim=2)  # camera pan
    x = square_clip(size=48, start=(30, 6), step=(-3, 4), side=6, background=background)
    object_path = torch.zeros(48, 48, dtype=torch.bool)  # where the square goes, widened by the pan
    for t in range(8):
        object_path[max(30 - 3 * t - 3, 0) : 36 - 3 * t + 3, max(6 + 4 * t - 3, 0) : 12 + 4 * t + 3] = True

    def object_to_background(compensate):
        m = tsgf.saliency(x, tsgf_cfg(compensate=compensate, spatial_kernel=1))[0, 0, :7]
        square = torch.stack([m[t, 30 - 3 * t : 36 - 3 * t, 6 + 4 * t : 12 + 4 * t].mean() for t in range(7)]).mean()
        return square / m[:, ~object_path].mean()

    raw, shifted = object_to_background("none"), object_to_background("shift")
    assert raw < 3  # without compensation the whole frame moves
    assert shifted > 10 * raw  # aligned frames: only the object is left
    shift_map = tsgf.saliency(x, tsgf_cfg(compensate="shift", spatial_kernel=1))[0, 0, :7]
    assert shift_map[:, ~object_path].max() < 1e-5


def test_median_compensation_removes_uniform_flicker():
    x = square_clip(size=32)
    flicker = torch.tensor([0.0, 0.3, 0.0, 0.3, 0.0, 0.3, 0.0, 0.3]).view(1, 1, 8, 1, 1)
    m_none = tsgf.saliency(x + flicker, tsgf_cfg(spatial_kernel=1))[0, 0]
    m_median = tsgf.saliency(x + flicker, tsgf_cfg(compensate="median", spatial_kernel=1))[0, 0]
    far = (slice(None), slice(20, 32), slice(0, 32))  # rows the square never visits
    assert m_none[far].min() > 0.1
    assert m_median[far].max() == 0


def test_estimate_shift_recovers_integer_translations():
    a = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(1))
    shifts = [(3, -2), (-5, 7), (0, 0)]
    b = torch.stack([img.roll(shifts=(-dy, -dx), dims=(0, 1)) for img, (dy, dx) in zip(a, shifts)])
    dy, dx = tsgf.estimate_shift(a, b)
    assert list(zip(dy.tolist(), dx.tolist())) == shifts


def test_the_filter_weights_static_pixels_by_w_min_on_the_gradient_and_on_the_update():
    x = square_clip()
    m = tsgf.saliency(x, tsgf_cfg())
    w = tsgf.filter_weight(m, 0.1)
    grad = torch.randn_like(x)
    filtered = tsgf.filter_gradient(grad, w)
    static = (m == 0).expand_as(x)
    torch.testing.assert_close(filtered[static], 0.1 * grad[static])
    peak = (m == m.max()).expand_as(x)
    torch.testing.assert_close(filtered[peak], grad[peak] * (0.1 + 0.9 * m.max()))
    assert torch.equal(tsgf.filter_gradient(grad, tsgf.filter_weight(m, 1.0)), grad)
    new = x + grad
    stepped = tsgf.filter_update(x, new, w)
    torch.testing.assert_close((stepped - x)[static], 0.1 * grad[static])
    torch.testing.assert_close(tsgf.filter_update(x, new, tsgf.filter_weight(m, 1.0)), new)


def test_saliency_is_batched_and_per_clip():
    clips = torch.cat([square_clip(step=(0, 2)), square_clip(step=(2, 0)), torch.zeros(1, 3, 8, 32, 32)])
    together = tsgf.saliency(clips, tsgf_cfg())
    alone = torch.cat([tsgf.saliency(c[None], tsgf_cfg()) for c in clips])
    torch.testing.assert_close(together, alone)


def test_saliency_boxes_centre_on_the_heat():
    heat = torch.zeros(64, 32, 32)
    heat[:, 20, 5] = 1.0
    g = torch.Generator().manual_seed(0)
    boxes = tsgf.saliency_boxes(heat, torch.rand(64, 2, generator=g), (0.1, 0.3), (0.75, 1.33), delta=0.0, generator=g)
    inside = box_mask(boxes, 32, 32)[:, 0, 0, 20, 5]
    assert inside.all()  # the hot pixel is in every box, even after moving boxes into the image
    assert (boxes[:, 0].abs() + boxes[:, 2] / 2 <= 1 + 1e-6).all() and (
        boxes[:, 1].abs() + boxes[:, 3] / 2 <= 1 + 1e-6
    ).all()
    flat = tsgf.saliency_boxes(
        torch.zeros(2000, 32, 32), torch.zeros(2000, 2), (0.01, 0.01), (1.0, 1.0), delta=0.05, generator=g
    )
    assert flat[:, 0].std() > 0.5 and flat[:, 1].std() > 0.5  # no heat: centres anywhere


def test_cutmix_pastes_the_same_box_in_every_frame():
    x = torch.stack([torch.full((3, 4, 16, 16), float(i)) for i in range(3)])
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    mixed = tsgf.saliency_cutmix(x, boxes, torch.tensor([1, 2, 0]))
    mask = box_mask(boxes, 16, 16)[0, 0, 0].bool()
    assert (mixed[0][:, :, mask] == 1).all() and (mixed[0][:, :, ~mask] == 0).all()
    assert (mixed[2][:, :, mask] == 0).all() and (mixed[2][:, :, ~mask] == 2).all()


def test_motion_energy_is_the_mean_frame_difference_and_scores_windows_by_it_and_the_margin():
    from tsgd_ray.core.selection import window_score

    still = torch.rand(1, 3, 1, 16, 16).expand(1, 3, 6, 16, 16)
    square = square_clip(frames=6, size=16, step=(0, 1))  # 4x4, one pixel a frame: 2 x 4 pixels change
    one_frame = torch.rand(1, 3, 1, 16, 16)
    energy = tsgf.motion_energy(torch.cat([still, square, 2 * square]))
    assert energy.tolist() == pytest.approx([0.0, 8 / 256, 16 / 256])
    assert tsgf.motion_energy(one_frame).tolist() == [0.0]
    # softmax of (log 3, 0, 0) is (0.6, 0.2, 0.2): margin 0.4 for label 0, -0.4 for label 1
    logits = torch.tensor([[3.0, 1.0, 1.0]]).log().expand(4, 3)
    labels = torch.tensor([0, 0, 0, 1])
    scores = window_score(logits, labels, torch.tensor([0.0, 1.0, 2.0, 2.0]))
    assert scores.tolist() == pytest.approx([0.0, 0.4, 0.8, -0.8])
