#!/usr/bin/env bash
# Issue 16, the fused PSA (2D neighbourhood attention) kernel, on one H200, in one call:
#   1. the GPU tests of maskar.kernels.neighborhood (out, dq, dk, dv vs float64 unfold / NATTEN
#      loop / SDPA + bias references at real sizes, every autotune candidate, auto dispatch,
#      CUDA-graph replay, the CASMAR DiT block under bf16 autocast) -> $OUT/gpu_tests.txt
#   2. benchmarks/psa.py, bf16, H 16, D 64: grids 16x16 B64, 32x32 B16, 64x64 B4, 128x128 B1;
#      windows k 7 dil 1 and k 13 dil 2; methods triton (the kernel), sdpa_bias, flex, unfold,
#      dense_nomask; fwd and fwd+bwd medians, peak extra memory, HBM/FLOP floor, the kernel's
#      compile + autotune time -> $OUT/psa.txt (log, tables, summary), $OUT/psa.json (rows)
# Expected: about 3-4 minutes (tests ~70-120 s, most of it Triton compiles; bench ~2 min, most of it
# FlexAttention compiles). Each stage has its own timeout. Ends with the summary table.
# WINDOWS, CASES, METHODS (benchmarks/psa.py's --windows, --cases, --methods) narrow the bench, e.g.
#   WINDOWS=7:1 CASES=16x16:64:16,64x64:4:16 METHODS=triton,sdpa_bias,dense_nomask (under a minute).
# MASKAR_PSA_WHOLE=1 lets the tuner time the whole-sub-grid backward too (not yet run on a GPU; the
# GPU tests' every-candidate test checks it either way). Next check of it, ~2.5 min:
#   MASKAR_PSA_WHOLE=1 WINDOWS=7:1,13:2 CASES=16x16:64:16,32x32:16:16,64x64:4:16 \
#     METHODS=triton,sdpa_bias,dense_nomask OUT=$OUT bash scripts/gpu/bench_psa.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

el "gpu tests (tests/test_neighborhood_kernel.py -m gpu)"
timeout "${TEST_T:-240}" python3 -m pytest -q -rf -m gpu -p no:cacheprovider --durations=5 \
  tests/test_neighborhood_kernel.py > "$OUT/gpu_tests.txt" 2>&1
echo "tests exit code $?"
grep -E "^(FAILED|ERROR)|passed|failed|^[0-9.]+s (call|setup)" "$OUT/gpu_tests.txt" | tail -n 20

el "bench (benchmarks/psa.py)"
timeout "${BENCH_T:-240}" python3 benchmarks/psa.py --dtypes bf16 --windows "${WINDOWS:-7:1,13:2}" \
  --cases "${CASES:-16x16:64:16,32x32:16:16,64x64:4:16,128x128:1:16}" ${METHODS:+--methods "$METHODS"} \
  --json "$OUT/psa.json" > "$OUT/psa.txt" 2>&1
echo "bench exit code $?"
# the tables, the kernel's autotuning report and the summary (everything after the per-row log)
sed -n '/^PSA k=/,$p' "$OUT/psa.txt"
el "done"
