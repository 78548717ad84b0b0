"""Recovery: determinism across partitions, the loss falls, TSGFO leaves static regions alone."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tsgd_ray.config import load_config
from tsgd_ray.core import recovery, training
from tsgd_ray.core.bn_stats import accumulate_statistics
from tsgd_ray.core.clips import valid_range
from tsgd_ray.core.models import build_model
from tsgd_ray.settings import recovery_settings, saliency_settings

SIZE = (4, 16, 16)


def config(*overrides):
    return load_config(None, ["distill.iterations=6", "distill.lr=0.05", "distill.log_every=1", *overrides])


def settings(*overrides) -> recovery.RecoverySettings:
    return recovery_settings(config(*overrides))


def fit_full_batch(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """Adam(0.01) on cross-entropy over the whole of (x, y) for `steps` steps; ends in eval mode."""
    optimizer = torch.optim.Adam(teacher.parameters(), 0.01)
    teacher.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(teacher(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.eval()


def teacher_and_stats(classes=6):
    """A tiny teacher trained to tell apart noisy copies of one random prototype clip per class."""
    torch.manual_seed(0)
    teacher = build_model("mini_c3d", classes, SIZE, width=4, depth=2)
    g = torch.Generator().manual_seed(1)
    prototypes = torch.randn(classes, 3, *SIZE, generator=g)
    y = torch.arange(48) % classes
    x = prototypes[y] + torch.randn(48, 3, *SIZE, generator=g)
    fit_full_batch(teacher, x, y, steps=30)
    return teacher, accumulate_statistics(teacher, [(x[:24], y[:24]), (x[24:], y[24:])], classes)


def synthetic_set(classes, ipc, seed=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([c for c in classes for _ in range(ipc)])
    indices = torch.tensor([i for _ in classes for i in range(ipc)])
    return torch.randn(len(labels), 3, *SIZE, generator=g).clamp(-1.5, 1.5), labels, indices


def test_partitioning_and_retries_do_not_change_the_videos():
    teacher, stats = teacher_and_stats()
    cfg = config("distill.chunk_size=4")  # ipc 2: two classes per forward pass
    init, labels, indices = synthetic_set(range(6), ipc=2)
    whole = recovery.recover(teacher, init, labels, indices, recovery_settings(cfg), stats)
    first, second = labels < 3, labels >= 3
    half_a = recovery.recover(teacher, init[first], labels[first], indices[first], recovery_settings(cfg), stats)
    half_b = recovery.recover(teacher, init[second], labels[second], indices[second], recovery_settings(cfg), stats)
    assert torch.equal(whole[first], half_a) and torch.equal(whole[second], half_b)
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    again = recovery.recover(
        teacher, init[shuffled], labels[shuffled], indices[shuffled], recovery_settings(cfg), stats
    )
    assert torch.equal(again, whole[shuffled])  # input order and retries do not matter either
    assert not torch.equal(whole, init)


def test_chunks_hold_whole_classes_and_respect_the_size():
    labels = torch.tensor([2, 0, 0, 1, 1, 1, 2])
    indices = torch.tensor([0, 1, 0, 0, 1, 2, 1])
    chunks = recovery.plan_chunks(labels, indices, chunk_size=3)
    assert [c.group_classes for c in chunks] == [[0], [1], [2]]
    assert [c.positions.tolist() for c in chunks] == [[2, 1], [3, 4, 5], [0, 6]]
    big = recovery.plan_chunks(torch.tensor([0] * 5), torch.arange(5), chunk_size=2)
    assert [c.positions.tolist() for c in big] == [[0, 1], [2, 3], [4]]  # a class larger than a chunk


def test_recovery_lowers_the_loss_and_stays_in_the_valid_range():
    teacher, stats = teacher_and_stats()
    cfg = config("distill.iterations=30", "distill.lr=0.1")
    init, labels, indices = synthetic_set(range(6), ipc=1)
    history = []
    out = recovery.recover(
        teacher,
        init,
        labels,
        indices,
        recovery_settings(cfg),
        stats,
        callback=lambda step, m: history.append((step, m)),
    )
    assert [s for s, _ in history] == list(range(30))
    assert set(history[0][1]) == {"loss", "ce", "bn", "lr", "stopped", "edit_static", "edit_moving", "motion_share"}
    assert history[0][1]["edit_moving"] == 0 and history[-1][1]["edit_moving"] > 0  # noise init: every pixel moves
    assert history[-1][1]["ce"] < 0.5 * history[0][1]["ce"]
    assert history[0][1]["lr"] == pytest.approx(0.1) and history[-1][1]["lr"] < 0.01
    low, high = valid_range(cfg.data.mean, cfg.data.std, out)
    assert (out >= low - 1e-6).all() and (out <= high + 1e-6).all()
    with torch.no_grad():
        assert (teacher(out).argmax(1) == labels).float().mean() > (teacher(init).argmax(1) == labels).float().mean()


def test_tsgfo_with_w_min_zero_leaves_static_regions_untouched():
    teacher, stats = teacher_and_stats()
    cfg = config("tsgf.w_min=0", "distill.iterations=4", "tsgf.spatial_kernel=1", "tsgf.window=0")
    init = torch.zeros(1, 3, *SIZE)
    init[0, :, :, 0:2, :] = 0.5
    for t in range(SIZE[0]):
        init[0, :, t, 0:2, 2 * t : 2 * t + 2] = 1.5  # motion only in rows 0-1
    out = recovery.recover(teacher, init, torch.tensor([0]), torch.tensor([0]), recovery_settings(cfg), stats)
    assert torch.equal(out[0, :, :, 8:], init[0, :, :, 8:])  # far from the motion: not one bit changed
    assert not torch.equal(out[0, :, :, :2], init[0, :, :, :2])
    off = recovery.recover(
        teacher,
        init,
        torch.tensor([0]),
        torch.tensor([0]),
        settings("tsgf.enabled=false", "distill.iterations=4"),
        stats,
    )
    assert not torch.equal(off[0, :, :, 8:], init[0, :, :, 8:])  # the SRe2L baseline changes everything


def test_bn_targets_and_the_ema_of_group_statistics_each_change_the_videos_and_noise_init_is_per_video():
    teacher, stats = teacher_and_stats()
    init, labels, indices = synthetic_set(range(2), ipc=1)
    outs = [
        recovery.recover(teacher, init, labels, indices, settings(*keys, "distill.lambda_bn=1"), stats)
        for keys in (
            ["distill.bn_target=global"],
            ["distill.bn_target=class_mixture"],
            ["distill.bn_target=mixed"],
            ["distill.bn_target=mixed", "distill.bn_ema=0.9"],
        )
    ]
    assert all(not torch.equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1 :])
    low, high = valid_range(config().data.mean, config().data.std, init)
    n1 = recovery.noise_init((3, *SIZE), torch.tensor([0, 1]), torch.tensor([0, 0]), 7, low, high)
    n2 = recovery.noise_init((3, *SIZE), torch.tensor([1]), torch.tensor([0]), 7, low, high)
    assert torch.equal(n1[1], n2[0]) and not torch.equal(n1[0], n1[1])


def test_no_iterations_leave_the_init_as_it_is():
    """iterations=0 (random_real, packed_real): the videos are their init clips."""
    teacher, stats = teacher_and_stats()
    init, labels, indices = synthetic_set(range(3), ipc=2)
    out = recovery.recover(teacher, init, labels, indices, settings("distill.iterations=0"), stats)
    assert torch.equal(out, init.float())


def test_a_bn_term_without_bn_layers_is_refused():
    teacher = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.Flatten(), nn.LazyLinear(2))
    teacher(torch.zeros(1, 3, *SIZE))
    init, labels, indices = synthetic_set(range(2), ipc=1)
    with pytest.raises(recovery.RecoveryError, match="lambda_bn"):
        recovery.recover(teacher, init, labels, indices, settings())
    out = recovery.recover(teacher, init, labels, indices, settings("distill.lambda_bn=0"))
    assert out.shape == init.shape


def builtin_clips(per_class: int = 2):
    """Real built-in videos (moving digits on static textures) through the H.264 codec and back:
    uint8 (8 * per_class, 8, 32, 32, 3), labels (8 * per_class,), with the codec's noise."""
    import numpy as np

    from tsgd_ray.data import builtin
    from tsgd_ray.data.video import clip_rng, decode_clip, encode_mp4

    digits = builtin._digits("train")
    clips, labels = [], []
    for pair in range(len(builtin.CLASS_PAIRS)):
        for index in range(per_class):
            forward = builtin.generate_pair(pair, np.random.default_rng([5, pair, index]), digits, 8, 32)
            for offset, frames in enumerate((forward, forward[::-1])):
                data = encode_mp4(frames, 8)
                clips.append(decode_clip(data, 8, 32, 32, 1, "uniform", clip_rng(0, f"{pair}-{index}")))
                labels.append(2 * pair + offset)
    return torch.from_numpy(np.stack(clips)), torch.tensor(labels)


def test_tsgfo_on_the_update_keeps_static_pixels_and_on_the_gradient_does_not():
    """A real recovery run (teacher trained on encoded built-in videos, real init clips): with
    w_min 0 the update is scaled by the init map, so pixels the init does not move barely change
    while moving ones do. The same weight on the gradient (the paper's wording) changes nothing
    under Adam: Adam divides each pixel's step by its own running gradient scale, and a fixed
    per-pixel factor cancels in that ratio."""
    from tsgd_ray.core import tsgf
    from tsgd_ray.core.clips import to_model_input

    clips, labels = builtin_clips()
    base = [
        "data.num_frames=8",
        "data.height=32",
        "data.width=32",
        "augment.hflip=false",
        "distill.iterations=40",
        "distill.lr=0.1",
        "tsgf.w_min=0",
    ]
    cfg = load_config(None, base)
    x = to_model_input(clips, cfg.data.mean, cfg.data.std)
    torch.manual_seed(0)
    teacher = build_model("mini_c3d", 8, (8, 32, 32), width=8, depth=2)
    fit_full_batch(teacher, x, labels, steps=20)
    stats = accumulate_statistics(teacher, [(x, labels)], 8)
    indices = torch.zeros_like(labels)
    m0 = tsgf.saliency(x, saliency_settings(cfg.tsgf))

    def edits(*overrides):
        out = recovery.recover(
            teacher,
            x,
            labels,
            indices,
            recovery_settings(load_config(None, [*base, *overrides])),
            stats,
        )
        return tsgf.motion_diagnostics(tsgf.motion_sums(out, x, m0, saliency_settings(cfg.tsgf)))

    off = edits("tsgf.enabled=false")
    update = edits("tsgf.apply=update")
    gradient = edits("tsgf.apply=gradient")
    assert off["edit_static"] > 0.05  # recovery does edit the static background when left alone
    assert update["edit_static"] < 0.1 * off["edit_static"]  # W < 0.1 there, mostly 0
    assert update["edit_moving"] > 0.25 * off["edit_moving"]
    assert gradient["edit_static"] > 0.5 * off["edit_static"]  # Adam cancels the weight
    print({name: arm for name, arm in (("off", off), ("update", update), ("gradient", gradient))})


def test_the_diversity_term_is_the_sum_over_groups_of_their_mean_pairwise_cosine():
    """`_similarity` with `pair_weights`: groups of one video add nothing, each group of >= 2
    adds the mean cosine similarity over its ordered pairs of different videos."""
    torch.manual_seed(0)
    features = torch.randn(6, 5)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    expected = 0.0
    for g in (0, 2):
        members = features[groups == g]
        cos = F.cosine_similarity(members.unsqueeze(1), members.unsqueeze(0), dim=2)
        n = len(members)
        expected += float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    got = recovery._similarity(features, recovery.pair_weights(groups)).item()
    assert abs(got - expected) <= 1e-6  # cosines in [-1, 1], float32 sums


def test_the_diversity_term_spreads_the_videos_of_a_class_apart_in_feature_space():
    teacher, stats = teacher_and_stats()
    init, labels, indices = synthetic_set(range(2), ipc=4)
    init = init[labels * 4].clone() + 0.05 * init  # near copies: four videos per class start alike

    def similarity(x):
        features = training.embeddings(teacher, x)
        return recovery._similarity(features, recovery.pair_weights(labels)).item() / 2

    plain = recovery.recover(teacher, init, labels, indices, settings("distill.iterations=20"), stats)
    spread = recovery.recover(
        teacher, init, labels, indices, settings("distill.iterations=20", "distill.diversity=5"), stats
    )
    assert similarity(spread) < similarity(plain) - 0.05


def test_a_confident_video_stops_changing_and_the_others_go_on():
    teacher, stats = teacher_and_stats()
    init, labels, indices = synthetic_set(range(6), ipc=2)
    with torch.no_grad():
        confidence = torch.softmax(teacher(init), 1).gather(1, labels.view(-1, 1)).squeeze(1)
    threshold = float(confidence.median())  # about half the videos start above it (on the whole clip)
    history = []
    out = recovery.recover(
        teacher,
        init,
        labels,
        indices,
        settings("distill.iterations=10", f"distill.stop_confidence={threshold}"),
        stats,
        callback=lambda step, m: history.append(m["stopped"]),
    )
    unchanged = (out - init).flatten(1).abs().amax(1) == 0
    assert 0 < unchanged.sum() < len(init)  # some stopped (at step 0 or later), some kept going
    # those stopped on their first view are never changed; the share stopped only grows
    assert history[0] == pytest.approx(unchanged.float().mean().item())
    assert history == sorted(history) and history[-1] > history[0]  # recovery made some sure enough
    # a video's stop depends only on its own views: recovered alone, it ends the same
    alone = recovery.recover(
        teacher,
        init[:2],
        labels[:2],
        indices[:2],
        settings("distill.iterations=10", f"distill.stop_confidence={threshold}"),
        stats,
    )
    torch.testing.assert_close(alone, out[:2])


def test_the_init_target_keeps_the_teacher_less_sure_than_the_one_hot_label_does():
    teacher, stats = teacher_and_stats()
    init, labels, indices = synthetic_set(range(6), ipc=2)

    def entropy(x):
        with torch.no_grad():
            p = torch.softmax(teacher(x), 1)
        return -(p * p.clamp(min=1e-12).log()).sum(1).mean().item()

    one_hot = recovery.recover(teacher, init, labels, indices, settings("distill.iterations=20"), stats)
    soft = recovery.recover(
        teacher, init, labels, indices, settings("distill.iterations=20", "distill.init_target=1"), stats
    )
    assert entropy(soft) > entropy(one_hot) + 0.1
    print({"init": entropy(init), "one_hot": entropy(one_hot), "soft": entropy(soft)})


def test_the_vectorised_bn_term_equals_the_per_layer_sum():
    """`recovery.bn_term` over `group_statistics` (every layer's channels side by side, one
    reduction) equals the sum over layers, groups and target kinds of share x weight x
    (||mu - mean|| + ||var - var'||), in value and in gradient, within 1e-6 relative."""
    from tsgd_ray.core.bn_stats import BatchNormTaps, batchnorm_layers, group_average, group_moments

    torch.manual_seed(0)
    teacher = build_model("mini_r2plus1d", 5, SIZE, width=8, depth=3).eval()
    layers = batchnorm_layers(teacher)
    x = torch.randn(7, 3, *SIZE, requires_grad=True)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    weights = [10.0] + [1.0] * (len(layers) - 1)
    kinds = [  # (share, per-layer (mean, var) targets (3 groups, C_l)): half one target, half another
        (share, [(torch.randn(3, layer.num_features), torch.rand(3, layer.num_features)) for layer in layers])
        for share in (0.5, 0.5)
    ]
    with BatchNormTaps(teacher) as taps:
        teacher(x)
        reference = torch.zeros(())
        for layer, (w, means, squares) in enumerate(zip(weights, taps.means, taps.squares)):
            mu, var = group_moments(means, squares, groups, 3)
            for share, targets in kinds:
                mu_t, var_t = targets[layer]
                reference = reference + share * w * ((mu - mu_t).norm(dim=1) + (var - var_t).norm(dim=1)).sum()
        moments = recovery.group_statistics(taps.means, taps.squares, group_average(groups, 3))
        stacked = torch.stack([torch.cat([m for m, _ in t] + [v for _, v in t], 1) for _, t in kinds])
        layer_weights = torch.tensor([share for share, _ in kinds]).view(-1, 1, 1) * torch.tensor(weights).repeat(2)
        vectorised = recovery.bn_term(
            moments, stacked, recovery._segments(layers, "cpu"), layer_weights.expand(-1, 3, -1)
        )
    (expected,) = torch.autograd.grad(reference, x, retain_graph=True)
    (got,) = torch.autograd.grad(vectorised, x)
    assert len(layers) >= 6 and abs(vectorised.item() - reference.item()) <= 1e-6 * abs(reference.item())
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
