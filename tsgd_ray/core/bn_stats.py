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
            x, dims = inputs[0], (2, 3, 4)
            if x.dtype == torch.float32:
                self.means[index] = x.mean(dim=dims)
                self.squares[index] = x.square().mean(dim=dims)
            else:  # bf16 under autocast: accumulate in fp32 without keeping an fp32 copy for backward
                positions = x.shape[2] * x.shape[3] * x.shape[4]
                self.means[index] = x.mean(dim=dims, dtype=torch.float32)
                self.squares[index] = torch.linalg.vector_norm(x, 2, dim=dims, dtype=torch.float32).square() / positions

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


def group_moments(
    means: torch.Tensor, squares: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over (samples of a group, F, H, W) from per-sample moments.

    means, squares (N, C); groups (N,) int in [0, num_groups) -> (num_groups, C) each. Exact
    because every sample of a layer has the same number of positions.
    """
    counts = torch.zeros(num_groups, device=means.device, dtype=means.dtype).index_add_(
        0, groups, torch.ones_like(groups, dtype=means.dtype)
    )
    counts = counts.clamp(min=1).unsqueeze(1)
    mean = (
        torch.zeros(num_groups, means.shape[1], device=means.device, dtype=means.dtype).index_add_(0, groups, means)
        / counts
    )
    square = torch.zeros_like(mean).index_add_(0, groups, squares) / counts
    return mean, square - mean.square()


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
