"""Shared fixtures: a loopback S3 server (moto), one small local Ray, real encoded videos.

Ray in tests: 2 CPUs, a 512 MiB object store, no dashboard, token auth off, Ray Train's health
check polled as production polls it, its temp dir inside the workspace (.cache/ray), started once
per session by the first test that asks for it. Every test has a timeout (pyproject:
pytest-timeout) because an actor pool that takes every CPU deadlocks silently.

Two tiers: CI's (the default) and the full one (`--all`, or `bash scripts/test.sh --all`), which
adds the tests marked `full`. The built-in videos of `tiny_config` are generated once per session
(a shared cache root), not once per test.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from tsgd_ray import methods
from tsgd_ray.config import Method, load_config

REPO = Path(__file__).resolve().parents[1]
BUCKET = "tsgd-test"

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for the test instances
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", default=False, help="the full tier: also the tests marked full")


def pytest_collection_modifyitems(config, items):
    """CI's tier leaves out the tests marked `full` (deselected, so they are not counted as skipped)."""
    if config.getoption("--all"):
        return
    left_out = [item for item in items if item.get_closest_marker("full")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


#: the built-in videos of every `tiny_config`, generated once per session (set by `_shared_videos`)
SHARED = {"cache_root": ""}


@pytest.fixture(scope="session", autouse=True)
def _shared_videos(tmp_path_factory):
    SHARED["cache_root"] = str(tmp_path_factory.mktemp("videos"))
    yield
    SHARED["cache_root"] = ""


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

    from tsgd_ray.runtime.cluster import TRAIN_POLL

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
        runtime_env={"env_vars": dict([TRAIN_POLL])},  # as `init_ray` sets it for a local Ray
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared(ray_session, tmp_path_factory):
    """`prepared(cfg)` gives cfg's output root a copy of a prepared root for its data settings and
    seed (shards, and the clip caches of the training and evaluation splits), prepared once per
    session: for the tests that only need prepared data (prepare's and the clip cache's own tests
    prepare from scratch)."""
    import json
    import shutil

    from omegaconf import OmegaConf

    from tsgd_ray import storage
    from tsgd_ray.config import to_dict
    from tsgd_ray.data.shards import shards_root
    from tsgd_ray.stages.prepare import decode_once, run_prepare

    roots: dict[str, Path] = {}

    def copy(cfg) -> None:
        out = Path(storage.absolute(cfg.storage.output_root))
        assert shards_root(cfg) == str(out / "shards"), "prepared() copies shards under the output root"
        data = {k: v for k, v in to_dict(cfg)["data"].items() if k != "shards"}
        key = json.dumps({"seed": cfg.seed, "data": data}, sort_keys=True)
        if key not in roots:
            root = tmp_path_factory.mktemp("prepared")
            source = OmegaConf.merge(
                cfg, {"storage": {"output_root": str(root)}, "data": {"shards": str(root / "shards")}}
            )
            run_prepare(source)
            decode_once(source)
            roots[key] = root
        for part in ("shards", "clips"):
            shutil.copytree(roots[key] / part, out / part, dirs_exist_ok=True)

    return copy


#: the shared finished run's settings (`finished_run`): a small built-in set, every stage in seconds,
#: every registered method (tsgd and the others as its baselines)
SMALL_RUN = (
    "data.builtin.train_per_class=8",  # packed_real at IPC 2 draws 8 per class
    "data.builtin.test_per_class=2",
    "data.num_frames=8",
    "data.height=32",
    "data.width=32",
    "teacher.epochs=2",
    "teacher.width=8",
    "teacher.depth=2",
    "distill.ipc=2",
    "distill.iterations=20",
    "evaluate.epochs=2",
    "evaluate.seeds=[0,1]",
    "evaluate.draws=1",  # one init draw (the default config's three: tests/stages/test_methods.py)
    f"evaluate.baselines=[{','.join(m.value for m in methods.registered() if m != Method.tsgd)}]",
)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """`tsgd-ray run default SMALL_RUN...` as a user starts it (a fresh process with its own local
    Ray), then the same with one key changed (tsgf.enabled=false) in the same output root, once
    per session; returns (output root, the first run's console text). Tests read it, never write
    it: one that changes it works on a copy."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("finished-run")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    env["RAY_AUTH_MODE"] = "disabled"
    consoles = []
    for changed in ([], ["tsgf.enabled=false"]):
        out = subprocess.run(
            [
                str(Path(sys.executable).with_name("tsgd-ray")),
                "run",
                "default",
                f"storage.output_root={root}",
                f"ray.temp_dir={REPO / '.cache' / f'ray-run-{os.getpid()}'}",
                *SMALL_RUN,
                *changed,
            ],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        consoles.append(out.stdout + out.stderr)
    return root, consoles[0]


def tiny_config(output_root: str | Path, *overrides: str):
    """A config for tests: small built-in dataset, small clips, output under `output_root` (the
    built-in videos in the session's shared cache root), on the CPU (a GPU test says device=auto
    or cuda)."""
    return load_config(
        None,
        [
            f"storage.output_root={output_root}",
            *([f"storage.cache_root={SHARED['cache_root']}"] if SHARED["cache_root"] else []),
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
