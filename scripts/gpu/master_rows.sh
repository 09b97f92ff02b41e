#!/usr/bin/env bash
# train.master_weights (bf16 working copies of the linears, fp32 masters written by one AdamW pass;
# maskar/train/master_weights.py) on a GPU, in one device call (about 8 min, DEADLINE=570):
#   OUT=$OUT bash scripts/gpu/master_rows.sh
# 1. its GPU tests (the AdamW kernel against its torch reference; 8 graphed training steps of a
#    tiny HMAR with and without the copies, compile false and blocks), and the launch-flag check of
#    every kernel module (tests/test_*kernel*.py and friends, -k "launched or compile or cubin");
# 2. `maskar bench train_step` HMAR-d16 and VAR-d16 at 1024 px B 2 (`scales` attention: FA4 needs
#    its bundle) and 256 px B 32, the step as one CUDA graph without and with /master, the two
#    rows of a pair in one process and then again in a second process in the other order (the
#    spread between processes is about 1 ms; see docs/benchmarks.md, Run 11). The first 1024 px
#    process is profiled (kernel time by class: what the optimizer and the casts take each way).
#    Stages run in order of need (HMAR 1024, VAR 1024, 256 px, the kernels' launch check, HMAR
#    1024 reversed) so a shorter DEADLINE cuts the last ones.
# Writes $OUT/master-*.txt / .json.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/clock.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
el "GPU tests: master weights; kernels as launched"
# QUICK=1 (a short call): the compiled-blocks trainer case is left out
timeout $(cap 200) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_master_weights.py \
  $([ -n "${QUICK:-}" ] && echo "-k not blocks") > "$OUT/master-gpu-tests.txt" 2>&1
echo "rc=$?"; grep -E "copies vs|passed|failed|FAILED|ERROR" "$OUT/master-gpu-tests.txt" | tail -n 8
PREFIX=master; source "$(dirname "$0")/train_bench.sh"
H=hmar/d16/blocks/graph; V=var/d16/blocks/graph
# in order of need: a stage the deadline reaches last is the one cut
bench 1024-a 1024 20 3 "$H/attn-scales,$H/master/attn-scales" "profile=$OUT/master-1024-a-profile.txt"
if [ -f "$OUT/master-1024-a-profile.txt" ]; then
  grep -E "^(==|class|matmul|attention|other|norms|optimizer|cross|idle)" "$OUT/master-1024-a-profile.txt" | head -n 24
fi
bench 1024-var 1024 20 3 "$V/attn-scales,$V/master/attn-scales,$V/attn-scales"
bench 256 256 25 5 "$H,$H/master,$V,$V/master"
el "kernels as launched (the launch flag; Triton on this GPU)"
timeout $(cap 120) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_kernels.py \
  tests/test_categorical_kernel.py tests/test_qk_norm_kernel.py tests/test_gelu_bias_kernel.py \
  tests/test_softmax_rows.py > "$OUT/master-kernel-tests.txt" 2>&1
echo "rc=$?"; tail -n 3 "$OUT/master-kernel-tests.txt"
bench 1024-b 1024 20 3 "$H/master/attn-scales,$H/attn-scales"
el done
