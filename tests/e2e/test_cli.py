"""The program at its edges: installed, found from any directory, and every user error one line
with exit code 2 wherever it was raised (driver, Ray task, actor, Ray Train worker)."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO

import tsgd_ray
from tsgd_ray.cli import run_command
from tsgd_ray.config import ConfigError, config_names, to_yaml
from tsgd_ray.errors import UserError, find_user_error

TSGD_RAY = Path(sys.executable).with_name("tsgd-ray")
# Raised and handled inside the project, never shown to a user as such.
INTERNAL_ERRORS = {"VideoDecodeError"}  # a bad video: skipped and counted


def test_the_installed_program_finds_shipped_configs_from_any_directory(tmp_path):
    assert config_names() == ["default", "hmdb51", "kinetics400", "ssv2", "ucf101"]
    for argv in ([str(TSGD_RAY), "config", "kinetics400"], [sys.executable, "-m", "tsgd_ray", "config", "ucf101"]):
        out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "dataset:" in out.stdout
    out = subprocess.run([str(TSGD_RAY), "config", "nosuch"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "tsgd-ray config: error: config file not found: nosuch (not a file, nor a shipped "
        "config: default, hmdb51, kinetics400, ssv2, ucf101)"
    )


def test_version_is_the_installed_distributions():
    out = subprocess.run([str(TSGD_RAY), "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"tsgd-ray {metadata.version('tsgd-ray')}" == f"tsgd-ray {tsgd_ray.__version__}"


def test_the_package_installs_no_top_level_module_but_its_own():
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = setuptools["packages"]
    assert packages and {p.split(".")[0] for p in packages} == {"tsgd_ray"}, packages
    on_disk = {".".join(p.relative_to(REPO).parts[:-1]) for p in (REPO / "tsgd_ray").rglob("__init__.py")}
    assert on_disk <= set(packages), on_disk - set(packages)  # a new subpackage must be listed
    assert setuptools["package-dir"]["tsgd_ray.configs"] == "configs"  # the shipped configs travel with it
    assert setuptools["package-data"]["tsgd_ray.configs"] == ["*.yaml"]


def test_the_installed_torch_is_the_one_the_readme_promises():
    """scripts/bootstrap.sh pins torch through scripts/constraints.txt; README names the same build."""
    import torch

    pinned = [
        line.split("==")[1].strip()
        for line in (REPO / "scripts" / "constraints.txt").read_text().splitlines()
        if line.startswith("torch==")
    ]
    assert pinned and torch.__version__.split("+")[0] == pinned[0]
    assert f"torch=={pinned[0]}" in (REPO / "README.md").read_text()
    if not torch.cuda.is_available():  # this kind of machine: the CPU build, no CUDA wheels pulled in
        assert torch.version.cuda is None
        assert not [d for d in metadata.distributions() if (d.metadata["Name"] or "").startswith("nvidia-")]


def _project_exceptions() -> list[type]:
    found = {}
    for info in pkgutil.walk_packages(tsgd_ray.__path__, "tsgd_ray."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("tsgd_ray."):
                found[obj.__qualname__] = obj
    return sorted(found.values(), key=lambda c: c.__qualname__)


def test_every_project_error_is_a_user_error_or_internal():
    errors = _project_exceptions()
    assert len(errors) >= 12
    for error in errors:
        assert issubclass(error, UserError) or error.__name__ in INTERNAL_ERRORS, error


def test_a_missing_file_is_a_user_error_and_still_a_file_not_found(tmp_path):
    from tsgd_ray import storage

    with pytest.raises(FileNotFoundError) as caught:
        storage.read_bytes(str(tmp_path / "teacher.pt"))
    assert isinstance(caught.value, UserError) and str(caught.value) == f"no such file: {tmp_path / 'teacher.pt'}"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_user_error_raised_anywhere_in_ray_is_found_as_the_original(ray_session, tmp_path):
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def _raise(message: str):  # defined here: test modules do not import on Ray workers
        raise ConfigError(message)

    class _Raiser:
        def fail(self, message: str):
            _raise(message)

    def _train_loop(config: dict):
        _raise(config["message"])

    def origin_task():
        ray.get(ray.remote(_raise).options(num_cpus=0.1).remote("task: bad key"))

    def origin_actor():
        actor = ray.remote(_Raiser).options(num_cpus=0.1).remote()
        ray.get(actor.fail.remote("actor: bad key"))

    def origin_train_worker():
        TorchTrainer(
            _train_loop,
            train_loop_config={"message": "train worker: bad key"},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="fails", storage_path=str(tmp_path)),
        ).fit()

    for origin, message in (
        (origin_task, "task: bad key"),
        (origin_actor, "actor: bad key"),
        (origin_train_worker, "train worker: bad key"),
    ):
        with pytest.raises(Exception) as caught:
            origin()
        found = find_user_error(caught.value)
        assert type(found) is ConfigError and str(found) == message, (origin.__name__, caught.value)
    assert find_user_error(RuntimeError("a bug")) is None


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_user_errors_of_the_stages_end_as_one_line_and_exit_code_2(prepared, tmp_path, capsys):
    from support.stage_helpers import imported_config, teacher_file

    from tsgd_ray import layout

    cfg = imported_config(tmp_path / "out", teacher_file(tmp_path / "teacher"))
    prepared(cfg)
    path = tmp_path / "tiny.yaml"
    path.write_text(to_yaml(cfg))
    missing = tmp_path / "missing.pt"
    cases = [  # (command, overrides, the message's start): driver, actor set-up, Ray Train worker
        ("stats", [], f"no teacher output at {layout.of(cfg).teacher_file}: run the teacher stage first"),
        ("teacher", [f"teacher.checkpoint={missing}"], f"no such file: {missing}"),
        ("teacher", [], ""),  # imports the checkpoint: the stages below have their teacher
        ("distill", [], f"no stats output at {layout.of(cfg).stats}/"),
        ("stats", [], ""),
        ("init", ["distill.ipc=50"], "distill.ipc=50: these classes have fewer decodable training clips"),
        ("distill", [], f"no init output at {layout.of(cfg).stats}/init/"),
        ("evaluate", ["data.eval_split=val"], "data.eval_split: the dataset has no 'val' split"),
        ("merge", [], "every class needs exactly distill.ipc=1 videos"),  # distill planned, then stopped
    ]
    for command, overrides, start in cases:
        capsys.readouterr()
        code = run_command(command, str(path), overrides)
        err = capsys.readouterr().err.strip()
        if not start:
            assert code == 0, err
            continue
        assert code == 2, (command, err)
        assert err.splitlines()[-1].startswith(f"tsgd-ray {command}: error: {start}"), err
        assert "Traceback" not in err
        if command != "evaluate":  # evaluate's error is found in preflight, before any log file opens
            logs = (tmp_path / "out" / "logs").glob(f"{command}-*.log")
            assert "Traceback" in max(logs, key=lambda p: p.stat().st_mtime).read_text()  # the chain, kept


def test_the_log_file_of_a_run_in_object_storage_is_uploaded_at_the_end(s3_root, capsys):
    import logging

    from tsgd_ray import storage
    from tsgd_ray.console import Console, echo

    with Console(s3_root, "teacher") as console:
        logging.getLogger("tsgd_ray.test").info("the project's line")
        logging.getLogger("some.library").info("Ray's own line")  # a library logger that propagates
        print("(RayTrainWorker pid=1) a worker's line")
        print("(RayTrainWorker pid=1) [tsgd-ray] teacher: epoch 1/2, loss 1.0")
        echo("| the results |")
        assert not storage.exists(console.uri)  # written locally while the command runs
    out, err = capsys.readouterr()
    kept = storage.read_bytes(console.uri).decode()
    assert console.uri.startswith(f"{s3_root}/logs/teacher-")
    for line in ("the project's line", "Ray's own line", "a worker's line", "[tsgd-ray] teacher: epoch 1/2"):
        assert line in kept
    shown = out + err
    assert "the project's line" in shown and "[tsgd-ray] teacher: epoch 1/2" in shown and "| the results |" in out
    assert "Ray's own line" not in shown and "a worker's line" not in shown


def test_options_and_overrides_mix_in_any_order():
    from tsgd_ray.cli import parse_args

    for argv in (
        ["run", "default", "--verbose", "distill.ipc=2", "seed=3"],
        ["run", "--verbose", "default", "distill.ipc=2", "seed=3"],
    ):
        args = parse_args(argv)
        assert args.verbose and args.config == "default" and args.overrides == ["distill.ipc=2", "seed=3"]
    args = parse_args(["export", "default", "seed=3", "--to", "/tmp/x", "distill.ipc=2", "--format", "mp4"])
    assert (args.to, args.fmt, args.overrides) == ("/tmp/x", "mp4", ["seed=3", "distill.ipc=2"])
    with pytest.raises(SystemExit):
        parse_args(["run", "default", "--loud"])
    with pytest.raises(SystemExit):
        parse_args(["run", "default", "--verbose", "distill.ipc=2", "stray"])


def test_a_stream_kept_after_its_command_still_writes(tmp_path, capsys):
    """A handler made while a console was open (Ray's, bound at import) keeps its stream."""
    import sys

    from tsgd_ray.console import Console

    with Console(str(tmp_path), "prepare"):
        kept = sys.stderr
    kept.write("after the command\n")
    assert "after the command" in capsys.readouterr().err


def test_a_bug_raised_while_handling_a_user_error_stays_a_bug():
    try:
        try:
            raise ConfigError("a user's mistake")
        except ConfigError:
            raise RuntimeError("a bug in the handler")  # noqa: B904 - the implicit context is the point
    except RuntimeError as bug:
        assert find_user_error(bug) is None
    cause = ConfigError("a user's mistake")
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = cause  # raise RuntimeError(...) from cause
    assert find_user_error(wrapped) is cause


def test_a_ray_temp_dir_too_long_for_ray_sockets_is_a_user_error(tmp_path):
    """Ray puts Unix sockets (at most 107 bytes a path) deep under ray.temp_dir and fails at
    start-up past that; the run says so in one line, with exit code 2, before starting Ray."""
    long = tmp_path / ("t" * 60)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tsgd_ray",
            "run",
            "default",
            f"storage.output_root={tmp_path / 'out'}",
            f"ray.temp_dir={long}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"tsgd-ray run: error: ray.temp_dir: {long} has")
    assert "Traceback" not in out.stderr and not long.exists()
