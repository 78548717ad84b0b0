"""The one place the run config becomes the algorithm's typed settings.

core/ takes small frozen settings (shapes and units in their docstrings) and never reads a config;
the stages, benchmarks and tests build them here, once per stage or worker, so a core signature
says exactly what it reads.
"""

from __future__ import annotations

from omegaconf import DictConfig

from tsgd_ray.config import BNTarget, Compensation, Granularity, SaliencySource, TSGFApply, regimes
from tsgd_ray.core.augment import CropSettings
from tsgd_ray.core.clips import InputSettings
from tsgd_ray.core.labels import ViewSettings
from tsgd_ray.core.recovery import RecoverySettings
from tsgd_ray.core.training import FitSettings, StudentSettings, TeacherSettings
from tsgd_ray.core.tsgf import SaliencySettings


def input_settings(cfg: DictConfig) -> InputSettings:
    """data.mean, data.std and amp."""
    return InputSettings(tuple(cfg.data.mean), tuple(cfg.data.std), bool(cfg.amp))


def crop_settings(section) -> CropSettings:
    """A section with crop_scale, crop_ratio, hflip, roll (augment, evaluate.augment, distill.labels.augment)."""
    return CropSettings(tuple(section.crop_scale), tuple(section.crop_ratio), bool(section.hflip), float(section.roll))


def saliency_settings(section) -> SaliencySettings:
    """The `tsgf` section."""
    return SaliencySettings(
        Compensation(section.compensate),
        int(section.spatial_kernel),
        int(section.window),
        tuple(section.alpha),
        float(section.eps),
        Granularity(section.granularity),
    )


def fit_settings(section) -> FitSettings:
    """The teacher or evaluate section."""
    return FitSettings(int(section.epochs), int(section.batch_size), float(section.lr), float(section.weight_decay))


def teacher_settings(cfg: DictConfig) -> TeacherSettings:
    """The run seed, the inputs, `augment` and the teacher section."""
    return TeacherSettings(int(cfg.seed), input_settings(cfg), crop_settings(cfg.augment), fit_settings(cfg.teacher))


def student_settings(cfg: DictConfig) -> StudentSettings:
    """The evaluate section (its label regime from config.regimes; under a label-preserving regime
    the teacher's `augment` crops alone) and tsgf's saliency and crop_delta."""
    e, aug = cfg.evaluate, cfg.evaluate.augment
    regime = regimes.get(e.labels)
    hard = regime.label_preserving  # class labels: only label-preserving transforms
    return StudentSettings(
        inputs=input_settings(cfg),
        fit=fit_settings(e),
        crop=crop_settings(cfg.augment if hard else aug),
        time_reverse=bool(aug.time_reverse) and not hard,
        cutmix=0.0 if hard else float(aug.cutmix),
        mixup=0.0 if hard else float(aug.mixup),
        tsgfa=bool(e.tsgfa),
        crop_delta=float(cfg.tsgf.crop_delta),
        saliency=saliency_settings(cfg.tsgf),
        regime=regime,
        temperature=float(e.temperature),
        mse_ce_weight=float(e.mse_ce_weight),
        ema=float(e.ema),
        views=int(e.views),
    )


def recovery_settings(cfg: DictConfig) -> RecoverySettings:
    """The distill section, `augment`, `tsgf` and the run seed."""
    d, t = cfg.distill, cfg.tsgf
    return RecoverySettings(
        seed=int(cfg.seed),
        inputs=input_settings(cfg),
        crop=crop_settings(cfg.augment),
        iterations=int(d.iterations),
        lr=float(d.lr),
        lambda_bn=float(d.lambda_bn),
        first_bn_weight=float(d.first_bn_weight),
        bn_target=BNTarget(d.bn_target),
        bn_ema=float(d.bn_ema),
        diversity=float(d.diversity),
        init_target=float(d.init_target),
        init_temperature=float(d.init_temperature),
        stop_confidence=float(d.stop_confidence),
        chunk_size=int(d.chunk_size),
        log_every=int(d.log_every),
        tsgfo=bool(t.enabled),
        apply=TSGFApply(t.apply),
        source=SaliencySource(t.source),
        w_min=float(t.w_min),
        every=int(t.every),
        saliency=saliency_settings(t),
    )


def view_settings(cfg: DictConfig) -> ViewSettings:
    """distill.labels (and tsgf.crop_delta): the stored views' family."""
    section = cfg.distill.labels
    return ViewSettings(
        crop_settings(section.augment),
        bool(section.augment.time_reverse),
        bool(section.tsgfa),
        float(cfg.tsgf.crop_delta),
    )
