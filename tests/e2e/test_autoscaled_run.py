"""A whole run on an autoscaling cluster simulated on this machine (issue 46): Ray's autoscaler v2
with infra/aws/cluster.yaml's node types scaled down (support.autoscaling), starting from no worker
nodes, every stage's GPU key at 1 while compute is forced onto the CPU (support.gpus_on_cpu)."""

from __future__ import annotations

import pytest
from support.clusters import run_script

pytestmark = [pytest.mark.ray, pytest.mark.full]


@pytest.mark.timeout(1500)
def test_a_whole_run_from_no_workers_adds_the_node_types_it_asks_for_and_ends_with_none(tmp_path):
    """prepare's decoding adds the CPU type, the GPU stages add GPU types (as many nodes as a type
    allows when the evaluation fleet's students wait), the run ends 0, and the idle nodes go."""
    report = run_script("autoscaled_run.py", tmp_path / "out", timeout=1400)
    gpu_types = {name for name, resources in report["types"].items() if resources.get("GPU")}
    assert report["rc"] == 0
    assert set(report["added"]) == gpu_types | {"cpu-decode"}
    assert all(report["added"][name] == 2 for name in gpu_types)  # the fleet widened to every GPU node
    assert report["workers_left"] == 0 and report["idle_gone_s"] < 60
    print(report)
