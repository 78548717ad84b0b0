"""benchmarks/gpu.py --dry: every part of the GPU benchmark runs on the CPU, so the script a GPU
session runs first cannot rot (its figures here say nothing about a GPU)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

TARGET = re.compile(r"^target (\S+): (\S+) \(goal (<=|>=|<|>) (\S+)\) (met|NOT met)$")


@pytest.mark.timeout(1500)  # about 4 min on an idle 2-core machine
@pytest.mark.full  # gpu.py --dry's whole run
def test_the_gpu_benchmark_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "calibration.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--dry", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1440,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for part in "abdefg":
        assert any(line.startswith(f"({part}) ") for line in lines), part
    targets = {m[1]: m for m in map(TARGET.match, lines) if m}
    # what holds on any device: the CPU run agrees with itself, a GPU-less worker stays on the CPU,
    # and the default run with every stage's GPU keys set (0 here) finishes
    for name in (
        "recovery_fp32_final_loss_relative_gap",
        "recovery_repeat_max_uint8_difference",
        "ray_gpu_less_worker_on_cpu",
        "default_run_exit_code",
    ):
        assert targets[name][5] == "met", (name, run.stdout[-4000:])  # (g) prints the run's stderr
    assert any(name.endswith("_step_over_bare") for name in targets)  # measured, whatever the figure
    rows = json.loads(out.read_text())
    assert rows["device"] == "cpu" and rows["recovery"] and rows["training"]
    assert rows["determinism"] == 0.0  # the CPU is bitwise reproducible (a GPU differs by a uint8 level)
    assert set(rows["copy_gbps"]) == {"pageable", "pinned_per_batch", "pinned_buffer"}
    assert {"bare_ms", "taps_ms", "step_ms", "video_iterations_per_s", "plan_gib"} <= set(rows["recovery"][0])
    assert {"host_ms", "copy_ms", "step_ms", "clips_per_s"} <= set(rows["training"][0])
