"""The embedded default run as a newcomer makes it: wall time phase by phase, the plan it printed
against that time, the error lines on its console, and whether two fresh prepares write the same
bytes.

    python benchmarks/default_run.py [--skip-prepares] [key=value ...]

Runs `tsgd-ray run default` (this checkout's installed program, beside this Python) in a fresh
temporary output root, then `tsgd-ray prepare default` twice in two more. Measure on an idle
machine. Phases come from the run's log file: before the console (config, the built-in videos),
Ray's start, prepare (shards and clip caches), the teacher, stats to merge of every method, and
the evaluation fleet (its slots, their start-up, the students).

Targets (issue "Default"): default_run_seconds <= 240 on 2 idle cores; default_plan_over_measured
within 0.67-1.5; default_run_error_lines == 0 (console lines Ray marks as errors);
fresh_prepares_identical == 1 (byte-identical shards and clip caches).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import target  # noqa: E402

PROGRAM = Path(sys.executable).with_name("tsgd-ray")
#: a console line Ray marks as an error: its own logging's level letter, or a logger's ERROR
ERROR_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]|\b(ERROR|CRITICAL|FATAL)\b")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
MARKS = {
    "console": "log file:",
    "ray": "Ray resources:",
    "prepare": "clip cache: ",
    "teacher": "teacher: done in",
    "distill": "merge: done in",
    "fleet": "evaluate: slot ",
    "evaluate": "evaluate/",
}


def _times(log: str) -> dict[str, list[float]]:
    """Unix times of the log lines that mark each phase (every occurrence, in order)."""
    out: dict[str, list[float]] = {k: [] for k in MARKS}
    for line in log.splitlines():
        stamp = STAMP.match(line)
        if not stamp:
            continue
        when = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for phase, mark in MARKS.items():
            if mark in line and (phase != "evaluate" or ": done in" in line):
                out[phase].append(when)
    return out


def run_default(root: Path, overrides: list[str]) -> dict:
    """`tsgd-ray run default` into `root`: seconds, phases, the plan's seconds, error lines."""
    from tsgd_ray.config import load_config
    from tsgd_ray.plan import make_plan

    argv = ["default", f"storage.output_root={root}", *overrides]
    plan = make_plan(load_config(argv[0], argv[1:]))["wall_s"]  # what the run prints before its spend
    started = time.time()
    out = subprocess.run([str(PROGRAM), "run", *argv], capture_output=True, text=True, timeout=3600)
    ended = time.time()
    console = out.stdout + out.stderr
    if out.returncode:
        raise SystemExit(f"tsgd-ray run default failed ({out.returncode}):\n{console[-3000:]}")
    (log,) = root.glob("logs/run-*.log")
    t = _times(log.read_text())
    seeds = [json.loads(p.read_text()) for p in root.glob("evaluate/*/seed-*.json")]
    phases = {
        "before the console (config, built-in videos)": t["console"][0] - started,
        "Ray start": t["ray"][0] - t["console"][0],
        "prepare (shards, clip caches)": t["prepare"][-1] - t["ray"][0],
        "teacher": t["teacher"][0] - t["prepare"][-1],
        "stats, init, distill, merge": t["distill"][-1] - t["teacher"][0],
        "evaluation fleet": t["evaluate"][-1] - t["distill"][-1],
        "  of which its start (to the first student)": min(s["started"] for s in seeds) - t["fleet"][0],
        "after the fleet (results, MLflow, Ray's end)": ended - t["evaluate"][-1],
    }
    return {
        "seconds": ended - started,
        "plan_seconds": plan,
        "phases": phases,
        "slots": len(t["fleet"]),
        "students": len(seeds),
        "error_lines": [line for line in console.splitlines() if ERROR_LINE.search(line)],
        "table": [line for line in console.splitlines() if line.startswith("|") or line.startswith("teacher (")],
    }


def prepares_identical(first: Path, second: Path) -> bool:
    """Two `tsgd-ray prepare default` runs in separate roots: the same shard and clip-cache bytes."""
    for root in (first, second):
        out = subprocess.run(
            [str(PROGRAM), "prepare", "default", f"storage.output_root={root}"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if out.returncode:
            raise SystemExit(f"tsgd-ray prepare default failed:\n{(out.stdout + out.stderr)[-3000:]}")
    files = [
        {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet")) if "/cache/" not in str(p)}
        for root in (first, second)
    ]
    return bool(files[0]) and files[0] == files[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-prepares", action="store_true", help="leave out the two fresh prepares")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the default config")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tsgd-default-") as folder:
        run = run_default(Path(folder, "run"), args.overrides)
        print(f"default run: {run['seconds']:.0f} s; plan {run['plan_seconds']:.0f} s")
        for name, seconds in run["phases"].items():
            print(f"  {name}: {seconds:.1f} s")
        print(f"  fleet: {run['students']} students on {run['slots']} slot(s)")
        print("\n".join(run["table"]))
        for line in run["error_lines"]:
            print(f"  error line: {line}")
        identical = None if args.skip_prepares else prepares_identical(Path(folder, "a"), Path(folder, "b"))
    target("default_run_seconds", run["seconds"], "<=", 240, 0)
    ratio = run["plan_seconds"] / run["seconds"]
    target("default_plan_over_measured_at_least", ratio, ">=", 0.67)
    target("default_plan_over_measured_at_most", ratio, "<=", 1.5)
    target("default_run_error_lines", len(run["error_lines"]), "<=", 0, 0)
    if identical is not None:
        target("fresh_prepares_identical", float(identical), ">=", 1, 0)


if __name__ == "__main__":
    main()
