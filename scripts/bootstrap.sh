#!/usr/bin/env bash
# Create .venv and install tsgd-ray with its test extra. Idempotent; run from the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.13.0, the CPU build (scripts/constraints.txt pins the version): where pip would fetch a
# CUDA build of it (PyPI's on Linux x86_64, several GB of nvidia-* packages), it comes from
# PyTorch's CPU wheel index instead (TSGD_TORCH_INDEX overrides that index).
if [ "$(.venv/bin/python scripts/torch_build.py)" = cuda ]; then
    echo "bootstrap: the CPU build of torch, from ${TSGD_TORCH_INDEX:=https://download.pytorch.org/whl/cpu}"
    .venv/bin/python -m pip install -q -c scripts/constraints.txt --index-url "$TSGD_TORCH_INDEX" torch
else
    .venv/bin/python -m pip install -q -c scripts/constraints.txt torch
fi
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[test]"
