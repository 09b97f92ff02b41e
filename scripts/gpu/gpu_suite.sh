#!/usr/bin/env bash
# The whole GPU test suite (`pytest -m gpu`, one process, no xdist) in two device calls, split
# by file at tests/test_linear_gelu.py | tests/test_neighborhood_kernel.py (alphabetical; 209
# and 62 tests: 5.1 and 4.0 min on an H100 on 2026-12-07, docs/results/gpu-suite-*_h100_2026-12-07a.txt):
#   OUT=$OUT PART=1 bash scripts/gpu/gpu_suite.sh     # then PART=2
# checkpoints/hmar-fmnist and checkpoints/fmnist-classifier must travel with the tree (the
# bad-input tests' GPU case reads them); the other checkpoints may stay behind.
# Writes $OUT/gpu-suite-$PART.txt (pytest's output with every non-pass named) and
# $OUT/gpu-suite-$PART.xml (JUnit: each test's outcome and time).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/clock.sh"
files=$(grep -lE "pytest\.mark\.gpu" tests/test_*.py | sort)
case "${PART:-}" in
  1) sel=$(echo "$files" | awk '$0 <= "tests/test_linear_gelu.py"') ;;
  2) sel=$(echo "$files" | awk '$0 > "tests/test_linear_gelu.py"') ;;
  *) echo "PART: expected 1 or 2, got '${PART:-}'" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
el "pytest -m gpu, part $PART: $(echo $sel | wc -w) files"
timeout $(cap 560) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs --junitxml="$OUT/gpu-suite-$PART.xml" \
  $sel > "$OUT/gpu-suite-$PART.txt" 2>&1
echo "pytest rc=$?"
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu-suite-$PART.txt" | tail -n 30
el done
