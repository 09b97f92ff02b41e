# The compiled decoder traced in channels-last memory (2026-12-06): does an NCHW trace pay layout
# copies around the fused GroupNorm (an opaque op Inductor must hand the strides it was traced
# with, while its layout optimisation gives the convolutions channels-last tensors)?
#   1. the GPU tests of the compiled decode against the eager one, NCHW and channels-last;
#   2. `maskar bench decode` bf16 / bf16-compiled / bf16-cl-compiled at 256 px B 64, each variant
#      profiled once more (GPU time by kernel group and the longest kernels);
#   3. HMAR-d16 256 px B 64 end to end (compiled-w16 + compiled decoder), without and with
#      MASKAR_DECODE_CHANNELS_LAST=1, each in its own process (so compiled afresh).
# About 5 min: OUT=/tmp/out DEADLINE=420 bash scripts/gpu/decode_layout.sh (from the repository root)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/clock.sh"
PY=${PY:-python3}
NOISE='Warning|warn|originates from|^ *File |kern = |^$|torch._dynamo.utils'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

el "GPU tests: the compiled decode against the eager one"
timeout $(cap 150) $PY -m pytest -q -m gpu tests/test_group_norm_kernel.py -k inductor_decode \
  > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?"; tail -n 4 "$OUT/gpu_tests.txt"

el "bench decode: bf16, bf16-compiled, bf16-cl-compiled, profiled"
timeout $(cap 240) $PY -m maskar bench decode quality=false speed=true cases=256x64 \
  variants=bf16,bf16-compiled,bf16-cl-compiled profile=true json="$OUT/decode.json" > "$OUT/decode.txt" 2>&1
echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode.txt" | tail -n 75

for cl in 0 1; do
  el "bench sample hmar-d16 256 px B 64 compiled-w16 + compiled decoder, MASKAR_DECODE_CHANNELS_LAST=$cl"
  MASKAR_DECODE_CHANNELS_LAST=$cl timeout $(cap 120) $PY -m maskar bench sample models=hmar-d16 cases=256x64 \
    modes=compiled-w16 reps=5 compile_decoder=true json="$OUT/sample_cl$cl.json" > "$OUT/sample_cl$cl.txt" 2>&1
  echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample_cl$cl.txt" | tail -n 6
done
el done
