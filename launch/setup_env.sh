#!/usr/bin/env bash
# Create .venv in the repository and install sam-distill with its dependencies. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch and torchvision as one matched pair from the package index: a CPU-only torch from a local
# wheel folder cannot load torchvision's compiled operators, and segment_anything imports
# torchvision. The CUDA builds run on CPU-only machines too.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.15.0" "torchvision==0.29.2"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
.venv/bin/python -c "import torch, torchvision, segment_anything, deepspeed, webdataset, lvis; \
print(f'sam-distill environment ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 \
  | grep -v "Setting accelerator to CPU"
