#!/usr/bin/env bash
# Device call: VAR-d16 / HMAR-d16 sampling benchmark (bf16 at 256 / 1024 px, fp32 at 256 px).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
timeout ${BF16_T:-230} python3 -m maskar bench sample json=$OUT/sample_bf16.json > $OUT/sample_bf16.txt 2>&1
echo "bf16 rc=$?"; tail -n 14 $OUT/sample_bf16.txt
timeout ${FP32_T:-200} python3 -m maskar bench sample precision=fp32 cases=256x64 json=$OUT/sample_fp32.json > $OUT/sample_fp32.txt 2>&1
echo "fp32 rc=$?"; tail -n 10 $OUT/sample_fp32.txt
