#!/usr/bin/env bash
# Attention kernels on one GPU (docs/benchmarks.md, *Attention kernels*): the fused kernel's GPU
# tests, a host-time profile at the launch-bound shape (L680 B4 H30), then the benchmark table.
# Produces in $OUT: gpu_tests.txt, profile.txt, bench.txt (the table) and bench.json.
# Takes at most 11 minutes (step timeouts 200 + 120 + 330 s; the GPU tests took 100 s on the H100);
# set SKIP_TESTS=1 SKIP_PROFILE=1 to fit one 10-minute device call with the table alone. Knobs: SKIP_TESTS=1, SKIP_PROFILE=1, DTYPES (fp16),
# METHODS, BENCH_ARGS (e.g. "--cases 680:32:16"), PROFILE_METHODS.
# Run from the repository root: OUT=/tmp/out scripts/gpu/bench_kernels.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  el "gpu tests"
  timeout ${TEST_T:-200} python3 -m pytest -q -m gpu tests/test_kernels.py -x -p no:cacheprovider 2>&1 | tail -n 4 | tee $OUT/gpu_tests.txt
fi
if [ "${SKIP_PROFILE:-0}" != 1 ]; then
  el "profile"
  timeout 120 python3 benchmarks/attention.py --profile 300 --cases 680:4:30 --patterns block_causal \
    --methods ${PROFILE_METHODS:-triton_jit,triton_fast,sdpa} --dtypes fp16 > $OUT/profile.txt 2>&1
  grep -E "^== |tottime|block_sparse|jit.py|compiler.py|autograd" $OUT/profile.txt | head -n 60
fi
el "bench"
timeout ${BENCH_T:-330} python3 benchmarks/attention.py --dtypes ${DTYPES:-fp16} --methods ${METHODS:-sdpa,flex128,flex64,varlen,triton,triton_fast,dense_nomask} \
  ${BENCH_ARGS:-} --json $OUT/bench.json > $OUT/bench.txt 2>&1
grep -v "^check " $OUT/bench.txt | tail -n 45
el "done"
