#!/usr/bin/env bash
# MASKAR_FFN_EPILOGUE (the training FFN's GELU in cuBLASLt's epilogues, maskar.nn.ffn_epilogue), one call:
#   OUT=$OUT bash scripts/gpu/ffn_epilogue_call.sh      (carry .carry/fa4a to keep it for call 2)
# Its GPU tests and the training paths' with it on, scripts/gpu/ffn_epilogue_check.py (accuracy against float64 and the launches'
# times against the unfused pair's), then the 256 px B 32 rows (HMAR-d16, VAR-d16, /graph/master)
# with it on and off, each side in its own process.
# Then, carrying .carry/fa4b: SWITCH=MASKAR_FFN_EPILOGUE PART=switch1024 bash scripts/gpu/fa4_rows.sh
set -uo pipefail
source "$(dirname "$0")/clock.sh"
prelude
[ "${SKIP_TESTS:-0}" = 1 ] || { el "GPU tests of maskar.nn.ffn_epilogue"
# the op's own tests, then the training paths' with it on (CUDA-graph step, bf16 copies, VAR, HMAR)
MASKAR_FFN_EPILOGUE=1 timeout $(cap 220) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs \
  tests/test_ffn_epilogue.py tests/test_train_cuda_graph.py tests/test_master_weights.py tests/test_hmar.py \
  tests/test_var.py > "$OUT/ffe-gpu-tests.txt" 2>&1
echo "rc=$?"; grep -E "Error|assert|passed|failed" "$OUT/ffe-gpu-tests.txt" | head -n 12 | cut -c1-300; }
el "ffn_epilogue_check.py"
(cd scripts/gpu && timeout $(cap 90) python3 ffn_epilogue_check.py) > "$OUT/ffe-check.jsonl" 2>&1
echo "rc=$?"; cut -c1-600 "$OUT/ffe-check.jsonl" | tail -n 8
# rows: on (1: DGELU, then torch's column sum for fc1's bias), on with the sum in fc1's transposed
# weight-gradient matmul (1t: BGRADA), on with it as a ones column of that matmul (1o), off (0)
for a in ${ROWS-1 1t 1o 0}; do  # ROWS="": none
  el "train_step 256 px B 32, MASKAR_FFN_EPILOGUE=$a"
  MASKAR_FFN_EPILOGUE=${a:0:1} timeout $(cap 120) python3 -c "import sys; import maskar.nn.ffn_epilogue as f
f.BIAS_GRAD = {'1t': 'wgrad_t', '1o': 'ones'}.get('$a', 'sum')
from maskar.cli import main
sys.exit(main(sys.argv[1:]))" bench train_step res=256 steps=25 warmup=5 \
    rows=hmar/d16/blocks/graph/master,var/d16/blocks/graph/master json="$OUT/ffe-256-$a.json" \
    > "$OUT/ffe-256-$a.txt" 2>&1
  echo "rc=$?"; grep -E "^(hmar|var)-|rror" "$OUT/ffe-256-$a.txt" | cut -c1-230 | tail -n 3
done
el done
pack_out "$OUT"
