#!/usr/bin/env bash
# MAR-B and CASMAR-B sampling speed on one GPU (issue 15; docs/benchmarks.md, *MAR and CASMAR
# sampling*): GPU equality of the CUDA-graph and eager heads, then `maskar bench casmar` (CASMAR-B,
# README eval settings, B 64: graphs / eager / graphs + torch.compile, token comparisons, a profile)
# and `maskar bench mar` (MAR-B num_iter 64 and 256, B 64, cfg 2.9: graphs / graphs + compile, a
# profile of num_iter 64), and last the targets table.
# Produces in $OUT: gpu_tests.txt, casmar.txt, casmar.json, mar.txt, mar.json, targets.txt.
# Takes at most 7.9 minutes (timeouts 75 + 200 + 190 s); expected ~6: each compiled variant pays
# its torch.compile once (~1 min), CASMAR-B calls take ~6-16 s, MAR-B 3-12 s.
# Run from the repository root: OUT=/tmp/out scripts/gpu/bench_masked_sampling.sh
# CPU smoke test of the script itself (tiny presets, dynamo's eager backend; the GPU tests skip):
#   A="--device cpu --batch 2 --compile-backend eager"; OUT=/tmp/o PY=python CASMAR_ARGS="$A --preset casmar-tiny" \
#   MAR_ARGS="$A --preset mar-tiny --num-iters 4,8" scripts/gpu/bench_masked_sampling.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PY:-python3}
KEEP='^(sample |  tokens|\||profile|\(|top kernels|FLOPs|command|device|model|Traceback|[A-Za-z]*Error| +[0-9])'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
el "GPU tests: graph vs eager (DiT head, tiny CASMAR / MAR, the MLP head at 128 rows)"
timeout ${TEST_T:-75} $PY -m pytest -q -rP -m gpu -p no:cacheprovider tests/test_graphed_chain.py \
  tests/test_cuda_graph_sampling.py -k "not test_gpu_graph_equals_eager or [128" > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?"; grep -E "rel max|passed|failed|Error" "$OUT/gpu_tests.txt" | tail -n 14
el "bench casmar"
timeout ${CASMAR_T:-200} $PY -m maskar bench casmar --batch 64 --cuda-graph both --compile both \
  --sample-reps 2 --eager-reps 1 --profile --json "$OUT/casmar.json" ${CASMAR_ARGS:-} > "$OUT/casmar.txt" 2>&1
echo "casmar rc=$?"; grep -E "$KEEP" "$OUT/casmar.txt" | tail -n 48
el "bench mar"
timeout ${MAR_T:-190} $PY -m maskar bench mar --batch 64 --num-iters 64,256 --cuda-graph on --compile both \
  --sample-reps 1 --train-batch 0 --profile --json "$OUT/mar.json" ${MAR_ARGS:-} > "$OUT/mar.txt" 2>&1
echo "mar rc=$?"; grep -E "$KEEP" "$OUT/mar.txt" | tail -n 42
el "targets"
$PY -m maskar bench masked_sampling "$OUT/casmar.json" "$OUT/mar.json" | tee "$OUT/targets.txt"
el "done"
