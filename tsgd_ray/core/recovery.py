"""Recovery of synthetic videos from a frozen teacher (docs/method.md: recovery), with TSGFO.

Synthetic videos are grouped by class: a *BN group* is up to `chunk_size` videos of one class
(consecutive indices), and the BN term compares each group's statistics with its target. Forward
passes pack whole groups, at most `chunk_size` videos each. Because no group mixes classes and
every video draws its random numbers from its own (seed, class, index) stream, a video's result
does not depend on which other classes were recovered with it, nor on retries.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tsgd_ray.config import BNTarget, SaliencySource, TSGFApply
from tsgd_ray.core import augment, tsgf
from tsgd_ray.core.augment import CropSettings
from tsgd_ray.core.bn_stats import BatchNormTaps, ClassStatistics, batchnorm_layers, group_average
from tsgd_ray.core.clips import InputSettings
from tsgd_ray.core.device import autocast, frozen_bf16
from tsgd_ray.core.tsgf import SaliencySettings
from tsgd_ray.errors import UserError

StepCallback = Callable[[int, dict], None]


@dataclass(frozen=True)
class RecoverySettings:
    """What `recover` does (the `distill` section, `augment`, `tsgf`, the run seed).

    iterations Adam(0.5, 0.9) steps at `lr` (cosine to 0); loss = CE + lambda_bn * BN term
    (first BN layer weighted `first_bn_weight`, targets `bn_target`, an EMA over steps when
    bn_ema > 0) + diversity * within-group similarity; forward passes of <= chunk_size videos,
    each seen through `crop`; callback every `log_every` steps. The CE target is the one-hot label
    mixed with weight `init_target` with the teacher's softmax at `init_temperature` on the whole
    init clip. A video stops changing once an EMA (0.7 on the past) of the teacher's probability of
    its class on its views reaches `stop_confidence` (0: never). TSGFO when `tsgfo`: W = w_min +
    (1 - w_min) * M scales the update or the gradient (`apply`), M from the init clip or the
    current one (`source`, recomputed every `every` steps) under `saliency`.
    """

    seed: int
    inputs: InputSettings
    crop: CropSettings
    iterations: int
    lr: float
    lambda_bn: float
    first_bn_weight: float
    bn_target: BNTarget
    bn_ema: float
    diversity: float
    init_target: float
    init_temperature: float
    stop_confidence: float
    chunk_size: int
    log_every: int
    tsgfo: bool
    apply: TSGFApply
    source: SaliencySource
    w_min: float
    every: int
    saliency: SaliencySettings


class RecoveryError(UserError, ValueError):
    """A teacher or input that recovery cannot use (e.g. a BN term without BN layers)."""


def video_generator(seed: int, class_id: int, index: int) -> torch.Generator:
    """The CPU random stream of synthetic video `index` of class `class_id` in a run seeded `seed`."""
    state = np.random.SeedSequence([seed, class_id, index, 0x75_67_64]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def noise_init(
    shape: tuple[int, ...],
    labels: torch.Tensor,
    indices: torch.Tensor,
    seed: int,
    low: torch.Tensor,
    high: torch.Tensor,
) -> torch.Tensor:
    """Gaussian clips (N, *shape) in the normalised space, clamped to [low, high], one stream per video."""
    clips = [
        torch.randn(shape, generator=video_generator(seed, int(c), int(i) + 2**20)) for c, i in zip(labels, indices)
    ]
    return torch.maximum(torch.minimum(torch.stack(clips), high.cpu()), low.cpu())


@dataclass
class _Chunk:
    positions: torch.Tensor  # (n,) rows of the synthetic set in this forward pass
    groups: torch.Tensor  # (n,) BN group of each row, 0..num_groups-1 within the chunk
    group_classes: list[int]


def plan_chunks(labels: torch.Tensor, indices: torch.Tensor, chunk_size: int) -> list[_Chunk]:
    """Split videos into BN groups (one class, consecutive indices, <= chunk_size) and pack whole
    groups into forward passes of <= chunk_size videos, in (class, index) order."""
    order = sorted(range(len(labels)), key=lambda i: (int(labels[i]), int(indices[i])))
    groups: list[list[int]] = []
    for pos in order:
        if groups and int(labels[groups[-1][0]]) == int(labels[pos]) and len(groups[-1]) < chunk_size:
            groups[-1].append(pos)
        else:
            groups.append([pos])
    chunks: list[list[list[int]]] = []
    for group in groups:
        if chunks and sum(map(len, chunks[-1])) + len(group) <= chunk_size:
            chunks[-1].append(group)
        else:
            chunks.append([group])
    return [
        _Chunk(
            torch.tensor([p for g in chunk for p in g]),
            torch.tensor([k for k, g in enumerate(chunk) for _ in g]),
            [int(labels[g[0]]) for g in chunk],
        )
        for chunk in chunks
    ]


def _targets(
    layers: list[nn.BatchNorm3d],
    per_class: Optional[list[tuple[torch.Tensor, torch.Tensor]]],
    classes: list[int],
    device,
) -> torch.Tensor:
    """Target moments of the groups of `classes`, (G, 2 x sum of C_l) float32 on `device`: every BN
    layer's channel means side by side, then their variances; the groups' class moments
    (`per_class`, from ClassStatistics.moments), else the layers' running statistics."""
    if per_class is not None:
        idx = torch.tensor(classes)
        pairs = [(m[idx].float(), v[idx].float()) for m, v in per_class]
    else:
        pairs = [(layer.running_mean.float(), layer.running_var.float()) for layer in layers]
        pairs = [(m.expand(len(classes), -1), v.expand(len(classes), -1)) for m, v in pairs]
    if not pairs:  # a teacher without BN layers (lambda_bn = 0): no channels to match
        return torch.zeros(len(classes), 0, device=device)
    return torch.cat([m for m, _ in pairs] + [v for _, v in pairs], 1).to(device)


def _segments(layers: list[nn.BatchNorm3d], device) -> torch.Tensor:
    """(2 x sum of C_l, 2 L) 0/1: which layer's means (columns 0..L-1) or variances (L..2L-1) each
    channel of the `_targets` layout belongs to."""
    layer_of = torch.tensor([i for i, layer in enumerate(layers) for _ in range(layer.num_features)], dtype=torch.long)
    columns = torch.cat([layer_of, layer_of + len(layers)])
    return (columns.view(-1, 1) == torch.arange(2 * len(layers)).view(1, -1)).float().to(device)


def group_statistics(means: list[torch.Tensor], squares: list[torch.Tensor], average: torch.Tensor) -> torch.Tensor:
    """Each BN group's moments in the `_targets` layout, (G, 2 x sum of C_l): every layer's channel
    means, then their biased variances, from per-sample means and mean squares (per layer (N, C_l),
    as BatchNormTaps records them) and the groups' averaging matrix (G, N) (bn_stats.group_average)."""
    both = average @ torch.cat([*means, *squares], 1)
    mean, square = both.chunk(2, dim=1)
    return torch.cat([mean, torch.addcmul(square, mean, mean, value=-1)], 1)


def bn_term(
    moments: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The BN-matching term of one chunk, every layer at once: the sum over target kinds k, groups g
    and layers l of weights[k, g] x (||mean_gl - target mean_kgl|| + ||var_gl - target var_kgl||),
    the norms over each layer's channels. moments (G, 2 x sum of C_l) (`group_statistics`);
    targets (K, G, 2 x sum of C_l) (`_targets` per kind); segments (`_segments`); weights
    (K, G, 2 L): a kind's share x a layer's weight, for its means and again for its variances."""
    squared = (moments - targets).square().flatten(0, 1) @ segments  # (K x G, 2 L)
    return torch.dot((squared + 1e-30).sqrt().flatten(), weights.flatten())  # + 1e-30: a finite gradient at 0


@contextlib.contextmanager
def _penultimate(head: list[nn.Linear]):
    """Collect the input of `head` (none or the teacher's last nn.Linear) during the forward pass."""
    captured: list[torch.Tensor] = []
    handles = [h.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0])) for h in head]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def pair_weights(groups: torch.Tensor) -> torch.Tensor:
    """(N, N): 1 / (|g| (|g| - 1)) between two different videos of one BN group g (groups (N,)),
    0 elsewhere, so that sum_ij P_ij s_ij is the sum over groups of their mean pairwise s."""
    same = groups.view(-1, 1) == groups.view(1, -1)
    pairs = same & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    return pairs / (same.sum(dim=1, keepdim=True) * pairs.sum(dim=1, keepdim=True)).clamp(min=1)


def _similarity(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over BN groups of >= 2 videos of the mean pairwise cosine similarity of their features
    (N, D), with `pair_weights` (N, N) of their groups."""
    unit = F.normalize(features.flatten(1), dim=1)
    return torch.dot((weights @ unit).flatten(), unit.flatten())


def _ce_target(teacher: nn.Module, init: torch.Tensor, labels: torch.Tensor, s: RecoverySettings) -> torch.Tensor:
    """The CE target of each video: its labels (N,) when s.init_target is 0, else (N, classes)
    probabilities (1 - a) * one-hot + a * softmax(teacher(init) / s.init_temperature)."""
    if s.init_target == 0:
        return labels
    with torch.no_grad(), autocast(init.device, s.inputs.amp):
        logits = teacher(init).float()
    soft = F.softmax(logits / s.init_temperature, dim=1)
    return (1 - s.init_target) * F.one_hot(labels, logits.shape[1]).float() + s.init_target * soft


def recover(
    teacher: nn.Module,
    init: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    settings: RecoverySettings,
    stats: Optional[ClassStatistics] = None,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Optimise synthetic videos so that the frozen teacher recognises them as their class.

    teacher: in eval mode on the device to use; its parameters are not changed.
    init: (N, 3, F, H, W) float, normalised start clips (real clips or `noise_init`).
    labels, indices: (N,) class id and per-class index of each video (its random stream).
    settings: see `RecoverySettings`.
    stats: per-class BN statistics; with bn_target=class_mixture each group is matched to its
        class's statistics, with `mixed` half to those and half to the layers' running
        statistics, with `global` (or without stats) to the running statistics alone.
    callback: called every settings.log_every steps and at the last with (step, metrics) where
        metrics = {loss, ce, bn, lr, stopped, edit_static, edit_moving, motion_share}: ce and bn are
        means over BN groups, stopped the share of videos no longer changed, the rest is
        `tsgf.motion_diagnostics` of the clips before that step.
    Returns the synthetic videos (N, 3, F, H, W) float32 on the CPU, in the order of `init`.

    Raises:
        RecoveryError: lambda_bn > 0 with a teacher that has no BatchNorm3d.
    """
    s = settings
    device = next(teacher.parameters()).device
    if s.lambda_bn > 0 and not batchnorm_layers(teacher):
        raise RecoveryError("distill.lambda_bn > 0 needs a teacher with BatchNorm3d layers; set distill.lambda_bn=0")
    teacher.eval().requires_grad_(False)
    low, high = s.inputs.valid_range(torch.empty(0, device=device))
    chunks = plan_chunks(labels, indices, s.chunk_size)
    params = [nn.Parameter(init[c.positions].detach().float().clone().to(device)) for c in chunks]
    # every video's augmentation uniforms for the whole run, drawn once from its own stream:
    # (n, iterations, 6) per chunk on the device, so a step indexes a tensor instead of n generators
    uniforms = [
        torch.stack(
            [
                torch.rand(
                    s.iterations,
                    augment.UNIFORMS_PER_CLIP,
                    generator=video_generator(s.seed, int(labels[p]), int(indices[p])),
                )
                for p in c.positions
            ]
        ).to(device)
        for c in chunks
    ]
    # every step's sampling grid of every video at once (separable: its columns' x and rows' y),
    # (iterations, n, W) and (iterations, n, H) per chunk: a step's view is one grid_sample
    height, width = init.shape[3], init.shape[4]
    grids = []
    for u in uniforms:
        gx, gy = augment.grid_axes(s.crop.params(u.flatten(0, 1)), height, width)
        grids.append((gx.unflatten(0, u.shape[:2]).transpose(0, 1), gy.unflatten(0, u.shape[:2]).transpose(0, 1)))
    layers = batchnorm_layers(teacher)
    matching = s.lambda_bn > 0
    target = s.bn_target
    per_class = stats.moments() if stats is not None and target != BNTarget.global_ else None
    # the target kinds and their shares: one target, or half global half class (EDC)
    kinds = [(1.0, per_class)] if target != BNTarget.mixed or per_class is None else [(0.5, None), (0.5, per_class)]
    layer_weights = torch.tensor([s.first_bn_weight] + [1.0] * (len(layers) - 1)).repeat(2)  # means, variances
    # each kind's share x lambda_bn (lambda_bn and the diversity weight are folded into their terms' weights)
    shares = torch.tensor([share for share, _ in kinds]).view(-1, 1, 1) * s.lambda_bn
    # per chunk, on the device once: the BN term's targets (K, G, 2 x sum C_l) and weights (K, G, 2 L),
    # the groups' averaging matrix (G, n), the diversity term's pair weights (n, n), the CE target of
    # each video and 1 / the size of its group (each group's CE is its mean)
    targets = [torch.stack([_targets(layers, src, c.group_classes, device) for _, src in kinds]) for c in chunks]
    bn_weights = [
        (shares * layer_weights).expand(len(kinds), len(c.group_classes), -1).contiguous().to(device) for c in chunks
    ]
    segments = _segments(layers, device)
    groups = [c.groups.to(device) for c in chunks]
    averages = [group_average(g, len(c.group_classes)) for c, g in zip(chunks, groups)]
    pairs = [s.diversity * pair_weights(g) for g in groups]
    ema: list[Optional[torch.Tensor]] = [None] * len(chunks)  # the groups' moments over steps
    head = [m for m in teacher.modules() if isinstance(m, nn.Linear)][-1:] if s.diversity > 0 else []
    labels_on = [labels[c.positions].to(device) for c in chunks]
    targets_y = [_ce_target(teacher, x.detach(), y, s) for x, y in zip(params, labels_on)]
    group_share = [1 / torch.bincount(g, minlength=len(c.group_classes)).float()[g] for c, g in zip(chunks, groups)]
    optimizer = torch.optim.Adam(params, lr=s.lr, betas=(0.5, 0.9), fused=True)  # one kernel per step, CPU or CUDA
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(s.iterations, 1)))
    )
    x0 = [x.detach().clone() for x in params]
    init_maps = [tsgf.saliency(x, s.saliency) for x in x0]  # (n, 1, F, H, W) per chunk
    weights = [tsgf.filter_weight(m, s.w_min) for m in init_maps]  # TSGFO's W per chunk
    on_update = s.tsgfo and s.apply == TSGFApply.update
    n_groups = sum(len(c.group_classes) for c in chunks)
    stopping = s.stop_confidence > 0
    confidence = [torch.zeros(len(c.positions), device=device) for c in chunks]  # EMA over steps
    stopped = [torch.zeros(len(c.positions), dtype=torch.bool, device=device) for c in chunks]
    taps = BatchNormTaps(teacher) if matching else contextlib.nullcontext()

    # hooks on and (bf16 on CUDA) the teacher's weights cast once, for the whole optimisation
    with taps, _penultimate(head) as features, frozen_bf16(teacher, device, s.inputs.amp):
        for step in range(s.iterations):
            logging = callback is not None and (step % s.log_every == 0 or step == s.iterations - 1)
            totals = torch.zeros(3, device=device) if logging else None  # loss, ce, bn: sums over groups
            for x in params:
                x.grad = None  # what zero_grad(set_to_none) does, without its profiler records
            for k, x in enumerate(params):
                view = augment.sample(x, grids[k][0][step], grids[k][1][step])
                features.clear()
                with autocast(device, s.inputs.amp):
                    logits = teacher(view)
                ce = torch.dot(F.cross_entropy(logits.float(), targets_y[k], reduction="none"), group_share[k])
                if stopping:
                    with torch.no_grad():
                        p = F.softmax(logits.float(), dim=1).gather(1, labels_on[k].view(-1, 1)).squeeze(1)
                        confidence[k] = p if step == 0 else 0.7 * confidence[k] + 0.3 * p
                        stopped[k] |= confidence[k] >= s.stop_confidence
                loss, bn = ce, None  # bn: lambda_bn x the BN term
                if matching:  # every layer in one reduction: their channels side by side
                    moments = group_statistics(taps.means, taps.squares, averages[k])
                    if s.bn_ema > 0:
                        if ema[k] is not None:
                            moments = torch.lerp(moments, ema[k], s.bn_ema)
                        ema[k] = moments.detach()
                    bn = bn_term(moments, targets[k], segments, bn_weights[k])
                    loss = loss + bn
                if features:
                    loss = loss + _similarity(features[0].float(), pairs[k])
                loss.backward()
                if s.tsgfo:
                    if s.source == SaliencySource.current and step % s.every == 0:
                        weights[k] = tsgf.filter_weight(tsgf.saliency(x, s.saliency), s.w_min)
                    if not on_update:
                        x.grad = tsgf.filter_gradient(x.grad, weights[k])
                if logging:
                    bn_v = bn.detach() / s.lambda_bn if bn is not None else ce.new_zeros(())
                    totals += torch.stack([loss.detach(), ce.detach(), bn_v])
            if logging:
                motion = sum(tsgf.motion_sums(x, a, m, s.saliency) for x, a, m in zip(params, x0, init_maps))
            lr = schedule.get_last_lr()[0]
            previous = [x.detach().clone() for x in params] if on_update or stopping else None
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for k, x in enumerate(params):
                    if on_update:
                        x.copy_(tsgf.filter_update(previous[k], x, weights[k]))
                    x.clamp_(low, high)
                    if stopping:
                        x[stopped[k]] = previous[k][stopped[k]]
            if logging:
                loss_v, ce_v, bn_v = (totals / n_groups).tolist()
                share = (sum(int(m.sum()) for m in stopped) / len(labels)) if stopping else 0.0
                metrics = {"loss": loss_v, "ce": ce_v, "bn": bn_v, "lr": lr, "stopped": share}
                callback(step, {**metrics, **tsgf.motion_diagnostics(motion)})

    out = torch.empty_like(init, dtype=torch.float32, device="cpu")
    for chunk, x in zip(chunks, params):
        out[chunk.positions] = x.detach().cpu()
    return out
