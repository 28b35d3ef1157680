#!/usr/bin/env bash
# Create .venv in the repository and install sam-distill with its dependencies. Safe to rerun.
# --slurm: first install SLURM and munge (Debian's slurm-wlm, munge; needs root and apt-get),
# which the tests of launch/slurm/ run a one-node cluster with.
set -euo pipefail
cd "$(dirname "$0")/.."
slurm=0
for arg in "$@"; do
  case $arg in
    --slurm) slurm=1 ;;
    *) echo "usage: bash launch/setup_env.sh [--slurm]" >&2; exit 2 ;;
  esac
done
if [ "$slurm" = 1 ]; then
  missing=()
  for bin in slurmctld slurmd sbatch srun scontrol munged; do
    PATH=$PATH:/usr/sbin:/usr/local/sbin command -v "$bin" >/dev/null || missing+=("$bin")
  done
  if [ ${#missing[@]} = 0 ]; then
    echo "SLURM found: $(PATH=$PATH:/usr/sbin:/usr/local/sbin slurmctld -V)"
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
  else
    echo "--slurm: ${missing[*]} not found, and installing them needs root and apt-get." >&2
    echo "Install SLURM and munge (Debian/Ubuntu: sudo apt-get install slurm-wlm munge), then rerun." >&2
    exit 1
  fi
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch and torchvision as one matched pair from the package index: a CPU-only torch from a local
# wheel folder cannot load torchvision's compiled operators, and segment_anything imports
# torchvision. The CUDA builds run on CPU-only machines too.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.15.0" "torchvision==0.29.2"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
# samexporter's runtime (SegmentAnythingONNX, what AnyLabeling and X-AnyLabeling run) for the
# annotation-tool tests. Its wheel pins torch, onnx and opencv to exact older releases that would
# replace ours, and its runtime needs only numpy, opencv, pillow and onnxruntime: no dependencies.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "samexporter==0.5.0"
.venv/bin/python -c "import torch, torchvision, segment_anything, deepspeed, webdataset, lvis; \
print(f'sam-distill environment ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 \
  | grep -v "Setting accelerator to CPU"
