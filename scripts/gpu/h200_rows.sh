# Issue 14's rows on the issue's GPU with the compiled decoder's output conv kept NCHW (2026-12-06;
# measured before on H100s only), each model in its own process so each compiles afresh:
#   PART=a (about 8 min, DEADLINE=570): the GPU tests of the fused norm with a conv's bias
#     (MASKAR_GN_CONV_BIAS); `maskar bench decode` bf16 / bf16-gnbias / bf16-cl (eager,
#     channels-last) / bf16-cl-gnbias / bf16-compiled / bf16-gnbias-compiled, profiled, with
#     Inductor's output code kept (decode_code.log.gz: what its elementwise kernels around the
#     convolutions do); HMAR-d16 256 px B 64 compiled-w16 + compiled decoder, at the defaults and
#     with MASKAR_GN_CONV_BIAS=1 (the first profiled: GPU time of the graphed call by kernel group).
#   PART=cl (about 8.5 min, DEADLINE=570): after the fix that keeps a channels-last decode channels-last
#     (small norms no longer go to PyTorch's CUDA group norm, which returns NCHW): its GPU tests;
#     `bench decode` bf16 / bf16-cl / bf16-cl-gnbias / bf16-compiled / bf16-cl-compiled /
#     bf16-cl-gnbias-compiled, profiled; HMAR-d16 256 px B 64 fast-w16 (the eager decoder of `maskar
#     sample`) and compiled-w16 + compiled decoder, each at the defaults and with
#     MASKAR_DECODE_CHANNELS_LAST=1 MASKAR_GN_CONV_BIAS=1.
#   PART=sweep (about 6 min, DEADLINE=570): the GPU tests of the channels-last decode (its last norm now
#     writes NCHW for the output conv); scripts/gpu/gn_cl_sweep.py (the norm's channels-last tiles at
#     the decode's calls, then the compiled channels-last decode with the winners); HMAR-d16 256 px B 64
#     compiled-w16 + compiled decoder with MASKAR_DECODE_CHANNELS_LAST=1 MASKAR_GN_CONV_BIAS=1.
#   PART=next (about 6.5 min, DEADLINE=570): the decode's defaults since 2026-12-06 (channels-last,
#     the conv bias in the norm) on the issue's GPU: every GPU test of the fused norm; `bench decode`
#     bf16 (NCHW, the old decode) / bf16-cl-gnbias (the default) / bf16-compiled /
#     bf16-cl-gnbias-compiled, profiled; HMAR-d16 and VAR-d16 256 px B 64, fast-w16 then
#     compiled-w16 + compiled decoder, each model in its own process. Then PART=b1024 (about 5 min):
#     both models at 1024 px B 8, compiled.
#   PART=mm (about 2 min): scripts/gpu/matmul_shapes.py, CASMAR-B's matmul shapes one by one, with
#     cuBLASLt's default workspace and with 64 MiB.
#   PART=sums (about 4 min): the fused norm's GPU tests of the shifted-sums statistics
#     (GNConfig.sums), then scripts/gpu/gn_cl_sweep.py with SWEEP_SUMS=0,1 at the decode's calls of
#     at least 5M elements, and the compiled channels-last decode with the per-shape winners.
#   PART=p1024 (about 5 min): HMAR-d16 at 256 px B 64 and 1024 px B 8, compiled-w16 + compiled
#     decoder, profiled (per scale, decode, GPU kernels by group): where issue 14's calls go.
#   PART=lowres (about 5 min): CASMAR's DiT head with its residual stream in bf16
#     (MASKAR_DIT_LOW_RESIDUAL): its GPU test (eps against fp32 with either stream), then `maskar
#     bench casmar --batch 64` with the switch off and on, each in its own process.
#   PART=wide (about 7 min): the GPU tests of the tokenizers' wide-head attention as two matmuls
#     (MASKAR_DECODE_WIDE_ATTN); HMAR-d16 256 px B 64 and 1024 px B 8 compiled-w16 + compiled decoder
#     at the defaults, with MASKAR_DECODE_WIDE_ATTN=1, and with it and MASKAR_FUSED_GELU=1 (the FFN's
#     GELU in fc1's cuBLASLt epilogue), each in its own process (WIDE_CASES=1024x8: that case only).
#   PART=softgn (about 9 min, DEADLINE=570): the GPU tests of the wide attention's softmax kernel
#     (MASKAR_WIDE_SOFTMAX_KERNEL) and of the fused norm; HMAR-d16 1024 px B 8 compiled-w16 + compiled
#     decoder with the softmax kernel off and on, each in its own process (reps ${SOFTGN_REPS:-3});
#     then scripts/gpu/gn_cl_sweep.py at the 1024 px B 8 decode's calls of at least 5M elements,
#     with the grid's channel blocks first (cb_fast) and the statistics loop pipelined (stages).
#   PART=softgn2 (about 9.5 min, DEADLINE=570): with the softmax kernel and the norm's new channels-last
#     rule on by default (MASKAR_WIDE_SOFTMAX_KERNEL, MASKAR_GN_CB_FAST): the fused norm's and the
#     softmax's GPU tests; HMAR-d16 1024 px B 8, then 256 px B 64, compiled-w16 + compiled decoder, at
#     the defaults and with both switches off, each in its own process; the norm swept at the 1024 px
#     decode's calls around the new rule (every candidate's time kept), and the compiled decode with
#     the rule before, the default and the winners.
#   PART=gn3 (about 3 min): scripts/gpu/gn_cl_sweep.py at the 1024 px B 8 decode's calls of at least
#     4M elements, channel blocks first and shifted sums, over 32- to 256-channel tiles, 16 or 32 tiles
#     a statistics program, 4 or 8 warps; the compiled decode with the rule before, the default and
#     the winners.
#   PART=resid (about 6 min, DEADLINE=570): the residual block's sum made by the next fused norm's
#     statistics pass (MASKAR_GN_RESIDUAL): its GPU tests; HMAR-d16 1024 px B 8, then
#     256 px B 64, compiled-w16 + compiled decoder with the switch off and on, each in its own
#     process; then PART=gn3's sweep in the time left.
#   PART=gn4 (about 3 min): the norm's narrower tiles for the largest maps (WIDE_MAPS_MIN_ELEMENTS,
#     off by default): the fused norm's GPU tests at the decoder's shapes; the compiled 1024 px B 8
#     decode at the defaults and with them (scripts/gpu/gn_cl_sweep.py, no sweep); HMAR-d16 1024 px
#     B 8 at the defaults, then profiled (where the call's time goes now); GN4_VAR=1: VAR-d16 too.
#   PART=draw (about 2 min): the one-kernel draw's GPU tests, then scripts/gpu/sampler_speed.py (its
#     launch configs; on 2026-12-06, ninth session, at commit 21a310d it also swept the thresholds
#     found 2 or 4 bits a round, which lost and were removed).
#   PART=rows (about 8 min, DEADLINE=570): issue 14's and 15's rows at the defaults, each in its own
#     process: HMAR-d16 and VAR-d16 at 1024 px B 8, then 256 px B 64, compiled-w16 + compiled decoder;
#     `maskar bench casmar --batch 64 --sample-reps 2`. For the H200, where they are defined.
#   PART=conv (about 5 min): the decoders' 3-channel output conv as one Triton kernel
#     (MASKAR_CONV_OUT_KERNEL): its GPU tests (against cuDNN, both timed); HMAR-d16 1024 px B 8 and
#     256 px B 64, compiled-w16 + compiled decoder, with the switch off and on, each in its own process.
#   PART=conv2 (about 3 min): the compiled 1024 px B 8 and 256 px B 64 decodes alone, each in one
#     process with the default configs and then with the conv_out kernel (scripts/gpu/gn_cl_sweep.py,
#     no sweep): the comparison PART=conv's end-to-end rows were too noisy for.
#   PART=defer (about 6 min): the blocks' FFN residual adds made in the next block's compiled graph
#     (MASKAR_DEFER_RESIDUAL): its GPU tests (tokens against the blocks' own adds); HMAR-d16 1024 px B 8
#     and 256 px B 64, compiled-w16 + compiled decoder, with the switch off and on, each in its own
#     process.
#   PART=guide (about 6 min): the CFG guidance made inside the one-kernel draw (MASKAR_DRAW_GUIDANCE):
#     the draw's GPU tests (its ids and kept probabilities against the draw of torch's guided logits);
#     HMAR-d16 1024 px B 8 and 256 px B 64 with the switch off and on, each in its own process.
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
gpu_tests() {  # NAME CAP PYTEST_ARGS...: `pytest -q -s -m gpu ARGS` into $OUT/NAME.txt; rc, its summary
  local name=$1 limit=$2; shift 2
  timeout $(cap $limit) $PY -m pytest -q -s -m gpu "$@" > "$OUT/$name.txt" 2>&1
  echo "tests rc=$?"; grep -E "softmax rows|residual sums|token agreement|guided draw|passed|failed" "$OUT/$name.txt"
}
switch_ab() {  # VAR TAG CAP: HMAR-d16 1024 px B 8 and 256 px B 64 with VAR=0 then 1, each in its own process
  local var=$1 tag=$2 limit=$3 case v
  for case in 1024x8 256x64; do
    for v in 0 1; do
      el "bench sample hmar-d16 $case compiled-w16 + compiled decoder: $var=$v"
      env "$var=$v" timeout $(cap $limit) $PY -m maskar bench sample models=hmar-d16 cases=$case \
        modes=compiled-w16 reps=5 compile_decoder=true > "$OUT/s${case}_$tag$v.txt" 2>&1
      echo "sample rc=$?"; grep -E "^hmar-d16 " "$OUT/s${case}_$tag$v.txt"
    done
  done
}
gn3_sweep() {  # PART=gn3's sweep (also the end of PART=resid)
  el "the norm at the 1024 px decode's calls: tile widths and chunk lengths, channel blocks first"
  SWEEP_CASE=1024x8 SWEEP_BLOCK_C=32,64,128,256 SWEEP_TILE=4096 SWEEP_CHUNK_TILES=16,32 SWEEP_WARPS=4,8 \
    SWEEP_SUMS=1 SWEEP_CB_FAST=1 SWEEP_STAGES=1 SWEEP_MIN_ELEMENTS=4000000 \
    timeout $(cap 400) $PY scripts/gpu/gn_cl_sweep.py > "$OUT/sweep1024c.txt" 2>&1
  echo "sweep rc=$?"; grep -vE "$NOISE" "$OUT/sweep1024c.txt" | grep -v "^  GNConfig" | tail -n 16
}
if [ "${PART:-a}" = a ]; then
  el "GPU tests: the fused norm adding a conv's bias, alone, in the decoder, compiled"
  timeout $(cap 120) $PY -m pytest -q -m gpu tests/test_group_norm_kernel.py \
    -k "x_bias or inductor_decode or decoder_with_the_kernel" > "$OUT/gpu_tests.txt" 2>&1
  echo "tests rc=$?"; tail -n 3 "$OUT/gpu_tests.txt"
  el "bench decode 256 px B 64, profiled; Inductor's output code"
  TORCH_LOGS=output_code timeout $(cap 210) $PY -m maskar bench decode quality=false speed=true \
    cases=256x64 variants=bf16,bf16-gnbias,bf16-cl,bf16-cl-gnbias,bf16-compiled,bf16-gnbias-compiled \
    profile=true json="$OUT/decode.json" > "$OUT/decode.txt" 2> "$OUT/decode_code.log"
  echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode.txt" | grep -v "fp32-strict\|sm80\|DSE::\|pointwise_mult" \
    | grep -v "^        " | tail -n 16
  gzip -9 "$OUT/decode_code.log"
  el "bench sample hmar-d16 256 px B 64 compiled-w16 + compiled decoder (compiled afresh)"
  sample_run s256_hmar-d16 150 models=hmar-d16 cases=256x64 modes=compiled-w16 reps=5 compile_decoder=true \
    profile=true
  el "the same with MASKAR_GN_CONV_BIAS=1"
  MASKAR_GN_CONV_BIAS=1 sample_run s256_hmar-d16-gnbias 130 models=hmar-d16 cases=256x64 modes=compiled-w16 \
    reps=5 compile_decoder=true
elif [ "${PART}" = cl ]; then
  el "GPU tests: the channels-last decode stays channels-last; conv bias in the norm"
  timeout $(cap 120) $PY -m pytest -q -m gpu tests/test_group_norm_kernel.py \
    -k "channels_last_decode_stays or x_bias or inductor_decode" > "$OUT/gpu_tests.txt" 2>&1
  echo "tests rc=$?"; tail -n 3 "$OUT/gpu_tests.txt"
  el "bench decode 256 px B 64, profiled"
  timeout $(cap 200) $PY -m maskar bench decode quality=false speed=true cases=256x64 \
    variants=bf16,bf16-cl,bf16-cl-gnbias,bf16-compiled,bf16-cl-compiled,bf16-cl-gnbias-compiled \
    profile=true json="$OUT/decode.json" > "$OUT/decode.txt" 2>&1
  echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode.txt" | grep -v "fp32-strict\|sm80\|DSE::\|pointwise_mult" \
    | tail -n 68 | grep -v "^        .* ms  [^t_]" | head -n 50
  for env in "" "MASKAR_DECODE_CHANNELS_LAST=1 MASKAR_GN_CONV_BIAS=1"; do
    tag=$([ -z "$env" ] && echo default || echo cl-gnbias)
    el "bench sample hmar-d16 256 px B 64 fast-w16, then compiled-w16 + compiled decoder: $tag"
    env $env timeout $(cap 150) $PY -m maskar bench sample models=hmar-d16 cases=256x64 \
      modes=fast-w16,compiled-w16 reps=5 compile_decoder=true json="$OUT/s256_hmar_$tag.json" \
      > "$OUT/s256_hmar_$tag.txt" 2>&1
    echo "sample rc=$?"; grep -E "^hmar-d16 " "$OUT/s256_hmar_$tag.txt"
  done
elif [ "${PART}" = sweep ]; then
  el "GPU tests: the channels-last decode"
  timeout $(cap 100) $PY -m pytest -q -m gpu tests/test_group_norm_kernel.py \
    -k "channels_last_decode_stays or inductor_decode" > "$OUT/gpu_tests.txt" 2>&1
  echo "tests rc=$?"; tail -n 3 "$OUT/gpu_tests.txt"
  el "the norm's channels-last tiles swept; the compiled channels-last decode with the winners"
  timeout $(cap 300) $PY scripts/gpu/gn_cl_sweep.py > "$OUT/sweep.txt" 2>&1
  echo "sweep rc=$?"; grep -vE "$NOISE" "$OUT/sweep.txt" | grep -v "^  GNConfig" | tail -n 24
  el "bench sample hmar-d16 256 px B 64 compiled-w16 + compiled decoder, channels-last + conv bias in the norm"
  MASKAR_DECODE_CHANNELS_LAST=1 MASKAR_GN_CONV_BIAS=1 sample_run s256_hmar_cl_nchwout 120 models=hmar-d16 \
    cases=256x64 modes=compiled-w16 reps=5 compile_decoder=true
elif [ "${PART}" = next ]; then
  el "GPU tests: the fused norm"
  timeout $(cap 120) $PY -m pytest -q -m gpu tests/test_group_norm_kernel.py > "$OUT/gpu_tests.txt" 2>&1
  echo "tests rc=$?"; tail -n 3 "$OUT/gpu_tests.txt"
  el "bench decode 256 px B 64, profiled: the old decode and the default, eager and compiled"
  timeout $(cap 150) $PY -m maskar bench decode quality=false speed=true cases=256x64 \
    variants=bf16,bf16-cl-gnbias,bf16-compiled,bf16-cl-gnbias-compiled profile=true \
    json="$OUT/decode.json" > "$OUT/decode.txt" 2>&1
  echo "decode rc=$?"; grep -E "^  256|GPU kernels" "$OUT/decode.txt"
  for m in hmar-d16 var-d16; do
    el "bench sample $m 256 px B 64: fast-w16, then compiled-w16 + compiled decoder (compiled afresh)"
    sample_run "s256_$m" 130 models=$m cases=256x64 modes=fast-w16,compiled-w16 reps=5 compile_decoder=true
  done
elif [ "${PART}" = b1024 ]; then
  for m in hmar-d16 var-d16; do
    el "bench sample $m 1024 px B 8 compiled-w16 + compiled decoder (compiled afresh)"
    sample_run "s1024_$m" 150 models=$m cases=1024x8 modes=compiled-w16 reps=5 compile_decoder=true
  done
elif [ "${PART}" = mm ]; then
  el "CASMAR-B's matmul shapes, one by one"
  TAG=default timeout $(cap 150) $PY scripts/gpu/matmul_shapes.py > "$OUT/mm.txt" 2>&1
  echo "mm rc=$?"; grep -vE "$NOISE" "$OUT/mm.txt"
  el "the same with a 64 MiB cuBLASLt workspace"
  CUBLASLT_WORKSPACE_SIZE=65536 TAG=ws64 timeout $(cap 150) $PY scripts/gpu/matmul_shapes.py > "$OUT/mm_ws64.txt" 2>&1
  echo "mm rc=$?"; grep -vE "$NOISE" "$OUT/mm_ws64.txt" | tail -n +2 | cut -c1-80
elif [ "${PART}" = p1024 ]; then
  el "bench sample hmar-d16 256 px B 64 and 1024 px B 8 compiled-w16 + compiled decoder, profiled"
  sample_run p1024_hmar-d16 330 models=hmar-d16 cases=256x64,1024x8 modes=compiled-w16 reps=5 \
    compile_decoder=true profile=true
  grep -E "profile|per scale|GPU kernels|^        " "$OUT/p1024_hmar-d16.txt" | head -n 60
elif [ "${PART}" = lowres ]; then
  el "GPU test: the DiT head's bf16 residual stream"
  timeout $(cap 90) $PY -m pytest -q -s -m gpu tests/test_dit_low_residual.py > "$OUT/lowres_tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "DiT head|passed|failed" "$OUT/lowres_tests.txt"
  for low in 0 1; do
    el "bench casmar B 64, MASKAR_DIT_LOW_RESIDUAL=$low"
    MASKAR_DIT_LOW_RESIDUAL=$low timeout $(cap 170) $PY -m maskar bench casmar --batch 64 --sample-reps 2 \
      --json "$OUT/casmar_lowres$low.json" > "$OUT/casmar_lowres$low.txt" 2>&1
    echo "casmar rc=$?"; grep -E "^switches|^sample " "$OUT/casmar_lowres$low.txt"
  done
elif [ "${PART}" = wide ]; then
  el "GPU tests: the wide-head attention"
  timeout $(cap 90) $PY -m pytest -q -s -m gpu tests/test_wide_attention.py > "$OUT/wide_tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "against fp32|passed|failed" "$OUT/wide_tests.txt"
  for env in "MASKAR_DECODE_WIDE_ATTN=0" "MASKAR_DECODE_WIDE_ATTN=1" "MASKAR_DECODE_WIDE_ATTN=1 MASKAR_FUSED_GELU=1"; do
    tag=$(echo "$env" | tr -d ' ' | sed 's/MASKAR_//g; s/DECODE_WIDE_ATTN/wide/; s/FUSED_GELU/-gelu/; s/=//g')
    el "bench sample hmar-d16 256 px B 64 and 1024 px B 8 compiled-w16 + compiled decoder: $env"
    env $env timeout $(cap 170) $PY -m maskar bench sample models=hmar-d16 cases=${WIDE_CASES:-256x64,1024x8} \
      modes=compiled-w16 reps=${WIDE_REPS:-5} compile_decoder=true json="$OUT/s_hmar_$tag.json" > "$OUT/s_hmar_$tag.txt" 2>&1
    echo "sample rc=$?"; grep -E "^hmar-d16 " "$OUT/s_hmar_$tag.txt"
  done
elif [ "${PART}" = sums ]; then
  el "GPU tests: the shifted-sums statistics"
  timeout $(cap 120) $PY -m pytest -q -m gpu tests/test_group_norm_kernel.py -k shifted_sums > "$OUT/sums_tests.txt" 2>&1
  echo "tests rc=$?"; tail -n 3 "$OUT/sums_tests.txt"
  el "the channels-last norm's statistics: shifted sums against the default, swept"
  SWEEP_BLOCK_C=64,128 SWEEP_TILE=2048,4096 SWEEP_CHUNK_TILES=4,8 SWEEP_WARPS=4 SWEEP_SUMS=0,1 \
    SWEEP_MIN_ELEMENTS=5000000 timeout $(cap 240) $PY scripts/gpu/gn_cl_sweep.py > "$OUT/sweep.txt" 2>&1
  echo "sweep rc=$?"; grep -vE "$NOISE" "$OUT/sweep.txt" | grep -v "^  GNConfig" | tail -n 14
elif [ "${PART}" = softgn ]; then
  el "GPU tests: the softmax kernel, the fused norm"
  gpu_tests softgn_tests 100 tests/test_softmax_rows.py tests/test_wide_attention.py \
    tests/test_group_norm_kernel.py -k "softmax or wide or kernel_matches_torch_gpu or x_bias_gpu"
  for k in 0 1; do
    el "bench sample hmar-d16 1024 px B 8 compiled-w16 + compiled decoder: MASKAR_WIDE_SOFTMAX_KERNEL=$k"
    MASKAR_WIDE_SOFTMAX_KERNEL=$k timeout $(cap 150) $PY -m maskar bench sample models=hmar-d16 cases=1024x8 \
      modes=compiled-w16 reps=${SOFTGN_REPS:-3} compile_decoder=true json="$OUT/s1024_hmar_softmax$k.json" \
      > "$OUT/s1024_hmar_softmax$k.txt" 2>&1
    echo "sample rc=$?"; grep -E "^hmar-d16 " "$OUT/s1024_hmar_softmax$k.txt"
  done
  el "the norm at the 1024 px decode's calls: channel blocks first, pipelined statistics, swept"
  SWEEP_CASE=1024x8 SWEEP_BLOCK_C=64,128 SWEEP_TILE=4096 SWEEP_CHUNK_TILES=8,16 SWEEP_WARPS=4,8 SWEEP_SUMS=0,1 \
    SWEEP_CB_FAST=0,1 SWEEP_STAGES=1,3 SWEEP_MIN_ELEMENTS=5000000 \
    timeout $(cap 330) $PY scripts/gpu/gn_cl_sweep.py > "$OUT/sweep1024.txt" 2>&1
  echo "sweep rc=$?"; grep -vE "$NOISE" "$OUT/sweep1024.txt" | grep -v "^  GNConfig" | tail -n 16
elif [ "${PART}" = softgn2 ]; then
  el "GPU tests: the fused norm (new channels-last rule), the softmax kernel"
  gpu_tests softgn2_tests 100 tests/test_softmax_rows.py tests/test_group_norm_kernel.py
  for case in 1024x8 256x64; do
    for env in "MASKAR_GN_CB_FAST=1" "MASKAR_GN_CB_FAST=0 MASKAR_WIDE_SOFTMAX_KERNEL=0"; do
      tag=$(echo "$env" | tr -d ' ' | sed 's/MASKAR_//g; s/GN_CB_FAST/cbfast/; s/WIDE_SOFTMAX_KERNEL/-softmax/; s/=//g')
      el "bench sample hmar-d16 $case compiled-w16 + compiled decoder: $env"
      env $env timeout $(cap 100) $PY -m maskar bench sample models=hmar-d16 cases=$case modes=compiled-w16 \
        reps=5 compile_decoder=true json="$OUT/s${case}_hmar_$tag.json" > "$OUT/s${case}_hmar_$tag.txt" 2>&1
      echo "sample rc=$?"; grep -E "^hmar-d16 " "$OUT/s${case}_hmar_$tag.txt"
    done
  done
  el "the norm at the 1024 px decode's calls around the new rule"
  SWEEP_CASE=1024x8 SWEEP_BLOCK_C=64,128 SWEEP_TILE=4096 SWEEP_CHUNK_TILES=8,16 SWEEP_WARPS=4 SWEEP_SUMS=1 \
    SWEEP_CB_FAST=1 SWEEP_STAGES=1,3 SWEEP_MIN_ELEMENTS=4000000 \
    timeout $(cap 200) $PY scripts/gpu/gn_cl_sweep.py > "$OUT/sweep1024b.txt" 2>&1
  echo "sweep rc=$?"; grep -vE "$NOISE" "$OUT/sweep1024b.txt" | grep -v "^  GNConfig" | tail -n 16
elif [ "${PART}" = resid ]; then
  el "GPU tests: the residual sums in the norm, the fused norm"
  gpu_tests resid_tests 110 tests/test_group_norm_kernel.py -k "sum_norm_act or residual"
  for case in 1024x8 256x64; do
    for k in 0 1; do
      el "bench sample hmar-d16 $case compiled-w16 + compiled decoder: MASKAR_GN_RESIDUAL=$k"
      MASKAR_GN_RESIDUAL=$k timeout $(cap 100) $PY -m maskar bench sample models=hmar-d16 cases=$case \
        modes=compiled-w16 reps=5 compile_decoder=true > "$OUT/s${case}_resid$k.txt" 2>&1  # no json: 8 files come back
      echo "sample rc=$?"; grep -E "^hmar-d16 " "$OUT/s${case}_resid$k.txt"
    done
  done
  gn3_sweep
elif [ "${PART}" = gn4 ]; then
  el "GPU tests: the fused norm at the decoder's shapes"
  gpu_tests gn4_tests 90 tests/test_group_norm_kernel.py -k "kernel_matches_torch_gpu or x_bias_gpu or sum_norm_act_gpu"
  el "the compiled 1024 px decode at the defaults and with the largest maps' tiles"
  SWEEP_CASE=1024x8 SWEEP_MIN_ELEMENTS=1000000000000 SWEEP_DECODES="default configs,with the largest maps' tiles" \
    timeout $(cap 150) $PY scripts/gpu/gn_cl_sweep.py > "$OUT/gn4_decodes.txt" 2>&1
  echo "decodes rc=$?"; grep "^compiled" "$OUT/gn4_decodes.txt"
  el "bench sample hmar-d16 1024 px B 8 compiled-w16 + compiled decoder at the defaults, profiled"
  timeout $(cap 150) $PY -m maskar bench sample models=hmar-d16 cases=1024x8 modes=compiled-w16 reps=5 \
    compile_decoder=true profile=true json="$OUT/s1024x8_hmar_gn4.json" > "$OUT/s1024x8_hmar_gn4.txt" 2>&1
  echo "sample rc=$?"; grep -E "^hmar-d16 |profile|per scale|GPU kernels|^        " "$OUT/s1024x8_hmar_gn4.txt" | head -n 30
  if [ -n "${GN4_VAR:-}" ]; then
    el "bench sample var-d16 1024 px B 8 compiled-w16 + compiled decoder at the defaults"
    sample_run s1024x8_var_gn4 150 models=var-d16 cases=1024x8 modes=compiled-w16 reps=5 compile_decoder=true
  fi
elif [ "${PART}" = draw ]; then
  el "GPU tests: the one-kernel draw"
  gpu_tests draw_tests 90 tests/test_categorical_kernel.py
  el "the draw alone at each launch config"
  timeout $(cap 150) $PY scripts/gpu/sampler_speed.py --json "$OUT/draw_speed.json" > "$OUT/draw_speed.txt" 2>&1
  echo "draw rc=$?"; grep -vE "$NOISE" "$OUT/draw_speed.txt"
elif [ "${PART}" = rows ]; then
  for case in 1024x8 256x64; do
    for m in hmar-d16 var-d16; do
      el "bench sample $m $case compiled-w16 + compiled decoder at the defaults (compiled afresh)"
      if [ $case = 1024x8 ]; then  # json for these two only: about 8 files come back
        sample_run "s${case}_$m" 150 models=$m cases=$case modes=compiled-w16 reps=5 compile_decoder=true
      else
        timeout $(cap 120) $PY -m maskar bench sample models=$m cases=$case modes=compiled-w16 reps=5 \
          compile_decoder=true > "$OUT/s${case}_$m.txt" 2>&1
        echo "sample rc=$?"; grep -E "^$m " "$OUT/s${case}_$m.txt"
      fi
    done
  done
  el "bench casmar B 64 at the defaults"
  timeout $(cap 200) $PY -m maskar bench casmar --batch 64 --sample-reps 2 --json "$OUT/casmar.json" \
    > "$OUT/casmar.txt" 2>&1
  echo "casmar rc=$?"; grep -E "^switches|^sample " "$OUT/casmar.txt"
elif [ "${PART}" = conv ]; then
  el "GPU tests: the few-output-channel 3x3 conv kernel (its times against cuDNN printed)"
  timeout $(cap 90) $PY -m pytest -q -s -m gpu tests/test_conv3x3_narrow.py > "$OUT/conv_tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "conv3x3 narrow|passed|failed" "$OUT/conv_tests.txt"
  switch_ab MASKAR_CONV_OUT_KERNEL convout 100
elif [ "${PART}" = conv2 ]; then
  for case in 1024x8 256x64; do
    el "the compiled $case decode alone, in one process: the default configs, then with the conv_out kernel"
    OUT=$OUT/conv2_$case SWEEP_CASE=$case SWEEP_MIN_ELEMENTS=1000000000000 \
      SWEEP_DECODES="default configs,with the conv_out kernel" \
      timeout $(cap 200) $PY scripts/gpu/gn_cl_sweep.py > "$OUT/conv2_$case.txt" 2>&1
    echo "decodes rc=$?"; grep "^compiled" "$OUT/conv2_$case.txt"
  done
elif [ "${PART}" = defer ]; then
  el "GPU tests: the blocks' FFN residual adds deferred into the next block's graph, against not deferred"
  gpu_tests defer_tests 150 tests/test_sampling_speed.py -k deferred
  switch_ab MASKAR_DEFER_RESIDUAL defer 110
elif [ "${PART}" = guide ]; then
  el "GPU tests: the draw with the guidance inside against the draw of torch's guided logits"
  gpu_tests guide_tests 120 tests/test_categorical_kernel.py
  switch_ab MASKAR_DRAW_GUIDANCE guide 110
elif [ "${PART}" = gn3 ]; then
  gn3_sweep
else
  echo "PART: expected a, cl, sweep, next, b1024, mm, sums, p1024, lowres, wide, softgn, softgn2, resid, gn3, gn4, draw, rows, conv, conv2, defer or guide; got ${PART}" >&2
  exit 2
fi
el done
