#!/usr/bin/env bash
# Where CASMAR-B and MAR-B sampling time goes (issue 15), before optimising: one call of ~7 min.
#   1. `maskar bench casmar_parts`: a DiT-head step eager / PSA via SDPA / compiled, block pieces,
#      one 250-step chain with and without its CUDA graph, one MLP-head step, stage 1 and stage 2
#   2. `maskar bench casmar`: graphs (warm-up + 1 timed call), the profile of one graphed call, then
#      graphs + torch.compile (1 timed call)
#   3. `maskar bench mar` num_iter 64: graphs, profile, graphs + torch.compile
#   4. the fused GroupNorm's GPU tests (their torch-bound check was fixed after the last GPU run)
# Run from the repository root: OUT=/tmp/out bash scripts/gpu/profile_masked.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
el "casmar_parts"
timeout ${PARTS_T:-150} $PY -m maskar bench casmar_parts --json "$OUT/casmar_parts.json" ${PARTS_ARGS:-} \
  2>&1 | tee "$OUT/casmar_parts.txt" | grep -v Warning
el "bench casmar: graphs, profile, graphs+compiled"
timeout ${CASMAR_T:-240} $PY -m maskar bench casmar --batch 64 --cuda-graph on --compile both \
  --sample-reps 1 --profile --json "$OUT/casmar.json" ${CASMAR_ARGS:-} > "$OUT/casmar.txt" 2>&1
echo "casmar rc=$?"; grep -vE "Warning|warn" "$OUT/casmar.txt" | tail -n 60
el "bench mar: num_iter 64, graphs, profile, graphs+compiled"
timeout ${MAR_T:-120} $PY -m maskar bench mar --batch 64 --num-iters 64 --cuda-graph on --compile both \
  --sample-reps 1 --train-batch 0 --profile --json "$OUT/mar.json" ${MAR_ARGS:-} > "$OUT/mar.txt" 2>&1
echo "mar rc=$?"; grep -vE "Warning|warn" "$OUT/mar.txt" | tail -n 45
el "group norm GPU tests"
timeout ${GN_T:-60} $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_group_norm_kernel.py > "$OUT/gn_tests.txt" 2>&1
echo "gn tests rc=$?"; tail -n 5 "$OUT/gn_tests.txt"
el "done"
