"""Scaling benchmark of the distill stage, measured side by side in one run.

(a) Ray overhead: one actor recovering a partition (`PartitionWorker.recover`, teacher already
    loaded) vs the same `recover_partition` call in this plain process; both single-threaded.
    Target: actor / plain <= 1.05.
(b) Two actors vs one, one torch thread each, the whole stage (`run_distill`, actor start-up
    included) on the same partitions. Target on a 2-core machine: speedup >= 0.9 x 2 = 1.8. It also
    prints how many cores the actors kept busy, and how many the driver and Ray's own processes
    (GCS, raylet, idle workers) took, over each run.
(d) Recovery's own overhead: one `recover` step (augmentation, BN taps and term, TSGFO, Adam,
    clamping) vs the bare teacher forward + backward to the pixels of the same chunk, one thread.
    Target: <= 1.3. Also with tsgf.source=current (saliency recomputed every tsgf.every steps) to
    show what that map costs.
(e) The machine's own ceiling for (b): (d)'s bare forward + backward in one plain process alone,
    then in two started together (no Ray): 2 x alone / together is the speedup two single-threaded
    workers can get from these cores.
(c) On a CUDA machine: synthetic video-iterations per second of one actor on one GPU, at
    --gpu-size (default MiniC3D at 16x112x112), with --gpu-videos videos in one partition.

    python benchmarks/scaling.py                 # (a), (b), (d), (e); (c) too when CUDA is available
    python benchmarks/scaling.py --iterations 50 --repeats 1

The teacher is the default config's architecture with its seeded initial weights: recovery costs
the same whatever the weights, so no training is needed to time it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from report import CpuTally, target  # noqa: E402

from tsgd_ray import layout  # noqa: E402
from tsgd_ray.artifacts import load_teacher, new_teacher, read_statistics  # noqa: E402
from tsgd_ray.config import SaliencySource, load_config  # noqa: E402
from tsgd_ray.core.models import checkpoint_bytes  # noqa: E402
from tsgd_ray.data.shards import read_manifest, shards_root  # noqa: E402
from tsgd_ray.runtime.cluster import init_ray  # noqa: E402
from tsgd_ray.settings import recovery_settings  # noqa: E402
from tsgd_ray.stages.distill import PartitionWorker, load_plan, recover_partition, run_distill  # noqa: E402
from tsgd_ray.stages.init import run_init  # noqa: E402
from tsgd_ray.stages.prepare import run_prepare  # noqa: E402
from tsgd_ray.stages.stats import run_stats  # noqa: E402
from tsgd_ray.stages.teacher import run_teacher  # noqa: E402


def untrained_teacher_file(root: Path) -> Path:
    return root / "untrained-teacher.pt"


def teacher_config(root: Path, overrides: list[str]):
    """The default config under `root` with the seeded, untrained teacher imported."""
    teacher = untrained_teacher_file(root)
    return load_config("default", [f"storage.output_root={root}", f"teacher.checkpoint={teacher}", *overrides])


def prepared_config(root: Path, overrides: list[str]):
    """Default config with a seeded, untrained teacher imported; shards and statistics prepared."""
    teacher_file = untrained_teacher_file(root)
    base = load_config("default", [f"storage.output_root={root}", *overrides])
    run_prepare(base)
    classes = read_manifest(shards_root(base))["classes"]
    if not teacher_file.exists():
        teacher_file.write_bytes(checkpoint_bytes(new_teacher(base, len(classes)), classes))
    cfg = teacher_config(root, overrides)
    run_teacher(cfg)
    run_stats(cfg)
    run_init(cfg)
    return cfg, classes


def fresh_distill(cfg) -> None:
    path = Path(layout.of(cfg).distill)
    if path.exists():
        shutil.rmtree(path)


def ray_overhead(cfg, classes, repeats: int) -> tuple[float, float]:
    """Median seconds of one partition: (plain process, one warm actor)."""
    import ray

    torch.set_num_threads(1)
    plan = load_plan(cfg, layout.of(cfg), len(classes))
    teacher, stats = load_teacher(cfg, classes), read_statistics(cfg)
    actor = ray.remote(PartitionWorker).options(num_cpus=1).remote(cfg, classes, 1)
    plain, remote = [], []
    for _ in range(repeats):
        for measure, out in (
            (lambda: recover_partition(cfg, layout.of(cfg), teacher, stats, 0, plan[0]), plain),
            (lambda: ray.get(actor.recover.remote(cfg, 0, plan[0])), remote),
        ):
            fresh_distill(cfg)
            load_plan(cfg, layout.of(cfg), len(classes))
            started = time.perf_counter()
            measure()
            out.append(time.perf_counter() - started)
    ray.kill(actor)
    return statistics.median(plain), statistics.median(remote)


def pool_seconds(cfg_for, actors: int) -> float:
    cfg = cfg_for(actors)
    fresh_distill(cfg)
    started = time.perf_counter()
    run_distill(cfg)
    return time.perf_counter() - started


def chunk_of_init(cfg, classes):
    """(x, labels, indices): one chunk of the init clips as recovery sees it."""
    from tsgd_ray.artifacts import read_init

    settings = recovery_settings(cfg)
    init = read_init(cfg, range(len(classes)))
    x = settings.inputs.model_input(init["clips"])[: settings.chunk_size].contiguous()
    return x, init["labels"][: len(x)], init["indices"][: len(x)]


def bare_step_seconds(teacher, x0, labels, steps: int) -> float:
    """Seconds per bare teacher forward + backward to the pixels of `x0`, after 2 warm-up steps."""
    import torch.nn.functional as F

    teacher.eval().requires_grad_(False)
    x = x0.clone().requires_grad_(True)
    for warm in (True, False):
        started = time.perf_counter()
        for _ in range(2 if warm else steps):
            x.grad = None
            F.cross_entropy(teacher(x), labels).backward()
    return (time.perf_counter() - started) / steps


def step_overhead(cfg, classes, steps: int, **changes) -> tuple[float, float]:
    """(seconds per bare forward + backward, seconds per recovery step) on one chunk of the init
    clips; `changes`: RecoverySettings fields to change."""
    from tsgd_ray.core.recovery import recover

    torch.set_num_threads(1)
    teacher, stats = load_teacher(cfg, classes), read_statistics(cfg)
    x0, labels, indices = chunk_of_init(cfg, classes)
    settings = replace(recovery_settings(cfg), iterations=steps, **changes)
    bare = bare_step_seconds(teacher, x0, labels, steps)
    recover(teacher, x0, labels, indices, replace(settings, iterations=2), stats)  # warm-up
    started = time.perf_counter()
    recover(teacher, x0, labels, indices, settings, stats)
    return bare, (time.perf_counter() - started) / steps


def plain_processes(argv: list[str], steps: int) -> tuple[float, float]:
    """(e) Seconds per bare forward + backward in one plain process alone, and the mean of two
    started together: what two cores of this machine give two independent single-threaded torch
    processes, with no Ray in the way."""
    import subprocess

    command = [sys.executable, __file__, *argv, "--bare-child", str(steps)]
    alone = float(subprocess.run(command, capture_output=True, text=True, check=True, timeout=600).stdout.split()[-1])
    pair = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    together = [float(p.communicate(timeout=600)[0].split()[-1]) for p in pair]
    return alone, statistics.mean(together)


def gpu_rate(args) -> float:
    """Synthetic video-iterations/s of one actor on one GPU (recovery only, teacher loaded)."""
    f, h, w = args.gpu_size
    cfg = load_config(
        "default",
        [
            f"storage.output_root={args.root}/gpu",
            "device=cuda",
            f"data.num_frames={f}",
            f"data.height={h}",
            f"data.width={w}",
            f"distill.ipc={args.gpu_videos}",
            f"distill.iterations={args.iterations}",
            "distill.bn_target=global",
        ],
    )
    from tsgd_ray.core.recovery import recover

    teacher = new_teacher(cfg, 8).cuda().eval()
    labels = torch.arange(8).repeat_interleave(args.gpu_videos // 8 or 1)[: args.gpu_videos]
    indices = torch.arange(len(labels))
    x0 = torch.randn(len(labels), 3, f, h, w, device="cuda")
    recover(
        teacher,
        x0,
        labels,
        indices,
        recovery_settings(load_config("default", ["distill.iterations=5", "device=cuda"])),
    )  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    recover(teacher, x0, labels, indices, recovery_settings(cfg))
    torch.cuda.synchronize()
    return len(labels) * args.iterations / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(REPO / ".cache" / "scaling"))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--ipc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-size", type=int, nargs=3, default=[16, 112, 112], metavar=("F", "H", "W"))
    parser.add_argument("--gpu-videos", type=int, default=50)
    parser.add_argument("--step-count", type=int, default=30, help="(d): recovery steps timed")
    parser.add_argument("--plain-steps", type=int, default=60, help="(e): steps timed in each plain process")
    parser.add_argument("--bare-child", type=int, default=0, help=argparse.SUPPRESS)  # (e)'s process: its steps
    args = parser.parse_args(argv)
    common = [
        f"distill.iterations={args.iterations}",
        f"distill.ipc={args.ipc}",
        "distill.cpus_per_actor=0.5",
        f"ray.temp_dir={REPO / '.cache' / 'ray-scaling'}",
    ]
    if args.bare_child:  # one of (e)'s plain processes: the stages are prepared, Ray is not needed
        torch.set_num_threads(1)
        cfg = teacher_config(Path(args.root), common)
        classes = read_manifest(shards_root(cfg))["classes"]
        x0, labels, _ = chunk_of_init(cfg, classes)
        print(bare_step_seconds(load_teacher(cfg, classes), x0, labels, args.bare_child))
        return 0
    base, classes = prepared_config(Path(args.root), ["distill.actors=1", *common])
    init_ray(base)
    print(
        f"distill: {len(classes)} classes x ipc {args.ipc}, {args.iterations} iterations, "
        f"clips {base.data.num_frames}x{base.data.height}x{base.data.width}, teacher {base.teacher.model} "
        f"width {base.teacher.width}, torch threads 1 per worker"
    )

    plain, actor = ray_overhead(base, classes, args.repeats)
    print(f"(a) one partition: plain process {plain:.2f} s, one actor {actor:.2f} s -> ratio {actor / plain:.3f}")

    def cfg_for(actors: int):
        return load_config(
            "default",
            [
                f"storage.output_root={args.root}",
                f"teacher.checkpoint={base.teacher.checkpoint}",
                f"distill.actors={actors}",
                f"distill.partitions={len(classes)}",
                *common,
            ],
        )

    seconds, cores = {}, {}
    for actors in (1, 2):  # where the cores went: the actors, and the driver with Ray's own processes
        with CpuTally("ray::PartitionWorker") as tally:
            seconds[actors] = statistics.median(pool_seconds(cfg_for, actors) for _ in range(args.repeats))
        cores[actors] = (
            f"{tally.matched / tally.wall:.2f} busy in the actors, {tally.rest / tally.wall:.2f} in the rest"
        )
    one, two = seconds[1], seconds[2]
    print(
        f"(b) whole stage, {len(classes)} partitions: 1 actor {one:.1f} s, 2 actors {two:.1f} s -> speedup {one / two:.2f}"
        f"; cores of this machine's {os.cpu_count()}: 1 actor {cores[1]}; 2 actors {cores[2]}"
    )
    if torch.cuda.is_available():
        rate = gpu_rate(args)
        print(
            f"(c) {torch.cuda.get_device_name()}: {rate:.0f} video-iterations/s per GPU at "
            f"{'x'.join(map(str, args.gpu_size))}, {args.gpu_videos} videos"
        )
    else:
        print("(c) no CUDA device here: GPU iterations/s not measured")
    bare, step = step_overhead(base, classes, args.step_count)
    _, current = step_overhead(base, classes, args.step_count, source=SaliencySource.current, every=1)
    print(
        f"(d) one chunk of {min(base.distill.chunk_size, len(classes) * args.ipc)} videos, one thread: "
        f"bare forward+backward {1000 * bare:.1f} ms, "
        f"recovery step {1000 * step:.1f} ms (ratio {step / bare:.2f}); with saliency of the current clip every "
        f"step {1000 * current:.1f} ms (ratio {current / bare:.2f})"
    )
    alone, together = plain_processes(
        ["--root", args.root, "--iterations", str(args.iterations), "--ipc", str(args.ipc)], args.plain_steps
    )
    print(
        f"(e) the same bare forward+backward in plain processes, no Ray: alone {1000 * alone:.1f} ms/step, "
        f"two at once {1000 * together:.1f} ms/step each -> speedup {2 * alone / together:.2f}, the most two "
        f"single-threaded workers get from this machine; (b)'s two actors reach {one / two / (2 * alone / together):.2f} of it"
    )
    target("actor_over_plain_process", actor / plain, "<=", 1.05, 3)
    target("two_actors_speedup", one / two, ">=", 1.8)
    target("recovery_step_over_bare_forward_backward", step / bare, "<=", 1.3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
