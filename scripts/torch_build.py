"""Which build of torch `pip install` would fetch on this machine: prints `cpu`, `cuda` or `none`.

Asks pip itself (`pip install --dry-run --report`, nothing downloaded but metadata), under
scripts/constraints.txt, so the answer is this machine's resolution: a local CPU wheel, PyPI's CUDA
build on Linux x86_64 (torch plus several GB of nvidia-* packages), or nothing to install (`none`:
torch is there already). scripts/bootstrap.sh takes the CPU build from PyTorch's CPU wheel index
when the answer is `cuda`.

    python scripts/torch_build.py [torch==VERSION]    (default: torch, as constrained)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CONSTRAINTS = Path(__file__).with_name("constraints.txt")
#: packages that only a CUDA build of torch pulls in
CUDA_PACKAGES = ("nvidia-", "cuda-", "triton")


def build_of(report: dict) -> str:
    """`cuda` when pip's install report holds a CUDA build of torch (a `+cuXYZ` local version or
    CUDA runtime packages beside it), `cpu` when it holds another torch, `none` without torch."""
    names = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report.get("install", [])}
    if "torch" not in names:
        return "none"
    if "+cu" in names["torch"] or any(name.startswith(CUDA_PACKAGES) for name in names):
        return "cuda"
    return "cpu"


def resolve(requirement: str = "torch", constraints: Path | None = CONSTRAINTS, *pip_args: str) -> dict:
    """pip's dry-run install report for `requirement` (under `constraints`), in this Python."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder, "report.json")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report)]
            + (["-c", str(constraints)] if constraints else [])
            + [*pip_args, requirement],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return json.loads(report.read_text())


if __name__ == "__main__":
    print(build_of(resolve(*sys.argv[1:2])))
