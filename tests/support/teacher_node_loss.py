"""Run by test_faults.py in its own process: train the teacher on a 3-node `ray.cluster_utils.Cluster`
(a head with no CPUs, two 2-CPU workers, one 2-CPU Ray Train worker on each) with
teacher.min_workers=1, remove the node of one worker once a checkpoint is registered, and do NOT
add a node back: the teacher must finish from that checkpoint on the one worker left.

    python tests/support/teacher_node_loss.py OUTPUT_ROOT RAY_TEMP_DIR

Prints one JSON line: the teacher's marker (history: one row per epoch with its worker count)
and the epoch count asked for.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest and support

EPOCHS = 16


def main(output_root: str, temp_dir: str) -> None:
    import ray
    from conftest import tiny_config
    from support.clusters import head_without_cpus

    from tsgd_ray import layout
    from tsgd_ray.stages.prepare import run_prepare
    from tsgd_ray.stages.teacher import run_teacher

    cluster = head_without_cpus(temp_dir, 150)
    workers = [cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = tiny_config(
        Path(output_root),
        "teacher.width=8",
        "teacher.depth=2",
        f"teacher.epochs={EPOCHS}",
        "teacher.num_workers=2",
        "teacher.min_workers=1",
        "teacher.cpus_per_worker=2",
        "ray.max_failures=2",
    )
    run_prepare(cfg)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_teacher(cfg)))
    thread.start()
    snapshot = Path(layout.of(cfg).teacher) / "ray_train" / "teacher" / "checkpoint_manager_snapshot.json"
    while thread.is_alive():
        try:
            if json.loads(snapshot.read_text())["checkpoint_results"]:
                break
        except (OSError, ValueError, KeyError):  # not written yet, or being written
            pass
        time.sleep(0.05)
    cluster.remove_node(workers[1])
    thread.join(timeout=300)
    print(json.dumps({"marker": result, "epochs": EPOCHS}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
