"""Augmentation, teacher and student training, selection baselines, on small real tensors."""

import contextlib
import copy
import io

import pytest
import torch
from conftest import tiny_config

from tsgd_ray.config import load_config
from tsgd_ray.core import augment, selection, training
from tsgd_ray.core.clips import to_model_input, to_uint8_clips
from tsgd_ray.core.models import build_model
from tsgd_ray.data.in_memory import load_split
from tsgd_ray.settings import crop_settings, input_settings, student_settings, teacher_settings


def direction_clips(n, seed, size=16, frames=6):
    """uint8 (n, F, H, W, 3): a bright square at a random place moving right (class 0) or left (1)."""
    g = torch.Generator().manual_seed(seed)
    clips = torch.randint(0, 40, (n, frames, size, size, 3), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    for i in range(n):
        y0, x0 = torch.randint(0, size - 4, (2,), generator=g).tolist()
        step = 2 if labels[i] == 0 else -2
        for t in range(frames):
            x = (x0 + step * t) % size
            clips[i, t, y0 : y0 + 4, max(x - 2, 0) : x + 2] = 255
    return clips, labels


def test_clip_conversion_round_trips():
    cfg = load_config(None)
    clips = torch.randint(0, 256, (2, 4, 8, 8, 3), dtype=torch.uint8)
    x = to_model_input(clips, cfg.data.mean, cfg.data.std)
    assert x.shape == (2, 3, 4, 8, 8)
    assert torch.equal(to_uint8_clips(x, cfg.data.mean, cfg.data.std), clips)


def test_augmentation_is_the_same_for_every_frame_of_a_clip():
    cfg = load_config(None)
    frame = torch.rand(4, 3, 1, 16, 16)
    static = frame.expand(4, 3, 5, 16, 16).contiguous()
    out = training.random_augment(static, crop_settings(cfg.augment), torch.Generator().manual_seed(0))
    assert torch.allclose(out, out[:, :, :1].expand_as(out))  # frames stay identical
    assert not torch.allclose(out, static)
    x = torch.randn(2, 3, 4, 8, 10)
    assert torch.allclose(augment.apply_params(x, augment.identity_params(2)), x, atol=1e-6)


def test_hflip_off_never_mirrors():
    u = torch.rand(1000, augment.UNIFORMS_PER_CLIP, generator=torch.Generator().manual_seed(0))
    assert (augment.random_params(u, (0.5, 1.0), (0.75, 1.33), hflip=False, roll=0.1)[:, 4] == 1).all()
    flips = augment.random_params(u, (0.5, 1.0), (0.75, 1.33), hflip=True, roll=0.1)[:, 4]
    assert 400 < int((flips == -1).sum()) < 600


def motion_config(*overrides):
    return load_config(
        None,
        [
            "augment.hflip=false",
            "teacher.epochs=12",
            "teacher.batch_size=16",
            "teacher.lr=0.003",
            "evaluate.epochs=30",
            "evaluate.batch_size=8",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def motion_teacher():
    cfg = motion_config()
    clips, labels = direction_clips(96, seed=0)
    torch.manual_seed(0)
    teacher = build_model("mini_c3d", 2, (6, 16, 16), width=8, depth=2)
    training.train_teacher(teacher, clips, labels, teacher_settings(cfg))
    return teacher


def test_a_teacher_learns_direction_of_motion(motion_teacher):
    cfg = motion_config()
    test, labels = direction_clips(64, seed=1)
    assert training.topk_accuracy(training.predict(motion_teacher, test, input_settings(cfg)), labels) >= 0.9
    reversed_clips = test.flip(1)  # time reversed: the other class
    assert (
        training.topk_accuracy(training.predict(motion_teacher, reversed_clips, input_settings(cfg)), 1 - labels) >= 0.9
    )


STUDENT_PROTOCOLS = {
    "soft_kl tsgfa": ["evaluate.labels=soft_kl"],
    "soft_kl uniform crops": ["evaluate.labels=soft_kl", "evaluate.tsgfa=false"],
    "soft_kl every transform": [
        "evaluate.labels=soft_kl",
        "evaluate.augment.time_reverse=true",
        "evaluate.augment.cutmix=0.3",
        "evaluate.augment.mixup=0.3",
        "evaluate.ema=0.9",
    ],
    "soft_mse": ["evaluate.labels=soft_mse"],
    "hard": ["evaluate.labels=hard", "evaluate.augment.hflip=false"],  # a flip would swap right and left
}


@pytest.mark.parametrize("protocol", list(STUDENT_PROTOCOLS))
def test_students_learn_from_a_few_clips(motion_teacher, protocol):
    cfg = motion_config(*STUDENT_PROTOCOLS[protocol])
    clips, labels = direction_clips(16, seed=2)
    test, test_labels = direction_clips(64, seed=3)
    torch.manual_seed(0)
    student = build_model("mini_c3d", 2, (6, 16, 16), width=8, depth=2)
    before = training.topk_accuracy(training.predict(student, test, input_settings(cfg)), test_labels)
    losses = []
    training.train_student(
        student,
        motion_teacher,
        to_model_input(clips, cfg.data.mean, cfg.data.std),
        labels,
        student_settings(cfg),
        seed=0,
        callback=lambda epoch, m: losses.append(m["loss"]),
    )
    after = training.topk_accuracy(training.predict(student, test, input_settings(cfg)), test_labels)
    assert len(losses) == 30 and losses[-1] < losses[0]
    assert after >= 0.75 and after > before


def test_a_student_trained_on_uint8_clips_is_the_one_trained_on_their_model_input(motion_teacher):
    """Evaluate workers keep their synthetic rows as uint8 and normalise per batch: same weights."""
    cfg = motion_config("evaluate.epochs=3", "evaluate.labels=soft_kl")
    clips, labels = direction_clips(70, seed=4)  # more than one 64-clip saliency chunk
    students = []
    for x in (clips, to_model_input(clips, cfg.data.mean, cfg.data.std)):
        torch.manual_seed(0)
        student = build_model("mini_c3d", 2, (6, 16, 16), width=8, depth=2)
        students.append(training.train_student(student, motion_teacher, x, labels, student_settings(cfg), seed=0))
    for a, b in zip(students[0].state_dict().values(), students[1].state_dict().values()):
        assert torch.equal(a, b)


def test_a_student_resumed_from_a_mid_run_checkpoint_ends_as_the_uninterrupted_one(motion_teacher):
    """Evaluation checkpoints a student every few epochs; a student resumed after a lost node
    (weights, optimiser, schedule, the EMA and the augmentation stream restored through a
    weights_only load) must end with the weights of the run that was never interrupted."""
    cfg = motion_config("evaluate.epochs=4", "evaluate.labels=soft_kl", "evaluate.ema=0.9")
    clips, labels = direction_clips(12, seed=5)
    settings = student_settings(cfg)
    saved = {}

    def train(resume=None):
        torch.manual_seed(0)
        student = build_model("mini_c3d", 2, (6, 16, 16), width=8, depth=2)

        def keep_epoch_one(state):
            if state.epoch == 1 and resume is None:
                buffer = io.BytesIO()
                torch.save(state.state_dict(), buffer)
                saved["state"] = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

        return training.train_student(
            student, motion_teacher, clips, labels, settings, seed=0, callbacks=[keep_epoch_one], resume=resume
        )

    whole = train()
    assert saved["state"]["epoch"] == 1 and {"generator", "average"} <= set(saved["state"])
    resumed = train(resume=saved["state"])
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_student_views_reverse_time_and_centre_crops_on_the_heat():
    cfg = load_config(
        None,
        [
            "evaluate.augment.hflip=false",
            "evaluate.augment.roll=0",
            "evaluate.augment.time_reverse=true",
            "evaluate.augment.crop_scale=[0.1,0.1]",
            "tsgf.crop_delta=0",
        ],
    )
    ramp = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(64, 3, 4, 16, 16).contiguous()
    heat = torch.zeros(64, 16, 16)
    heat[:, 12, 3] = 1.0  # all the heat at row 12, column 3
    ramp[:, :, :, 12, 3] += 100  # mark that pixel
    view = training.student_view(ramp, heat, student_settings(cfg), torch.Generator().manual_seed(0))
    first = view[:, 0, 0].amin(dim=(1, 2))  # frame 0 reads 0 forwards, 3 reversed (+ the mark, whatever)
    reversed_share = (first >= 2.5).float().mean()
    assert 0.3 < reversed_share < 0.7
    assert (view[:, 0, 0].amax(dim=(1, 2)) > 50).all()  # every crop holds the marked pixel
    flat = load_config(
        None, ["evaluate.augment.roll=0", "evaluate.augment.crop_scale=[0.1,0.1]", "evaluate.tsgfa=false"]
    )
    uniform = training.student_view(ramp, heat, student_settings(flat), torch.Generator().manual_seed(0))
    assert (uniform[:, 0, 0].amax(dim=(1, 2)) > 50).float().mean() < 0.5  # uniform crops mostly miss it


def test_a_student_ema_is_the_average_of_its_weights():
    model = torch.nn.Linear(2, 1)
    ema = training.WeightEMA(model, 0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    ema.copy_to(model)
    torch.testing.assert_close(model.weight, start + 1.0)


def test_the_ema_updates_every_tensor_in_one_foreach_call_as_per_tensor_lerps_would():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_model("mini_c3d", 4, (4, 8, 8), 4, 2)  # 4 convolution/BN tensors per block, a head
    ema, reference = training.WeightEMA(model, 0.9), copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(3, 3, 4, 8, 8))  # BN statistics and batch counts move too
    with Calls() as calls:
        ema.update(model)
    lerps = [n for n in calls.names if "lerp" in n]
    assert lerps == ["_foreach_lerp_"], calls.names  # not one lerp_ per tensor
    for k, v in model.state_dict().items():  # the same numbers as a lerp_ per tensor, bit for bit
        expected = reference[k].lerp(v, 0.1) if v.is_floating_point() else v
        assert torch.equal(ema.shadow[k], expected), k


def test_distillation_losses():
    student = student_settings(load_config(None))
    logits = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    assert training.distillation_loss(logits, logits, y, student).abs() < 1e-6  # KL of identical logits
    assert training.distillation_loss(logits, logits + 1.0, y, student).abs() < 1e-6  # softmax is shift-free
    mse = training.distillation_loss(
        logits, logits, y, student_settings(load_config(None, ["evaluate.labels=soft_mse"]))
    )
    torch.testing.assert_close(mse, 0.1 * torch.nn.functional.cross_entropy(logits, y))


def test_topk_accuracy():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 0])
    assert training.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert training.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert training.topk_accuracy(logits, labels, 5) == 1.0


def test_selection_is_per_class_and_deterministic():
    """random_real: the seeded order of each class (the order the pipeline's statistics pass
    keeps), whatever order the clips come in; a longer draw starts with the shorter one."""
    labels = torch.tensor([0, 1, 2] * 10)
    ids = [f"v{i:02d}" for i in range(30)]
    choice = selection.random_real(ids, labels, 3, ipc=4, seed=5)
    assert all(len(v) == 4 and all(labels[r] == c for r in v) for c, v in choice.items())
    ranked = sorted((selection.seeded_priority(5, ids[r]), r) for r in range(0, 30, 3))
    assert choice[0] == [r for _, r in ranked[:4]]
    backwards = selection.random_real(ids[::-1], labels.flip(0), 3, ipc=4, seed=5)  # the same clips, reversed
    assert {c: sorted(ids[::-1][r] for r in v) for c, v in backwards.items()} == {
        c: sorted(ids[r] for r in v) for c, v in choice.items()
    }
    longer = selection.random_real(ids, labels, 3, ipc=8, seed=5)
    assert all(longer[c][:4] == choice[c] for c in range(3))
    assert selection.random_real(ids, labels, 3, ipc=4, seed=5, start=4) == {c: longer[c][4:] for c in range(3)}
    assert selection.random_real(ids, labels, 3, ipc=4, seed=6) != choice
    with pytest.raises(ValueError, match="fewer real clips"):
        selection.random_real(ids, labels, 3, ipc=11, seed=0)
    rows, classes, indices = selection.flatten(choice)
    assert classes.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and indices.tolist() == [0, 1, 2, 3] * 3


def test_k_center_covers_the_class_and_moderate_skips_both_ends():
    # class 0: three tight directions (0, 45 and 90 degrees) with near copies; class 1 elsewhere
    angles = torch.tensor([0.0, 0.01, 0.02, 0.78, 0.79, 1.57, 1.56, 3.0, 3.1, 3.05])
    features = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    choice = selection.k_center(features, labels, 2, ipc=3)
    assert choice[0][0] in (3, 4)  # the middle direction is nearest the class mean
    assert sorted(angles[choice[0]].round().tolist()) == [0.0, 1.0, 2.0]  # one clip per direction
    assert selection.k_center(features, labels, 2, ipc=2, candidates={0: [0, 1, 2, 5], 1: [7, 8]})[0] == [2, 5]
    same = torch.ones(4, 2)  # identical clips: still four different rows
    assert sorted(selection.k_center(same, torch.zeros(4, dtype=torch.long), 1, ipc=4)[0]) == [0, 1, 2, 3]
    losses = torch.tensor([0.1, 5.0, 1.0, 0.9, 1.5, 0.0, 9.0, 1.0, 1.0, 1.0])
    assert sorted(selection.moderate(losses, labels, 2, ipc=3)[0]) == [2, 3, 4]  # class 0: median 1.0
    with pytest.raises(ValueError, match="fewer candidates"):
        selection.moderate(losses, labels, 2, ipc=3, candidates={0: [0, 1], 1: [7, 8]})


def test_load_split_decodes_the_builtin_dataset(tmp_path):
    cfg = tiny_config(tmp_path)
    clips, labels, classes = load_split(cfg, "test")
    assert clips.shape == (16, 8, 32, 32, 3) and clips.dtype == torch.uint8
    assert sorted(labels.tolist()) == sorted(list(range(8)) * 2) and len(classes) == 8


def _regression_fit(resume=None, callbacks=(), epoch_context=contextlib.nullcontext):
    """A linear regression trained by `training.fit`: 4 epochs of 3 batches; returns (model, state)."""
    generator = torch.Generator().manual_seed(0)
    data, target = torch.randn(12, 4, generator=generator), torch.randn(12, 1, generator=generator)
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 1)

    def step(rows, optimizer):
        loss = ((model(data[rows]) - target[rows]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    settings = training.FitSettings(epochs=4, batch_size=4, lr=0.05, weight_decay=0.01)
    batches = lambda epoch: [slice(i, i + 4) for i in range(0, 12, 4)]  # noqa: E731
    state = training.fit(model, batches, step, settings, 3, callbacks, resume=resume, epoch_context=epoch_context)
    return model, state


def test_fit_resumed_from_a_saved_state_ends_where_the_uninterrupted_run_ends():
    saved = {}

    def keep_epoch_one(state):
        if state.epoch == 1:
            saved["state"] = copy.deepcopy(state.state_dict())

    whole, state = _regression_fit(callbacks=[keep_epoch_one])
    resumed, resumed_state = _regression_fit(resume=saved["state"])
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)
    assert [h["loss"] for h in resumed_state.history] == [h["loss"] for h in state.history]
    assert [h["step"] for h in state.history] == [0, 1, 2, 3] and not whole.training


def test_fit_calls_back_after_each_epochs_context_has_closed():
    """A callback may be a collective across workers (a Ray Train report): it must run after DDP's
    join has closed for the epoch, never inside it (two workers waited on each other for ever)."""
    inside, seen = [False], []

    @contextlib.contextmanager
    def join():
        inside[0] = True
        yield
        inside[0] = False

    _regression_fit(callbacks=[lambda state: seen.append((state.epoch, inside[0]))], epoch_context=join)
    assert seen == [(0, False), (1, False), (2, False), (3, False)]
