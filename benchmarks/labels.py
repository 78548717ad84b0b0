"""What stored labels cost: bytes on disk beside each clip, the labelling pass in distill, and a
student step that replays them against one that asks the teacher online. In one process on the CPU.

1. Size: clip tables of random uint8 clips written with and without stored labels (K views, fp16
   logits), at the built-in shape (8x32x32, 8 classes) and at Kinetics-700's (16x112x112, 700
   classes); the measured bytes per clip of the labels, and their share of the clip's.
2. Labelling: `label_views` (K teacher forwards per clip) against one recovery iteration on the same
   clips (the default config's teacher), as a share of a distill partition at the shipped configs'
   distill.iterations (75 built-in, 1000 for the real datasets: the target).
3. Replay: a student step under stored labels (no teacher forward) against one under online labels,
   same student, batch and augmentation family.

    python benchmarks/labels.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target  # noqa: E402

from tsgd_ray.config import load_config  # noqa: E402
from tsgd_ray.core import labels, recovery, training  # noqa: E402
from tsgd_ray.core.models import build_model  # noqa: E402
from tsgd_ray.data.clip_table import clip_table_bytes  # noqa: E402
from tsgd_ray.settings import recovery_settings, student_settings, view_settings  # noqa: E402


def label_bytes_per_clip(shape: tuple[int, ...], classes: int, views: int, n: int = 8) -> tuple[float, float]:
    """(bytes of stored labels per clip, bytes of the clip itself), measured on written tables."""
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y, idx = np.arange(n) % 4, np.arange(n) // 4
    plain = len(clip_table_bytes(clips, y, idx, [""] * n))
    stored = (
        rng.random((n, views, labels.VIEW_PARAMS), dtype=np.float32),
        rng.standard_normal((n, views, classes)).astype(np.float16),
    )
    with_labels = len(clip_table_bytes(clips, y, idx, [""] * n, stored=stored))
    return (with_labels - plain) / n, plain / n


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--views", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    for name, shape, classes in (("builtin", (8, 32, 32, 3), 8), ("kinetics700", (16, 112, 112, 3), 700)):
        for views in (1, 4, 16, 64):
            extra, clip = label_bytes_per_clip(shape, classes, views)
            print(f"{name} K={views}: {extra / 1024:.1f} KiB of labels per clip, {100 * extra / clip:.1f}% of the clip")
    extra, clip = label_bytes_per_clip((16, 112, 112, 3), 700, args.views)
    target(f"kinetics700_k{args.views}_label_bytes_over_clip_bytes", extra / clip, "<=", 0.05, 3)

    cfg = load_config("default", ["evaluate.batch_size=32"])
    size, k = (cfg.data.num_frames, cfg.data.height, cfg.data.width), 8
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.model, k, size, cfg.teacher.width, cfg.teacher.depth).eval()
    x = torch.randn(32, 3, *size)
    y = torch.arange(32) % k
    heat = torch.rand(32, *size[1:])
    params = labels.view_params(heat, labels.clip_keys(y, torch.arange(32) // k), 0, args.views, view_settings(cfg))
    label_time = seconds(lambda: labels.label_views(teacher, x, params), 3)
    settings = recovery_settings(load_config("default", ["distill.iterations=5"]))
    step_time = seconds(lambda: recovery.recover(teacher, x, y, torch.arange(32) // k, settings), 2) / 5
    print(f"labelling {args.views} views of 32 clips: {label_time:.2f} s; one recovery iteration: {step_time:.3f} s")
    for name in ("default", "kinetics400"):
        iterations = load_config(name, []).distill.iterations
        share = label_time / (label_time + iterations * step_time)
        print(f"  share of a distill partition at the {name} config's {iterations} iterations: {100 * share:.1f}%")
    target("labelling_share_of_distill_at_1000_iterations", label_time / (label_time + 1000 * step_time), "<=", 0.05, 3)

    logits = labels.label_views(teacher, x, params)

    def step_seconds(regime: str) -> float:
        settings = student_settings(load_config("default", [f"evaluate.labels={regime}"]))
        student = build_model("mini_c3d", k, size, 16, 4)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        return seconds(
            lambda: training.student_step(
                student, teacher, optimizer, x, y, settings, generator, heat, (params, logits)
            ),
            10,
        )

    step = {regime: step_seconds(regime) for regime in ("soft_kl", "stored")}
    print(f"student step, batch 32: online {step['soft_kl'] * 1000:.0f} ms, stored {step['stored'] * 1000:.0f} ms")
    target("stored_step_over_online_step", step["stored"] / step["soft_kl"], "<=", 1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
