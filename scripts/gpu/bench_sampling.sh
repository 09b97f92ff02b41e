#!/usr/bin/env bash
# VAR-d16 / HMAR-d16 sampling on one GPU (issue 14; docs/benchmarks.md, *VAR-d16 and HMAR-d16 sampling*).
# Produces in $OUT (6 files):
#   gpu_tests.txt  pytest -m gpu of the fast path: captured CUDA graphs give the eager tokens (fp32, bf16)
#   decode.txt/.json  bf16 vs fp32 VQ-VAE decode on real tokens (trained hmar-fmnist tokenizer, 10,000
#                  Fashion-MNIST images: the installed test split where the machine has it, else the carried
#                  .carry/fmnist-test, else the first 10,000 train images of .carry/fmnist, else a "skipped" line) and d16 decode
#                  time / memory per precision at 256 px B 64, 1024 px B 8
#   sample.txt/.json  `maskar bench sample` in bf16, HMAR-d16 then VAR-d16 at 256 px B 64 and 1024 px B 8, modes
#                  legacy (the path before issue 14) and fast (CUDA graphs, fused sampler, bf16 decode): median of
#                  5 calls, peak allocated / reserved memory, FLOP floor; per-region profile of each row; bf16 vs
#                  fp32 token agreement and image error; a 10,000-sample HMAR-d16 256 px run through the
#                  `maskar sample` pipeline (npz streamed to /tmp, deleted) against the single-batch images/s.
# Carry: .carry/fmnist-test (the 10,000 test images, 4 MB; scripts/quality_collect.sh prepare) for the
# real-token decode line: the device machine has no /usr/share/datasets/fashion-mnist (2026-12-03:
# "quality: not measured"). .carry/fmnist (the train split, 22 MB) also works, but with the shipped
# checkpoints tracked (56 MB) it takes the tree over the 64 MiB a device call may send.
# Expected about 5 minutes; hard limits 90 + 120 + 300 s (8.5 minutes). A summary is printed last.
# Run from the repository root: OUT=/tmp/out scripts/gpu/bench_sampling.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_sampling_speed.py tests/test_bench_sample.py \
    > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?"
# Real tokens for the decode-quality line (the IDX reader takes the carry's .xz / .gz as they are).
if [ -d /usr/share/datasets/fashion-mnist ]; then DQ=()
elif [ -d .carry/fmnist-test ]; then DQ=(root=.carry/fmnist-test split=test)
elif [ -d .carry/fmnist ]; then DQ=(root=.carry/fmnist split=train limit=10000)
else
  DQ=(quality=false)
  echo "decode quality: skipped (no /usr/share/datasets/fashion-mnist, .carry/fmnist-test or .carry/fmnist: carry one)"
fi
timeout 120 python3 -m maskar bench decode ${DQ[@]+"${DQ[@]}"} speed=true json="$OUT/decode.json" > "$OUT/decode.txt" 2>&1
echo "decode rc=$?"
timeout 300 python3 -m maskar bench sample models=hmar-d16,var-d16 modes=legacy,fast reps=5 profile=true \
    agree=true large_n=10000 json="$OUT/sample.json" > "$OUT/sample.txt" 2>&1
echo "sample rc=$?"
echo "=== summary ==="
tail -n 1 "$OUT/gpu_tests.txt"
grep -E "^quality|^ +(256|1024) " "$OUT/decode.txt"
grep -E "^(model|hmar|var)" "$OUT/sample.txt"
grep -E "bf16 vs fp32|large-N|failed" "$OUT/sample.txt" | cut -c1-400
sed -n '/^targets/,$p' "$OUT/sample.txt"
