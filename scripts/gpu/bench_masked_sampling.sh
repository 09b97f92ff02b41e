#!/usr/bin/env bash
# MAR-B and CASMAR-B sampling speed on one GPU (issue 15; docs/benchmarks.md, *MAR and CASMAR
# sampling*), the figures first and the optional compiled variants last:
#   1. GPU equality of the CUDA-graph and eager heads (tests; TEST_T, default 60 s)
#   2. `maskar bench casmar` (CASMAR-B, README eval settings, B 64): graphs (1 warm-up that captures,
#      2 timed calls), eager (1 timed call, tokens compared), then the profile of one graphed call
#      (CASMAR_T, default 240 s; expected ~150: a call takes ~18 s, the warm-up ~45 s)
#   3. `maskar bench mar` (MAR-B num_iter 64 and 256, B 64, cfg 2.9, graphs; then a profile of
#      num_iter 64) (MAR_T, default 150 s; expected ~80)
#   4. the targets table
#   5. only with COMPILE=1: the graphs + torch.compile variants (CASMAR-B, then MAR-B num_iter 64),
#      each in the time left before DEADLINE (default 560 s after the start; skipped under 60 s).
# Rows reach the JSON files as they are measured, so a time limit costs only the step it stops.
# Produces in $OUT (at most 8 files): gpu_tests.txt, casmar.txt/.json, mar.txt/.json, targets.txt,
# and with COMPILE=1 casmar_compiled.json, mar_compiled.json (their consoles appended to casmar.txt /
# mar.txt). Expected ~4.5 minutes without COMPILE (hard limit 7.5), up to DEADLINE with it.
# The 2026-12-03 run (TEST_T=60 CASMAR_T=170 MAR_T=150, the old order graphs / profile / eager /
# compiled) measured the graphs rows only: both profiles started and never finished. Likely cause:
# prof.events() builds a Python event tree (20 s per 250k events on the 2-core dev CPU) and a graphed
# call runs hundreds of thousands of kernels; the bench reads the profiler's raw events since.
# Run from the repository root: OUT=/tmp/out scripts/gpu/bench_masked_sampling.sh
# CPU smoke test of the script itself (tiny presets, dynamo's eager backend; the GPU tests skip):
#   A="--device cpu --batch 2 --compile-backend eager"; OUT=/tmp/o PY=python COMPILE=1 \
#   CASMAR_ARGS="$A --preset casmar-tiny" MAR_ARGS="$A --preset mar-tiny --num-iters 4,8" \
#   scripts/gpu/bench_masked_sampling.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( T0 + ${DEADLINE:-560} - $(date +%s) )); }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PY:-python3}
KEEP='^(sample |  tokens|\||profile|\(|top kernels|FLOPs|command|device|model|Traceback|[A-Za-z]*Error| +[0-9])'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
el "GPU tests: graph vs eager (DiT head, tiny CASMAR / MAR, the MLP head at 128 rows)"
timeout ${TEST_T:-60} $PY -m pytest -q -rP -m gpu -p no:cacheprovider tests/test_graphed_chain.py \
  tests/test_cuda_graph_sampling.py -k "not test_gpu_graph_equals_eager or [128" > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?"; grep -E "rel max|passed|failed|Error" "$OUT/gpu_tests.txt" | tail -n 14
el "bench casmar: graphs, eager, profile"
timeout ${CASMAR_T:-240} $PY -m maskar bench casmar --batch 64 --cuda-graph both --compile off \
  --sample-reps 2 --eager-reps 1 --profile --json "$OUT/casmar.json" ${CASMAR_ARGS:-} > "$OUT/casmar.txt" 2>&1
echo "casmar rc=$?"; grep -E "$KEEP" "$OUT/casmar.txt" | tail -n 48
el "bench mar: num_iter 64, 256 with graphs, profile"
timeout ${MAR_T:-150} $PY -m maskar bench mar --batch 64 --num-iters 64,256 --cuda-graph on --compile off \
  --sample-reps 1 --train-batch 0 --profile --json "$OUT/mar.json" ${MAR_ARGS:-} > "$OUT/mar.txt" 2>&1
echo "mar rc=$?"; grep -E "$KEEP" "$OUT/mar.txt" | tail -n 42
JSONS=("$OUT/casmar.json" "$OUT/mar.json")
if [ "${COMPILE:-0}" = 1 ]; then
  for what in casmar mar; do
    t=$(left)
    if [ "$t" -lt 60 ]; then el "compiled $what: skipped ($t s left before DEADLINE)"; continue; fi
    el "bench $what: graphs + torch.compile (limit $t s)"
    if [ $what = casmar ]; then args=(--sample-reps 1 ${CASMAR_ARGS:-})
    else args=(--num-iters 64 --sample-reps 1 --train-batch 0 ${MAR_ARGS:-}); fi
    echo "=== compiled variant (COMPILE=1) ===" >> "$OUT/$what.txt"
    timeout $t $PY -m maskar bench $what --batch 64 --cuda-graph on --compile on \
      --json "$OUT/${what}_compiled.json" "${args[@]}" >> "$OUT/$what.txt" 2>&1
    echo "$what compiled rc=$?"; sed -n '/^=== compiled variant/,$p' "$OUT/$what.txt" | grep -E "$KEEP" | tail -n 8
    JSONS+=("$OUT/${what}_compiled.json")
  done
fi
el "targets"
$PY -m maskar bench masked_sampling "${JSONS[@]}" | tee "$OUT/targets.txt"
el "done"
