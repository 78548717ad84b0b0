#!/usr/bin/env bash
# Create .venv and install tsgd-ray with its test extra. Idempotent; run from the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.13.0 is the CPU build on this project's machines; a range would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q -c scripts/constraints.txt torch
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[test]"
