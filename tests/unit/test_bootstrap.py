"""scripts/torch_build.py, which tells scripts/bootstrap.sh whether pip would fetch torch's CUDA
build, on pip's own reports of real resolutions on this machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import torch_build  # noqa: E402


def _report(requirement: str) -> dict:
    try:
        return torch_build.resolve(requirement, None, "--ignore-installed")
    except subprocess.CalledProcessError:
        pytest.skip(f"pip cannot resolve {requirement} from the indexes this machine reaches")


def test_the_pinned_torch_resolves_to_the_cpu_build_here_and_a_newer_one_to_cuda():
    assert torch_build.build_of(_report("torch==2.13.0")) == "cpu"  # the CPU wheel this machine carries
    assert torch_build.build_of(_report("torch==2.14.1")) == "cuda"  # PyPI's Linux build: nvidia-* beside it
    assert torch_build.build_of({"install": []}) == "none"  # installed already: nothing to fetch


def test_the_bootstrap_asks_before_it_installs_torch():
    script = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert "scripts/torch_build.py" in script and script.index("torch_build.py") < script.index('-e ".[test]"')
