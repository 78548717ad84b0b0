"""Run by test_faults.py in its own process: distill on a 3-node `ray.cluster_utils.Cluster`
(a head with no CPUs, two 2-CPU workers, one single-threaded 1.5-CPU distill actor on each), remove
the node of one actor while it recovers its second partition, and do NOT add a node back: the
stage must finish on the node that is left (the replacement actor it asks for is never placed).

    python tests/support/node_loss.py OUTPUT_ROOT TEACHER_CHECKPOINT RAY_TEMP_DIR

Prints one JSON line: the distill summary, the actor pids and nodes seen, the removed node, and
the sha256 of each merged file.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest and support


def main(output_root: str, teacher: str, temp_dir: str) -> None:
    import ray
    from support.clusters import head_without_cpus
    from support.stage_helpers import imported_config

    from tsgd_ray import layout, storage
    from tsgd_ray.stages.distill import run_distill
    from tsgd_ray.stages.init import run_init
    from tsgd_ray.stages.merge import run_merge
    from tsgd_ray.stages.prepare import run_prepare
    from tsgd_ray.stages.stats import run_stats
    from tsgd_ray.stages.teacher import run_teacher

    cluster = head_without_cpus(temp_dir, 150)
    workers = [cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cfg = imported_config(
        Path(output_root), Path(teacher), "distill.actors=2", "distill.cpus_per_actor=1.5", "distill.iterations=150"
    )
    run_prepare(cfg)
    run_teacher(cfg)
    with_stats = imported_config(Path(output_root), Path(teacher), "distill.actors=1", "distill.cpus_per_actor=0.5")
    run_stats(with_stats)  # the statistics do not depend on the actor count (same folder)
    run_init(with_stats)

    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_distill(cfg, actor_prefix="node-loss")))
    thread.start()
    first = [layout.of(cfg).partition_marker(p) for p in (0, 1)]
    while not all(map(storage.exists, first)) and thread.is_alive():
        time.sleep(0.05)
    # the actor that wrote partition 1 has just been handed partition 2 or 3: take its node away
    target = storage.read_json(first[1])["node_id"]
    removed = next(w for w in workers if w.node_id == target)
    cluster.remove_node(removed)
    thread.join(timeout=240)
    merged = run_merge(cfg)
    print(
        json.dumps(
            {
                "summary": {k: v for k, v in result.items() if k != "markers"},
                "pids": sorted({m["pid"] for m in result.get("markers", [])}),
                "removed_node": target,
                "nodes": sorted({m["node_id"] for m in result.get("markers", [])}),
                "files": [f["sha256"] for f in merged["files"]],
            }
        )
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
