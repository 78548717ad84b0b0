"""Training: the one loop (`fit`), teacher and student steps, prediction and top-k accuracy (docs/method.md).

Real clips enter as uint8 (N, F, H, W, 3) and are normalised per batch on the device; synthetic
clips are already normalised floats (N, 3, F, H, W). One `*_step` is what a Ray Train worker runs
per batch; `fit` is the one training loop (optimiser, schedule, EMA, callbacks) that the
`train_*` functions (a whole in-memory set in one process) and the Ray Train workers run.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tsgd_ray.config.regimes import LabelRegime
from tsgd_ray.core import augment, tsgf
from tsgd_ray.core.augment import CropSettings
from tsgd_ray.core.clips import InputSettings
from tsgd_ray.core.device import autocast
from tsgd_ray.core.labels import replay
from tsgd_ray.core.tsgf import SaliencySettings

EpochCallback = Callable[[int, dict], None]


@dataclass(frozen=True)
class FitSettings:
    """AdamW (`lr`, `weight_decay`) with a cosine schedule over `epochs` passes of `batch_size` clips."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float


@dataclass(frozen=True)
class TeacherSettings:
    """Supervised teacher training: `crop` augmentation (the `augment` section), `fit`, and the
    batch-order and augmentation stream `seed`."""

    seed: int
    inputs: InputSettings
    crop: CropSettings
    fit: FitSettings


@dataclass(frozen=True)
class StudentSettings:
    """Student training on a (synthetic) set (the `evaluate` section): `crop` plus time reversal,
    CutMix and MixUp (evaluate.augment; under hard labels the teacher's label-preserving `augment`
    crops alone), TSGFA (`tsgfa`, boxes centred within `crop_delta` of a salient point, maps from
    `saliency`), the label regime (`regime`, config.regimes: online teacher, the first `views`
    stored views, hard, ...; `temperature`, `mse_ce_weight`), `fit`, and an EMA of the weights
    with decay `ema` (0: off)."""

    inputs: InputSettings
    fit: FitSettings
    crop: CropSettings
    time_reverse: bool
    cutmix: float
    mixup: float
    tsgfa: bool
    crop_delta: float
    saliency: SaliencySettings
    regime: LabelRegime
    temperature: float
    mse_ce_weight: float
    ema: float
    views: int


def random_augment(x: torch.Tensor, crop: CropSettings, generator: torch.Generator) -> torch.Tensor:
    """Clip-consistent random resized crop, flip and roll of x (N, 3, F, H, W) under `crop`."""
    u = torch.rand(x.shape[0], augment.UNIFORMS_PER_CLIP, generator=generator).to(x.device)
    return augment.apply_params(x, crop.params(u))


def student_view(
    x: torch.Tensor, heat: torch.Tensor, settings: StudentSettings, generator: torch.Generator
) -> torch.Tensor:
    """The student's augmented view of x (N, 3, F, H, W): time reversal,
    CutMix, MixUp (each per clip, partners from a shuffle of the batch), then a random resized
    crop, flip and roll; one box per clip, the same on every frame. CutMix and MixUp share one
    uniform, so no clip gets both while cutmix + mixup <= 1.

    Crop and CutMix box centres are drawn from heat (N, H, W) >= 0, the time-mean of each clip's
    init saliency, when settings.tsgfa (TSGFA), else from a flat map: the two arms differ only in
    where the centres land. A CutMix box is centred on a salient point of the clip it comes from.
    """
    delta = settings.crop_delta
    scale, ratio = settings.crop.scale, settings.crop.ratio
    n, device = x.shape[0], x.device
    u = torch.rand(n, augment.UNIFORMS_PER_CLIP + 5, generator=generator).to(device)
    partner = torch.randperm(n, generator=generator).to(device)
    sample_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    heat = heat if settings.tsgfa else torch.ones_like(heat)
    per_clip = (n, 1, 1, 1, 1)
    if settings.time_reverse:
        x = torch.where((u[:, 6] < 0.5).view(per_clip), x.flip(2), x)
    if settings.cutmix > 0:
        boxes = tsgf.saliency_boxes(heat[partner], u[:, 7:9], scale, ratio, delta, sample_gen)
        pasted = tsgf.saliency_cutmix(x, boxes, partner)
        x = torch.where((u[:, 9] < settings.cutmix).view(per_clip), pasted, x)
    if settings.mixup > 0:
        weight = u[:, 10].view(per_clip)
        x = torch.where((u[:, 9] >= 1 - settings.mixup).view(per_clip), weight * x + (1 - weight) * x[partner], x)
    params = settings.crop.params(u[:, :6])
    params[:, :4] = tsgf.saliency_boxes(heat, u[:, :2], scale, ratio, delta, sample_gen)
    return augment.apply_params(x, params)


class WeightEMA:
    """An exponential moving average of a model's floating-point state (parameters and BN
    statistics): shadow <- decay * shadow + (1 - decay) * current after every `update`, in one
    foreach lerp over all tensors (one kernel launch per dtype and device on CUDA, not one per
    tensor); integer state (BN's batch counts) is copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        self._others = [k for k, v in self.shadow.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        torch._foreach_lerp_([self.shadow[k] for k in self._floats], [current[k] for k in self._floats], 1 - self.decay)
        for k in self._others:
            self.shadow[k].copy_(current[k])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            v.copy_(self.shadow[k])

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for k, v in self.shadow.items():
            v.copy_(state[k])


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / max(total_steps, 1)))
    )


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def teacher_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TeacherSettings,
    generator: torch.Generator,
) -> torch.Tensor:
    """One supervised step: CE of model(augmented x) against y; x normalised (N, 3, F, H, W).
    Returns the loss (a detached device tensor, not synced)."""
    with autocast(x.device, settings.inputs.amp):
        loss = F.cross_entropy(model(random_augment(x, settings.crop, generator)).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class FitState:
    """What a training run carries from epoch to epoch: `epoch` (0-based, the last finished one
    once callbacks see it, -1 before the first), `history` (one row per epoch: step, time, loss),
    the random stream the steps draw from (`generator`) and the weight EMA (`average`), each where
    the run has one. A resumable run saves `state_dict()` (CPU tensors, loadable with
    weights_only=True) and passes it back as `fit(resume=...)`: it then ends exactly where the
    uninterrupted run ends."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generator: Optional[torch.Generator] = None
    average: Optional[WeightEMA] = None
    epoch: int = -1
    history: list[dict] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            **({"generator": self.generator.get_state()} if self.generator is not None else {}),
            **({"average": self.average.state_dict()} if self.average is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.epoch, self.history = state["epoch"], list(state["history"])
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
        if self.average is not None and "average" in state:
            self.average.load_state_dict(state["average"])


#: called after every epoch with the run's state, outside `epoch_context` (so a callback may talk
#: to every worker, e.g. a Ray Train report, after DDP's join has brought the ranks together)
Callback = Callable[[FitState], None]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # inside a DistributedDataParallel wrapper


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterable],
    step: Callable[[object, torch.optim.Optimizer], torch.Tensor],
    settings: FitSettings,
    steps_per_epoch: int,
    callbacks: Sequence[Callback] = (),
    ema: float = 0.0,
    resume: Optional[dict] = None,
    epoch_context: Callable[[], ContextManager] = contextlib.nullcontext,
    generator: Optional[torch.Generator] = None,
) -> FitState:
    """The one training loop (teacher, students, `full`): AdamW (settings.lr, weight_decay) with a
    cosine schedule over settings.epochs * steps_per_epoch steps; epoch e trains on `batches(e)`,
    step(batch, optimizer) trains on one batch and returns its detached loss. ema > 0: the model
    ends with the EMA of its weights (decay `ema`, updated every step). resume: a
    `FitState.state_dict()` to continue from (the epoch after it). Each epoch's batches run inside
    `epoch_context()` (DDP's join for ranks with uneven batch counts); the callbacks run after it.
    generator: the random stream `batches` and `step` draw from, saved and resumed with the state.
    Returns the final state, the model in eval mode."""
    average = WeightEMA(model, ema) if ema > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    state = FitState(
        model, optimizer, cosine_schedule(optimizer, settings.epochs * steps_per_epoch), generator, average
    )
    if resume is not None:
        state.load_state_dict(resume)
    for epoch in range(state.epoch + 1, settings.epochs):
        model.train()
        losses = []
        with epoch_context():
            for batch in batches(epoch):
                losses.append(step(batch, optimizer))
                state.schedule.step()
                if average is not None:
                    average.update(model)
        loss = torch.stack(losses).mean().item() if losses else float("nan")
        state.epoch = epoch
        state.history.append({"step": epoch, "time": time.time(), "loss": loss})
        for callback in callbacks:
            callback(state)
    if average is not None:
        average.copy_to(model)
    model.eval()
    return state


def epoch_callback(callback: Optional[EpochCallback]) -> list[Callback]:
    """An EpochCallback (epoch, {"loss"}) as `fit` callbacks."""
    if callback is None:
        return []
    return [lambda state: callback(state.epoch, {"loss": state.history[-1]["loss"]})]


def train_teacher(
    model: nn.Module,
    clips: torch.Tensor,
    labels: torch.Tensor,
    settings: TeacherSettings,
    callback: Optional[EpochCallback] = None,
) -> nn.Module:
    """Train `model` (on its device) with AdamW + cosine on uint8 clips (N, F, H, W, 3) for
    settings.fit.epochs; callback(epoch, {"loss"}) after each epoch. Returns the model in eval mode."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)

    def step(rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        x = settings.inputs.model_input(clips[rows].to(device, non_blocking=True))
        return teacher_step(model, optimizer, x, labels[rows].to(device), settings, generator)

    fit(
        model,
        lambda epoch: _batches(len(clips), settings.fit.batch_size, generator),
        step,
        settings.fit,
        math.ceil(len(clips) / settings.fit.batch_size),
        epoch_callback(callback),
    )
    return model


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], y: torch.Tensor, settings: StudentSettings
) -> torch.Tensor:
    """The student's loss under settings.regime (its `loss`, on float32 student logits):
    teacher_logits online or replayed, None where the regime uses neither."""
    return settings.regime.loss(student_logits.float(), teacher_logits, y, settings)


def clip_heat(x: torch.Tensor, saliency: SaliencySettings, inputs: InputSettings, chunk: int = 64) -> torch.Tensor:
    """The TSGFA heat map (N, H, W) in [0, 1] of clips x (uint8 or model input): the time-mean of
    their saliency, computed in chunks (the map is normalised per clip, so chunks do not matter)."""
    return torch.cat(
        [tsgf.saliency(inputs.normalised(x[i : i + chunk]), saliency).mean(dim=(1, 2)) for i in range(0, len(x), chunk)]
    )


def student_step(
    student: nn.Module,
    teacher: Optional[nn.Module],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: StudentSettings,
    generator: torch.Generator,
    heat: Optional[torch.Tensor] = None,
    stored: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """One student step on normalised clips x (N, 3, F, H, W) and fit the student: where
    settings.regime replays views, replay one of the first settings.views stored views per clip
    (`stored`: their params (N, K, 7) and logits (N, K, classes)); else augment (`student_view`,
    heat (N, H, W) or, when None, the clips' own) and, where the regime runs the teacher, let the
    frozen teacher label the views (`teacher` None otherwise). Returns the detached loss."""
    teacher_logits = None
    if settings.regime.replays_views:
        view, teacher_logits = replay(x, stored[0][:, : settings.views], stored[1][:, : settings.views], generator)
    else:
        if heat is None:  # only TSGFA reads it: no saliency per batch for uniform crops
            heat = (
                clip_heat(x, settings.saliency, settings.inputs)
                if settings.tsgfa
                else x.new_ones(x.shape[0], *x.shape[-2:])
            )
        view = student_view(x, heat, settings, generator)
    with autocast(x.device, settings.inputs.amp):
        if settings.regime.teacher_online:
            with torch.no_grad():
                teacher_logits = teacher(view)
        student_logits = student(view)
    loss = distillation_loss(student_logits, teacher_logits, y, settings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_student(
    student: nn.Module,
    teacher: Optional[nn.Module],
    x: torch.Tensor,
    labels: torch.Tensor,
    settings: StudentSettings,
    seed: int,
    callback: Optional[EpochCallback] = None,
    heat: Optional[torch.Tensor] = None,
    epoch_context: Callable[[], ContextManager] = contextlib.nullcontext,
    stored: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    callbacks: Sequence[Callback] = (),
    resume: Optional[dict] = None,
) -> nn.Module:
    """Train `student` from its current weights on clips x (the synthetic set, or real clips for
    `full`): normalised (N, 3, F, H, W), or uint8 (N, F, H, W, 3), which stay uint8 in memory and
    are normalised per batch (4x less memory, the same numbers). settings.fit with AdamW +
    cosine (and settings.ema), teacher in eval mode (None where settings.regime does not run it). heat
    (N, H, W): the TSGFA map of each clip, carried from its init clip (synthetic sets); None: the
    clips' own (real clips). stored: the set's views (N, K, 7) and logits (N, K, classes), needed
    by a regime that replays views. Randomness comes from `seed` only; epoch_context, callbacks (after
    `callback`) and resume: as `fit`'s. Returns the student in eval mode.

    Raises:
        ValueError: stored labels asked for and `stored` None or holding fewer than settings.views.
    """
    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    if settings.regime.replays_views and (stored is None or stored[0].shape[1] < settings.views):
        held = 0 if stored is None else stored[0].shape[1]
        raise ValueError(
            f"evaluate.labels={settings.regime.name} replays {settings.views} views per clip; the set stores {held}"
        )
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    if heat is None and not settings.regime.replays_views:
        heat = clip_heat(x, settings.saliency, settings.inputs)

    def step(rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        return student_step(
            student,
            teacher,
            optimizer,
            settings.inputs.normalised(x[rows].to(device, non_blocking=True)),  # uint8 over the bus
            labels[rows].to(device),
            settings,
            generator,
            heat[rows].to(device) if heat is not None else None,
            (stored[0][rows], stored[1][rows]) if stored is not None else None,
        )

    fit(
        student,
        lambda epoch: _batches(len(x), settings.fit.batch_size, generator),
        step,
        settings.fit,
        math.ceil(len(x) / settings.fit.batch_size),
        [*epoch_callback(callback), *callbacks],
        settings.ema,
        resume=resume,
        epoch_context=epoch_context,
        generator=generator,
    )
    return student


@torch.no_grad()
def predict(model: nn.Module, clips: torch.Tensor, inputs: InputSettings, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, K) on the CPU of uint8 clips (N, F, H, W, 3), model in eval mode, no augmentation."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(clips), batch_size):
        x = inputs.model_input(clips[start : start + batch_size].to(device))
        with autocast(device, inputs.amp):
            out.append(model(x).float().cpu())
    return torch.cat(out)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the k largest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels.view(-1, 1)).any(dim=1).float().mean().item()


@torch.no_grad()
def embeddings(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The input of the model's last nn.Linear (its penultimate features), (N, D) on the CPU."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float().cpu()))
    device = next(model.parameters()).device
    try:
        model.eval()
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size].to(device))
    finally:
        handle.remove()
    return torch.cat(captured)
