"""Labels stored with a set: views drawn from each clip's own stream, the teacher's logits on them,
their replay in a student step without the teacher, and the label regimes' settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tsgd_ray.config import load_config
from tsgd_ray.core import labels, training
from tsgd_ray.core.models import build_model
from tsgd_ray.data import clip_table
from tsgd_ray.settings import input_settings, student_settings, view_settings


def _settings(*overrides: str) -> labels.ViewSettings:
    return view_settings(load_config("default", list(overrides)))


def test_a_clips_views_depend_on_its_key_alone_and_fewer_views_are_a_prefix():
    heat = torch.rand(6, 16, 16)
    keys = labels.clip_keys([0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1])
    views = labels.view_params(heat, keys, 0, 8, _settings())
    assert views.shape == (6, 8, labels.VIEW_PARAMS) and views.dtype == torch.float32
    alone = labels.view_params(heat[3:4], keys[3:4], 0, 4, _settings())  # another batch, fewer views
    assert torch.equal(alone[0], views[3, :4])
    assert not torch.equal(labels.view_params(heat, keys, 1, 8, _settings()), views)  # the seed matters
    assert set(views[..., 4].unique().tolist()) == {-1.0, 1.0}  # flips, drawn per view
    assert set(views[..., 6].unique().tolist()) == {0.0}  # time reversal off by default
    reversed_ = labels.view_params(heat, keys, 0, 8, _settings("distill.labels.augment.time_reverse=true"))
    assert set(reversed_[..., 6].unique().tolist()) == {0.0, 1.0}


def test_tsgfa_views_centre_their_crops_on_the_heat():
    heat = torch.zeros(64, 16, 16)
    heat[:, 2, 13] = 1.0  # all the motion in one pixel, top right
    keys = [str(i) for i in range(64)]
    small = ["distill.labels.augment.crop_scale=[0.05,0.05]", "tsgf.crop_delta=0.0"]
    salient = labels.view_params(heat, keys, 0, 1, _settings(*small))[:, 0]
    uniform = labels.view_params(heat, keys, 0, 1, _settings(*small, "distill.labels.tsgfa=false"))[:, 0]
    pixel = torch.tensor([2 * 13 + 1, 2 * 2 + 1]) / 16 - 1  # (cx, cy) of that pixel's centre
    inside = lambda boxes: ((boxes[:, :2] - pixel).abs() <= boxes[:, 2:4] / 2).all(1).float().mean()  # noqa: E731
    assert inside(salient) == 1.0 and inside(uniform) < 0.2


def test_stored_logits_are_the_teachers_on_the_replayed_view():
    torch.manual_seed(0)
    teacher = build_model("mini_c3d", 5, (4, 16, 16), 8, 2).eval()
    x = torch.randn(6, 3, 4, 16, 16)
    params = labels.view_params(torch.rand(6, 16, 16), [str(i) for i in range(6)], 0, 4, _settings())
    logits = labels.label_views(teacher, x, params, chunk=4)
    assert logits.shape == (6, 4, 5) and logits.dtype == torch.float16
    view, target = labels.replay(x, params, logits, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(view)
    assert torch.allclose(target, expected, atol=2e-2, rtol=1e-2)  # fp16 storage
    picked = [next(k for k in range(4) if torch.equal(target[i], logits[i, k].float())) for i in range(6)]
    assert len(set(picked)) > 1  # different clips replay different views


def _stored_student(cfg, x, y, stored, seed=0):
    torch.manual_seed(0)
    student = build_model("mini_r2plus1d", 3, (4, 16, 16), 4, 2)
    settings = student_settings(cfg)
    losses = []
    training.train_student(
        student, None, x, y, settings, seed, callback=lambda e, m: losses.append(m["loss"]), stored=stored
    )
    return student, losses


def test_a_student_learns_from_stored_labels_without_the_teacher():
    cfg = load_config(
        "default",
        [
            "data.num_frames=4",
            "data.height=16",
            "data.width=16",
            "evaluate.labels=stored",
            "evaluate.views=4",
            "evaluate.epochs=30",
            "evaluate.batch_size=6",
        ],
    )
    torch.manual_seed(1)
    teacher = build_model("mini_c3d", 3, (4, 16, 16), 8, 2).eval()
    x = torch.randint(0, 256, (6, 4, 16, 16, 3), dtype=torch.uint8)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    normalised = input_settings(cfg).model_input(x)
    params = labels.view_params(torch.rand(6, 16, 16), labels.clip_keys(y, [0, 1] * 3), 0, 8, _settings())
    stored = (params, labels.label_views(teacher, normalised, params))
    first, losses = _stored_student(cfg, x, y, stored)
    assert losses[-1] < 0.5 * losses[0]  # KL to the stored logits falls
    again, _ = _stored_student(cfg, x, y, stored)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="replays 4 views per clip; the set stores 2"):
        _stored_student(cfg, x, y, (params[:, :2], stored[1][:, :2]))
    with pytest.raises(ValueError, match="the set stores 0"):
        _stored_student(cfg, x, y, None)


def test_hard_labels_keep_the_teachers_label_preserving_crops():
    cfg = load_config(
        "default", ["evaluate.labels=hard", "evaluate.augment.time_reverse=true", "evaluate.augment.cutmix=0.5"]
    )
    s = student_settings(cfg)
    assert s.regime.name == "hard" and s.crop.scale == tuple(cfg.augment.crop_scale) and not s.crop.hflip
    assert not s.time_reverse and s.cutmix == 0.0 and s.mixup == 0.0
    online = student_settings(load_config("default", ["evaluate.labels=soft_kl"]))
    assert online.crop.scale == tuple(cfg.evaluate.augment.crop_scale) and online.crop.hflip


def test_stored_labels_round_trip_through_a_clip_table(tmp_path):
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (5, 4, 8, 8, 3), dtype=np.uint8)
    y, idx = np.array([1, 0, 1, 0, 2]), np.array([0, 0, 1, 1, 0])
    params = rng.random((5, 3, 7), dtype=np.float32)
    logits = rng.standard_normal((5, 3, 4)).astype(np.float16)
    data = clip_table.clip_table_bytes(clips, y, idx, ["a"] * 5, stored=(params, logits))
    (tmp_path / "t.parquet").write_bytes(data)
    batch = clip_table.concat_clips(list(clip_table.read_clip_tables([str(tmp_path / "t.parquet")], (4, 8, 8, 3))), ())
    order = np.lexsort((idx, y))  # by_class: rows sorted by (label, index)
    assert np.array_equal(batch["view_params"].numpy(), params[order])
    assert np.array_equal(batch["logits"].numpy(), logits[order]) and batch["logits"].dtype == torch.float16
    (tmp_path / "plain.parquet").write_bytes(clip_table.clip_table_bytes(clips, y, idx, ["a"] * 5))
    plain = clip_table.concat_clips(
        list(clip_table.read_clip_tables([str(tmp_path / "plain.parquet")], (4, 8, 8, 3))), ()
    )
    assert plain["view_params"] is None and plain["logits"] is None


def test_stored_views_cannot_exceed_what_the_set_stores():
    from tsgd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="evaluate.views: the set stores distill.labels.views=4"):
        load_config("default", ["evaluate.labels=stored", "distill.labels.views=4", "evaluate.views=16"])
