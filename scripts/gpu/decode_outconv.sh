# The compiled decoder with its 3-channel output conv kept NCHW (`maskar::conv2d_nchw`, 2026-12-06):
# Inductor had made it channels-last, where cuDNN's kernel is 6x slower (24.6 of 125 ms of GPU
# time at 256 px B 64 on an H100, decode_layout.sh). The GPU tests of the compiled decode; `maskar
# bench decode` bf16 / bf16-compiled / bf16-torch-gn-compiled (torch's group norm, which Inductor
# can fuse with its neighbours) profiled; HMAR-d16 256 px B 64 end to end (compiled-w16 +
# compiled decoder). About 4 min: OUT=/tmp/out DEADLINE=300 bash scripts/gpu/decode_outconv.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/clock.sh"
PY=${PY:-python3}
NOISE='Warning|warn|originates from|^ *File |kern = |^$|torch._dynamo.utils'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
el "GPU tests: the compiled decode against the eager one, alone and inside the sampling graphs"
timeout $(cap 120) $PY -m pytest -q -m gpu tests/test_group_norm_kernel.py tests/test_sampling_speed.py \
  -k "inductor_decode or compiled_decoder_inside" > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?"; tail -n 3 "$OUT/gpu_tests.txt"
el "bench decode: bf16, bf16-compiled, profiled"
timeout $(cap 120) $PY -m maskar bench decode quality=false speed=true cases=256x64 \
  variants=bf16,bf16-compiled,bf16-torch-gn-compiled profile=true json="$OUT/decode.json" > "$OUT/decode.txt" 2>&1
echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode.txt" | grep -v "fp32-strict\|sm80\|DSE::\|pointwise_mult" | tail -n 38
el "bench sample hmar-d16 256 px B 64 compiled-w16 + compiled decoder"
timeout $(cap 120) $PY -m maskar bench sample models=hmar-d16 cases=256x64 modes=compiled-w16 reps=5 \
  compile_decoder=true json="$OUT/sample.json" > "$OUT/sample.txt" 2>&1
echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample.txt" | tail -n 6
el done
