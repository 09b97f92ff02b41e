#!/usr/bin/env bash
# VAR-d16 / HMAR-d16 sampling on one GPU (docs/benchmarks.md, *VAR-d16 and HMAR-d16 sampling*):
# `maskar bench sample` in bf16 at 256 px B 64 and 1024 px B 8, then in fp32 at 256 px B 64.
# Produces in $OUT: sample_bf16.txt/.json and sample_fp32.txt/.json.
# Takes at most 7.5 minutes (timeouts 230 + 200 s); each row builds random weights, checks them
# (determinism, teacher-forced logits) and times 3 generations after a warm-up.
# Run from the repository root: OUT=/tmp/out scripts/gpu/bench_sampling.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
timeout ${BF16_T:-230} python3 -m maskar bench sample json=$OUT/sample_bf16.json > $OUT/sample_bf16.txt 2>&1
echo "bf16 rc=$?"; tail -n 14 $OUT/sample_bf16.txt
timeout ${FP32_T:-200} python3 -m maskar bench sample precision=fp32 cases=256x64 json=$OUT/sample_fp32.json > $OUT/sample_fp32.txt 2>&1
echo "fp32 rc=$?"; tail -n 10 $OUT/sample_fp32.txt
