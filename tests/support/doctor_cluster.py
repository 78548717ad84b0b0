"""Run by test_doctor.py in its own process: `run_doctor` on a 3-node `ray.cluster_utils.Cluster`
(a head with no CPUs, a CPU worker, and a worker that declares a GPU this machine's torch cannot
use), with its output root on local disk.

    python tests/support/doctor_cluster.py OUTPUT_ROOT RAY_TEMP_DIR

Prints one JSON line: the report lines, the error (or null), and the node ids.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest


def main(output_root: str, temp_dir: str) -> None:
    import ray
    from conftest import tiny_config
    from support.clusters import head_without_cpus

    from tsgd_ray.doctor import DoctorError, run_doctor

    memory = {"object_store_memory": 100 * 2**20}
    cluster = head_without_cpus(temp_dir, 100)
    cluster.add_node(num_cpus=1, **memory)
    cluster.add_node(num_cpus=1, num_gpus=1, **memory)
    ray.init(address=cluster.address, log_to_driver=False)
    lines: list[str] = []
    error = None
    try:
        run_doctor(tiny_config(output_root, "device=auto"), lines.append)
    except DoctorError as exc:
        error = str(exc)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps({"lines": lines, "error": error, "nodes": nodes}))


if __name__ == "__main__":
    main(*sys.argv[1:])
