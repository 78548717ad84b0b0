"""The wheel a regular (non-editable) install uses: every package of the tree, the shipped configs
inside it, and `tsgd-ray config default` from another directory with only the wheel's files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.timeout(300)
def test_the_wheel_holds_every_module_and_config_and_runs_from_anywhere(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("tsgd_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(REPO)) for p in (REPO / "tsgd_ray").rglob("*.py")}
    assert sources - names == set()  # a package missing from pyproject's list would be left out
    configs = {f"tsgd_ray/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert configs and configs <= names
    assert "tsgd_ray/calibration.json" in names  # the plan's measured rates
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the wheel's files, not the checkout's
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tsgd_ray.cli; print(tsgd_ray.cli.__file__); sys.exit(tsgd_ray.cli.main(['config', 'default']))",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(str(site)) and "num_frames: 8" in out.stdout
