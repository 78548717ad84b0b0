"""`tsgd-ray doctor CONFIG`: can this machine, or every node of the configured cluster, run the config?

On every alive Ray node, by a task pinned there (given a GPU where the node has one and the device
is not cpu): torch, CUDA, driver and cuDNN versions; bf16; a forward and backward of the teacher's
architecture at the config's clip size on the device a stage would use there; decord and PyAV on a
freshly encoded clip; a write, read and conditional write under the output root; the tracking
server (from every node when it is a server, from the driver for a local store). From the driver,
per GPU node: what an actor given no GPU and one given half a GPU would run on. Then the client's
Ray against each node's, Ray's auth mode, and where MLflow keeps its store.

One line per check, `ok` or `FAIL` with the fix; any failure ends in `DoctorError` (exit code 2)
naming the first fix. Every wait is bounded by WAIT_SECONDS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from omegaconf import DictConfig

from tsgd_ray import storage
from tsgd_ray.errors import UserError

WAIT_SECONDS = 300.0


class DoctorError(UserError):
    """At least one check failed; the message names the first fix."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self, where: str) -> str:
        text = f"{'ok  ' if self.ok else 'FAIL'} [{where}] {self.name}: {self.detail}"
        return text + (f" -> {self.fix}" if not self.ok and self.fix else "")


def _guard(name: str, fix: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """`fn()`'s checks, or one failed check `name` carrying the exception's one-line text."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a failing check is reported, never raised
        text = " ".join(str(exc).split())[:300]
        return [Check(name, False, f"{type(exc).__name__}: {text}", fix)]


def _driver_version() -> str:
    if not shutil.which("nvidia-smi"):
        return "no nvidia-smi"
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


#: the oldest Linux driver each CUDA major version runs on (NVIDIA's minor-version compatibility)
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def driver_too_old(driver: str, cuda_build: str | None) -> str:
    """Why NVIDIA driver `driver` (e.g. "570.133.20") cannot run a torch built for CUDA
    `cuda_build` (e.g. "13.0"), or "" when it can or either is unknown."""
    if not cuda_build or not driver[:1].isdigit():
        return ""
    need = MIN_DRIVER.get(int(cuda_build.split(".")[0]))
    if need and _version(driver) < _version(need):
        return f"driver {driver} is older than CUDA {cuda_build} builds need (>= {need})"
    return ""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _torch(gpus: float) -> Check:
    import torch

    cuda = torch.cuda.is_available()
    driver = _driver_version()
    detail = (
        f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
        f"cuDNN {torch.backends.cudnn.version() if cuda else '-'}, driver {driver}, "
        f"{torch.cuda.device_count() if cuda else 0} GPU(s) visible"
    )
    old = driver_too_old(driver, torch.version.cuda)
    if old:
        fix = "boot GPU nodes from an image with a newer driver (infra/aws/README.md), or a torch built for older CUDA"
        return Check("torch", gpus == 0, f"{detail}: {old}", fix)
    fix = "install a CUDA build of torch that fits the node's driver (infra/docker)"
    return Check("torch", cuda or gpus == 0, detail, fix)


def _compute(cfg: DictConfig, gpus: float) -> list[Check]:
    """bf16 support, then a forward and backward of the teacher's architecture on the device."""
    import torch

    from tsgd_ray.core.device import autocast, resolve_device
    from tsgd_ray.core.models import build_model
    from tsgd_ray.layout import clip_size

    device = resolve_device(cfg.device, gpus, "the doctor's GPU")
    checks = []
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        checks.append(
            Check(
                "bf16",
                bf16 or not cfg.amp,
                f"{'supported' if bf16 else 'not supported'} on {torch.cuda.get_device_name(device)}",
                "set amp=false (this GPU has no bfloat16)",
            )
        )
    else:
        checks.append(Check("bf16", True, "not used on the CPU (amp applies on CUDA only)"))
    t = cfg.teacher
    model = build_model(t.model, 10, clip_size(cfg), t.width, t.depth).to(device)
    x = torch.randn(2, 3, *clip_size(cfg), device=device)
    started = time.perf_counter()
    with autocast(device, cfg.amp):
        loss = model(x).float().logsumexp(dim=1).mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    finite = bool(torch.isfinite(loss)) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    detail = f"{t.model} forward and backward of 2 clips {'x'.join(map(str, clip_size(cfg)))} on {device}: "
    checks.append(Check("compute", finite, detail + f"{seconds * 1e3:.0f} ms, finite={finite}", "amp=false"))
    return checks


def _decoders() -> list[Check]:
    """decord and PyAV on the same freshly encoded H.264 clip: 8 frames each, and they agree."""
    import io

    import av
    import decord

    from tsgd_ray.data.video import encode_mp4

    frames = np.zeros((8, 64, 64, 3), np.uint8)
    for t in range(8):
        frames[t, 16:32, 4 * t : 4 * t + 16] = (230, 200, 40)
    data = encode_mp4(frames, fps=10)
    by_decord = decord.VideoReader(io.BytesIO(data), num_threads=1).get_batch(list(range(8))).asnumpy()
    with av.open(io.BytesIO(data)) as container:
        by_pyav = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    gap = float(np.abs(by_decord.astype(np.int16) - by_pyav.astype(np.int16)).mean())
    fix = "reinstall decord and av (pip install tsgd-ray pulls both)"
    return [
        Check("decord", by_decord.shape == frames.shape, f"{decord.__version__}: {by_decord.shape[0]} frames", fix),
        Check(
            "pyav",
            by_pyav.shape == frames.shape and gap < 2,
            f"{av.__version__}: {len(by_pyav)} frames, mean difference to decord {gap:.2f} levels",
            fix,
        ),
    ]


def _storage(cfg: DictConfig, node: str) -> Check:
    """A write, read and conditional write of one small object under the output root (removed after)."""
    root = storage.absolute(cfg.storage.output_root)
    probe = storage.join(root, ".doctor", f"{node[:12]}-{uuid.uuid4().hex}")
    data = os.urandom(64)
    try:
        wrote = storage.write_once(probe, data)
        same = storage.read_bytes(probe) == data
        refused = not storage.write_once(probe, b"again")  # a second create must not replace it
    finally:
        storage.remove(probe)
    ok = wrote and same and refused
    detail = f"{root}: write {wrote}, read back {same}, second create refused {refused}"
    return Check("storage", ok, detail, "the store must honour conditional creates (If-None-Match)")


def _tracking(cfg: DictConfig) -> Check:
    """The MLflow store answers a search within MLFLOW_HTTP_REQUEST_TIMEOUT (10 s here, no retries)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from mlflow.tracking import MlflowClient

    from tsgd_ray.tracking.runs import redact, tracking_uri

    uri = tracking_uri(cfg)
    MlflowClient(uri).search_experiments(max_results=1)
    return Check("tracking", True, f"{redact(uri)} answers")


def node_checks(cfg: DictConfig, gpus: float, node: str = "local", tracking: bool = True) -> list[Check]:
    """Every check of one process that Ray gave `gpus` GPUs, on `node` (see the module docstring);
    `tracking`: also ask the MLflow store."""
    import ray

    checks = [Check("ray", True, ray.__version__)]
    checks += _guard("torch", "install torch", lambda: [_torch(gpus)])
    checks += _guard("compute", "see the torch line", lambda: _compute(cfg, gpus))
    checks += _guard("decoders", "pip install decord av", _decoders)
    storage_fix = "check the credentials, region and permissions for storage.output_root"
    checks += _guard("storage", storage_fix, lambda: [_storage(cfg, node)])
    if tracking:
        server_fix = "set tracking.tracking_uri to an MLflow server every node reaches (infra/mlflow)"
        checks += _guard("tracking", server_fix, lambda: [_tracking(cfg)])
    return checks


def _sees(cfg: DictConfig, gpus: float) -> dict:
    """What a Ray worker given `gpus` GPUs sees, and the device a stage would pick there."""
    import ray
    import torch

    from tsgd_ray.core.device import resolve_device

    try:
        device = str(resolve_device(cfg.device, gpus, "the doctor's actor"))
    except UserError as exc:
        device = f"none ({exc})"
    return {
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
        "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "torch_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "device": device,
    }


class _Probe:
    """A plain actor for `_sees` (an actor, as the stages' pools are)."""

    def sees(self, cfg: DictConfig, gpus: float) -> dict:
        return _sees(cfg, gpus)


def _visibility(cfg: DictConfig, node_id: str, gpus: float) -> Check:
    """An actor with `gpus` GPUs on the node: a GPU-less one must pick the CPU, a GPU one a GPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pin = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    actor = ray.remote(_Probe).options(num_cpus=0, num_gpus=gpus, scheduling_strategy=pin).remote()
    try:
        ref = actor.sees.remote(cfg, gpus)
        if not ray.wait([ref], timeout=WAIT_SECONDS)[0]:
            return Check(f"actor with {gpus:g} GPU", False, f"not placed in {WAIT_SECONDS:.0f} s", "free a GPU")
        seen = ray.get(ref)
    finally:
        ray.kill(actor)
    want = "cpu" if gpus == 0 else "cuda"
    ok = seen["device"].startswith(want) or (cfg.device not in ("auto", "cuda") and gpus == 0)
    detail = (
        f"CUDA_VISIBLE_DEVICES={seen['visible']}, Ray GPU ids {seen['ray_gpu_ids']}, torch sees "
        f"{seen['torch_gpus']}, runs on {seen['device']}"
    )
    return Check(
        f"actor with {gpus:g} GPU", ok, detail, "install a CUDA torch on this node, or set its gpus_per_* to 0"
    )


def _auth() -> Check:
    """Ray's auth mode and where its token comes from (never the token itself), once connected."""
    mode = os.environ.get("RAY_AUTH_MODE", "Ray's default")
    if os.environ.get("RAY_AUTH_TOKEN"):
        source = "RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        source = "RAY_AUTH_TOKEN_PATH"
    else:
        source = "~/.ray/auth_token" if (Path.home() / ".ray" / "auth_token").exists() else "none"
    return Check("ray auth", True, f"mode {mode}, token from {source}")


def _store(cfg: DictConfig) -> list[Check]:
    from tsgd_ray.tracking.runs import check_store, redact

    check_store(cfg)
    return [Check("tracking store", True, redact(cfg.tracking.tracking_uri))]


def _connect(cfg: DictConfig) -> list[Check]:
    from tsgd_ray.runtime.cluster import init_ray

    init_ray(cfg)
    return [_auth()]


def _on_node(cfg: DictConfig, node: dict, ref) -> list[Check]:
    """The node's own checks (`ref`), its Ray against this client's, and its actors' GPU view."""
    import ray

    checks = _guard("node", "", lambda: ray.get(ref))
    theirs = next((c.detail for c in checks if c.name == "ray"), ray.__version__)
    if theirs != ray.__version__:
        fix = f"pip install ray=={theirs} on this client (client and cluster must match)"
        checks.append(Check("ray version", False, f"node {theirs}, this client {ray.__version__}", fix))
    if node["Resources"].get("GPU", 0) and cfg.device != "cpu":
        for gpus in (0.0, 0.5):
            name, fix = f"actor with {gpus:g} GPU", "see the node's torch line"
            checks += _guard(name, fix, lambda gpus=gpus: [_visibility(cfg, node["NodeID"], gpus)])
    return checks


def _where(node: dict) -> str:
    """A node's label in the report: its address and the start of its Ray node id."""
    return f"{node['NodeManagerAddress']}/{node['NodeID'][:8]}"


def run_doctor(cfg: DictConfig, say: Callable[[str], None] = print) -> int:
    """Every check, on every alive node (Ray started or joined as the config says); `say` gets
    each line as it is known. Returns the number of checks.

    Raises:
        DoctorError: a check failed; the message is the first failed line.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tsgd_ray.core.device import reserved_gpus
    from tsgd_ray.tracking.runs import is_local_store

    failed: list[str] = []
    count = 0

    def report(where: str, checks: list[Check]) -> None:
        nonlocal count
        for c in checks:
            count += 1
            say(c.line(where))
            if not c.ok:
                failed.append(c.line(where))

    report("driver", _guard("tracking store", "", lambda: _store(cfg)))
    report(
        "driver",
        _guard("ray auth", "check RAY_ADDRESS and the cluster's token (infra/README.md)", lambda: _connect(cfg)),
    )
    if ray.is_initialized():
        server = not is_local_store(cfg.tracking.tracking_uri)
        if not server:  # a local store: only the driver's node has it
            report("driver", _guard("tracking", "", lambda: [_tracking(cfg)]))
        work = {}
        for node in (n for n in ray.nodes() if n["Alive"]):
            gpus = reserved_gpus(cfg.device, min(1.0, node["Resources"].get("GPU", 0.0)))
            pin = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            task = ray.remote(node_checks).options(num_cpus=0, num_gpus=gpus, scheduling_strategy=pin)
            work[task.remote(cfg, gpus, node["NodeID"], server)] = node
        done, late = ray.wait(list(work), num_returns=len(work), timeout=WAIT_SECONDS)
        for ref in done:
            report(_where(work[ref]), _on_node(cfg, work[ref], ref))
        for ref in late:
            fix = "a busy or lost node: rerun when it is idle"
            report(_where(work[ref]), [Check("node", False, f"no answer in {WAIT_SECONDS:.0f} s", fix)])
    if failed:
        raise DoctorError(f"{len(failed)} of {count} checks failed; the first: {failed[0]}")
    return count
