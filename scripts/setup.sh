#!/usr/bin/env bash
# Set up wan-tune in ./.venv on a fresh machine: torch first (so no dependency drags in a
# different build), then wan-tune with its test extra. Safe to rerun.
#   TORCH_SPEC   torch requirement to install (default torch==2.13.0; on a GPU machine pick the
#                build that matches its CUDA, e.g. TORCH_SPEC="torch==2.13.0" from the CUDA index)
#   EXTRAS       extras to install (default "test"; e.g. "test,deepspeed")
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "wan-tune needs Python >= 3.10" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${EXTRAS:-test}]"  # the versions the suite passed with
echo "wan-tune installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
