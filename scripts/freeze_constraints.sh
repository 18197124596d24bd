#!/usr/bin/env bash
# Refresh constraints.txt from ./.venv after the test suite passed in it: the versions CI and
# scripts/setup.sh then install. torch is left out (setup.sh installs it first, TORCH_SPEC picks
# the build: CPU here, CUDA on a GPU machine), and so is wan-tune itself.
#   bash scripts/setup.sh && .venv/bin/python -m pytest -q && bash scripts/freeze_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# The versions the test suite last passed with (scripts/freeze_constraints.sh wrote this; see README)."
  echo "# pyproject.toml keeps the floors for users who pin their own."
  .venv/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|wan-tune)=='
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
