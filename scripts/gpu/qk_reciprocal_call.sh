#!/usr/bin/env bash
# MASKAR_QK_RECIPROCAL (the q/k norm's backward: one reciprocal a row instead of IEEE divisions;
# 132.7 against 154.0 us at HMAR-d16's 1024 px B 2 on an H100, 2026-12-07 sixth session), one call:
#   OUT=$OUT bash scripts/gpu/qk_reciprocal_call.sh      (carry .carry/fa4a to keep it for call 2)
# The GPU tests of the q/k norm and the VAR / HMAR training paths with it on, then the 256 px B 32
# rows (HMAR-d16, VAR-d16, /graph/master) with it on and off, each side in its own process.
# Then, carrying .carry/fa4b: SWITCH=MASKAR_QK_RECIPROCAL PART=switch1024 bash scripts/gpu/fa4_rows.sh
set -uo pipefail
source "$(dirname "$0")/clock.sh"
prelude
el "GPU tests, MASKAR_QK_RECIPROCAL=1"
MASKAR_QK_RECIPROCAL=1 timeout $(cap 200) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs \
  tests/test_qk_norm_kernel.py tests/test_train_cuda_graph.py tests/test_hmar.py tests/test_var.py \
  > "$OUT/qkr-gpu-tests.txt" 2>&1
echo "rc=$?"; tail -n 3 "$OUT/qkr-gpu-tests.txt" | cut -c1-300
switch_rows256 MASKAR_QK_RECIPROCAL qkr 120 1 0
el done
