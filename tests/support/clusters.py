"""Local multi-node Ray for the cluster tests. Each cluster test runs a script of tests/support in
its own process (one Ray per process): `run_script` in the test, `head_without_cpus` in the script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def head_without_cpus(temp_dir: str, object_store_mb: int):
    """A `ray.cluster_utils.Cluster` whose head has no CPUs (work goes to the nodes the caller adds),
    its sessions under `temp_dir`."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_TMPDIR"] = temp_dir  # Cluster records its address under Ray's temp dir: keep it in ours
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    return Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "temp_dir": temp_dir, "object_store_memory": object_store_mb * 2**20},
    )


def run_script(name: str, *args: str, timeout: float) -> dict:
    """Run tests/support/`name` with `args` and then a fresh Ray temp dir in its own Python process
    (no RAY_ADDRESS), within `timeout` seconds; returns the JSON object its last stdout line holds.
    Asserts it exits 0.

    The temp dir is made under the system's temp dir and removed afterwards: Ray's Unix sockets
    sit about 60 characters below it, and a socket path may have 107 at most, too few under a
    checkout at a deep path (CI's clone under /tmp/tmp.XXXXXXXXXX/.cache already went over)."""
    temp_dir = tempfile.mkdtemp(prefix="tsgd-ray-")
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "support" / name), *map(str, args), temp_dir],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env={**os.environ, "RAY_ADDRESS": ""},
        )
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
