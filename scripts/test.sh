#!/usr/bin/env bash
# Set up, fill the real-footage cache (tests that need it skip if that fails), run the tests: CI's
# tier by default, the full tier with --all (any other arguments go to pytest).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh || exit 1
.venv/bin/python scripts/fetch_footage.py || echo "footage cache incomplete: the footage tests will skip"
.venv/bin/ruff check . && .venv/bin/ruff format --check . || { echo "ruff: fix the above (ruff check --fix . && ruff format .)"; exit 1; }
# --maxfail: a broken environment ends the run with its tracebacks, not at CI's time limit
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 --maxfail=20 "$@"
