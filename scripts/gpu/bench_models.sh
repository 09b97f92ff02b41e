#!/usr/bin/env bash
# Model-level speed on one GPU (docs/benchmarks.md): the VAR-d16 / HMAR-d16 training step with the
# fused kernel and with SDPA, then MAR-B sampling (num_iter 64 and 256, B 64) and its training step.
# Produces in $OUT: gpu.txt, train_step.txt, mar.txt.
# Takes at most 9 minutes (timeouts 270 + 270 s). From the H100 figures: 4 train-step rows of 60
# steps at 0.17-0.19 s plus up to 24 s of compile/autotune each; MAR 3 generations of 5 s
# (num_iter 64) and 19 s (256) with the head in CUDA graphs, then 2 x 23 train steps of ~0.2 s.
# Run from the repository root:
#   OUT=/tmp/out scripts/gpu/bench_models.sh
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout ${TS_T:-270} $PY -m maskar bench train_step batch=32 backend=triton,sdpa steps=50 2>&1 | tee "$OUT/train_step.txt"
timeout ${MAR_T:-270} $PY -m maskar bench mar --batch 64 --num-iters 64,256 --sample-reps 2 --train-batch 64 2>&1 | tee "$OUT/mar.txt"
