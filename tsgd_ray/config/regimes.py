"""Label regimes, as a registry (timm's style): what a student learns from (`evaluate.labels`).

A regime is one object: what a distilled set must store for it (`stores`: config keys a
distilling method's config takes, so the set's stage key follows), how the student's loss uses
its targets (`loss`), whether the frozen teacher runs at every student step (`teacher_online`: the
plan counts a teacher forward per view), whether the student replays the set's stored views
instead of augmenting (`replays_views`), and whether only the teacher's label-preserving crops
are allowed (`label_preserving`: class labels must stay true). Register one with
`register(LabelRegime(...))`: config validation, the generated configuration reference, the
student's step, the plan and `benchmarks/quality.py --regimes` read it from here.

It lives in config/ because validation and the reference read it and config/ is the bottom layer;
the losses import torch when first called, so loading a config stays free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

#: loss(student_logits (N, C) float32, targets (N, C) or None, y (N,) class ids, settings) -> scalar;
#: targets: the teacher's logits on the view (online) or the stored ones (replayed); None when the
#: regime has neither; settings: core.training.StudentSettings (temperature, mse_ce_weight, ...)
Loss = Callable[[Any, Optional[Any], Any, Any], Any]


def _stores_nothing_more(cfg) -> dict:
    return {}


@dataclass(frozen=True)
class LabelRegime:
    """name (the value of evaluate.labels); description (one line, in the configuration
    reference); loss; teacher_online; replays_views (needs evaluate.views <= distill.labels.views);
    label_preserving; stores(cfg) -> config overrides a distilling method's config takes;
    without_set: the regime a student with no stored set (`full`) uses instead ('' = this one)."""

    name: str
    description: str
    loss: Loss
    teacher_online: bool = False
    replays_views: bool = False
    label_preserving: bool = False
    stores: Callable[[Any], dict] = _stores_nothing_more
    without_set: str = ""

    def for_student(self, has_set: bool) -> LabelRegime:
        """The regime a student uses: this one, or `without_set` for a student with no stored set."""
        return self if has_set or not self.without_set else get(self.without_set)

    def recorded(self, cfg, has_set: bool) -> str:
        """What a student learns from, as results and MLflow record it: `stored(K=16)` for a
        regime that replays K views, `online(<name>)` where the teacher runs, else the name."""
        regime = self.for_student(has_set)
        if regime.replays_views:
            return f"{regime.name}(K={cfg.evaluate.views})"
        return f"online({regime.name})" if regime.teacher_online else regime.name


_REGISTRY: dict[str, LabelRegime] = {}


def register(regime: LabelRegime) -> LabelRegime:
    _REGISTRY[regime.name] = regime
    return regime


def unregister(name: str) -> None:
    """Remove a regime (tests that register their own)."""
    del _REGISTRY[name]


def get(name: str) -> LabelRegime:
    """The registered regime. Raises KeyError for a name nobody registered (config validation
    rejects such a name at load)."""
    return _REGISTRY[str(name)]


def registered() -> list[str]:
    return list(_REGISTRY)


def described() -> dict[str, str]:
    """{name: description} of every registered regime (the values evaluate.labels accepts)."""
    return {name: regime.description for name, regime in _REGISTRY.items()}


def soft_kl_loss(s, t, y, settings):
    """KL(softmax(t/T) || softmax(s/T)) * T^2 (Hinton's distillation loss), T = settings.temperature."""
    from torch.nn import functional as F

    temp = settings.temperature
    t = t.float()
    return F.kl_div(F.log_softmax(s / temp, 1), F.log_softmax(t / temp, 1), log_target=True, reduction="batchmean") * (
        temp**2
    )


def soft_mse_loss(s, t, y, settings):
    """MSE to the teacher's logits + settings.mse_ce_weight * CE(y) (Video-DC)."""
    from torch.nn import functional as F

    return F.mse_loss(s, t.float()) + settings.mse_ce_weight * F.cross_entropy(s, y)


def hard_loss(s, t, y, settings):
    """Cross-entropy with the class labels; no targets."""
    from torch.nn import functional as F

    return F.cross_entropy(s, y)


register(
    LabelRegime(
        "soft_kl",
        "KL to the teacher's softened outputs on each augmented batch, times T^2",
        soft_kl_loss,
        teacher_online=True,
    )
)
register(
    LabelRegime(
        "soft_mse",
        "MSE to the teacher's logits plus evaluate.mse_ce_weight * CE (Video-DC)",
        soft_mse_loss,
        teacher_online=True,
    )
)
register(
    LabelRegime(
        "stored",
        "replay the set's stored views (distill.labels) and their logits, KL as soft_kl; no teacher "
        "(a student with no stored set, `full`, is labelled online by soft_kl)",
        soft_kl_loss,
        replays_views=True,
        without_set="soft_kl",
    )
)
register(
    LabelRegime(
        "hard",
        "cross-entropy with the class labels, the teacher's label-preserving `augment` crops; no teacher",
        hard_loss,
        label_preserving=True,
    )
)
