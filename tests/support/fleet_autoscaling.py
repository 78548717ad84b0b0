"""Run by test_fleet.py in its own process: the evaluation fleet on an autoscaling cluster that
starts with no worker nodes (support.autoscaling: infra/aws/cluster.yaml's node types scaled down,
one node of each at most). Four students of one GPU worker each; a slot's Ray Train run is stood in
for by a task that holds one CPU and one GPU for a few seconds.

    python tests/support/fleet_autoscaling.py OUTPUT_ROOT RAY_TEMP_DIR

Then a stage's check for 2 GPUs a worker, which no node type has. Prints one JSON line: the room at
the start and the end, the most slots training at once, the node types the slots ran on, the scaled
node types, how long the idle nodes took to go, and what the infeasible check said, and when.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, support


def main(output_root: str, temp_dir: str) -> None:
    import ray
    from conftest import tiny_config
    from support.autoscaling import autoscaling_cluster, scaled_node_types

    from tsgd_ray.runtime.cluster import InfeasibleError, check_gpus
    from tsgd_ray.runtime.fleet import Fleet, Student

    types = scaled_node_types(gpu_workers=1, cpu_workers=1)
    with autoscaling_cluster(temp_dir, types, idle_timeout_s=6) as address:
        ray.init(address=address, log_to_driver=False)
        cfg = tiny_config(output_root, "device=auto", "evaluate.gpus_per_worker=1", "evaluate.cpus_per_worker=1")
        fleet = Fleet.for_config(cfg)
        start = (fleet.students, fleet.workers)

        @ray.remote(num_cpus=1, num_gpus=1)
        def slot_run() -> str:
            import os

            time.sleep(4)
            return os.environ.get("RAY_NODE_TYPE_NAME", "")

        lock, running, most, ran_on = threading.Lock(), [0], [0], []

        def train(index, slot) -> None:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                ran_on.append(ray.get(slot_run.remote(), timeout=240))
            finally:
                with lock:
                    running[0] -= 1

        slots = fleet.slots([Student(f"student-{i}", 1.0, 1) for i in range(4)])
        fleet.run(slots, train)
        end = (fleet.students, fleet.workers)
        ended = time.time()
        while len([n for n in ray.nodes() if n["Alive"]]) > 1 and time.time() - ended < 120:
            time.sleep(1)
        idle_gone_s = time.time() - ended
        left = len([n for n in ray.nodes() if n["Alive"]]) - 1
        asked = time.time()  # a stage asking for more GPUs than any node type has
        try:
            check_gpus(cfg, "evaluate.gpus_per_worker", 2)
            infeasible = "placed"
        except InfeasibleError as exc:
            infeasible = str(exc)
        infeasible_s = time.time() - asked
        ray.shutdown()
    print(
        json.dumps(
            {
                "start": start,
                "end": end,
                "slots": len(slots),
                "most_at_once": most[0],
                "ran_on": sorted(ran_on),
                "types": {name: t["resources"] for name, t in types.items()},
                "idle_gone_s": idle_gone_s,
                "workers_left": left,
                "infeasible": infeasible,
                "infeasible_s": infeasible_s,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
