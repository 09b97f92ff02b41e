#!/usr/bin/env bash
# Device call: GPU tests of the fused kernel, then the config sweep and the host-time check.
# Outputs under $OUT (json + logs).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  el "gpu tests"
  timeout ${TEST_T:-200} python3 -m pytest -q -m gpu tests/test_kernels.py -x -p no:cacheprovider 2>&1 | tail -n 15 | tee $OUT/gpu_tests.txt
fi
el "host"
timeout 120 python3 benchmarks/attention_sweep.py --host --cases ${HOST_CASES:-680:4:30,680:32:16} --json $OUT/host.json 2>&1 | tail -n 8
el "sweep"
timeout ${SWEEP_T:-330} python3 benchmarks/attention_sweep.py --cases ${CASES:-680:32:16,2240:8:16,680:4:30} \
  ${SWEEP_ARGS:-} --json $OUT/sweep.json > $OUT/sweep.log 2>&1
grep -v '^{' $OUT/sweep.log | tail -n 30
el "done"
