#!/usr/bin/env python3
"""Video decodes of a whole run, counted in every process where videos are decoded.

    python benchmarks/decodes.py [--workdir DIR]

Two whole runs (`run_stages`: prepare, teacher, stats, init, distill, merge, evaluate) of tsgd
with the baselines random_real and full, on the built-in dataset at 8x32x32, each on a fresh
local Ray whose every process counts the videos its `ClipDecoder`s decode: a Ray
`worker_process_setup_hook` wraps `ClipDecoder.__call__` in each worker to log (video id, window)
per video to a file of its own, so the count covers every stage, task and actor, whatever it
reports about itself. The windows: `epoch-<e>` for the random temporal window of epoch e (the
cache's view e), `epoch-0` for a deterministic sampling, `view-<v>` for an init candidate view.

    cache   the default (data.clip_cache=true), with random sampling and two cached windows per
            video (data.views_per_video=2), teacher 2 epochs
    live    data.clip_cache=false (centre sampling): every pass decodes, for contrast; it shows
            what the counter sees when a run decodes again

Targets (the cache run): every (clip, window) the run trains or tests on decoded exactly once:
the most decodes of any, <= 1, and none never decoded; the stage markers' own counts
(`decodes`) agree with the counter.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import TINY_RUN, target  # noqa: E402

LOG_ENV = "TSGD_BENCH_DECODE_LOG"
RUN = (
    *TINY_RUN,  # then what this benchmark needs beyond it (later overrides win)
    "device=cpu",
    "data.num_frames=8",
    "data.height=32",
    "data.width=32",
    "teacher.width=8",
    "teacher.depth=2",
    "teacher.epochs=2",
    "teacher.batch_size=8",
    "distill.ipc=2",
    "distill.iterations=3",
    "distill.cpus_per_actor=0.5",
    "evaluate.full.epochs=1",
    "evaluate.baselines=[random_real,full]",
)
SETUPS = {
    "cache": ("data.sampling=random", "data.views_per_video=2", "data.frame_interval=1"),
    "live": ("data.clip_cache=false",),
}


def count_decodes() -> None:
    """Ray's worker_process_setup_hook (and the driver's): this process's ClipDecoders append
    "<video id>\\t<window>" per video they decode to <$TSGD_BENCH_DECODE_LOG>/<pid>.log."""
    from tsgd_ray.config import TemporalSampling
    from tsgd_ray.data import pipeline

    real = pipeline.ClipDecoder.__call__
    if getattr(real, "counted", False):
        return
    path = os.path.join(os.environ[LOG_ENV], f"{os.getpid()}.log")

    def counted(self, batch):
        views = batch.get("view")
        epoch = self.epoch if self.sampling == TemporalSampling.random else 0
        with open(path, "a") as f:
            for i, vid in enumerate(batch["video_id"]):
                view = 0 if views is None else int(views[i])
                f.write(f"{vid}\t{f'view-{view}' if view else f'epoch-{epoch}'}\n")
        return real(self, batch)

    counted.counted = True
    pipeline.ClipDecoder.__call__ = counted


def run(name: str, workdir: Path) -> dict:
    """One whole run of setup `name`; {"decodes": Counter of (video id, window), "wanted": the
    (video id, window) pairs the run trains or tests on, "markers": the stages' own counts}."""
    import ray

    from tsgd_ray import layout, storage
    from tsgd_ray.config import Method, load_config
    from tsgd_ray.data import clip_cache
    from tsgd_ray.data.catalogs import build_catalog
    from tsgd_ray.methods import method_config
    from tsgd_ray.runtime.cluster import TRAIN_POLL
    from tsgd_ray.stages.pipeline import STAGES, run_stages

    logs = workdir / f"decodes-{name}"
    logs.mkdir(parents=True)
    os.environ[LOG_ENV] = str(logs)
    cfg = load_config(None, [f"storage.output_root={workdir / name}", *RUN, *SETUPS[name]])
    env = {LOG_ENV: str(logs), TRAIN_POLL[0]: TRAIN_POLL[1]}
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env, "worker_process_setup_hook": count_decodes},
    )
    count_decodes()  # the driver too
    try:
        run_stages(cfg, STAGES)
    finally:
        ray.shutdown()
    decodes = collections.Counter()
    for log in logs.glob("*.log"):
        decodes.update(tuple(line.split("\t")) for line in log.read_text().splitlines())
    views = clip_cache.views(cfg)
    records = build_catalog(cfg).records
    wanted = {(r.video_id, f"epoch-{e}") for r in records if r.split == "train" for e in range(views)}
    wanted |= {(r.video_id, "epoch-0") for r in records if r.split == "test"}
    tsgd = method_config(cfg, Method.tsgd)
    markers = {"stats": storage.read_json(storage.join(layout.of(tsgd).stats, layout.STATS_MARKER))["decodes"]}
    markers["init"] = storage.read_json(storage.join(layout.of(tsgd).init, layout.INIT_MARKER))["decodes"]
    if cfg.data.clip_cache:
        for split in ("train", "test"):
            marker = storage.read_json(storage.join(clip_cache.cache_dir(cfg, split), clip_cache.MARKER))
            markers[f"prepare ({split} cache)"] = clip_cache.decodes(marker)
    return {"decodes": decodes, "wanted": wanted, "markers": markers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="", help="where the runs write (default: a temporary folder, removed)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tsgd-decodes-"))
    try:
        results = {name: run(name, workdir) for name in SETUPS}
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("| run | (clip, window) pairs used | decoded | decodes | most of one | never decoded | stages' own counts |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        counts, wanted = r["decodes"], r["wanted"]
        print(
            f"| {name} | {len(wanted)} | {len(counts)} | {sum(counts.values())} | {max(counts.values(), default=0)} "
            f"| {len(wanted - set(counts))} | {', '.join(f'{k} {v}' for k, v in r['markers'].items())} |"
        )
    cache = results["cache"]
    counts = cache["decodes"]
    target("decodes_per_clip_window_max", max(counts.values(), default=0), "<=", 1, 0)
    target("clip_windows_never_decoded", len(cache["wanted"] - set(counts)), "<=", 0, 0)
    target("decodes_counted_minus_stage_counts", abs(sum(counts.values()) - sum(cache["markers"].values())), "<=", 0, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
