"""quality.py --teacher: the benchmark scores sets against a teacher trained elsewhere (a GPU run,
the pipeline) instead of training its own, and refuses one that does not fit in one line; --device
refuses a device this torch cannot use, in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO

from tsgd_ray.core.models import build_model, checkpoint_bytes
from tsgd_ray.data.builtin import CLASSES

pytestmark = pytest.mark.timeout(300)
SMALL = ["data.builtin.train_per_class=4", "data.builtin.val_per_class=2", "data.builtin.test_per_class=2"]


def _quality(tmp_path, teacher, *overrides: str) -> subprocess.CompletedProcess:
    args = ["--ipc", "1", "--draws", "0", "--seeds", "0", "--regimes", "hard", "--methods", "random_real"]
    args += ["--steps", "1", "--no-full", "--threads", "1", "--teacher", str(teacher)]
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), *args, *SMALL, *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_an_imported_teacher_is_used_and_one_that_does_not_fit_is_refused(tmp_path):
    teacher = tmp_path / "teacher.pt"
    model = build_model("mini_c3d", len(CLASSES), (8, 32, 32), 8, 2)
    teacher.write_bytes(checkpoint_bytes(model, sorted(CLASSES)))  # the catalog's class order
    out = _quality(tmp_path, teacher, "teacher.width=8", "teacher.depth=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"Teacher mini_c3d width 8, imported from {teacher}." in out.stdout
    refused = _quality(tmp_path, teacher)  # the benchmark's own teacher is width 16
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip().splitlines()[-1]]
    assert "quality.py: error: checkpoint does not fit the model" in refused.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees CUDA: the refusal is for machines without it")
def test_a_device_this_torch_cannot_use_is_refused_in_one_line(tmp_path):
    for device, said in (("cuda", "sees no CUDA device here"), ("tpu7", "cpu, cuda or cuda:N, got 'tpu7'")):
        out = subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--device", device],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
        assert out.stderr.startswith("quality.py: error: --device") and said in out.stderr
