"""Shared fixtures: a loopback S3 server (moto), one small local Ray, real encoded videos.

Ray in tests: 2 CPUs, a 512 MiB object store, no dashboard, token auth off, its temp dir inside
the workspace (.cache/ray), started once per session by the first test that asks for it. Every
test has a timeout (pyproject: pytest-timeout) because an actor pool that takes every CPU
deadlocks silently.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from tsgd_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
BUCKET = "tsgd-test"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for the test instances
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto's server) with bucket `tsgd-test`; yields the endpoint URL.

    The AWS_* variables are set for the whole session (before Ray starts, so Ray workers inherit
    them), as a user would for their own S3-compatible store.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_root(s3_server, request) -> str:
    """A fresh prefix in the test bucket."""
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}-{os.urandom(3).hex()}"


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path) -> str:
    """A fresh root on the local disk, then one on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_root")


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One small local Ray for the whole session (started after the S3 variables are set). It
    declares one GPU that torch here cannot use, as a GPU node with a CPU-only torch would be."""
    import ray

    temp_dir = REPO / ".cache" / "ray"
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        object_store_memory=512 * 2**20,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        log_to_driver=False,
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def tiny_config(output_root: str | Path, *overrides: str):
    """A config for tests: small built-in dataset, small clips, output under `output_root`, on the
    CPU (a GPU test says device=auto or cuda)."""
    return load_config(
        None,
        [
            f"storage.output_root={output_root}",
            "device=cpu",
            "data.builtin.train_per_class=4",
            "data.builtin.test_per_class=2",
            "data.num_frames=8",
            "data.height=32",
            "data.width=32",
            "data.shard_target_mb=0.05",
            *overrides,
        ],
    )


def moving_square_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A real-looking test clip: a bright square moving over a noisy background, (T, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    frames = (rng.random((num_frames, height, width, 3)) * 60 + 40).astype(np.uint8)
    side = max(4, min(height, width) // 4)
    for t in range(num_frames):
        x = (t * 3) % max(1, width - side)
        frames[t, height // 3 : height // 3 + side, x : x + side] = (230, 200, 40)
    return frames


def write_video(
    path: str | Path,
    num_frames: int = 12,
    height: int = 48,
    width: int = 64,
    codec: str = "libx264",
    seed: int = 0,
    fps: int = 10,
) -> bytes:
    """Encode a real video file with PyAV (container from the extension) and return its bytes."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = moving_square_frames(num_frames, height, width, seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def upload_tree(local_root: Path, s3_uri: str) -> None:
    """Copy a local folder tree to S3 (the loopback server), as a user's bucket would hold it."""
    from tsgd_ray import storage

    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            storage.write_once(storage.join(s3_uri, path.relative_to(local_root).as_posix()), path.read_bytes())


UCF_CLASSES = ["ApplyEyeMakeup", "Archery", "HandstandPushups"]


def make_ucf101_tree(
    root: Path, groups: dict[str, list[int]] | None = None, corrupt: dict[str, bytes] | None = None
) -> dict[str, list[str]]:
    """A UCF101-layout tree of real MPEG-4 AVI files with ucfTrainTestlist/ (splits 1..3).

    `groups` maps split -> group numbers (default train g08-g10, test g01-g02); file names keep
    UCF's real case quirk (folder HandstandPushups, files v_HandStandPushups_...). `corrupt`
    maps relative paths to bytes planted as extra, listed train videos. Returns the split lists.
    """
    groups = groups or {"train": [8, 9, 10], "test": [1, 2]}
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for ci, name in enumerate(UCF_CLASSES):
        file_name = "HandStandPushups" if name == "HandstandPushups" else name
        for split, gs in groups.items():
            for g in gs:
                rel = f"{name}/v_{file_name}_g{g:02d}_c01.avi"
                write_video(root / "UCF-101" / rel, codec="mpeg4", seed=ci * 100 + g)
                lists[split].append(rel)
    for rel, data in (corrupt or {}).items():
        (root / "UCF-101" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "UCF-101" / rel).write_bytes(data)
        lists["train"].append(rel)
    ann = root / "ucfTrainTestlist"
    ann.mkdir(parents=True, exist_ok=True)
    (ann / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    label = {c: i + 1 for i, c in enumerate(UCF_CLASSES)}
    for k in (1, 2, 3):
        (ann / f"trainlist0{k}.txt").write_text("".join(f"{r} {label[r.split('/')[0]]}\n" for r in lists["train"]))
        (ann / f"testlist0{k}.txt").write_text("".join(f"{r}\n" for r in lists["test"]))
    return lists
