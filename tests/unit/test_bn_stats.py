"""BN taps and per-class statistics: exact against direct computation, bit-identical in any merge order."""

import torch
import torch.nn as nn

from tsgd_ray.core.bn_stats import BatchNormTaps, ClassStatistics, accumulate_statistics, group_moments
from tsgd_ray.core.models import build_model


def small_model(seed=0):
    torch.manual_seed(seed)
    return build_model("mini_c3d", 4, (4, 16, 16), width=4, depth=2).eval()


def batches(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(5, 3, 4, 16, 16, generator=g) * 2 + 1, torch.randint(0, 4, (5,), generator=g)) for _ in range(n)
    ]


def test_taps_record_each_samples_moments_of_the_bn_input():
    model = small_model()
    x = torch.randn(3, 3, 4, 16, 16)
    with torch.no_grad(), BatchNormTaps(model) as taps:
        model(x)
        first_input = model.features[0](x)  # the first BN layer's input
    assert len(taps.means) == 2 and taps.means[1].shape == (3, 8)
    torch.testing.assert_close(taps.means[0], first_input.mean(dim=(2, 3, 4)))
    torch.testing.assert_close(taps.squares[0], first_input.square().mean(dim=(2, 3, 4)))
    assert not model.features[1]._forward_hooks  # removed on exit


def test_the_taps_gradient_is_autograds_through_the_moments_in_float32_and_bfloat16():
    """The taps' one-op backward ((g_mean + 2 g_square x) / positions) equals autograd through
    x.mean() and x.square().mean(), for float32 and for bfloat16 inputs (autocast on CUDA)."""
    from tsgd_ray.core.bn_stats import _Moments

    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        x = (torch.randn(3, 4, 2, 5, 5, generator=g) * 2 + 1).to(dtype).requires_grad_(True)
        w_mean, w_square = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
        mean, square = _Moments.apply(x)
        (got,) = torch.autograd.grad((mean * w_mean).sum() + (square * w_square).sum(), x)
        xf = x.float()
        expected_loss = (xf.mean(dim=(2, 3, 4)) * w_mean).sum() + (xf.square().mean(dim=(2, 3, 4)) * w_square).sum()
        (expected,) = torch.autograd.grad(expected_loss, x)
        assert got.dtype == dtype and mean.dtype == square.dtype == torch.float32
        torch.testing.assert_close(mean, xf.mean(dim=(2, 3, 4)).detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(square, xf.square().mean(dim=(2, 3, 4)).detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


def test_group_moments_equal_moments_of_the_pooled_group():
    inputs = torch.randn(6, 5, 2, 3, 3)
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    mean, var = group_moments(inputs.mean(dim=(2, 3, 4)), inputs.square().mean(dim=(2, 3, 4)), groups, 3)
    for g in range(3):
        pooled = inputs[groups == g].transpose(0, 1).flatten(1)  # (C, samples * positions)
        torch.testing.assert_close(mean[g], pooled.mean(1))
        torch.testing.assert_close(var[g], pooled.var(1, unbiased=False), rtol=1e-4, atol=1e-5)


def test_shards_merged_in_any_order_equal_one_pass_bit_for_bit():
    model = small_model()
    data = batches()
    one_pass = accumulate_statistics(model, data, 4)
    shards = [accumulate_statistics(model, data[i : i + 2], 4) for i in range(0, 6, 2)]
    forward = shards[0].merge(shards[1]).merge(shards[2])
    backward = shards[2].merge(shards[0].merge(shards[1]))
    assert one_pass == forward == backward
    assert int(one_pass.counts.sum()) == 30
    restored = ClassStatistics.from_state_dict({k: v.clone() for k, v in one_pass.state_dict().items()})
    assert restored == one_pass


def test_class_moments_match_a_direct_float64_computation():
    model = small_model()
    data = batches()
    stats = accumulate_statistics(model, data, 4)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    with torch.no_grad():
        first = model.features[0](x).double()  # (N, C, F, H, W)
    mean, var = stats.moments()[0]
    for c in range(4):
        pooled = first[y == c].transpose(0, 1).flatten(1)
        torch.testing.assert_close(mean[c], pooled.mean(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var[c], pooled.var(1, unbiased=False), rtol=1e-5, atol=1e-5)
    # a mixture weighted by the class counts is the moments of all the data together
    mu, v = stats.mixture(stats.counts)[0]
    pooled = first.transpose(0, 1).flatten(1)
    torch.testing.assert_close(mu, pooled.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, pooled.var(1, unbiased=False), rtol=1e-5, atol=1e-5)
    one_class = stats.mixture(torch.tensor([0, 0, 1, 0]))[0]
    torch.testing.assert_close(one_class[0], mean[2])
    torch.testing.assert_close(one_class[1], var[2])


def test_unseen_classes_and_mismatched_merges_are_reported():
    stats = ClassStatistics.for_model(small_model(), 6)
    model = small_model()
    with torch.no_grad(), BatchNormTaps(model) as taps:
        model(torch.randn(2, 3, 4, 16, 16))
        stats.add(taps, torch.tensor([1, 3]))
    assert stats.missing_classes() == [0, 2, 4, 5]
    try:
        stats.merge(ClassStatistics.for_model(small_model(), 5))
    except ValueError as exc:
        assert "different classes" in str(exc)
    else:
        raise AssertionError("merge of different class counts must fail")


def test_a_model_without_batchnorm_has_no_taps():
    model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU())
    with BatchNormTaps(model) as taps:
        model(torch.randn(1, 3, 4, 8, 8))
    assert taps.means == [] and taps.layers == []


def test_taps_on_bf16_activations_accumulate_in_fp32_and_keep_their_gradient():
    """Under autocast on CUDA the BatchNorm inputs are bf16: the taps give the fp32 moments of those
    values (without an fp32 copy kept for backward) and the same gradient as the fp32 path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm3d(4)).eval().bfloat16()
    x = (torch.randn(3, 4, 2, 5, 5) * 2 + 1).bfloat16().requires_grad_(True)
    reference = x.detach().float().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with BatchNormTaps(model) as taps:
            model(x)
    # whatever backward keeps at the activation's size stays bf16 (an fp32 copy doubles the memory)
    assert all(t.dtype == torch.bfloat16 for t in saved if t.numel() == x.numel())
    assert taps.means[0].dtype == torch.float32 and taps.squares[0].dtype == torch.float32
    expected_mean, expected_square = reference.mean(dim=(2, 3, 4)), reference.square().mean(dim=(2, 3, 4))
    torch.testing.assert_close(taps.means[0], expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(taps.squares[0], expected_square, rtol=1e-5, atol=1e-5)
    (taps.means[0].sum() + taps.squares[0].sum()).backward()
    (expected_mean.sum() + expected_square.sum()).backward()
    torch.testing.assert_close(x.grad.float(), reference.grad, rtol=1e-2, atol=1e-3)


def test_a_batchs_moments_reach_the_host_in_one_copy_for_every_layer_with_the_same_sums():
    """On CUDA each conversion of a device tensor is a device-to-host sync: the probe converts
    every layer's moments together, once per batch, however deep the teacher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tsgd_ray.core.bn_stats import FIXED_POINT_BITS

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.count += func.overloadpacket.__name__ == "_to_copy"
            return func(*args, **(kwargs or {}))

    x, y = batches(n=1)[0]
    counted = []
    for depth in (2, 4):
        torch.manual_seed(0)
        model = build_model("mini_c3d", 4, (4, 16, 16), width=4, depth=depth).eval()
        stats = ClassStatistics.for_model(model, 4)
        with torch.no_grad(), BatchNormTaps(model) as taps:
            model(x)
        Copies.count = 0
        with Copies():
            stats.add(taps, y)
        counted.append(Copies.count)
        for layer, (m, s) in enumerate(zip(taps.means, taps.squares)):  # each layer's sums as converted alone
            for total, values in ((stats.sums[layer], m), (stats.squares[layer], s)):
                fixed = torch.round(values.double() * 2.0**FIXED_POINT_BITS).to(torch.int64)
                assert torch.equal(total, torch.zeros_like(total).index_add_(0, y, fixed))
    assert counted[0] == counted[1] <= 3, counted  # not 2 per layer
