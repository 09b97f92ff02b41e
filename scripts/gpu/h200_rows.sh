# Issue 14's rows on the issue's GPU with the compiled decoder's output conv kept NCHW (2026-12-06;
# measured before on H100s only), each model in its own process so each compiles afresh:
#   PART=a (about 5 min, DEADLINE=560): `maskar bench decode` bf16 / bf16-cl (eager, channels-last) /
#     bf16-compiled, profiled, with Inductor's output code kept (decode_code.log.gz: what its
#     elementwise kernels around the convolutions do); HMAR-d16 and VAR-d16 256 px B 64
#     compiled-w16 + compiled decoder.
#   PART=b (about 5 min, DEADLINE=560): the same two models at 1024 px B 8.
# Run from the repository root: OUT=/tmp/out PART=a bash scripts/gpu/h200_rows.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/clock.sh"
PY=${PY:-python3}
NOISE='Warning|warn|originates from|^ *File |kern = |^$|torch._dynamo.utils'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
sample_run() {  # NAME CAP ARGS...: `maskar bench sample ARGS` into $OUT/NAME.{txt,json}; rc, its tail
  local name=$1 limit=$2; shift 2
  timeout $(cap $limit) $PY -m maskar bench sample "$@" json="$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/$name.txt" | tail -n 5
}
if [ "${PART:-a}" = a ]; then
  el "bench decode 256 px B 64: bf16, bf16-cl, bf16-compiled, profiled; Inductor's output code"
  TORCH_LOGS=output_code timeout $(cap 180) $PY -m maskar bench decode quality=false speed=true \
    cases=256x64 variants=bf16,bf16-cl,bf16-compiled profile=true json="$OUT/decode.json" \
    > "$OUT/decode.txt" 2> "$OUT/decode_code.log"
  echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode.txt" | grep -v "fp32-strict\|sm80\|DSE::\|pointwise_mult" | tail -n 40
  gzip -9 "$OUT/decode_code.log"
  for m in hmar-d16 var-d16; do
    el "bench sample $m 256 px B 64 compiled-w16 + compiled decoder (compiled afresh)"
    sample_run "s256_$m" 170 models=$m cases=256x64 modes=compiled-w16 reps=5 compile_decoder=true
  done
else
  for m in hmar-d16 var-d16; do
    el "bench sample $m 1024 px B 8 compiled-w16 + compiled decoder (compiled afresh)"
    sample_run "s1024_$m" 260 models=$m cases=1024x8 modes=compiled-w16 reps=5 compile_decoder=true
  done
fi
el done
