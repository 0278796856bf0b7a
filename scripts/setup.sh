#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs minillm_fast into it, editable, with the test and benchmark extras.
# torch is installed first, pinned to the CPU build 2.13.0 unless the venv already has a torch; the package is
# then built with --no-build-isolation so that setup.py compiles the C++ extension against that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q --no-build-isolation -e ".[test,bench]"
