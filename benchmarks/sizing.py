#!/usr/bin/env python3
"""The measured inputs of docs/sizing.md: per-video prepare cost and shard bytes, and recovery cost.

    python benchmarks/sizing.py [--config kinetics400] [--videos 50] [--iterations 5]

1. prepare and decode, per video on one core: probe (open + decode 3 frames), transcode to the
   config's `data.transcode_short_side`, and decode one training clip from the result, on the real
   footage closest to a Kinetics clip (bikes.mp4: 10 s, 640x272, 25 fps;
   scripts/fetch_footage.py). Prints seconds per video and the transcoded bytes.
2. recovery, per video-iteration at the config's clip shape and teacher: FLOPs of one forward +
   backward (torch's FlopCounterMode), and the measured seconds per video-iteration on this
   machine's device (CUDA when present, else CPU), with `--videos` videos in one chunk.

3. recovery memory per synthetic video, counted on torch's meta device (no GPU needed): the bytes
   the teacher's forward saves for the backward pass (activations, BN taps included; float32, so
   an upper bound under bf16 autocast) and the optimiser state (pixels, gradient, Adam's two
   moments: 16 bytes per value), for mini_c3d and r2plus1d_18 (when torchvision is installed) at
   8x64x64 and 16x112x112. A partition's GPU memory is about
   videos x state + distill.chunk_size x activations + the teacher.

These are measured here. docs/sizing.md scales them to Kinetics-400 and says which numbers are
assumptions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure_prepare(cfg, footage: Path, repeats: int) -> None:
    from tsgd_ray.data.video import decode_clip, probe, transcode

    data = (footage / "bikes.mp4").read_bytes()
    short = cfg.data.transcode_short_side or 128
    t0 = time.perf_counter()
    for _ in range(repeats):
        info = probe(data)
    probe_s = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        small = transcode(data, short)
    transcode_s = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        decode_clip(
            small, cfg.data.num_frames, cfg.data.height, cfg.data.width, cfg.data.frame_interval, cfg.data.sampling
        )
    decode_s = (time.perf_counter() - t0) / repeats
    print(
        f"prepare  source bikes.mp4 {len(data) / 1e6:.2f} MB, {info.num_frames} frames "
        f"{info.width}x{info.height} (a 10 s Kinetics-like clip)"
    )
    print(
        f"prepare  probe {probe_s * 1e3:.0f} ms/video/core; transcode to short side {short}: "
        f"{transcode_s:.2f} s/video/core -> {len(small) / 1e3:.0f} kB"
    )
    print(
        f"decode   one {cfg.data.num_frames}x{cfg.data.height}x{cfg.data.width} clip ({cfg.data.sampling.value}) from the "
        f"transcoded video: {decode_s * 1e3:.0f} ms/clip/core"
    )


def measure_recovery(cfg, videos: int, iterations: int) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tsgd_ray.core.device import resolve_device
    from tsgd_ray.core.models import build_model

    device = resolve_device("auto", 1 if torch.cuda.is_available() else 0)  # this process owns the machine
    shape = (cfg.data.num_frames, cfg.data.height, cfg.data.width)
    classes = 400
    model = build_model(cfg.teacher.model, classes, shape, cfg.teacher.width, cfg.teacher.depth).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(videos, 3, *shape, device=device, requires_grad=True)
    y = torch.randint(0, classes, (videos,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        x.grad = None

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / videos
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_video_iteration = (time.perf_counter() - t0) / (iterations * videos)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"recovery {cfg.teacher.model} width {cfg.teacher.width} depth {cfg.teacher.depth} at "
        f"{'x'.join(map(str, shape))}: {flops / 1e9:.2f} GFLOP per video-iteration (forward + backward)"
    )
    print(
        f"recovery {name}: {per_video_iteration * 1e3:.2f} ms per video-iteration "
        f"({1 / per_video_iteration:.0f} video-iterations/s, {3600 / per_video_iteration / 1e6:.2f} M per hour; "
        f"{videos} videos per chunk; forward/backward only, without augmentation and TSGF)"
    )


def measure_memory(width: int, depth: int) -> None:
    from tsgd_ray.core.models import ModelError
    from tsgd_ray.plan import model_cost

    for name in ("mini_c3d", "r2plus1d_18"):
        for size in ((8, 64, 64), (16, 112, 112)):
            state = 16 * 3 * size[0] * size[1] * size[2]
            try:
                act = model_cost(name, width, depth, size, classes=400).activation_bytes
            except ModelError as exc:
                print(f"memory   {name} {'x'.join(map(str, size))}: not measured ({exc})")
                continue
            label = f"{name} width {width} depth {depth}" if name == "mini_c3d" else name
            print(
                f"memory   {label} {'x'.join(map(str, size))}: {act / 2**20:.1f} MiB activations and "
                f"{state / 2**20:.2f} MiB optimiser state per synthetic video (float32)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="kinetics400")
    parser.add_argument("--videos", type=int, default=50, help="videos per recovery chunk (distill.chunk_size)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the prepare measurements")
    args = parser.parse_args()
    os.chdir(REPO)
    from tsgd_ray.config import load_config

    cfg = load_config(args.config)
    footage = Path(os.environ.get("TSGD_RAY_FOOTAGE", Path.home() / ".cache" / "tsgd-ray" / "footage"))
    if (footage / "bikes.mp4").is_file():
        measure_prepare(cfg, footage, args.repeats)
    else:
        print(f"prepare  skipped: no bikes.mp4 in {footage} (run scripts/fetch_footage.py)")
    measure_recovery(cfg, args.videos, args.iterations)
    measure_memory(cfg.teacher.width, cfg.teacher.depth)


if __name__ == "__main__":
    main()
