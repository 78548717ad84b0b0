"""A local autoscaling Ray cluster: autoscaler v2 and Ray's fake multi-node provider, whose worker
"nodes" are raylets on this machine, started when demand needs them and ended when idle. Its node
types are infra/aws/cluster.yaml's, scaled down (`scaled_node_types`); a type may declare GPUs
that this machine does not have.

Ray's own `ray.cluster_utils.AutoscalingCluster` cannot serve here: Ray 2.60's wheel lacks the
provider's defaults file (fake_multi_node/example.yaml), and it runs `ray stop --force`, which
would end every Ray on the machine. Here the provider is named as an `external` one (no defaults
file), the cluster lives under its own temp dir and port, and only its processes are ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import yaml

REPO = Path(__file__).resolve().parents[2]
HEAD_ID = "f" * 51 + "00000"  # the fake provider's head node id
PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"


def scaled_node_types(gpu_workers: int = 2, cpu_workers: int = 1, cpus: float = 1, object_store_mb: int = 100) -> dict:
    """infra/aws/cluster.yaml's worker types, each with `cpus` CPUs (and its one GPU), at most
    `gpu_workers` or `cpu_workers` nodes, a small object store, and a resource naming its type
    (`type:<name>`: 1), by which `node_type` tells the nodes apart."""
    config = yaml.safe_load((REPO / "infra" / "aws" / "cluster.yaml").read_text())
    out = {}
    for name, node in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        gpus = node["resources"].get("GPU", 0)
        resources = {"CPU": cpus, "object_store_memory": object_store_mb * 2**20, **({"GPU": 1} if gpus else {})}
        most = min(node["max_workers"], gpu_workers if gpus else cpu_workers)
        out[name] = {
            "resources": {**resources, f"type:{name}": 1},
            "node_config": {},
            "min_workers": 0,
            "max_workers": most,
        }
        if "priority" in node:
            out[name]["priority"] = node["priority"]
    return out


def node_type(node: dict) -> str:
    """The scaled type of a node as `ray.nodes()` lists it ("" for the head)."""
    return next((key.split(":", 1)[1] for key in node["Resources"] if key.startswith("type:")), "")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def autoscaling_cluster(temp_dir: str, node_types: dict, idle_timeout_s: float = 10.0) -> Iterator[str]:
    """Start the cluster (a head with no CPUs, no worker nodes) under `temp_dir` and yield its GCS
    address; on exit end every process whose command line names `temp_dir` (TERM, then KILL after
    10 s). The head's and the nodes' processes inherit this process's environment (PYTHONPATH)."""
    port = _free_port()
    config = {
        "cluster_name": "fake",
        "max_workers": sum(t["max_workers"] for t in node_types.values()),
        "idle_timeout_minutes": idle_timeout_s / 60,
        "upscaling_speed": 1.0,
        "provider": {
            "type": "external",
            "module": PROVIDER,
            "launch_multiple": True,
            "head_node_id": HEAD_ID,
            "gcs_address": f"127.0.0.1:{port}",  # where the nodes it starts join (else 6379)
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **node_types,
        },
        "head_node_type": "ray.head.default",  # the fake provider tags its head so
        # what Ray's config preparation expects of every cluster, empty for local processes
        **dict.fromkeys(["file_mounts"], {}),
        **dict.fromkeys(["cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands"], []),
        **dict.fromkeys(["setup_commands", "head_setup_commands", "worker_setup_commands"], []),
        **dict.fromkeys(["head_start_ray_commands", "worker_start_ray_commands"], []),
        "file_mounts_sync_continuously": False,
    }
    path = Path(temp_dir) / "autoscaling.json"
    path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",  # no ~/.ray/auth_token
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": HEAD_ID,
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": HEAD_ID,
    }
    ray_cli = str(Path(sys.executable).parent / "ray")
    command = [ray_cli, "start", "--head", f"--port={port}", "--num-cpus=0", f"--temp-dir={temp_dir}"]
    command += [f"--autoscaling-config={path}", "--include-dashboard=false", "--disable-usage-stats"]
    command += ["--object-store-memory=100000000"]
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        _end_processes_under(temp_dir)


def _end_processes_under(temp_dir: str) -> None:
    """TERM, then KILL after 10 s, every process whose command line names `temp_dir`, but this
    one and its ancestors."""
    import psutil

    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}

    def ours() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error, TypeError):
                if proc.pid not in spared and any(temp_dir in part for part in proc.info["cmdline"]):
                    found.append(proc)
        return found

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for proc in ours():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.time() + wait
        while ours() and time.time() < deadline:
            time.sleep(0.2)
