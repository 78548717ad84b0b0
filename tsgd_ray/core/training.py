"""Teacher and student training steps, prediction and top-k accuracy (METHOD.md stages 1 and 3).

Real clips enter as uint8 (N, F, H, W, 3) and are normalised per batch on the device; synthetic
clips are already normalised floats (N, 3, F, H, W). One `*_step` is what a Ray Train worker runs
per batch; the `train_*` loops run a whole in-memory set in one process.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tsgd_ray.config import LabelKind, TSGFAMode
from tsgd_ray.core import augment, tsgf
from tsgd_ray.core.clips import to_model_input
from tsgd_ray.core.device import autocast

EpochCallback = Callable[[int, dict], None]
BatchStep = Callable[[torch.Tensor, torch.optim.Optimizer], torch.Tensor]


def random_augment(x: torch.Tensor, aug, generator: torch.Generator) -> torch.Tensor:
    """Clip-consistent random resized crop, flip and roll of x (N, 3, F, H, W); `aug` = augment section."""
    u = torch.rand(x.shape[0], augment.UNIFORMS_PER_CLIP, generator=generator).to(x.device)
    return augment.apply_params(x, augment.random_params(u, tuple(aug.crop_scale), tuple(aug.crop_ratio), aug.hflip, aug.roll))


def tsgfa_augment(x: torch.Tensor, heat: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """TSGFA (evaluate.tsgfa_mode): a crop centred on a salient point, or a CutMix box centred on the
    salient point of another clip of the batch; one box for all frames. heat (N, H, W) is the
    time-mean of each clip's saliency map."""
    aug = cfg.augment
    scale, ratio = tuple(aug.crop_scale), tuple(aug.crop_ratio)
    n = x.shape[0]
    u = torch.rand(n, augment.UNIFORMS_PER_CLIP, generator=generator).to(x.device)
    params = augment.random_params(u, scale, ratio, aug.hflip, aug.roll)
    sample_gen = torch.Generator(device=x.device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    if cfg.evaluate.tsgfa_mode == TSGFAMode.crop:
        params[:, :4] = tsgf.saliency_boxes(heat, u[:, :2], scale, ratio, cfg.tsgf.crop_delta, sample_gen)
        return augment.apply_params(x, params)
    permutation = torch.randperm(n, generator=generator).to(x.device)
    boxes = tsgf.saliency_boxes(heat[permutation], u[:, :2], scale, ratio, cfg.tsgf.crop_delta, sample_gen)
    return augment.apply_params(tsgf.saliency_cutmix(x, boxes, permutation), params)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total_steps) / max(total_steps, 1))))


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def teacher_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """One supervised step: CE of model(augmented x) against y; x normalised (N, 3, F, H, W).
    Returns the loss (a detached device tensor, not synced)."""
    with autocast(x.device, cfg.amp):
        loss = F.cross_entropy(model(random_augment(x, cfg.augment, generator)).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _fit(model: nn.Module, num_examples: int, section, generator: torch.Generator, step: BatchStep, callback: Optional[EpochCallback]) -> nn.Module:
    """AdamW + cosine over `section.epochs` shuffled passes (section: teacher or evaluate config);
    step(rows, optimizer) trains on one batch and returns its detached loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr, weight_decay=section.weight_decay)
    schedule = cosine_schedule(optimizer, section.epochs * math.ceil(num_examples / section.batch_size))
    model.train()
    for epoch in range(section.epochs):
        losses = []
        for rows in _batches(num_examples, section.batch_size, generator):
            losses.append(step(rows, optimizer))
            schedule.step()
        if callback is not None:
            callback(epoch, {"loss": torch.stack(losses).mean().item()})
    return model.eval()


def train_teacher(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor, cfg, callback: Optional[EpochCallback] = None) -> nn.Module:
    """Train `model` (on its device) with AdamW + cosine on uint8 clips (N, F, H, W, 3) for
    teacher.epochs; callback(epoch, {"loss"}) after each epoch. Returns the model in eval mode."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)

    def step(rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        x = to_model_input(clips[rows].to(device, non_blocking=True), cfg.data.mean, cfg.data.std)
        return teacher_step(model, optimizer, x, labels[rows].to(device), cfg, generator)

    return _fit(model, len(clips), cfg.teacher, generator, step, callback)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], y: torch.Tensor, cfg) -> torch.Tensor:
    """evaluate.labels: soft_kl = KL(softmax(t/T) || softmax(s/T)) * T^2; soft_mse = MSE to the
    teacher logits + mse_ce_weight * CE(y); hard = CE(y) (teacher_logits unused, may be None)."""
    e = cfg.evaluate
    s = student_logits.float()
    if e.labels == LabelKind.hard:
        return F.cross_entropy(s, y)
    t = teacher_logits.float()
    if e.labels == LabelKind.soft_kl:
        temp = e.temperature
        return F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(t / temp, 1), log_target=True, reduction="batchmean") * temp**2
    return F.mse_loss(s, t) + e.mse_ce_weight * F.cross_entropy(s, y)


def student_step(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, cfg, generator: torch.Generator, heat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One student step on normalised clips x (N, 3, F, H, W): augment (TSGFA when evaluate.tsgfa,
    using heat (N, H, W) or the clips' own saliency), let the frozen teacher label the augmented
    clips, and fit the student. Returns the detached loss."""
    if cfg.evaluate.tsgfa:
        if heat is None:
            heat = tsgf.saliency(x, cfg.tsgf).mean(dim=(1, 2))
        view = tsgfa_augment(x, heat, cfg, generator)
    else:
        view = random_augment(x, cfg.augment, generator)
    with autocast(x.device, cfg.amp):
        with torch.no_grad():
            teacher_logits = teacher(view) if cfg.evaluate.labels != LabelKind.hard else None
        student_logits = student(view)
    loss = distillation_loss(student_logits, teacher_logits, y, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _normalised(x: torch.Tensor, cfg) -> torch.Tensor:
    """uint8 clips (N, F, H, W, 3) -> model input; model input is returned as it is."""
    return to_model_input(x, cfg.data.mean, cfg.data.std) if x.dtype == torch.uint8 else x


def train_student(student: nn.Module, teacher: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg, seed: int, callback: Optional[EpochCallback] = None) -> nn.Module:
    """Train `student` from its current weights on clips x (the synthetic set, or real clips for
    `full`): normalised (N, 3, F, H, W), or uint8 (N, F, H, W, 3), which stay uint8 in memory and
    are normalised per batch (4x less memory, the same numbers). evaluate.epochs with AdamW +
    cosine, teacher in eval mode. Randomness comes from `seed` only. Returns the student in eval mode."""
    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    teacher.eval().requires_grad_(False)
    heat = None  # (N, H, W); saliency is normalised per clip, so chunks give the same maps
    if cfg.evaluate.tsgfa:
        heat = torch.cat([tsgf.saliency(_normalised(x[i : i + 64], cfg), cfg.tsgf).mean(dim=(1, 2))
                          for i in range(0, len(x), 64)])

    def step(rows: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        batch_heat = heat[rows].to(device) if heat is not None else None
        return student_step(student, teacher, optimizer, _normalised(x[rows], cfg).to(device), labels[rows].to(device),
                            cfg, generator, batch_heat)

    return _fit(student, len(x), cfg.evaluate, generator, step, callback)


@torch.no_grad()
def predict(model: nn.Module, clips: torch.Tensor, cfg, batch_size: int = 64) -> torch.Tensor:
    """Logits (N, K) on the CPU of uint8 clips (N, F, H, W, 3), model in eval mode, no augmentation."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(clips), batch_size):
        x = to_model_input(clips[start : start + batch_size].to(device), cfg.data.mean, cfg.data.std)
        with autocast(device, cfg.amp):
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
