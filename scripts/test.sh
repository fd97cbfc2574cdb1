#!/usr/bin/env bash
# Installs lavae_fast (C++ extension included) and runs the whole default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# `pytest` (not `python -m pytest`) so that the installed package, with its compiled extension,
# is what gets imported rather than the source folder.
pytest "$@"
