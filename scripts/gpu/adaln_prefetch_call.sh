#!/usr/bin/env bash
# MASKAR_ADALN_PREFETCH (the adaln backward kernels' loads one row tile ahead), one call:
#   OUT=$OUT bash scripts/gpu/adaln_prefetch_call.sh      (carry .carry/fa4a to keep it for call 2)
# The GPU tests of the adaln kernels with it on, with the FFN epilogue's and the CUDA-graph step's
# (MASKAR_FFN_EPILOGUE's fallback count fixed since its last run; SKIP_TESTS=1 skips them); then
# scripts/gpu/adaln_prefetch_sweep.py (same bits with and without; each launch config timed both ways).
# then (ROWS=1, the default) the 256 px B 32 rows (HMAR-d16, VAR-d16, /graph/master) with it on and
# off, each side in its own process (no FlashAttention-4 needed).
# Then, carrying .carry/fa4b: SWITCH=MASKAR_ADALN_PREFETCH PART=switch1024 bash scripts/gpu/fa4_rows.sh
set -uo pipefail
DEADLINE=${DEADLINE:-450}
source "$(dirname "$0")/clock.sh"
prelude
[ "${SKIP_TESTS:-0}" = 1 ] || { el "GPU tests with MASKAR_ADALN_PREFETCH=1"
MASKAR_ADALN_PREFETCH=1 timeout $(cap 170) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs \
  tests/test_adaln_norm_kernel.py tests/test_ffn_epilogue.py tests/test_train_cuda_graph.py \
  > "$OUT/apf-gpu-tests.txt" 2>&1
echo "rc=$?"; grep -E "Error|assert|passed|failed" "$OUT/apf-gpu-tests.txt" | head -n 12 | cut -c1-300; }
el "adaln_prefetch_sweep.py"
(cd scripts/gpu && APF_SHAPES=${APF_SHAPES:-} timeout $(cap 150) python3 adaln_prefetch_sweep.py) > "$OUT/apf-sweep.jsonl" 2>&1
echo "rc=$?"; grep -E "^BEST|same_bits\": false|rror" "$OUT/apf-sweep.jsonl" | cut -c1-300
[ "${ROWS:-1}" = 1 ] && switch_rows256 MASKAR_ADALN_PREFETCH apf 110 1 0
el done
pack_out "$OUT"
