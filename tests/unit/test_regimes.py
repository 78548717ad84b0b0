"""Label regimes as a registry: every registered regime loads, trains a student step and is in the
reference; a regime registered here, which stores more views with the set and adds the class
cross-entropy to the replayed KL, reaches validation, the reference, the stage keys, the plan,
the student's loss and quality.py with no other edit."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from conftest import REPO

from tsgd_ray import layout
from tsgd_ray.config import ConfigError, Method, load_config, reference, regimes
from tsgd_ray.config.regimes import LabelRegime, soft_kl_loss
from tsgd_ray.core import training
from tsgd_ray.core.models import build_model
from tsgd_ray.methods import method_config
from tsgd_ray.plan import make_plan, render
from tsgd_ray.settings import student_settings


def _hardmix_loss(s, t, y, settings):
    return soft_kl_loss(s, t, y, settings) + torch.nn.functional.cross_entropy(s, y)


HARDMIX = LabelRegime(
    "stored_hardmix",
    "the stored views' KL plus the class cross-entropy, 32 views stored (a test's regime)",
    _hardmix_loss,
    replays_views=True,
    stores=lambda cfg: {"distill": {"labels": {"views": 32}}},
    without_set="soft_kl",
)


@pytest.fixture
def hardmix():
    regimes.register(HARDMIX)
    yield HARDMIX
    regimes.unregister(HARDMIX.name)


def _student_step(cfg, views: int = 4):
    """One student step (no weight change) on 2 random clips of cfg's shape: (loss, settings)."""
    torch.manual_seed(0)
    d = cfg.data
    shape = (d.num_frames, d.height, d.width)
    x = torch.rand(2, 3, *shape)
    y = torch.tensor([0, 1])
    settings = student_settings(cfg)
    student = build_model("mini_c3d", 8, shape, 4, 1)
    teacher = build_model("mini_c3d", 8, shape, 4, 1).eval()
    stored = (torch.rand(2, views, 7).clamp(0.3, 1.0), torch.randn(2, views, 8))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)  # the step leaves the weights alone
    loss = training.student_step(
        student, teacher, optimizer, x, y, settings, torch.Generator().manual_seed(0), stored=stored
    )
    return loss, settings


@pytest.mark.parametrize("name", regimes.registered())
def test_every_registered_regime_loads_trains_a_step_and_is_documented(name):
    cfg = load_config("default", [f"evaluate.labels={name}", "evaluate.views=4"])
    loss, settings = _student_step(cfg)
    assert settings.regime is regimes.get(name) and math.isfinite(loss.item()) and loss.item() >= 0
    assert f"`{name}`: {regimes.get(name).description}" in reference.render()
    regime = regimes.get(name)
    assert regime.for_student(False).replays_views is False  # a student with no stored set never replays
    assert not (regime.teacher_online and regime.replays_views)  # one source of targets


def test_an_unknown_regime_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"evaluate.labels: must be one of soft_kl, soft_mse, stored, hard"):
        load_config("default", ["evaluate.labels=nope"])


def test_a_new_regime_is_one_registration(hardmix, tmp_path):
    out = f"storage.output_root={tmp_path}"
    cfg = load_config("default", [out, "evaluate.labels=stored_hardmix"])  # validation knows it
    assert f"`stored_hardmix`: {hardmix.description}" in reference.render()  # the generated reference

    # what the set stores: the distilling methods' configs (and so their stage keys) take it
    stored = load_config("default", [out])
    tsgd = method_config(cfg, Method.tsgd)
    assert tsgd.distill.labels.views == 32 and method_config(stored, Method.tsgd).distill.labels.views == 16
    assert layout.of(tsgd).synthetic != layout.of(method_config(stored, Method.tsgd)).synthetic
    assert layout.of(tsgd).teacher == layout.of(method_config(stored, Method.tsgd)).teacher  # the teacher is shared
    with pytest.raises(ConfigError, match="evaluate.views"):  # replays views: no more than the set stores
        load_config("default", [out, "evaluate.labels=stored_hardmix", "evaluate.views=17"])

    # the plan counts the 32 views' teacher forwards, and no teacher at the students' steps
    plan = make_plan(load_config("kinetics400", [out, "evaluate.labels=stored_hardmix"]), table=[])
    assert "labels: 32 views x" in render(plan)
    plain = make_plan(load_config("kinetics400", [out]), table=[])
    wall = {p: {s.name: s.wall_s for s in plan_["stages"]} for p, plan_ in (("mix", plan), ("plain", plain))}
    assert wall["mix"]["evaluate/tsgd"] == pytest.approx(wall["plain"]["evaluate/tsgd"])
    assert wall["mix"]["distill/tsgd"] > wall["plain"]["distill/tsgd"]

    # the student's loss: KL to the replayed logits plus the class cross-entropy
    loss, settings = _student_step(load_config("default", ["evaluate.labels=stored_hardmix", "evaluate.views=4"]))
    kl, _ = _student_step(load_config("default", ["evaluate.labels=stored", "evaluate.views=4"]))
    assert settings.regime is hardmix and loss.item() > kl.item() > 0

    # quality.py --regimes takes it, with or without a view count
    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    assert quality.regime_overrides("stored_hardmix") == ["evaluate.labels=stored_hardmix"]
    assert quality.regime_overrides("stored_hardmix8") == ["evaluate.labels=stored_hardmix", "evaluate.views=8"]
    with pytest.raises(SystemExit, match="stored_hardmix"):
        quality.regime_overrides("hard8")  # hard replays nothing
