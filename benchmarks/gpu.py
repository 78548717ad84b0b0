"""The CUDA path on one GPU, in one command (about 10 minutes on an H100):

(a) recovery on CUDA against the CPU: no NaN, the final losses, the largest uint8 difference;
(b) a recovery step broken down: bare forward+backward, with the BatchNorm taps, the whole step
    (augmentation, TSGF, losses, Adam), per clip size and chunk size, and channels_last_3d;
(c) peak GPU memory of a recovery chunk against the plan's estimate;
(d) student and teacher steps: host preparation (gather), copy to the device, the step on it;
    the copy's GB/s from pageable and pinned memory;
(e) determinism: the same recovery twice;
(f) what Ray workers given 0 and 1 GPU run on;
(g) the default run on CUDA (`tsgd-ray run default` with every stage given the GPU).

It prints `target` lines and writes the measurements as calibration rows (JSON, `--out`) for the
plan. `--dry` runs every part on the CPU at small sizes (CI runs it, so the script cannot rot);
its figures say nothing about a GPU. `--quick` (the offline bundle's run, scripts/offline_run.sh)
leaves out the copy rates and (e). Usage: python benchmarks/gpu.py [--dry] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from report import TINY_RUN, target

from tsgd_ray.config import load_config
from tsgd_ray.core import recovery, training
from tsgd_ray.core.bn_stats import BatchNormTaps, accumulate_statistics
from tsgd_ray.core.clips import to_uint8_clips
from tsgd_ray.core.device import tune_for
from tsgd_ray.core.models import build_model
from tsgd_ray.plan import AUGMENT_OVERHEAD, OPTIMISER_BYTES, model_cost
from tsgd_ray.settings import input_settings, recovery_settings, student_settings, teacher_settings

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10


def _vision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def cases(dry: bool) -> list[tuple[str, int, tuple[int, int, int], list[int]]]:
    """(model, width, clip size, chunk sizes) measured: the Kinetics config's teacher at 8x64x64,
    and a torchvision teacher at 16x112x112 (mini_c3d width 64 without the vision extra)."""
    if dry:
        return [("mini_c3d", 8, (8, 32, 32), [4])]
    big = ("r2plus1d_18", 64) if _vision() else ("mini_c3d", 64)
    return [("mini_c3d", 64, (8, 64, 64), [10, 50]), (*big, (16, 112, 112), [8, 32])]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call of fn(), after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - started) / repeats


def settings(iterations: int, *overrides: str, amp: bool = True) -> recovery.RecoverySettings:
    """The default config's recovery with `iterations` steps, bf16 autocast on CUDA when `amp`."""
    cfg = load_config("default", [f"distill.iterations={iterations}", f"amp={amp}", *overrides])
    return recovery_settings(cfg)


def problem(model: str, width: int, size, videos: int, device: torch.device, seed: int = 0):
    """A teacher (eval mode, frozen) with class statistics, and `videos` start clips over CLASSES."""
    torch.manual_seed(seed)
    teacher = build_model(model, CLASSES, size, width, 4).to(device).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(max(videos, 2 * CLASSES), 3, *size, generator=g).clamp(-2, 2)
    y = torch.arange(len(x)) % CLASSES
    stats = accumulate_statistics(teacher, [(x.to(device), y.to(device))], CLASSES)
    return teacher, stats, x[:videos], y[:videos], torch.arange(videos) // CLASSES


def uint8_gap(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest difference between two batches of normalised clips once stored as uint8."""
    inputs = input_settings(load_config("default", []))

    def stored(clips: torch.Tensor) -> torch.Tensor:
        return to_uint8_clips(clips.cpu(), inputs.mean, inputs.std).int()

    return int((stored(a) - stored(b)).abs().max())


def agreement(device: torch.device) -> dict:
    """(a) the same small recovery on the CPU and on `device`, fp32 (amp off) and bf16."""
    size, iterations = (8, 32, 32), 10
    teacher, stats, x, y, idx = problem("mini_c3d", 16, size, 20, torch.device("cpu"))
    losses: dict[str, list[float]] = {}

    def run(model, key, amp):
        curve = losses.setdefault(key, [])
        s = settings(iterations, "distill.log_every=1", amp=amp)
        return recovery.recover(model, x, y, idx, s, stats, lambda _, m: curve.append(m["loss"]))

    on_cpu = run(teacher, "cpu reference", False)
    moved = teacher.to(device)
    out = {}
    for key, amp in (("fp32", False), ("bf16", True)):  # bf16 autocast applies on CUDA only
        on_device = run(moved, key, amp)
        finite = bool(torch.isfinite(on_device).all())
        gap = uint8_gap(on_device, on_cpu)
        loss_gap = abs(losses[key][-1] - losses["cpu reference"][-1]) / abs(losses["cpu reference"][-1])
        print(
            f"(a) recovery on {device} ({key}) vs the CPU (fp32), {iterations} steps: finite {finite}, final loss "
            f"{losses[key][-1]:.4f} vs {losses['cpu reference'][-1]:.4f} (relative gap {loss_gap:.4f}), "
            f"largest uint8 difference {gap}"
        )
        out[key] = {"finite": finite, "loss_gap": loss_gap, "uint8_gap": gap}
        target(f"recovery_{key}_finite", float(finite), ">=", 1.0, 0)
    target("recovery_fp32_final_loss_relative_gap", out["fp32"]["loss_gap"], "<=", 0.01, 4)
    target("recovery_bf16_final_loss_relative_gap", out["bf16"]["loss_gap"], "<=", 0.05, 4)
    return out


def recovery_case(model: str, width: int, size, chunk: int, device: torch.device, dry: bool) -> dict:
    """(b) and (c) for one teacher, clip size and chunk: ms per step and peak memory against the plan."""
    repeats = 3 if dry else 10
    teacher, stats, x, y, idx = problem(model, width, size, chunk, device)
    x = x.to(device)
    leaf, target_y = x.clone().requires_grad_(True), y.to(device)

    def bare(taps: bool = False):
        leaf.grad = None
        amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
        with amp, BatchNormTaps(teacher) if taps else contextlib.nullcontext() as tapped:
            loss = F.cross_entropy(teacher(leaf).float(), target_y)
            if taps:
                loss = loss + sum(m.mean() for m in tapped.means)
        loss.backward()

    bare_s, taps_s = timed(bare, device, repeats), timed(lambda: bare(True), device, repeats)
    channels_last = float("nan")
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last_3d)
        leaf.data = leaf.data.contiguous(memory_format=torch.channels_last_3d)
        channels_last = timed(bare, device, repeats)
        teacher.to(memory_format=torch.contiguous_format)
    steps = 4 if dry else 20
    s = settings(steps, f"distill.chunk_size={chunk}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def recover(iterations: int) -> None:
        recovery.recover(teacher, x, y, idx, replace(s, iterations=iterations), stats)

    # a step: the difference of two recoveries (2 and 2 + steps iterations), set-up left out
    step_s = (timed(lambda: recover(2 + steps), device, 1) - timed(lambda: recover(2), device, 1)) / steps
    cost = model_cost(model, width, 4, size, CLASSES)
    plan_bytes = chunk * (OPTIMISER_BYTES * 3 * math.prod(size) + cost.activation_bytes) + 4 * cost.params
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": model,
        "width": width,
        "size": list(size),
        "chunk": chunk,
        "bare_ms": 1e3 * bare_s,
        "taps_ms": 1e3 * taps_s,
        "step_ms": 1e3 * step_s,
        "channels_last_ms": 1e3 * channels_last,
        "video_iterations_per_s": chunk / step_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
        "plan_gib": plan_bytes / 2**30,
    }


def step_breakdown(device: torch.device, dry: bool) -> list[dict]:
    """(b) and (c) over every case and chunk size."""
    rows = []
    for model, width, size, chunks in cases(dry):
        for chunk in chunks:
            row = recovery_case(model, width, size, chunk, device, dry)
            rows.append(row)
            name = f"{model}_{'x'.join(map(str, size))}_chunk{chunk}"
            ratio = row["step_ms"] / row["bare_ms"]
            print(
                f"(b) {name} on {row['device']}: bare {row['bare_ms']:.1f} ms, +BN taps {row['taps_ms']:.1f} ms, "
                f"whole step {row['step_ms']:.1f} ms (x{ratio:.2f} of bare; the plan assumes "
                f"x{AUGMENT_OVERHEAD}), channels_last_3d bare {row['channels_last_ms']:.1f} ms; "
                f"{row['video_iterations_per_s']:.0f} video-iterations/s"
            )
            if device.type == "cuda":
                print(f"(c) {name}: peak {row['peak_gib']:.2f} GiB, plan {row['plan_gib']:.2f} GiB")
                target(f"{name}_peak_over_plan", row["peak_gib"] / row["plan_gib"], "<=", 1.0)
            target(f"{name}_step_over_bare", ratio, "<=", AUGMENT_OVERHEAD)
    return rows


def train_case(role: str, model: str, width: int, size, device: torch.device, dry: bool) -> dict:
    """(d) one student (online soft labels) or teacher step on uint8 clips held on the host."""
    cfg = load_config("default", ["evaluate.labels=soft_kl"])
    for_student = student_settings(cfg)
    for_teacher = teacher_settings(cfg)
    g = torch.Generator().manual_seed(0)
    batch = 8 if dry else 32
    clips = torch.randint(0, 256, (4 * batch, *size, 3), dtype=torch.uint8, generator=g)
    labels = torch.arange(len(clips)) % CLASSES
    rows = torch.randperm(len(clips), generator=g)[:batch]
    teacher = build_model(model, CLASSES, size, width, 4).to(device)
    student = build_model(model, CLASSES, size, width, 4).to(device) if role == "student" else None
    trained = student if student is not None else teacher
    optimizer = torch.optim.AdamW(trained.parameters(), 1e-3)
    spent = {"host": 0.0, "copy": 0.0}

    def step():
        t0 = time.perf_counter()
        picked = clips[rows].pin_memory() if device.type == "cuda" else clips[rows]
        t1 = time.perf_counter()
        on_device = picked.to(device, non_blocking=True)
        sync(device)
        spent["host"] += t1 - t0
        spent["copy"] += time.perf_counter() - t1
        y = labels[rows].to(device)
        if student is not None:
            x = for_student.inputs.model_input(on_device)
            training.student_step(student, teacher.eval(), optimizer, x, y, for_student, g)
        else:
            x = for_teacher.inputs.model_input(on_device)
            training.teacher_step(teacher.train(), optimizer, x, y, for_teacher, g)
        sync(device)  # the step's kernels are charged to it, not to the next batch's copy

    repeats = 3 if dry else 10
    total = timed(step, device, repeats)
    host, copy = spent["host"] / (repeats + 2), spent["copy"] / (repeats + 2)
    return {
        "role": role,
        "model": model,
        "size": list(size),
        "batch": batch,
        "host_ms": 1e3 * host,
        "copy_ms": 1e3 * copy,
        "step_ms": 1e3 * (total - host - copy),
        "clips_per_s": batch / total,
        "host_share": (host + copy) / total,
    }


def train_steps(device: torch.device, dry: bool) -> list[dict]:
    """(d) over every case, student and teacher."""
    rows = []
    for model, width, size, _ in cases(dry):
        for role in ("student", "teacher"):
            row = train_case(role, model, width, size, device, dry)
            rows.append(row)
            print(
                f"(d) {role} {model} {'x'.join(map(str, size))} batch {row['batch']}: host {row['host_ms']:.1f} ms, "
                f"copy {row['copy_ms']:.1f} ms, step {row['step_ms']:.1f} ms -> {row['clips_per_s']:.0f} clips/s"
            )
            target(f"{role}_{model}_{'x'.join(map(str, size))}_host_share", row["host_share"], "<=", 0.2)
    return rows


def copy_rates(device: torch.device, dry: bool) -> dict:
    """(d) GB/s of one host-to-device copy of a batch of uint8 clips (32 x 16x112x112x3, 19 MB):
    from pageable memory, pinned per batch (what the steps above do), and from a pinned buffer."""
    shape = (8, 8, 32, 32, 3) if dry else (32, 16, 112, 112, 3)
    clips = torch.randint(0, 256, shape, dtype=torch.uint8)
    cuda = device.type == "cuda"
    pinned = clips.pin_memory() if cuda else clips
    ways = {
        "pageable": lambda: clips.to(device),
        "pinned_per_batch": lambda: (clips.pin_memory() if cuda else clips).to(device, non_blocking=True),
        "pinned_buffer": lambda: pinned.to(device, non_blocking=True),
    }
    rates = {name: clips.nbytes / timed(fn, device, 3 if dry else 20) / 1e9 for name, fn in ways.items()}
    print(
        f"(d) host-to-device copy of {clips.nbytes / 1e6:.0f} MB: "
        + ", ".join(f"{k} {v:.1f} GB/s" for k, v in rates.items())
    )
    return rates


def determinism(device: torch.device) -> float:
    """(e) the largest difference between two identical recoveries on `device` (normalised input
    units; one uint8 level is about 0.017). cuDNN's fastest kernels and atomics in the backward pass
    differ run to run; torch has no deterministic CUDA backward for avg_pool3d and grid_sample,
    which recovery uses, so there is no bitwise mode to offer (seen on an H200)."""
    teacher, stats, x, y, idx = problem("mini_c3d", 16, (8, 32, 32), 20, device)
    s = settings(10)
    first = recovery.recover(teacher, x, y, idx, s, stats)
    second = recovery.recover(teacher, x, y, idx, s, stats)
    gap = float((first - second).abs().max())
    levels = uint8_gap(first, second)
    print(f"(e) two identical recoveries on {device}: largest difference {gap:.2e}, {levels} uint8 levels")
    target("recovery_repeat_max_uint8_difference", levels, "<=", 1, 0)
    return gap


def ray_visibility(device: torch.device, temp: Path) -> dict:
    """(f) what a Ray worker given 0 GPUs and (where there is one) 1 GPU runs on; {} where Ray is
    not installed (a bare GPU image: (a)-(e) need only torch and omegaconf)."""
    try:
        import ray
    except ImportError:
        print("(f) skipped: ray is not installed in this interpreter")
        return {}

    from tsgd_ray.doctor import _sees

    cfg = load_config("default", [f"storage.output_root={temp}"])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local instance: no ~/.ray/auth_token
    ray.init(address="local", include_dashboard=False, _temp_dir=str(temp / "ray"), log_to_driver=False)
    try:
        seen = {}
        for gpus in (0, 1) if device.type == "cuda" else (0,):
            seen[gpus] = ray.get(ray.remote(_sees).options(num_cpus=0, num_gpus=gpus).remote(cfg, gpus), timeout=300)
            print(f"(f) a Ray worker given {gpus} GPU: {seen[gpus]}")
    finally:
        ray.shutdown()
    target("ray_gpu_less_worker_on_cpu", float(seen[0]["device"] == "cpu"), ">=", 1.0, 0)
    if 1 in seen:
        target("ray_gpu_worker_on_cuda", float(seen[1]["device"].startswith("cuda")), ">=", 1.0, 0)
    return seen


def default_run(device: torch.device, temp: Path, dry: bool) -> float:
    """(g) `tsgd-ray run default` with every stage given the GPU; seconds (a tiny run when dry)."""
    gpu = 0 if device.type == "cpu" else 1
    overrides = [
        f"storage.output_root={temp / 'run'}",
        f"ray.temp_dir={temp / 'ray-run'}",
        *(f"{k}={gpu}" for k in ("teacher.gpus_per_worker", "stats.gpus_per_actor", "distill.gpus_per_actor")),
        f"evaluate.gpus_per_worker={gpu}",
        "distill.cpus_per_actor=0.5",
    ]
    if dry:
        overrides += TINY_RUN
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "tsgd_ray", "run", "default", *overrides], capture_output=True, text=True, timeout=3600
    )
    seconds = time.time() - started
    print(f"(g) tsgd-ray run default on {device.type}: exit {out.returncode} in {seconds:.0f} s")
    print("\n".join("    " + line for line in out.stdout.strip().splitlines()[-8:]))
    if out.returncode:
        print(out.stderr[-3000:])
    target("default_run_exit_code", float(out.returncode), "<=", 0.0, 0)
    return seconds


def calibration_rows(name: str, report: dict) -> list[dict]:
    """The measurements as rows of the plan's calibration table (`tsgd_ray.calibration`): recovery
    video-iterations/s (the largest chunk) and teacher train clips/s per model and clip size, for
    the device class in `name` (h100, a10g, ...). Merge them with
    `python benchmarks/calibrate.py --merge <this script's --out file>`."""
    found = re.search(r"\b(h100|h200|a100|a10g|l40s|l4)\b", name.lower())
    device = found[1] if found else "cpu"
    if device == "cpu":  # --dry: CPU figures at several threads, not the per-thread rows the plan reads
        return []
    source = f"benchmarks/gpu.py on {name}, {time.strftime('%Y-%m-%d')}"
    rows = {}
    for r in report["recovery"]:
        key = (r["model"], r["width"], tuple(r["size"]))
        if key not in rows or r["chunk"] > rows[key]["chunk"]:
            rows[key] = r
    out = [
        {
            "kind": "compute",
            "device": device,
            "work": "recovery",
            "model": m,
            "width": w,
            "depth": 4,
            "clip": list(size),
        }
        | {"rate": r["video_iterations_per_s"], "source": source}
        for (m, w, size), r in rows.items()
    ]
    widths = {(r["model"], tuple(r["size"])): r["width"] for r in report["recovery"]}
    for r in report["training"]:
        if r["role"] == "teacher":
            width = widths[(r["model"], tuple(r["size"]))]
            out.append(
                {"kind": "compute", "device": device, "work": "train", "model": r["model"], "width": width, "depth": 4}
                | {"clip": r["size"], "rate": r["clips_per_s"], "source": source}
            )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="every part on the CPU at small sizes (CI)")
    parser.add_argument("--out", default="", help="calibration rows (JSON); default .cache/gpu-benchmark/<device>.json")
    parser.add_argument("--skip-run", action="store_true", help="leave out (g), the default run")
    parser.add_argument("--quick", action="store_true", help="(a), (b), (d) without the copy rates, (f): no (e)")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry for the CPU check of this script", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry else "cuda")
    tune_for(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, dry {args.dry}")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="tsgd-gpu-") as tmp:  # short: Ray's socket paths live under it
        temp = Path(tmp)
        report = {
            "device": name,
            "torch": torch.__version__,
            "agreement": agreement(device),
            "recovery": step_breakdown(device, args.dry),
            "training": train_steps(device, args.dry),
            **({} if args.quick else {"copy_gbps": copy_rates(device, args.dry), "determinism": determinism(device)}),
            "ray": ray_visibility(device, temp),
        }
        if not args.skip_run:
            report["default_run_seconds"] = default_run(device, temp, args.dry)
    report["calibration_rows"] = calibration_rows(name, report)
    out = Path(args.out or REPO / ".cache" / "gpu-benchmark" / f"{name.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"calibration rows: {out}; {time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
