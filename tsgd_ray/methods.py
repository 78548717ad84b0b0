"""The methods a run distils or evaluates, as a registry (timm's style): name -> what it distils,
how it starts and what its students train on.

A method is the run's config with a few keys set (`overrides`); stage keys hash the resulting
config, so methods that differ only in recovery share the teacher and the statistics. Register a
new method with `register(MethodSpec(...))` next to its name in `tsgd_ray.config.Method`; tests
run every registered method end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from tsgd_ray.config import ConfigError, Method, regimes, validate


@dataclass(frozen=True)
class MethodSpec:
    """name; distils: runs stats -> init -> distill -> merge and trains its students on the merged
    set (False: the students train on every real training clip); overrides(cfg): the config keys
    this method sets; what it is, in one line."""

    name: Method
    distils: bool
    overrides: Callable[[DictConfig], dict[str, Any]]
    description: str


_REGISTRY: dict[Method, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get(method: Method | str) -> MethodSpec:
    """The registered method. Raises KeyError for a name nobody registered."""
    return _REGISTRY[Method(method)]


def registered() -> list[Method]:
    return list(_REGISTRY)


register(MethodSpec(Method.tsgd, True, lambda cfg: {}, "recovery with TSGF (TSGFO), students with TSGFA"))
register(
    MethodSpec(Method.sre2l_video, True, lambda cfg: {"tsgf": {"enabled": False}}, "recovery without TSGF (SRe2L)")
)
register(
    MethodSpec(
        Method.random_real,
        True,
        lambda cfg: {"tsgf": {"enabled": False}, "distill": {"init": "real", "iterations": 0, "pack": False}},
        "IPC seeded real clips per class, never packed, not optimised",
    )
)
register(
    MethodSpec(
        Method.packed_real,
        True,
        lambda cfg: {"tsgf": {"enabled": False}, "distill": {"init": "real", "iterations": 0, "pack": True}},
        "the first 4 x IPC of the same seeded real clips per class (random_real's among them) packed 2 x 2 "
        "where the teacher is sure, not optimised: what packing alone gives",
    )
)


def _full_student(cfg: DictConfig) -> dict:
    """evaluate.full folded into evaluate.*: its epochs, batch and workers where set, the
    learning rate scaled with the batch unless set."""
    e, f = cfg.evaluate, cfg.evaluate.full
    batch = f.batch_size or e.batch_size
    return {
        "evaluate": {
            "epochs": f.epochs or e.epochs,
            "batch_size": batch,
            "lr": f.lr or e.lr * batch / e.batch_size,
            "num_workers": f.num_workers or e.num_workers,
        }
    }


register(
    MethodSpec(
        Method.full,
        False,
        _full_student,
        "the student trained on every real training clip (the ceiling), with evaluate.full's budget and batch",
    )
)


def run_order(cfg: DictConfig) -> list[Method]:
    """The methods a run distils and evaluates, in the order the pipeline runs them and the plan
    counts them: distill.method, then evaluate.baselines in order, without repeats."""
    return list(dict.fromkeys([cfg.distill.method, *cfg.evaluate.baselines]))


def arms(cfg: DictConfig) -> list[tuple[Method, int]]:
    """What a run makes and evaluates, in `run_order`: (method, init draw) for each of
    evaluate.draws draws from distill.draw on, where the method distils; (method, distill.draw)
    once where it does not (`full` trains on every real clip, whatever the draw)."""
    first, n = cfg.distill.draw, cfg.evaluate.draws
    return [(m, d) for m in run_order(cfg) for d in (range(first, first + n) if get(m).distils else [first])]


def arm_name(method: Method, draw: int) -> str:
    """An arm's name in stage names, MLflow runs and logs: the method, and its draw where not 0."""
    return method.value if draw == 0 else f"{method.value}/draw-{draw}"


def method_config(cfg: DictConfig, method: Method, draw: int | None = None) -> DictConfig:
    """The run's config as it distils (or, for a method that does not distil, evaluates) with
    `method`, from init draw `draw` (default: distill.draw): its overrides merged over `cfg` (a
    distilling method also sets distill.method and takes what the label regime needs stored with
    its set, `LabelRegime.stores`, first). Returns a read-only config.

    Raises:
        ConfigError: the merged config is invalid.
    """
    spec = get(method)
    overrides = spec.overrides(cfg)
    if spec.distils:
        drawn = {} if draw is None else {"draw": draw}
        overrides = {**overrides, "distill": {"method": method.value, **drawn, **overrides.get("distill", {})}}
    stores = regimes.get(cfg.evaluate.labels).stores(cfg) if spec.distils else {}
    out = OmegaConf.merge(cfg, stores, overrides)
    try:
        validate(out)
    except ConfigError as exc:  # a baseline's own settings can be what breaks the rule
        raise ConfigError(f"{exc} (as method {method.value}: distill.method or evaluate.baselines)") from None
    OmegaConf.set_readonly(out, True)
    return out
