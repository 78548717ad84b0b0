"""Run by test_autoscaled_run.py in its own process: `tsgd-ray run default` (a small run) on an
autoscaling cluster that starts with no worker nodes (support.autoscaling: infra/aws/cluster.yaml's
node types scaled down), every stage's GPU key at 1 and compute forced onto the CPU
(support.gpus_on_cpu), then the idle nodes' end.

    python tests/support/autoscaled_run.py OUTPUT_ROOT RAY_TEMP_DIR [key=value ...]

Prints one JSON line: the run's exit code, the node types the autoscaler added (with how many at
most at once), how long the idle nodes took to go, and the workers left.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # conftest, support

GPU_KEYS = (
    "teacher.gpus_per_worker=1",
    "stats.gpus_per_actor=1",
    "distill.gpus_per_actor=1",
    "evaluate.gpus_per_worker=1",
)


def main(output_root: str, temp_dir: str, *overrides: str) -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])  # the nodes' workers
    import ray
    from conftest import SMALL_RUN
    from support.autoscaling import autoscaling_cluster, node_type, scaled_node_types
    from support.gpus_on_cpu import setup

    from tsgd_ray.cli import run_command

    setup()  # the driver's own checks too
    types = scaled_node_types(gpu_workers=2, cpu_workers=1, cpus=2)
    seen: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:  # the node types up, every second
        while not stop.wait(1.0):
            up: dict[str, int] = {}
            for node in ray.nodes():
                if node["Alive"] and node_type(node):
                    up[node_type(node)] = up.get(node_type(node), 0) + 1
            for kind, count in up.items():
                seen[kind] = max(seen.get(kind, 0), count)

    with autoscaling_cluster(temp_dir, types, idle_timeout_s=6) as address:
        ray.init(
            address=address, log_to_driver=False, runtime_env={"worker_process_setup_hook": "support.gpus_on_cpu.setup"}
        )
        threading.Thread(target=watch, daemon=True).start()
        try:
            started = time.time()
            overrides = [f"storage.output_root={output_root}", "device=auto", *SMALL_RUN, *GPU_KEYS, *overrides]
            rc = run_command("run", "default", overrides)
            run_s = time.time() - started
            stop.set()
            ended = time.time()
            while len([n for n in ray.nodes() if n["Alive"]]) > 1 and time.time() - ended < 120:
                time.sleep(1)
            idle_gone_s = time.time() - ended
            left = len([n for n in ray.nodes() if n["Alive"]]) - 1
        finally:
            stop.set()
            ray.shutdown()
    print(
        json.dumps(
            {
                "rc": rc,
                "run_s": run_s,
                "added": seen,
                "types": {k: t["resources"] for k, t in types.items()},
                "idle_gone_s": idle_gone_s,
                "workers_left": left,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
