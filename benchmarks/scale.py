"""Cost curves of every stage against the size of the data (N clips) and of the synthetic set
(K classes x IPC), on generated Kinetics-layout data (tests/support/kinetics_layout.py: tiny real H.264
clips, hard-linked so that 16k clips cost 64 encodes), measured in one run.

For each configuration, every stage runs in this driver with a local Ray (tiny teacher: 1 epoch;
recovery: 2 iterations; one student seed of 1 epoch), and per stage this records:

- wall seconds;
- driver peak RSS (this process, sampled every 0.1 s);
- the largest RSS of any Ray worker process (actors and tasks, sampled the same way);
- the largest file the stage wrote;
- bytes through the driver: what `ray.get` returned to this process (pickled size) plus what it
  read from storage.

Then it prints the log-log slope of each against N (K fixed) and against K x IPC (N fixed; the
distill partitions grow with K x IPC through distill.max_videos_per_partition, so an actor's share
stays the same), and one line per target.

Against the number of statistics actors (`--actors`, at --actors-k classes and --actors-n clips, the
teacher mini_c3d at width 128): each count runs the stats stage in a fresh driver process attached to
the same Ray, which reports how far its RSS rose during the stage above where it started (every
actor hands over classes x BN channels x 16 B of sums and MAX_IPC candidates per class). At the
default size this peak is set by something else the stage does (it grows with the teacher's width)
and did not separate the pile-up of states from the folded hand-over (docs/sizing.md).

    python benchmarks/scale.py                      # N = 1k, 4k, 16k at K=10; K = 50, 200, 800 at N=8k, IPC 10
                                                    # (about 30 minutes on 2 idle cores)
    python benchmarks/scale.py --n 500 2000 --k 20 80 --ipc 5 --k-n 1000 --max-videos 100   # a quick look
    python benchmarks/scale.py --sweeps actors      # stats actors 1, 2, 4, 8 (about 7 minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import target  # noqa: E402
from support.kinetics_layout import make_kinetics_layout  # noqa: E402

STAGES = ("prepare", "teacher", "stats", "init", "distill", "merge", "evaluate")


class Sampler:
    """Peak RSS of this process and of Ray's worker processes, per stage (a background thread)."""

    def __init__(self):
        self.stage = None
        self.driver: dict[str, int] = {}
        self.worker: dict[str, int] = {}
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """One sample of the current stage (also taken as a stage ends: a stage shorter than the
        thread's 0.1 s period is then still measured)."""
        stage = self.stage
        if stage is None:
            return
        self.driver[stage] = max(self.driver.get(stage, 0), self._me.memory_info().rss)
        for p in psutil.process_iter(["name", "memory_info"]):
            name = p.info["name"] or ""
            if name.startswith("ray::") and p.info["memory_info"] is not None:
                self.worker[stage] = max(self.worker.get(stage, 0), p.info["memory_info"].rss)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class DriverBytes:
    """Counts what this process pulls through ray.get (pickled size) and storage reads."""

    def __init__(self):
        import ray

        from tsgd_ray import storage

        self.total = 0
        original_get, original_read = ray.get, storage.read_bytes

        def get(*args, **kwargs):
            out = original_get(*args, **kwargs)
            try:
                self.total += len(pickle.dumps(out, protocol=5))
            except Exception:  # noqa: BLE001 - unpicklable results are Ray's own handles
                pass
            return out

        def read_bytes(uri):
            data = original_read(uri)
            self.total += len(data)
            return data

        ray.get, storage.read_bytes = get, read_bytes


def largest_file(folder: Path, since: float) -> int:
    sizes = [p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.stat().st_mtime >= since]
    return max(sizes, default=0)


def scale_config(data_root: Path, out: Path, ipc: int, max_videos: int, *overrides: str):
    """The benchmark's config: tiny stages over the generated layout (overrides win)."""
    from tsgd_ray.config import Method, load_config
    from tsgd_ray.methods import method_config

    cfg = load_config(
        "kinetics400",
        [
            f"data.root={data_root}/videos",
            f"data.annotations={data_root}/annotations",
            "data.on_catalog_error=skip",
            "data.num_frames=8",
            "data.height=32",
            "data.width=32",
            "data.transcode_short_side=0",
            "distill.pack=false",  # a generated class holds as few as N/K clips: init reads ipc, not 4 x ipc
            "data.shard_target_mb=2",
            "data.decode_actors=1",
            "data.decode_cpus_per_actor=0.5",
            "data.decode_batch_size=64",
            "teacher.width=8",
            "teacher.depth=2",
            "teacher.epochs=1",
            "teacher.batch_size=64",
            "teacher.num_workers=1",
            "teacher.cpus_per_worker=1",
            "teacher.gpus_per_worker=0",
            "stats.actors=1",
            "stats.cpus_per_actor=1",
            "stats.gpus_per_actor=0",
            "stats.batch_size=64",
            f"distill.ipc={ipc}",
            "distill.iterations=2",
            "distill.actors=1",
            "distill.gpus_per_actor=0",
            "distill.cpus_per_actor=1",
            f"distill.max_videos_per_partition={max_videos}",
            "distill.partitions=1",
            "evaluate.epochs=1",
            "evaluate.seeds=[0]",
            "evaluate.baselines=[]",
            "evaluate.cpus_per_worker=1",
            "evaluate.gpus_per_worker=0",
            "evaluate.batch_size=64",
            f"storage.output_root={out}",
            *overrides,
        ],
    )
    return method_config(cfg, Method.tsgd)


#: the plan's stages against the stages this benchmark times (stats includes init; distill, merge)
PLANNED = {"teacher": ("teacher",), "stats": ("stats", "init"), "distill/tsgd": ("distill", "merge")}
PLANNED["evaluate/tsgd"] = ("evaluate",)


def calibrate_for(data_root: Path, workdir: Path) -> list[dict]:
    """Calibration rows for the benchmark's config (benchmarks/calibrate.py), measured on the
    generated layout's encoded videos and this run's Ray; the stages' fixed costs from a run on a
    tiny layout of their own (10 classes x 10 clips), before any measured configuration."""
    from calibrate import measure

    tiny = workdir / "calibrate-data"
    make_kinetics_layout(tiny, 10, 10, 2, distinct=16)
    stages = scale_config(tiny, workdir / "calibrate-out", 1, 10)
    cfg = scale_config(data_root, workdir / "calibrate-out", 1, 1)
    return measure(cfg, sorted((data_root / "_encoded").glob("*.mp4")), "benchmarks/scale.py", stages)


def planned_over_measured(cfg, row: dict, table: list[dict]) -> dict[str, float]:
    """Per planned stage: the plan's wall time (cpu device, calibration `table`) / the measured one."""
    from tsgd_ray.plan import make_plan

    stages = {st.name: st for st in make_plan(cfg, "cpu", table)["stages"]}
    for name, measured in PLANNED.items():
        print(
            f"  {name}: planned {stages[name].wall_s:.1f} s ({stages[name].timing}), measured "
            f"{sum(row[s]['seconds'] for s in measured):.1f} s"
        )
    return {name: stages[name].wall_s / sum(row[s]["seconds"] for s in measured) for name, measured in PLANNED.items()}


def run_config(
    data_root: Path, out: Path, ipc: int, max_videos: int, sampler: Sampler, counter: DriverBytes, table: list[dict]
) -> dict:
    from tsgd_ray.config import Method
    from tsgd_ray.stages.distill import run_distill
    from tsgd_ray.stages.evaluate import run_evaluate
    from tsgd_ray.stages.init import run_init
    from tsgd_ray.stages.merge import run_merge
    from tsgd_ray.stages.prepare import decode_once, run_prepare
    from tsgd_ray.stages.stats import run_stats
    from tsgd_ray.stages.teacher import run_teacher

    cfg = scale_config(data_root, out, ipc, max_videos)
    work = {
        "prepare": lambda: (run_prepare(cfg), decode_once(cfg)),  # as `run`: shards, then the clip cache
        "teacher": lambda: run_teacher(cfg),
        "stats": lambda: run_stats(cfg),
        "init": lambda: run_init(cfg),
        "distill": lambda: run_distill(cfg),
        "merge": lambda: run_merge(cfg),
        "evaluate": lambda: run_evaluate(cfg, Method.tsgd),
    }
    row = {}
    for stage in STAGES:
        before, started = counter.total, time.time()
        sampler.stage = stage
        work[stage]()
        sampler.sample()
        sampler.stage = None
        time.sleep(0.15)
        row[stage] = {
            "seconds": time.time() - started,
            "driver_rss": sampler.driver.get(stage, 0),
            "worker_rss": sampler.worker.get(stage, 0),
            "largest_file": largest_file(out, started),
            "driver_bytes": counter.total - before,
        }
    row["plan"] = planned_over_measured(cfg, row, table)
    return row


# mini_c3d at width 128: 1,408 BN channels, 15.8 MB of sums per actor at 700 classes (the default
# teacher has 352; r2plus1d_18 about 12,500, which at 64 actors was 9 GB on the driver)
def actors_overrides(width: int) -> tuple[str, ...]:
    """The actors sweep's teacher: mini_c3d of `width` (BN channels, so sums per class, grow with
    it), untrained (the hand-over's size does not depend on its weights)."""
    return (f"teacher.width={width}", "teacher.depth=4", "teacher.epochs=0", "stats.batch_size=32")


def anon_bytes() -> int:
    """This process's private resident memory (RssAnon of /proc/self/status), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def stats_child(spec: dict) -> None:
    """In a fresh driver attached to the benchmark's Ray: the stats stage with spec["actors"]
    actors; prints {"seconds", "rss_before", "rss_peak"} as JSON."""
    import psutil
    import ray

    from tsgd_ray.stages.stats import run_stats

    ray.init(address=spec["address"], log_to_driver=False)
    actors = spec["actors"]
    cfg = scale_config(
        Path(spec["data"]),
        Path(spec["out"]),
        1,
        500,
        *actors_overrides(spec["width"]),
        f"stats.actors={actors}",
        f"stats.cpus_per_actor={min(1.0, 2 / actors)}",
    )
    private = [anon_bytes()]  # the driver's own memory: RSS also counts object-store pages it read
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            private.append(anon_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    before, started = psutil.Process().memory_info().rss, time.time()
    sampler.start()
    run_stats(cfg)
    stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(
        json.dumps(
            {
                "seconds": time.time() - started,
                "rss_before": before,
                "rss_peak": peak,
                "private_growth": max(private) - private[0],
                "private_peak": max(private),
            }
        )
    )


def actors_sweep(workdir: Path, k: int, n: int, actor_counts: list[int], width: int) -> list[dict]:
    """Prepare and teacher once; then the stats stage once per actor count, each in a fresh driver."""
    import ray

    from tsgd_ray import layout
    from tsgd_ray.stages.prepare import run_prepare
    from tsgd_ray.stages.teacher import run_teacher

    data, out = workdir / f"data-k{k}-n{n}", workdir / f"out-actors-k{k}-n{n}"
    make_kinetics_layout(data, k, n // k, 2, missing=3, distinct=64)
    cfg = scale_config(data, out, 1, 500, *actors_overrides(width))
    run_prepare(cfg)
    run_teacher(cfg)
    rows = []
    for actors in actor_counts:
        shutil.rmtree(layout.of(cfg).stats, ignore_errors=True)  # a local folder: run the stage again
        spec = {
            "address": ray.get_runtime_context().gcs_address,
            "data": str(data),
            "out": str(out),
            "actors": actors,
            "width": width,
        }
        child = subprocess.run(
            [sys.executable, __file__, "--stats-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if child.returncode:
            raise RuntimeError(f"stats with {actors} actors failed:\n{child.stderr[-3000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append({**row, "actors": actors, "growth": row["rss_peak"] - row["rss_before"]})
        print(
            f"stats actors={actors}: {row['seconds']:.0f} s, driver RSS +{rows[-1]['growth'] / 2**20:.1f} MB, "
            f"private +{row['private_growth'] / 2**20:.1f} MB",
            flush=True,
        )
    return rows


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def table(title: str, xs: list[int], rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        f"{'stage':9} {'x':>6} {'seconds':>8} {'driver MB':>10} {'worker MB':>10} {'largest file MB':>16} {'driver MB in':>13}"
    )
    for stage in STAGES:
        for x, row in zip(xs, rows):
            r = row[stage]
            print(
                f"{stage:9} {x:6d} {r['seconds']:8.1f} {r['driver_rss'] / 2**20:10.0f} {r['worker_rss'] / 2**20:10.0f} "
                f"{r['largest_file'] / 2**20:16.2f} {r['driver_bytes'] / 2**20:13.2f}"
            )


def slopes(title: str, xs: list[int], rows: list[dict]) -> dict:
    print(f"\nlog-log slopes against {title}")
    print(f"{'stage':9} {'seconds':>8} {'driver RSS':>11} {'worker RSS':>11} {'largest file':>13} {'driver bytes':>13}")
    out = {}
    for stage in STAGES:
        out[stage] = {
            k: slope(xs, [r[stage][k] for r in rows])
            for k in ("seconds", "driver_rss", "worker_rss", "largest_file", "driver_bytes")
        }
        s = out[stage]
        print(
            f"{stage:9} {s['seconds']:8.2f} {s['driver_rss']:11.2f} {s['worker_rss']:11.2f} {s['largest_file']:13.2f} "
            f"{s['driver_bytes']:13.2f}"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--n", type=int, nargs="+", default=[1000, 4000, 16000], help="training clips, at --n-k classes"
    )
    # Each class keeps MAX_IPC init candidates, so below MAX_IPC clips per class the candidates (and
    # the bytes stats and init hand the driver) grow with N until that bound; real datasets have
    # 70 (HMDB51) to 250+ (Kinetics) clips per class, so the N sweep starts at 100 per class.
    parser.add_argument("--n-k", type=int, default=10, help="classes of the N sweep")
    parser.add_argument("--k", type=int, nargs="+", default=[50, 200, 800], help="classes of the K x IPC sweep")
    parser.add_argument("--k-n", type=int, default=8000, help="training clips of the K x IPC sweep")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--max-videos", type=int, default=500, help="distill.max_videos_per_partition")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8], help="stats actors of the actors sweep")
    parser.add_argument("--actors-k", type=int, default=700, help="classes of the actors sweep")
    parser.add_argument("--actors-n", type=int, default=700, help="training clips of the actors sweep")
    parser.add_argument("--actors-width", type=int, default=128, help="teacher width of the actors sweep")
    parser.add_argument("--sweeps", nargs="+", default=["n", "k", "actors"], choices=["n", "k", "actors"])
    parser.add_argument("--workdir", default="", help="default: a temporary folder, removed at the end")
    parser.add_argument("--stats-child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stats_child:
        stats_child(json.loads(args.stats_child))
        return 0

    import ray

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tsgd-scale-"))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=1024 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(REPO / ".cache" / "ray-scale"),
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    sampler, counter = Sampler(), DriverBytes()
    try:
        calibrated: list[dict] = []

        def sweep(points: list[tuple[int, int]], ipc: int) -> list[dict]:
            rows = []
            for k, n in points:
                data = workdir / f"data-k{k}-n{n}"
                make_kinetics_layout(data, k, n // k, 2, missing=3, distinct=64)
                if not calibrated:  # once, on this data's videos, before any stage runs
                    calibrated.extend(calibrate_for(data, workdir))
                out = workdir / f"out-k{k}-n{n}-ipc{ipc}"
                shutil.rmtree(out, ignore_errors=True)
                started = time.time()
                rows.append(run_config(data, out, ipc, args.max_videos, sampler, counter, calibrated))
                print(f"K={k} N={n} IPC={ipc}: {time.time() - started:.0f} s", flush=True)
            return rows

        n_rows = sweep([(args.n_k, n) for n in args.n], 1) if "n" in args.sweeps else []
        k_rows = sweep([(k, args.k_n) for k in args.k], args.ipc) if "k" in args.sweeps else []
        a_rows = (
            actors_sweep(workdir, args.actors_k, args.actors_n, args.actors, args.actors_width)
            if "actors" in args.sweeps
            else []
        )
    finally:
        sampler.close()
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    lines = []
    ratios = [r for row in n_rows + k_rows for r in row["plan"].values()]
    if ratios:
        print("\nthe plan's wall time / the measured one, per stage (cpu device, calibrated before the runs)")
        for title, xs, rows in (("N", args.n, n_rows), ("K x IPC", [k * args.ipc for k in args.k], k_rows)):
            for x, row in zip(xs, rows):
                print(f"  {title}={x}: " + ", ".join(f"{name} {r:.2f}" for name, r in row["plan"].items()))
        lines += [
            ("plan_time_over_measured_min", min(ratios), ">=", 0.5),
            ("plan_time_over_measured_max", max(ratios), "<=", 2.0),
        ]
    if n_rows:
        table(f"against N (K={args.n_k}, IPC 1)", args.n, n_rows)
        by_n = slopes("N", args.n, n_rows)
        lines += [
            ("driver_peak_rss_slope_vs_N", max(s["driver_rss"] for s in by_n.values()), "<=", 0.1),
            ("stats_time_slope_vs_N", by_n["stats"]["seconds"], "<=", 1.1),
            ("stats_driver_bytes_slope_vs_N", by_n["stats"]["driver_bytes"], "<=", 0.1),
        ]
    if k_rows:
        kipc = [k * args.ipc for k in args.k]
        table(
            f"against K x IPC (N={args.k_n}, IPC {args.ipc}, partitions of <= {args.max_videos} videos)", kipc, k_rows
        )
        by_k = slopes("K x IPC", kipc, k_rows)
        lines += [
            ("driver_peak_rss_slope_vs_KxIPC", max(s["driver_rss"] for s in by_k.values()), "<=", 0.1),
            ("distill_actor_rss_slope_vs_KxIPC_at_fixed_share", by_k["distill"]["worker_rss"], "<=", 0.1),
            ("stats_time_slope_vs_K", by_k["stats"]["seconds"], "<=", 0.1),
            ("merge_driver_rss_slope_vs_KxIPC", by_k["merge"]["driver_rss"], "<=", 0.1),
        ]
    if a_rows:
        print(f"\nstats against its actors (K={args.actors_k}, N={args.actors_n})")
        print(
            f"{'actors':>6} {'seconds':>8} {'driver MB at start':>18} {'driver MB peak':>15} {'growth MB':>10} "
            f"{'private growth MB':>18}"
        )
        for r in a_rows:
            print(
                f"{r['actors']:6d} {r['seconds']:8.1f} {r['rss_before'] / 2**20:18.0f} {r['rss_peak'] / 2**20:15.0f} "
                f"{r['growth'] / 2**20:10.1f} {r['private_growth'] / 2**20:18.1f}"
            )
        xs = [r["actors"] for r in a_rows]
        lines += [
            ("stats_driver_rss_growth_slope_vs_actors", slope(xs, [r["growth"] for r in a_rows]), "<=", 0.1),
            (
                "stats_driver_private_growth_slope_vs_actors",
                slope(xs, [r["private_growth"] for r in a_rows]),
                "<=",
                0.1,
            ),
            ("stats_driver_peak_rss_slope_vs_actors", slope(xs, [r["rss_peak"] for r in a_rows]), "<=", 0.1),
            ("stats_driver_private_peak_slope_vs_actors", slope(xs, [r["private_peak"] for r in a_rows]), "<=", 0.1),
        ]
    print()
    for line in lines:
        target(*line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
