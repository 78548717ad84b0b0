"""Connecting to Ray: a local instance started by the program, or an existing cluster."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from omegaconf import DictConfig

from tsgd_ray.config import ConfigError
from tsgd_ray.errors import UserError

log = logging.getLogger(__name__)

#: how often a request Ray cannot place yet is checked against the autoscaler's infeasible ones (s)
INFEASIBLE_POLL_S = 5.0

#: Ray Train's controller polls its workers (and takes one report from each) this often; Ray's
#: default of 2 s makes a report per short epoch wait up to 2 s. Set for the local Ray here and for
#: clusters in infra/runtime_env.yaml; a value in the environment wins.
TRAIN_POLL = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
#: Ray puts Unix sockets at <temp_dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store (pid: the
#: process starting Ray), and a socket path has at most 107 bytes
SOCKET_TAIL = len("/session_2026-12-03_01-05-28_123456_/sockets/plasma_store")


class InfeasibleError(UserError):
    """A stage asks for resources that no node of the cluster, started or to be started, has."""


def init_ray(cfg: DictConfig, verbose: bool = False) -> None:
    """Start or join Ray as the config says; a no-op when Ray is already initialised. Ray Data's
    progress bars only when `verbose` (the stages report their own progress).

    ``ray.address`` empty starts a local instance with ``ray.num_cpus``, ``ray.object_store_mb``,
    ``ray.include_dashboard`` and ``ray.temp_dir``; ``auto`` or ``ray://...`` joins a cluster
    (inside ``ray job submit`` the job's cluster is joined automatically).

    Raises:
        ConfigError: ray.temp_dir is too long for the Unix sockets Ray puts under it.
    """
    import ray

    if ray.is_initialized():
        return
    r = cfg.ray
    kwargs: dict = {"log_to_driver": True}
    if r.address or os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = r.address or None
    else:
        kwargs["address"] = "local"  # a new instance, never one that `ray start` left on this host
        kwargs["include_dashboard"] = r.include_dashboard
        name, seconds = TRAIN_POLL
        kwargs["runtime_env"] = {"env_vars": {name: os.environ.get(name, seconds)}}
        if r.num_cpus:
            kwargs["num_cpus"] = r.num_cpus
        if r.object_store_mb:
            kwargs["object_store_memory"] = r.object_store_mb * 2**20
        if r.temp_dir:
            path, most = os.path.abspath(r.temp_dir), 107 - SOCKET_TAIL - len(str(os.getpid()))
            if len(path) > most:
                raise ConfigError(
                    f"ray.temp_dir: {path} has {len(path)} characters; Ray's sockets under it would pass the "
                    f"107 a socket path allows (and Ray fails at start-up): use one of at most {most}, "
                    "e.g. /tmp/ray"
                )
            os.makedirs(r.temp_dir, exist_ok=True)
            kwargs["_temp_dir"] = os.path.abspath(r.temp_dir)
    ray.init(**kwargs)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose
    log.info("Ray resources: %s", ray.cluster_resources())


@contextlib.contextmanager
def ray_for(cfg: DictConfig, verbose: bool = False) -> Iterator[None]:
    """`init_ray` for the inside of a command, and a local Ray this started shut down at the end:
    inside the command's `Console`, Ray's last forwarded worker lines land in its log file, not on
    the screen after the results. A Ray that was running already (a test's, a job's) is kept."""
    import ray

    started = not ray.is_initialized()
    init_ray(cfg, verbose)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def check_gpus(cfg: DictConfig, key: str, gpus: float) -> None:
    """Before a stage starts its workers: when it asks for `gpus` (config key `key`) and the device
    is not cpu, run one task with that GPU share and check that torch there sees CUDA. On an
    autoscaling cluster the wait ends when the autoscaler reports the request infeasible.

    Raises:
        DeviceError: torch on the GPU node cannot use CUDA (e.g. a CPU-only wheel), naming `key`.
        InfeasibleError: no node type the autoscaler may start has `gpus` GPUs.
    """
    import ray

    from tsgd_ray.core.device import cuda_report, require_cuda

    if gpus <= 0 or cfg.device == "cpu":
        return
    ref = ray.remote(cuda_report).options(num_cpus=0, num_gpus=gpus).remote()
    waited, scaling = 0.0, autoscales()
    while not ray.wait([ref], timeout=INFEASIBLE_POLL_S)[0]:
        waited += INFEASIBLE_POLL_S
        if scaling and {"GPU": float(gpus)} in infeasible_requests():
            ray.cancel(ref, force=True)
            raise InfeasibleError(
                f"{key}={gpus:g}: no node type of this cluster has {gpus:g} GPU(s) (its autoscaler reports the "
                "request infeasible); lower the key or add such a node type"
            )
        if waited % 60 < INFEASIBLE_POLL_S:
            log.warning("waiting for a node with %s GPU(s) for %s (Ray cannot place it yet)", gpus, key)
    require_cuda(ray.get(ref), key, gpus)


def autoscales() -> bool:
    """Whether an autoscaler (v2: infra/aws and infra/k8s run it) manages the connected cluster: it
    has reported its state to the GCS. False for a local Ray, a fixed cluster, or autoscaler v1."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        stats = get_cluster_status(ray.get_runtime_context().gcs_address).stats
    except Exception:  # noqa: BLE001 - an older GCS without the autoscaler state service
        return False
    return (stats.autoscaler_version or "0") != "0"


def infeasible_requests() -> list[dict]:
    """The resource bundles the cluster's autoscaler (v2) reports it can never place: requests
    and placement groups that no node type fits. [] without an autoscaler or its state."""
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    try:
        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status(timeout_s=10))
    except Exception:  # noqa: BLE001 - an older GCS, or one that does not answer in time
        return []
    state = reply.autoscaling_state
    gangs = [r for g in state.infeasible_gang_resource_requests for r in g.requests]
    return [dict(r.resources_bundle) for r in [*state.infeasible_resource_requests, *gangs]]
