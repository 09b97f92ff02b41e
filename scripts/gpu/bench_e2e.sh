#!/usr/bin/env bash
# End-to-end GPU benchmarks for docs/benchmarks.md: VAR/HMAR-d16 training step, MAR-B sampling and
# training. Writes logs to $OUT (or ./bench-out).
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -m maskar bench train_step batch=32 backend=sdpa,flex,triton,auto steps=50 2>&1 | tee "$OUT/train_step.txt"
$PY -m maskar bench mar --batch 64 --num-iters 64,256 --sample-reps 2 --train-batch 64 2>&1 | tee "$OUT/mar.txt"
