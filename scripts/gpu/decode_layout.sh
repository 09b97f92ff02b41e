# The compiled decoder traced in channels-last memory (2026-12-06): does an NCHW trace pay layout
# copies around the fused GroupNorm (an opaque op Inductor must hand the strides it was traced
# with, while its layout optimisation gives the convolutions channels-last tensors)?
#   1. the GPU tests of the compiled decode against the eager one, NCHW and channels-last, with
#      the GroupNorm op's layout as traced (the default) and flexible (MASKAR_GN_FLEXIBLE_LAYOUT=1);
#   2. `maskar bench decode` bf16 / bf16-compiled / bf16-cl-compiled at 256 px B 64, each variant
#      profiled once more (GPU time by kernel group and the longest kernels); then bf16-compiled
#      with MASKAR_GN_FLEXIBLE_LAYOUT=1 (its own process: the switch is read at import);
#   3. HMAR-d16 256 px B 64 end to end (compiled-w16 + compiled decoder) at the defaults, then
#      with the faster fix of step 2 (MASKAR_DECODE_CHANNELS_LAST=1 or MASKAR_GN_FLEXIBLE_LAYOUT=1),
#      each in its own process (so compiled afresh).
# About 6 min: OUT=/tmp/out DEADLINE=450 bash scripts/gpu/decode_layout.sh (from the repository root)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/clock.sh"
PY=${PY:-python3}
NOISE='Warning|warn|originates from|^ *File |kern = |^$|torch._dynamo.utils'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

el "GPU tests: the compiled decode against the eager one"
for flex in 0 1; do
  MASKAR_GN_FLEXIBLE_LAYOUT=$flex timeout $(cap 100) $PY -m pytest -q -m gpu tests/test_group_norm_kernel.py \
    -k inductor_decode >> "$OUT/gpu_tests.txt" 2>&1
  echo "tests (flexible layout $flex) rc=$?"; tail -n 2 "$OUT/gpu_tests.txt"
done

el "bench decode: bf16, bf16-compiled, bf16-cl-compiled, profiled"
timeout $(cap 240) $PY -m maskar bench decode quality=false speed=true cases=256x64 \
  variants=bf16,bf16-compiled,bf16-cl-compiled profile=true json="$OUT/decode.json" > "$OUT/decode.txt" 2>&1
echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode.txt" | tail -n 50
el "bench decode: bf16-compiled with the GroupNorm op's layout flexible"
MASKAR_GN_FLEXIBLE_LAYOUT=1 timeout $(cap 100) $PY -m maskar bench decode quality=false speed=true cases=256x64 \
  variants=bf16-compiled profile=true json=/tmp/decode_flex.json > "$OUT/decode_flex.txt" 2>&1
echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode_flex.txt" | tail -n 16

# the faster of the two layout fixes (by the decode alone) end to end, beside the default
BEST=$($PY - "$OUT/decode.json" /tmp/decode_flex.json <<'EOF'
import json, sys
ms = lambda path, v: next((r["ms"] for r in json.load(open(path))["speed"] if r["variant"] == v), 1e9)
try:
    cl, flex = ms(sys.argv[1], "bf16-cl-compiled"), ms(sys.argv[2], "bf16-compiled")
except Exception:
    cl, flex = 0, 1e9
print("MASKAR_DECODE_CHANNELS_LAST=1" if cl <= flex else "MASKAR_GN_FLEXIBLE_LAYOUT=1")
EOF
)
for name in default best; do
  envs=(); [ $name = best ] && envs=("$BEST")
  el "bench sample hmar-d16 256 px B 64 compiled-w16 + compiled decoder, $name ${envs[*]:-}"
  env "${envs[@]}" timeout $(cap 120) $PY -m maskar bench sample models=hmar-d16 cases=256x64 \
    modes=compiled-w16 reps=5 compile_decoder=true json="$OUT/sample_$name.json" > "$OUT/sample_$name.txt" 2>&1
  echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample_$name.txt" | tail -n 6
done
el done
