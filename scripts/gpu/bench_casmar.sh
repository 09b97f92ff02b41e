#!/usr/bin/env bash
# CASMAR on one GPU (docs/benchmarks.md, *CASMAR proximal attention*; docs/casmar.md): a CUDA smoke
# run of the whole model (casmar-tiny, 30 training steps, then `maskar sample`), the GPU tests of
# proximal attention and CASMAR, and the PSA benchmark table.
# Produces in $OUT: casmar_train.log, casmar_sample.log, casmar_tiny.png, psa.txt, psa.json.
# Takes at most 7.5 minutes (timeouts 90 + 60 + 90 + 200 s); the smoke training itself took 7 s on
# the H100. Run from the repository root: OUT=/tmp/out scripts/gpu/bench_casmar.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi -L
el "casmar gpu smoke"
timeout 90 python3 -m maskar train preset=casmar-tiny device=cuda train.steps=30 train.progress=false \
  train.out_dir=/tmp/casmar > $OUT/casmar_train.log 2>&1; echo "train rc=$?"; tail -n 2 $OUT/casmar_train.log
timeout 60 python3 -m maskar sample ckpt=/tmp/casmar device=cuda out=$OUT/casmar_tiny.png > $OUT/casmar_sample.log 2>&1
echo "sample rc=$?"; tail -n 2 $OUT/casmar_sample.log
el "psa gpu tests"
timeout 90 python3 -m pytest -q -m gpu tests/test_psa_bench.py tests/test_casmar.py tests/test_proximal_attention.py \
  -p no:cacheprovider 2>&1 | tail -n 3
el "psa bench"
timeout ${PSA_T:-200} python3 benchmarks/psa.py --json $OUT/psa.json > $OUT/psa.txt 2>&1
grep -v '^{' $OUT/psa.txt | grep -v "^\[" | tail -n 25
el "done"
