"""What a recovery step costs beyond the teacher's bare pass, counted in aten operations on the CPU
(the host-dispatch cost that dominates a recovery step on a GPU: docs/sizing.md).

Counted: every aten call under a TorchDispatchMode over one recovery step (forward, backward, the
optimiser step and what follows it), views and empty allocations left out; one step = a recovery of
two steps minus one of one step, so set-up cancels. "Bare" = the teacher's forward, cross-entropy
and backward on the same chunk without taps. The default config's recovery (BN matching to class
statistics, diversity, TSGFO, stored labels off: they are computed after recovery), 8 classes x 1
video in one chunk at its clip size.

    python benchmarks/recovery_ops.py [--models mini_c3d mini_r2plus1d r2plus1d_18] [key=value ...]

r2plus1d_18 needs torchvision (the `vision` extra): without it, it is reported NOT run.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target  # noqa: E402

from tsgd_ray.config import load_config  # noqa: E402
from tsgd_ray.core import recovery  # noqa: E402
from tsgd_ray.core.bn_stats import accumulate_statistics  # noqa: E402
from tsgd_ray.core.models import ModelError, build_model  # noqa: E402
from tsgd_ray.settings import recovery_settings  # noqa: E402

NOT_COUNTED = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class OpCounter(TorchDispatchMode):
    """Counts aten calls by name, views and empty allocations left out."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NOT_COUNTED:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count(work) -> collections.Counter:
    with OpCounter() as counter:
        work()
    return counter.counts


def measure(model: str, cfg) -> tuple[int, int, collections.Counter]:
    """(ops of one recovery step, ops of the bare pass, the step's ops by name)."""
    torch.manual_seed(0)
    size, k = (cfg.data.num_frames, cfg.data.height, cfg.data.width), 8
    teacher = build_model(model, k, size, cfg.teacher.width, cfg.teacher.depth).eval()
    x = torch.randn(k, 3, *size)
    labels, indices = torch.arange(k), torch.zeros(k, dtype=torch.long)
    stats = accumulate_statistics(teacher, [(x, labels)], k)

    def recover(steps: int):
        settings = recovery_settings(load_config(None, [*OVERRIDES, f"distill.iterations={steps}"]))
        return lambda: recovery.recover(teacher, x, labels, indices, settings, stats)

    one, two = count(recover(1)), count(recover(2))
    step = two - one

    def bare():
        view = x.clone().requires_grad_(True)
        F.cross_entropy(teacher(view), labels).backward()

    teacher.requires_grad_(False)
    return sum(step.values()), sum(count(bare).values()), step


def main(argv=None) -> int:
    global OVERRIDES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mini_c3d", "mini_r2plus1d", "r2plus1d_18"])
    parser.add_argument("--top", type=int, default=8, help="print the step's most frequent ops")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    OVERRIDES = [f"{k}={v}" for k, v in _default_recovery().items()] + args.overrides
    cfg = load_config(None, OVERRIDES)
    for model in args.models:
        try:
            step, bare, by_name = measure(model, cfg)
        except ModelError as exc:  # torchvision's models need the vision extra
            print(f"target recovery_ops_over_bare_{model}: NOT run ({exc})")
            continue
        print(f"{model}: {step} ops per recovery step, {bare} per bare pass; most: {by_name.most_common(args.top)}")
        target(f"recovery_ops_over_bare_{model}", step / bare, "<=", 2.5)
    return 0


def _default_recovery() -> dict:
    """The default config's clip size, teacher and recovery settings (configs/default.yaml)."""
    d = load_config("default")
    keys = {"data.num_frames", "data.height", "data.width", "teacher.width", "teacher.depth"}
    keys |= {f"distill.{k}" for k in ("lr", "diversity", "lambda_bn", "first_bn_weight", "bn_target")}
    return {k: _get(d, k) for k in sorted(keys)}


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return getattr(node, "value", node)


OVERRIDES: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
