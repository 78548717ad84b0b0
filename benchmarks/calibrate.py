#!/usr/bin/env python3
"""The CPU rows of the plan's calibration table (`tsgd_ray.calibration`), measured on this machine.

    python benchmarks/calibrate.py [--config default] [--videos DIR] [--write] [overrides ...]

For the config's teacher and student at its clip size, on one thread of this machine's CPU:
    compute   train steps, eval forwards and (the teacher) recovery iterations, per second
and, with the config's clip size:
    prepare   videos/s one core probes and transcodes to data.transcode_short_side (when set), on
              the encoded videos in --videos (default: the built-in dataset's)
    feed      decode: clips/s one core decodes from those videos as prepare stored them, one clip
              per video;
              read: clips/s one core reads back from clip-cache files (shuffled batches)
    start     each stage's fixed cost (teacher, stats, distill, evaluate): the real stages run on a
              tiny built-in dataset with the config's models, less the work the plan gives them
              (`--no-stages` leaves this out)
`--write` merges the rows into the shipped table (tsgd_ray/calibration.json); without it they are
printed only. GPU rows come from benchmarks/gpu.py on a GPU: `--merge <its --out file>` adds them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
from report import TINY_RUN  # noqa: E402

from tsgd_ray import calibration, layout  # noqa: E402
from tsgd_ray.config import load_config  # noqa: E402
from tsgd_ray.core import recovery, training  # noqa: E402
from tsgd_ray.core.bn_stats import accumulate_statistics  # noqa: E402
from tsgd_ray.core.models import build_model  # noqa: E402
from tsgd_ray.settings import recovery_settings, teacher_settings  # noqa: E402

CLASSES = 10


def rate(fn, units: int, seconds: float = 3.0) -> float:
    """units/s of fn() (each call does `units`), after one warm-up call, over at least `seconds`."""
    fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or calls < 2:
        fn()
        calls += 1
    return units * calls / (time.perf_counter() - started)


def model_rows(cfg, section, recover: bool, source: str) -> list[dict]:
    """train and forward of `section`'s model (and recovery when `recover`), one thread, in batches
    of a worker's share of the section's batch (at most 16)."""
    torch.set_num_threads(1)
    size = layout.clip_size(cfg)
    g = torch.Generator().manual_seed(0)
    batch = min(16, math.ceil(section.batch_size / section.num_workers))
    x = torch.randn(batch, 3, *size, generator=g).clamp(-2, 2)
    y = torch.arange(batch) % CLASSES
    model = build_model(section.model, CLASSES, size, section.width, section.depth)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    settings = teacher_settings(cfg)
    key = {"kind": "compute", "device": "cpu", "model": section.model, "width": section.width}
    key.update(depth=section.depth, clip=list(size), source=source)

    def forward():
        with torch.no_grad():
            model.eval()(x)

    train = rate(lambda: training.teacher_step(model.train(), optimizer, x, y, settings, g), batch)
    rows = [{**key, "work": "train", "rate": train}, {**key, "work": "forward", "rate": rate(forward, batch)}]
    if recover:
        model.eval().requires_grad_(False)
        stats = accumulate_statistics(model, [(x, y)], CLASSES)
        s = recovery_settings(cfg)
        videos, steps = min(batch, cfg.distill.chunk_size, 8), 6
        seconds = []
        for iterations in (2, 2 + steps):  # the difference: set-up cancels out
            started = time.perf_counter()
            recovery.recover(
                model, x[:videos], y[:videos], torch.arange(videos), replace(s, iterations=iterations), stats
            )
            seconds.append(time.perf_counter() - started)
        rows.append({**key, "work": "recovery", "rate": videos * steps / (seconds[1] - seconds[0])})
    return rows


def prepared(cfg, videos: list[Path], source: str) -> tuple[list[bytes], list[dict]]:
    """The videos as prepare stores them (transcoded to data.transcode_short_side when set), and
    the prepare row (videos/s per core of probe + transcode) when they are transcoded."""
    from tsgd_ray.data.video import probe, transcode

    data = [p.read_bytes() for p in videos]
    side = cfg.data.transcode_short_side
    if not side:
        return data, []
    started = time.perf_counter()
    out = []
    for blob in data:
        probe(blob)
        out.append(transcode(blob, side))
    per_s = len(data) / (time.perf_counter() - started)
    return out, [{"kind": "prepare", "short_side": side, "rate": per_s, "source": source}]


def decode_row(cfg, data: list[bytes], source: str) -> dict:
    """Clips/s of one core decoding one clip from each of the encoded videos `data`, over and over
    for at least 5 s (one thread: decode threads per clip are data.decode's business)."""
    from tsgd_ray.data.video import decode_clip

    d = cfg.data

    def every():
        for blob in data:
            decode_clip(blob, d.num_frames, d.height, d.width, d.frame_interval)

    per_s = rate(every, len(data), seconds=5.0)
    return {"kind": "feed", "work": "decode", "clip": list(layout.clip_size(cfg)), "rate": per_s, "source": source}


def read_row(cfg, folder: Path, source: str) -> dict:
    """Clips/s of one core reading clip-cache files back as shuffled batches of 32."""
    import numpy as np

    from tsgd_ray.data import clip_cache
    from tsgd_ray.data.clip_table import clip_table_bytes

    torch.set_num_threads(1)
    shape = [cfg.data.num_frames, cfg.data.height, cfg.data.width, 3]
    per_file, count = 256, 8
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):  # noise compresses like nothing: an upper bound on the bytes read
        clips = rng.integers(0, 256, (per_file, *shape), dtype=np.uint8)
        ids = [f"v{i}-{j}" for j in range(per_file)]
        body = clip_table_bytes(
            clips, np.arange(per_file) % CLASSES, None, ids, views=np.zeros(per_file), by_class=False, compression="lz4"
        )
        (folder / f"part-{i}.parquet").write_bytes(body)
        files.append({"path": f"part-{i}.parquet", "rows": per_file})
    marker = {"views": [{"files": files, "rows": per_file * count}], "shape": shape, "folder": str(folder)}

    def epoch():
        for _ in clip_cache.batches(marker, 0, 32, shuffle_seed=0):
            pass

    return {
        "kind": "feed",
        "work": "read",
        "clip": list(layout.clip_size(cfg)),
        "rate": rate(epoch, per_file * count),
        "source": source,
    }


#: the plan's stages, and the pipeline stages each covers
STAGES = {
    "teacher": ("teacher",),
    "stats": ("stats", "init"),
    "distill": ("distill", "merge"),
    "evaluate": ("evaluate",),
}


def start_rows(cfg, rows: list[dict], source: str) -> list[dict]:
    """Each stage's fixed cost on this machine: the real stages run once on `cfg` (a tiny run, on
    the Ray this process has initialised, else a local one started here), less the work the plan
    gives them with `rows` (Ray Train and actor start-up, checkpoints, MLflow, leases)."""
    import ray

    from tsgd_ray.config import Method
    from tsgd_ray.methods import method_config
    from tsgd_ray.plan import make_plan
    from tsgd_ray.runtime.cluster import init_ray
    from tsgd_ray.stages.distill import run_distill
    from tsgd_ray.stages.evaluate import run_evaluate
    from tsgd_ray.stages.init import run_init
    from tsgd_ray.stages.merge import run_merge
    from tsgd_ray.stages.prepare import decode_once, run_prepare
    from tsgd_ray.stages.stats import run_stats
    from tsgd_ray.stages.teacher import run_teacher

    cfg = method_config(cfg, Method.tsgd)
    owned = not ray.is_initialized()  # else the caller's Ray (benchmarks/scale.py)
    if owned:
        init_ray(cfg)
    seconds = {}
    try:
        run_prepare(cfg)
        decode_once(cfg)  # as `run` does: the plan books the clip cache to prepare
        work = {"teacher": run_teacher, "stats": run_stats, "init": run_init, "distill": run_distill}
        work.update(merge=run_merge, evaluate=lambda c: run_evaluate(c, Method.tsgd))
        for stage, fn in work.items():
            started = time.perf_counter()
            fn(cfg)
            seconds[stage] = time.perf_counter() - started
    finally:
        if owned:
            ray.shutdown()
    planned = {st.name.split("/")[0]: st.wall_s for st in make_plan(cfg, "cpu", rows)["stages"]}
    return [
        {"kind": "start", "work": name, "seconds": max(0.0, sum(seconds[s] for s in parts) - planned[name])}
        | {"source": source}
        for name, parts in STAGES.items()
    ]


def tiny_run(cfg, folder: Path):
    """`cfg` shrunk to a run of a few seconds per stage under `folder` (built-in data unless it
    names its own), on this machine's CPUs."""
    return load_config(
        None,
        [
            f"storage.output_root={folder / 'out'}",
            f"ray.temp_dir={folder / 'ray'}",
            "ray.num_cpus=2",
            "device=cpu",
            *(f"data.{k}={cfg.data[k]}" for k in ("num_frames", "height", "width")),
            *(f"{s}.{k}={cfg[s][k]}" for s in ("teacher", "evaluate") for k in ("model", "width", "depth")),
            *TINY_RUN,
        ],
    )


def builtin_videos(cfg, folder: Path, count: int = 40) -> list[Path]:
    """`count` encoded videos of the built-in dataset (written under `folder` unless cached)."""
    from omegaconf import OmegaConf

    from tsgd_ray.data.builtin import ensure_builtin_dataset

    cfg = OmegaConf.merge(cfg, {"storage": {"cache_root": str(folder)}})
    root = Path(ensure_builtin_dataset(cfg))
    return sorted(root.rglob("*.mp4"))[:count]


def measure(cfg, videos: list[Path] | None, source: str, stages=None) -> list[dict]:
    """Every CPU row for `cfg`'s models and clip size; the stages' fixed costs from a run of
    `stages` (a config; default: a tiny built-in run of `cfg`'s models), or none when False."""
    with tempfile.TemporaryDirectory() as tmp:
        temp = Path(tmp)
        rows = model_rows(cfg, cfg.teacher, True, source) + model_rows(cfg, cfg.evaluate, False, source)
        data, prepare = prepared(cfg, videos or builtin_videos(cfg, temp / "videos"), source)
        rows += prepare
        rows.append(decode_row(cfg, data, source))
        (temp / "cache").mkdir()
        rows.append(read_row(cfg, temp / "cache", source))
        if stages is not False:
            rows += start_rows(stages or tiny_run(cfg, temp), rows, source)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--videos", type=Path, help="a folder of encoded videos to decode (default: built-in ones)")
    parser.add_argument("--write", action="store_true", help="merge the rows into tsgd_ray/calibration.json")
    parser.add_argument("--no-stages", action="store_true", help="leave out the stages' fixed costs (a tiny run)")
    parser.add_argument("--merge", type=Path, help="merge the calibration rows of a benchmarks/gpu.py output, and stop")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.merge:
        rows = json.loads(args.merge.read_text())["calibration_rows"]
        calibration.save(rows)
        print(f"{len(rows)} rows merged into {calibration.TABLE}")
        return 0
    cfg = load_config(args.config, list(args.overrides))
    videos = sorted(p for p in args.videos.rglob("*") if p.is_file()) if args.videos else None
    source = f"benchmarks/calibrate.py --config {args.config} on a {os.cpu_count()}-core {platform.machine()} CPU, {time.strftime('%Y-%m-%d')}"
    rows = measure(cfg, videos, source, False if args.no_stages else None)
    for row in rows:
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "source"}))
    if args.write:
        calibration.save(rows)
        print(f"written to {calibration.TABLE}")
    return 0 if all(math.isfinite(r.get("rate", r.get("seconds", 0))) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
