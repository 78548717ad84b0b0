"""BatchNorm statistics: taps on a model's BN layers, exact per-class sums, and the recovery targets.

Every statistic here is per channel of a BatchNorm3d layer's *input*, over (N, F, H, W) positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

#: per-sample moments are stored as integers in units of 2**-FIXED_POINT_BITS
FIXED_POINT_BITS = 24
_SAMPLE_LIMIT = 2.0**24  # largest |per-sample moment| accepted (2**48 units)
_SUM_LIMIT = 2**62  # a class's running sum beyond this would risk int64 overflow


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm3d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]


class _Moments(torch.autograd.Function):
    """Each sample's per-channel mean and mean square of x (N, C, F, H, W) over (F, H, W), two
    (N, C) float32 tensors, with a backward of one fused operation per layer:
    dx = (g_mean + 2 g_square x) / positions (autograd's own takes about six)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x)  # the BN layer keeps it for its own backward already
        dims = (2, 3, 4)
        if x.dtype == torch.float32:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            return mean, torch.addcmul(var, mean, mean)
        # bf16 under autocast: accumulate in fp32 without an fp32 copy of x
        positions = x.shape[2] * x.shape[3] * x.shape[4]
        square = torch.linalg.vector_norm(x, 2, dim=dims, dtype=torch.float32).square() / positions
        return x.mean(dim=dims, dtype=torch.float32), square

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor, g_square: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        positions = x.shape[2] * x.shape[3] * x.shape[4]
        shape = (*x.shape[:2], 1, 1, 1)
        grad = torch.addcmul((g_mean / positions).view(shape), x, g_square.view(shape), value=2 / positions)
        return grad.to(x.dtype)


class BatchNormTaps:
    """Forward hooks on every BatchNorm3d of a model, recording each sample's per-channel mean and
    mean square of the layer's input: `means[l]`, `squares[l]` of shape (N, C_l), float32, still
    attached to the graph (so recovery can differentiate through them).

    Use as a context manager; the hooks are removed on exit.
    """

    def __init__(self, model: nn.Module):
        self.layers = batchnorm_layers(model)
        self.means: list[torch.Tensor] = []
        self.squares: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, index: int):
        def record(module, inputs, output):
            self.means[index], self.squares[index] = _Moments.apply(inputs[0])

        return record

    def __enter__(self) -> "BatchNormTaps":
        self.means = [None] * len(self.layers)  # type: ignore[list-item]
        self.squares = [None] * len(self.layers)  # type: ignore[list-item]
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def group_average(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The (num_groups, N) matrix that averages rows by group: row g holds 1 / |g| at the samples
    of group g (groups (N,) int in [0, num_groups)), 0 elsewhere; an empty group's row is 0."""
    member = (torch.arange(num_groups, device=groups.device).view(-1, 1) == groups.view(1, -1)).float()
    return member / member.sum(dim=1, keepdim=True).clamp(min=1)


def group_moments(
    means: torch.Tensor, squares: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over (samples of a group, F, H, W) from per-sample moments.

    means, squares (N, C); groups (N,) int in [0, num_groups) -> (num_groups, C) each. Exact
    because every sample of a layer has the same number of positions.
    """
    average = group_average(groups, num_groups).to(means.dtype)
    mean = average @ means
    return mean, average @ squares - mean.square()


def _to_fixed(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().double().cpu()
    if not torch.isfinite(values).all() or values.abs().max() >= _SAMPLE_LIMIT:
        raise ValueError(f"BN input moments must be finite and below {_SAMPLE_LIMIT:g} in magnitude")
    return torch.round(values * 2.0**FIXED_POINT_BITS).to(torch.int64)


def _add_checked(total: torch.Tensor, labels: torch.Tensor, fixed: torch.Tensor) -> None:
    total.index_add_(0, labels, fixed)
    if len(labels) and total[labels.unique()].abs().max() > _SUM_LIMIT:  # only the rows just touched
        raise OverflowError("per-class BN sums exceed the int64 fixed-point range")


@dataclass
class ClassStatistics:
    """Per-class, per-channel sums of every BN layer's input moments, mergeable exactly.

    counts (K,) samples per class; sums[l] and squares[l] (K, C_l) hold the sums over samples of
    each sample's channel mean and mean square, as int64 fixed-point numbers (2**-24 units), so
    that `merge` is integer addition: shards reduced in any order give bit-identical results.
    """

    counts: torch.Tensor
    sums: list[torch.Tensor]
    squares: list[torch.Tensor]

    @classmethod
    def empty(cls, num_classes: int, channels: Sequence[int]) -> "ClassStatistics":
        return cls(
            torch.zeros(num_classes, dtype=torch.int64),
            [torch.zeros(num_classes, c, dtype=torch.int64) for c in channels],
            [torch.zeros(num_classes, c, dtype=torch.int64) for c in channels],
        )

    @classmethod
    def for_model(cls, model: nn.Module, num_classes: int) -> "ClassStatistics":
        return cls.empty(num_classes, [layer.num_features for layer in batchnorm_layers(model)])

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    def add(self, taps: BatchNormTaps, labels: torch.Tensor) -> None:
        """Add the samples just seen by `taps` (one forward pass) with their class labels (N,)."""
        self.add_moments(taps.means, taps.squares, labels)

    def add_moments(self, means: Sequence[torch.Tensor], squares: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        """Add per-sample moments, per layer (N, C_l) float32 as `BatchNormTaps` records them (on
        any device: every layer's come to the host in one copy, not two per layer)."""
        labels = labels.detach().cpu().long()
        widths = [m.shape[1] for m in means]
        fixed = _to_fixed(torch.cat([*means, *squares], dim=1)).split(widths * 2, dim=1)
        self.counts.index_add_(0, labels, torch.ones_like(labels))
        for l in range(len(widths)):
            _add_checked(self.sums[l], labels, fixed[l])
            _add_checked(self.squares[l], labels, fixed[len(widths) + l])

    def merge(self, other: "ClassStatistics") -> "ClassStatistics":
        """The statistics of both sample sets (a new object); shapes must match."""
        return ClassStatistics(
            self.counts.clone(), [s.clone() for s in self.sums], [q.clone() for q in self.squares]
        ).merge_(other)

    def merge_(self, other: "ClassStatistics") -> "ClassStatistics":
        """Add `other`'s sample sets into this object's tensors (in place: no copy); returns self.

        Raises:
            ValueError: the classes or layers differ.
        """
        if other.counts.shape != self.counts.shape or [s.shape for s in other.sums] != [s.shape for s in self.sums]:
            raise ValueError("cannot merge statistics of different classes or layers")
        self.counts += other.counts
        for mine, theirs in zip(self.sums + self.squares, other.sums + other.squares):
            mine += theirs
        return self

    def moments(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: (mean (K, C), biased variance (K, C)) in float64; zeros for unseen classes."""
        n = self.counts.clamp(min=1).double().unsqueeze(1)
        out = []
        for s, q in zip(self.sums, self.squares):
            mean = s.double() / 2.0**FIXED_POINT_BITS / n
            out.append((mean, (q.double() / 2.0**FIXED_POINT_BITS / n - mean.square()).clamp(min=0)))
        return out

    def mixture(self, weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: the moments of a class mixture with weights (K,) (normalised here):
        mu* = sum_c p_c mu_c, var* = sum_c p_c (var_c + mu_c^2) - mu*^2. Returns (C,) tensors."""
        p = weights.double().cpu() / weights.double().sum()
        out = []
        for mean, var in self.moments():
            mu = p @ mean
            out.append((mu, (p @ (var + mean.square()) - mu.square()).clamp(min=0)))
        return out

    def missing_classes(self) -> list[int]:
        return [int(c) for c in torch.nonzero(self.counts == 0).flatten()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"counts": self.counts}
        for l, (s, q) in enumerate(zip(self.sums, self.squares)):
            state[f"sums.{l}"], state[f"squares.{l}"] = s, q
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "ClassStatistics":
        layers = sum(1 for k in state if k.startswith("sums."))
        return cls(
            state["counts"], [state[f"sums.{l}"] for l in range(layers)], [state[f"squares.{l}"] for l in range(layers)]
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ClassStatistics)
            and torch.equal(self.counts, other.counts)
            and len(self.sums) == len(other.sums)
            and all(torch.equal(a, b) for a, b in zip(self.sums + self.squares, other.sums + other.squares))
        )


def accumulate_statistics(model: nn.Module, batches, num_classes: int) -> ClassStatistics:
    """One pass of `model` (eval mode, no grad) over (x (N, 3, F, H, W), labels (N,)) batches."""
    stats = ClassStatistics.for_model(model, num_classes)
    model.eval()
    with torch.no_grad(), BatchNormTaps(model) as taps:
        for x, labels in batches:
            model(x)
            stats.add(taps, labels)
    return stats
