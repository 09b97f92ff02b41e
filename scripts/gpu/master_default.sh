#!/usr/bin/env bash
# train.master_weights=auto (on with the graphed bf16 step) and its block-sum clipping norm on a GPU,
# in one device call (about 8 min, DEADLINE=560); what `auto` as the default needs to have run:
#   OUT=$OUT bash scripts/gpu/master_default.sh
# 1. the GPU tests of the copies (the one-pass norm; compile false / blocks / full; HMAR stage 2;
#    resume with and without them) and of the graphed step (tests/test_master_weights.py,
#    tests/test_train_cuda_graph.py);
# 2. `maskar bench train_step` HMAR-d16 at 1024 px B 2 (`scales`), /graph against /graph/master in
#    one process, profiled (the optimizer's and the norm's kernels); 256 px B 32 HMAR and VAR pairs;
#    VAR-d16 1024 px pair. Stages in order of need, so a shorter DEADLINE cuts the last ones.
# Writes $OUT/md-*.txt / .json (8 files: what a device call returns).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/clock.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
el "GPU tests: master weights, the graphed step"
timeout $(cap 240) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs -s tests/test_master_weights.py \
  tests/test_train_cuda_graph.py > "$OUT/md-gpu-tests.txt" 2>&1
echo "rc=$?"; grep -E "rel max|passed|failed|FAILED|ERROR|Error" "$OUT/md-gpu-tests.txt" | cut -c1-200 | tail -n 16
PREFIX=md; source "$(dirname "$0")/train_bench.sh"
H=hmar/d16/blocks/graph; V=var/d16/blocks/graph
bench 1024 1024 20 3 "$H/attn-scales,$H/master/attn-scales" "profile=$OUT/md-1024-profile.txt"
if [ -f "$OUT/md-1024-profile.txt" ]; then
  grep -E "^(==|class|matmul|attention|other|norms|optimizer|cross|idle)|_sum_squares|_adamw_master|NormTwo|LpNorm" \
    "$OUT/md-1024-profile.txt" | cut -c1-160 | head -n 30
fi
bench 256 256 25 5 "$H,$H/master,$V,$V/master"
bench 1024-var 1024 20 3 "$V/attn-scales,$V/master/attn-scales"
el done
