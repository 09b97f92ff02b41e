#!/usr/bin/env bash
# Issue 12 (official sampling semantics) on one GPU: the GPU tests of the CUDA-graph diffusion
# head (graph vs eager after the official-order step arithmetic and CFG formula), of VAR / HMAR
# sampling, then the sampling speed of MAR-B (head in CUDA graphs and eager, num_iter 64, B 64)
# and of HMAR-d16 (256 px, B 64), to compare with docs/benchmarks.md (13.55 img/s; 572.9 ms).
# Produces in $OUT: gpu.txt, gpu_tests.txt, mar.txt, hmar.txt.
# Takes at most 9.5 minutes (timeouts 200 + 240 + 130 s); on an H100 the tests took ~1 min, MAR-B
# sampling 2 x 5 s per variant plus capture, HMAR-d16 3 x 0.6 s plus model construction.
# Run from the repository root:
#   OUT=/tmp/out scripts/gpu/check_fidelity.sh
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
OUT=${OUT:-fidelity-out}; mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout ${TEST_T:-200} $PY -m pytest -q -m gpu -p no:cacheprovider -rP \
    tests/test_cuda_graph_sampling.py tests/test_var.py tests/test_hmar.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40
timeout ${MAR_T:-240} $PY -m maskar bench mar --batch 64 --num-iters 64 --sample-reps 2 --skip-train \
    --cuda-graph both 2>&1 | tee "$OUT/mar.txt"
timeout ${HMAR_T:-130} $PY -m maskar bench sample models=hmar-d16 cases=256x64 reps=3 2>&1 | tee "$OUT/hmar.txt"
echo "== summary"; grep -E "passed|failed" "$OUT/gpu_tests.txt" | tail -1; tail -6 "$OUT/mar.txt"; tail -4 "$OUT/hmar.txt"
