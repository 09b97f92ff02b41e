#!/usr/bin/env bash
# Issues 15 and 14 after making torch.compile part of sampling (one H200, two device calls):
#   PART=masked (about 9 min): GPU tests of the graph paths; `maskar bench casmar_parts` (the DiT
#     step eager / compiled, its kernels, rounding-level token changes; PARTS_ARGS="--modes
#     max-autotune-no-cudagraphs" adds that mode, which did not finish in 190 s on 2026-12-03);
#     `maskar bench casmar` and `maskar bench mar` at their defaults (CUDA graphs + compiled) with
#     profiles; targets.
#   PART=head (DEADLINE=280): the batched adaLN MLP head's GPU test, MAR-B num_iter 64, CASMAR-B.
#   PART=equality (about 3 min): compiled vs uncompiled CASMAR-B tokens in fp32 and bf16, short chains.
#   PART=fused (about 9 min, DEADLINE=570): the GPU tests of the fused posterior; the decoder with and
#     without cuDNN autotuning (`maskar bench decode variants=fp32-strict,bf16,bf16-autotuned`);
#     `maskar bench sample` fast / compiled; MAR-B num_iter 64 / 256 and CASMAR-B at the defaults
#     (compiled: the step and the fused posterior in the heads' CUDA graphs).
#   PART=pending (about 7 min, DEADLINE=570): what the 2026-12-04 session built but could not measure:
#     the GPU tests of the weight copies and the fused GELU; MAR-B num_iter 64 / 256 and CASMAR-B at
#     the defaults (compiled steps now read bf16 weight copies made once per chain); CASMAR-B and
#     HMAR / VAR 256 px sampling again with MASKAR_FUSED_GELU=1 (the DiT MLP / FFN GELU in fc1's
#     cuBLASLt epilogue); the 256 px HMAR / VAR training step captured as one CUDA graph.
#   PART=autotune (up to 9 min, DEADLINE=570): MAR-B num_iter 256 at the defaults, then with the
#     transformer blocks compiled in mode max-autotune-no-cudagraphs (Triton matmul templates that can
#     take the exact GELU and the residual adds into their epilogues; a long first compile), then
#     CASMAR-B with its blocks and its heads' steps (the DiT head: GELU, adaLN modulation) so, in
#     the time left.
#   PART=headtune (about 9 min, DEADLINE=560): the GPU tests of the MLP head's time-embedding table;
#     MAR-B num_iter 256 with --linears low, the MLP head's
#     step compiled with mode default, then max-autotune-no-cudagraphs (blocks default: their
#     max-autotune lost on 2026-12-04); then CASMAR-B with the heads' steps so.
#   PART=linact (about 8 min, DEADLINE=570): what the 2026-12-04 night session built for MAR-B num_iter
#     256 (not yet run on a GPU): the GPU tests of the fused fc1 + GELU op (maskar.kernels.linear_act),
#     of the head's fused residual blocks (maskar.kernels.adaln_mlp) and of the head's time table;
#     MAR-B num_iter 256 with --linears low four ways in one call (the path measured before: time
#     table off, adds not deferred; + both, the defaults now; + --fused-head on; + --linear-act on).
#   PART=linact2 (about 7 min, DEADLINE=570): `maskar bench linear_act` (every tile config against
#     cuBLAS + the separate GELU, TFLOP/s; MAR-B's head step fused vs compiled, us per step);
#     CASMAR-B without / with the switches in ON (default: --linear-act on --fused-head on); MAR-B
#     num_iter 64 / 256 with them; the issue-15 targets; HMAR-d16 256 px sampling without / with
#     MASKAR_LINEAR_ACT=1 (the FFN's tanh GELU; issue 14).
#   PART=gelu3 (about 7 min, DEADLINE=480): CASMAR-B with the DiT MLP's fc1 + tanh GELU as two kernels
#     (default), through the tuned Triton op (--linear-act on), through cuBLASLt's epilogue
#     (MASKAR_FUSED_GELU=1); two timed calls each; the default's profile.
#   PART=modulate (about 9 min, DEADLINE=570): the GPU tests of the DiT block kernels
#     (maskar.kernels.adaln_modulate and gated_residual: every candidate at CASMAR-B's shapes, the
#     tuner's times against the unfused path) and of PSA's fused q/k/v; CASMAR-B at the defaults,
#     with MASKAR_DIT_MODULATE=1, with MASKAR_DIT_MODULATE=1 MASKAR_DIT_RESIDUAL=1 (profiled).
#   PART=modulate2 (about 8.5 min, DEADLINE=570): CASMAR-B at the defaults; MAR-B num_iter 256 (the
#     ratio, same machine); CASMAR-B with MASKAR_PSA_QKV=1 and with every switch on (EXTRA_ENV adds
#     or overrides, e.g.
#     EXTRA_ENV="MASKAR_DIT_RESIDUAL=0"); the issue-15 targets of the default and all-on runs.
#   PART=profile2 (about 8 min): the DiT step's kernels with MASKAR_LINEAR_ACT=1 (`bench casmar_parts`);
#     MAR-B num_iter 256 profiled with the switches in ON; HMAR / VAR-d16 1024 px memory by pool.
#   PART=w16 (about 9 min, DEADLINE=570): `maskar bench sample` HMAR-d16 / VAR-d16 fast, then with the
#     linears stored in bf16 once (cast_linears_, what `maskar sample` does since 2026-12-04), then
#     compiled so; MAR-B num_iter 64 / 256 and CASMAR-B at the defaults with --linears low (against
#     the figures of PART=pending, 2026-12-04: 21.02 / 5.52 / 8.58 images/s); first the decoder with
#     its Upsample convs as 2x2 sub-pixel convs (`bench decode variants=bf16,bf16-subpixel`).
#   PART=nextscale (about 5 min): `maskar bench sample models=hmar-d16,var-d16 modes=fast,compiled`,
#     then the short 256 px training-step rows of issue 13 in the time left.
#   PART=pool (about 9 min, DEADLINE=570): the GPU tests of the graphs' pool reservation (same tokens,
#     a smaller pool) and of the cuDNN-first dense attention, then `maskar bench sample
#     models=hmar-d16,var-d16 modes=compiled-w16` at 1024 px B 8 with MASKAR_GRAPH_POOL_RESERVE=0,
#     =1, and =1 with MASKAR_SDPA_CUDNN=1 (issue 14's memory figures with the pools split out; the
#     attention A/B), then at 256 px B 64 with the reservation.
#   PART=decodec (about 7.5 min, DEADLINE=540): `maskar bench decode` of the d16 decoder eager bf16
#     against torch.compile'd (default and max-autotune-no-cudagraphs), 256 px B 64 and 1024 px B 8;
#     then every convolution shape of the decoder timed alone (convs=true, with the 160-channel
#     split / padded forms).
#   PART=decodee2e (about 5 min, DEADLINE=300): the GPU test of the compiled decoder inside the
#     sampling graphs, then HMAR-d16 256 px B 64 compiled-w16 with the decoder compiled too
#     (compile_decoder=true) and without, end to end.
#   PART=issue14 (about 9 min, DEADLINE=560): every switch built for issue 14 in one call: the GPU
#     tests of the one-kernel draw, the captured graphs, the pool reservation and the compiled decoder
#     inside the graphs; the draw alone (scripts/gpu/sampler_speed.py); then `maskar bench sample
#     models=hmar-d16,var-d16 modes=compiled-w16` at 256 px B 64 and 1024 px B 8 with sampler=fused
#     (the earlier default) and with sampler=triton compile_decoder=true; every convolution shape of
#     the decoder alone (convs=true) and the draw alone in the time left.
#   PART=issue15 (about 8 min, DEADLINE=560): CASMAR-B at the defaults, with MASKAR_PSA_QKV=0 (the
#     three projections; the one matmul is the CUDA default since the seventh session of 2026-12-05,
#     when this part ran it as =1), at the defaults again (the drift between calls), with
#     MASKAR_DIT_MODULATE=1 alone; MAR-B num_iter 256; the issue-15 targets of each.
#   PART=s7b (about 9.5 min, DEADLINE=570): the GPU tests of the in-graph noise (2026-12-05, seventh
#     session) and the kernel draw; then (what PART=decodecl and PART=pool2 were, trimmed) the
#     decoder NCHW against channels-last (no compiled variant); HMAR-d16 fast-w16 at both sizes with
#     MASKAR_DECODE_CHANNELS_LAST=0 / 1; HMAR-d16 1024 px with pool margins 1.02 and 1.25 and VAR-d16
#     (the memory denominator); then VAR-d16 compiled-w16 at 256 then 1024 px in one process (the
#     order that failed on 2026-12-05), printing the failing row's traceback.
#   PART=s8 (about 8 min, DEADLINE=560): where the time goes now, for the next round of work:
#     `maskar bench sample models=hmar-d16,var-d16 cases=256x64 modes=compiled-w16
#     compile_decoder=true profile=true` (per-scale graph replays, decode; the noise drawn inside the
#     graphs since 2026-12-05), then CASMAR-B at the defaults with `--profile` (its phases and the
#     GPU idle per phase: is a stage-1 graph worth building?).
#   PART=s9 (about 9.5 min, DEADLINE=570): the GPU test of `attention.auto_backend_name`; PART=s8's
#     sample row with the models in the other order (VAR-d16 first: its decode was 18 ms slower than
#     HMAR's, run second, on both GPUs); MAR-B num_iter 64 / 256 and CASMAR-B at the defaults.
#   PART=order (about 5 min, DEADLINE=360): PART=s9's finding checked: HMAR-d16, VAR-d16 and HMAR-d16
#     again in one process (256 px B 64 compiled-w16, compiled decoder), with fresh_compile=false
#     (a later model reuses the first one's compiled code, as in every run before) then =true
#     (Dynamo reset before each model), the GPU's SM clock, power and temperature logged every
#     250 ms: is the later model slower for the reused code or for the GPU's state?
#   PART=c1024 (about 8 min, DEADLINE=570): issue 14's compiled rows with a fresh compile, each model
#     in its own process: HMAR-d16 and VAR-d16 at 1024 px B 8 (fast-w16 then compiled-w16 with the
#     decoder compiled), then VAR-d16 at 256 px B 64 the same way.
#   PART=casmarh (about 5 min, DEADLINE=560): CASMAR-H at its FID setting (num_iter 12), B 64, the
#     defaults: `maskar bench casmar --preset casmar-h --num-iters 12 --batch 64 --sample-reps 1
#     --linears low` (a warm-up call, then one timed call; its floor is 1.8 images/s).
# Run from the repository root: OUT=/tmp/out PART=masked bash scripts/gpu/speed_compiled.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-575}
source "$(dirname "$0")/clock.sh"
PY=${PY:-python3}
NOISE='Warning|warn|originates from|^ *File |kern = |^$|torch._dynamo.utils'
masked_defaults() {  # MAR_CAP CASMAR_CAP: MAR-B num_iter 64 / 256 and CASMAR-B at the defaults, the targets
  el "bench mar num_iter 64, 256 (defaults)"
  timeout $(cap $1) $PY -m maskar bench mar --batch 64 --num-iters 64,256 --sample-reps 1 --train-batch 0 \
    --json "$OUT/mar.json" > "$OUT/mar.txt" 2>&1
  echo "mar rc=$?"; grep -vE "$NOISE" "$OUT/mar.txt" | tail -n 25
  el "bench casmar (defaults)"
  timeout $(cap $2) $PY -m maskar bench casmar --batch 64 --sample-reps 1 --json "$OUT/casmar.json" \
    > "$OUT/casmar.txt" 2>&1
  echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar.txt" | tail -n 25
  [ -f "$OUT/casmar.json" ] && [ -f "$OUT/mar.json" ] && \
    $PY -m maskar bench masked_sampling "$OUT/casmar.json" "$OUT/mar.json" | tee "$OUT/targets.txt"
}
sample_run() {  # NAME CAP TAIL ARGS...: `maskar bench sample ARGS` into $OUT/NAME.{txt,json}; rc, its tail
  local name=$1 limit=$2 n=$3; shift 3
  timeout $(cap $limit) $PY -m maskar bench sample "$@" json="$OUT/$name.json" > "$OUT/$name.txt" 2>&1
  echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/$name.txt" | tail -n $n
}
casmar_variant() {  # NAME ENV... -- EXTRA_ARGS...: one CASMAR-B bench, two timed calls
  local v=$1; shift; local env=(); while [ $# -gt 0 ] && [ "$1" != -- ]; do env+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  el "bench casmar, --linears low, $v: ${env[*]:-} $*"
  env "${env[@]}" timeout $(cap 200) $PY -m maskar bench casmar --batch 64 --sample-reps 2 --linears low \
    "$@" --json "$OUT/casmar_$v.json" > "$OUT/casmar_$v.txt" 2>&1
  echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar_$v.txt" | grep -E "^switches|^sample|idle|Error" | tail -n 5
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "${PART:-masked}" = masked ]; then
  el "GPU tests: graph vs eager heads, PSA kernel dispatch"
  timeout $(cap 70) $PY -m pytest -q -rP -m gpu -p no:cacheprovider tests/test_graphed_chain.py \
    tests/test_cuda_graph_sampling.py -k "not test_gpu_graph_equals_eager or [128" > "$OUT/gpu_tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "rel max|passed|failed|Error" "$OUT/gpu_tests.txt" | tail -n 8
  el "casmar_parts"
  timeout $(cap 190) $PY -m maskar bench casmar_parts ${PARTS_ARGS:-} \
    --json "$OUT/casmar_parts.json" > "$OUT/casmar_parts.txt" 2>&1
  echo "parts rc=$?"; grep -vE "$NOISE" "$OUT/casmar_parts.txt" | tail -n 60
  el "bench casmar (defaults: graphs + compiled), profile"
  timeout $(cap 160) $PY -m maskar bench casmar --batch 64 --sample-reps 2 --profile \
    --json "$OUT/casmar.json" > "$OUT/casmar.txt" 2>&1
  echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar.txt" | tail -n 40
  el "bench mar num_iter 64, 256 (defaults), profile"
  timeout $(cap 170) $PY -m maskar bench mar --batch 64 --num-iters 64,256 --sample-reps 1 --train-batch 0 \
    --profile --json "$OUT/mar.json" > "$OUT/mar.txt" 2>&1
  echo "mar rc=$?"; grep -vE "$NOISE" "$OUT/mar.txt" | tail -n 40
  el "targets"
  $PY -m maskar bench masked_sampling "$OUT/casmar.json" "$OUT/mar.json" | tee "$OUT/targets.txt"
elif [ "${PART}" = head ]; then
  # the MLP head's adaLN projections as one matmul (DiffLoss.batched_modulation="auto"): its GPU test
  # against the per-block projections, then MAR-B num_iter 64 and CASMAR-B at the defaults (DEADLINE 280)
  el "GPU test: batched modulation vs per block"
  timeout $(cap 60) $PY -m pytest -q -rP -m gpu -p no:cacheprovider tests/test_cuda_graph_sampling.py \
    -k batched_modulation > "$OUT/gpu_tests_head.txt" 2>&1
  echo "tests rc=$?"; grep -E "rel|max|passed|failed|Error" "$OUT/gpu_tests_head.txt" | tail -n 8
  el "bench mar num_iter 64 (defaults)"
  timeout $(cap 110) $PY -m maskar bench mar --batch 64 --num-iters 64 --sample-reps 1 --train-batch 0 \
    --json "$OUT/mar.json" > "$OUT/mar.txt" 2>&1
  echo "mar rc=$?"; grep -vE "$NOISE" "$OUT/mar.txt" | tail -n 25
  el "bench casmar (defaults)"
  timeout $(cap 200) $PY -m maskar bench casmar --batch 64 --sample-reps 1 --json "$OUT/casmar.json" \
    > "$OUT/casmar.txt" 2>&1
  echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar.txt" | tail -n 25
elif [ "${PART}" = equality ]; then
  # compiled vs uncompiled CASMAR-B tokens, same seed, short chains (B 8, 10 / 20 head steps):
  # in fp32 the difference is rounding; in bf16 the chaotic sampler amplifies bf16 rounding
  for prec in fp32 bf16; do
    el "bench casmar $prec: compiled vs not"
    timeout $(cap 150) $PY -m maskar bench casmar --precision $prec --batch 8 --num-sampling-steps 10 \
      --refine-num-sampling-steps 20 --compile both --sample-reps 1 --json "$OUT/casmar_eq_$prec.json" \
      > "$OUT/casmar_eq_$prec.txt" 2>&1
    echo "rc=$?"; grep -E "^sample|tokens vs" "$OUT/casmar_eq_$prec.txt"
  done
elif [ "${PART}" = fused ]; then
  el "GPU tests: compiled step + fused posterior vs uncompiled, batched modulation"
  timeout $(cap 80) $PY -m pytest -q -rP -m gpu -p no:cacheprovider tests/test_cuda_graph_sampling.py \
    -k "fused_posterior or batched_modulation" > "$OUT/gpu_tests_fused.txt" 2>&1
  echo "tests rc=$?"; grep -E "rel max|passed|failed|Error" "$OUT/gpu_tests_fused.txt" | tail -n 8
  el "bench decode: cuDNN heuristic vs autotuned"
  timeout $(cap 110) $PY -m maskar bench decode quality=false speed=true cases=256x64,1024x8 \
    variants=fp32-strict,bf16,bf16-autotuned json="$OUT/decode.json" > "$OUT/decode.txt" 2>&1
  echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode.txt" | tail -n 12
  el "bench sample: fast, compiled"
  timeout $(cap 170) $PY -m maskar bench sample models=hmar-d16,var-d16 modes=fast,compiled reps=5 \
    json="$OUT/sample.json" > "$OUT/sample.txt" 2>&1
  echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample.txt" | tail -n 24
  masked_defaults 120 110
elif [ "${PART}" = pending ]; then
  el "GPU tests: weight copies, fused posterior, fused GELU"
  timeout $(cap 90) $PY -m pytest -q -rP -m gpu -p no:cacheprovider tests/test_cuda_graph_sampling.py \
    tests/test_linear_gelu.py -k "weight_copies or fused_posterior or fused" > "$OUT/gpu_tests_pending.txt" 2>&1
  echo "tests rc=$?"; grep -E "rel max|passed|failed|Error" "$OUT/gpu_tests_pending.txt" | tail -n 10
  masked_defaults 110 100  # the defaults now make the weight copies
  el "bench casmar, MASKAR_FUSED_GELU=1"
  timeout $(cap 100) env MASKAR_FUSED_GELU=1 $PY -m maskar bench casmar --batch 64 --sample-reps 1 \
    --json "$OUT/casmar_gelu.json" > "$OUT/casmar_gelu.txt" 2>&1
  echo "casmar gelu rc=$?"; grep -vE "$NOISE" "$OUT/casmar_gelu.txt" | tail -n 8
  el "bench sample 256 px, fast + compiled, MASKAR_FUSED_GELU=1"
  timeout $(cap 120) env MASKAR_FUSED_GELU=1 $PY -m maskar bench sample models=hmar-d16,var-d16 cases=256x64 \
    modes=fast,compiled reps=5 json="$OUT/sample_gelu.json" > "$OUT/sample_gelu.txt" 2>&1
  echo "sample gelu rc=$?"; grep -vE "$NOISE" "$OUT/sample_gelu.txt" | tail -n 12
  el "bench train_step 256 px: the whole step as one CUDA graph"
  timeout $(cap 150) env PYTHONWARNINGS=ignore $PY -m maskar bench train_step res=256 steps=25 warmup=5 \
    rows=hmar/d16/blocks/graph,var/d16/blocks/graph,hmar/d16/blocks json="$OUT/train_graph.json" \
    > "$OUT/train_graph.txt" 2>&1
  echo "train graph rc=$?"; grep -vE "$NOISE" "$OUT/train_graph.txt" | tail -n 8
elif [ "${PART}" = issue14 ]; then
  el "GPU tests: one-kernel draw, captured graphs, reserved pool, compiled decoder in the graphs"
  timeout $(cap 150) $PY -m pytest -q -m gpu tests/test_categorical_kernel.py tests/test_sampling_speed.py \
    -k "d16_shape or captured_graphs or reserved_pool or compiled_decoder_inside" > "$OUT/issue14_gpu_tests.txt" 2>&1
  echo "tests rc=$?"; tail -n 5 "$OUT/issue14_gpu_tests.txt"
  el "bench sample compiled-w16, sampler=fused (the earlier default)"
  sample_run sample_fused 150 16 models=hmar-d16,var-d16 modes=compiled-w16 reps=5 sampler=fused
  el "bench sample compiled-w16, sampler=triton compile_decoder=true"
  sample_run sample_triton_dec 200 16 models=hmar-d16,var-d16 modes=compiled-w16 reps=5 sampler=triton \
    compile_decoder=true
  el "bench decode: every convolution shape alone (bf16, NCHW / NHWC, 160-channel split / padded)"
  timeout $(cap 90) $PY -m maskar bench decode quality=false convs=true cases=256x64,1024x8 \
    json="$OUT/decode_convs.json" > "$OUT/decode_convs.txt" 2>&1
  echo "convs rc=$?"; grep -vE "$NOISE" "$OUT/decode_convs.txt" | tail -n 36
  el "the draw alone: torch path vs kernel configs"
  timeout $(cap 40) $PY scripts/gpu/sampler_speed.py --json "$OUT/sampler_speed.json" > "$OUT/sampler_speed.txt" 2>&1
  echo "speed rc=$?"; grep -vE "$NOISE" "$OUT/sampler_speed.txt" | tail -n 18
elif [ "${PART}" = issue15 ]; then
  # 2026-12-05 (sixth session): default 9.38, MASKAR_PSA_QKV=1 9.48, MODULATE + RESIDUAL 7.76 images/s
  # in separate calls; now the q/k/v A/B bracketed by two default runs (the drift between calls) and
  # the modulation kernel alone (which of the two lost)
  casmar_variant default
  casmar_variant noqkv MASKAR_PSA_QKV=0
  casmar_variant default2
  casmar_variant modulate MASKAR_DIT_MODULATE=1
  el "bench mar num_iter 256 (defaults)"
  timeout $(cap 120) $PY -m maskar bench mar --batch 64 --num-iters 256 --sample-reps 1 --train-batch 0 \
    --linears low --json "$OUT/mar.json" > "$OUT/mar.txt" 2>&1
  echo "mar rc=$?"; grep -vE "$NOISE" "$OUT/mar.txt" | grep -E "^sample|Error" | tail -n 3
  for v in default noqkv default2 modulate; do
    [ -f "$OUT/casmar_$v.json" ] && [ -f "$OUT/mar.json" ] && \
      $PY -m maskar bench masked_sampling "$OUT/casmar_$v.json" "$OUT/mar.json" | tee "$OUT/targets_$v.txt"
  done
elif [ "${PART}" = s8 ]; then
  el "bench sample 256 px compiled-w16 + compiled decoder, profiled"
  sample_run sample_profile 300 40 models=hmar-d16,var-d16 cases=256x64 modes=compiled-w16 reps=5 \
    compile_decoder=true profile=true
  el "bench casmar at the defaults, profiled"
  timeout $(cap 230) $PY -m maskar bench casmar --batch 64 --sample-reps 1 --linears low --profile \
    --json "$OUT/casmar_profile.json" > "$OUT/casmar_profile.txt" 2>&1
  echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar_profile.txt" | tail -n 40
elif [ "${PART}" = s9 ]; then
  el "GPU test: which backend auto runs (the fixed test of 2026-12-05)"
  timeout $(cap 90) $PY -m pytest -q -m gpu tests/test_kernels.py -k auto_picks > "$OUT/gpu_tests.txt" 2>&1
  echo "tests rc=$?"; tail -n 4 "$OUT/gpu_tests.txt"
  el "bench sample 256 px, VAR first this time (is VAR's slower decode an effect of the order?)"
  sample_run sample_order 280 40 models=var-d16,hmar-d16 cases=256x64 modes=compiled-w16 reps=5 \
    compile_decoder=true profile=true
  masked_defaults 120 150
elif [ "${PART}" = order ]; then
  # Is a model compiled after another in one process slow because it reuses the first one's
  # compiled code (fresh_compile=false: as every run before 2026-12-05 late), or for the GPU's state?
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader -lms 250 > "$OUT/clocks.csv" 2>&1 &
  SMI=$!
  for fresh in false true; do
    el "bench sample 256 px: HMAR, VAR, HMAR again in one process, fresh_compile=$fresh"
    timeout $(cap 240) $PY -m maskar bench sample models=hmar-d16,var-d16,hmar-d16 cases=256x64 modes=compiled-w16 \
      reps=${REPS:-5} compile_decoder=true fresh_compile=$fresh check=false json="$OUT/order3_$fresh.json" 2>&1 \
      | while IFS= read -r l; do echo "$(date +%H:%M:%S.%N | cut -c1-12) $l"; done > "$OUT/order3_$fresh.txt"
    grep -vE "$NOISE" "$OUT/order3_$fresh.txt" | grep -E " (hmar|var)-d16 |dynamo"
  done
  kill $SMI
  head -n 2 "$OUT/clocks.csv"; wc -l < "$OUT/clocks.csv"
elif [ "${PART}" = c1024 ]; then
  # The compiled sampler with a fresh compile, each model in its own process (never measured so
  # before 2026-12-05 late): fast-w16 then compiled-w16 + compiled decoder on the same model.
  for m in hmar-d16 var-d16; do
    el "bench sample $m 1024 px B 8: fast-w16, then compiled-w16 compiled afresh"
    sample_run "c1024_$m" 200 6 models=$m cases=1024x8 modes=fast-w16,compiled-w16 reps=5 compile_decoder=true
  done
  el "bench sample var-d16 256 px B 64: fast-w16, then compiled-w16 compiled afresh"
  sample_run c256_var-d16 150 6 models=var-d16 cases=256x64 modes=fast-w16,compiled-w16 reps=5 compile_decoder=true
elif [ "${PART}" = casmarh ]; then
  el "bench casmar CASMAR-H, num_iter 12 (issue 15's CASMAR-H row)"
  timeout $(cap 480) $PY -m maskar bench casmar --preset casmar-h --num-iters 12 --batch 64 --sample-reps 1 \
    --linears low --json "$OUT/casmar_h.json" > "$OUT/casmar_h.txt" 2>&1
  echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar_h.txt" | tail -n 20
elif [ "${PART}" = s7b ]; then
  el "GPU tests: the graphs' in-graph noise, the pool, the kernel draw at the d16 shape"
  timeout $(cap 150) $PY -m pytest -q -m gpu -x tests/test_sampling_speed.py tests/test_categorical_kernel.py \
    -k "captured_graphs or reserved_pool or d16_shape" > "$OUT/gpu_tests.txt" 2>&1
  echo "tests rc=$?"; tail -n 6 "$OUT/gpu_tests.txt"
  el "bench decode: bf16 NCHW, channels-last"
  timeout $(cap 120) $PY -m maskar bench decode quality=false speed=true cases=256x64,1024x8 \
    variants=bf16,bf16-cl json="$OUT/decode_cl.json" > "$OUT/decode_cl.txt" 2>&1
  echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode_cl.txt" | tail -n 8
  for cl in 0 1; do
    el "bench sample hmar-d16 fast-w16, MASKAR_DECODE_CHANNELS_LAST=$cl"
    MASKAR_DECODE_CHANNELS_LAST=$cl sample_run sample_cl$cl 100 8 models=hmar-d16 modes=fast-w16 reps=5
  done
  el "bench sample hmar-d16 1024 px fast-w16, pool margin 1.25"
  MASKAR_GRAPH_POOL_MARGIN=1.25 sample_run sample_margin1.25 60 4 models=hmar-d16 cases=1024x8 modes=fast-w16 reps=3 check=false
  el "bench sample var-d16 1024 px fast-w16 (the denominator)"
  sample_run sample_var1024 70 4 models=var-d16 cases=1024x8 modes=fast-w16 reps=3 check=false
  el "bench sample var-d16 compiled-w16 256 then 1024 px (the failure's traceback)"
  sample_run sample_compiled_both 150 60 models=var-d16 cases=256x64,1024x8 modes=compiled-w16 reps=1 check=false
elif [ "${PART}" = w16 ]; then
  el "bench decode: bf16 vs bf16 with sub-pixel upsample convs"
  timeout $(cap 90) $PY -m maskar bench decode quality=false speed=true cases=256x64,1024x8 \
    variants=bf16,bf16-subpixel json="$OUT/decode_subpixel.json" > "$OUT/decode_subpixel.txt" 2>&1
  echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode_subpixel.txt" | tail -n 8
  el "bench sample: fast, fast-w16, compiled-w16"
  timeout $(cap 330) $PY -m maskar bench sample models=hmar-d16,var-d16 modes=fast,fast-w16,compiled-w16 reps=5 \
    json="$OUT/sample_w16.json" > "$OUT/sample_w16.txt" 2>&1
  echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample_w16.txt" | tail -n 30
  el "bench mar num_iter 64, 256 and casmar, --linears low"
  timeout $(cap 110) $PY -m maskar bench mar --batch 64 --num-iters 64,256 --sample-reps 1 --train-batch 0 \
    --linears low --json "$OUT/mar_low.json" > "$OUT/mar_low.txt" 2>&1
  echo "mar rc=$?"; grep -E "^sample|Error" "$OUT/mar_low.txt" | tail -n 4
  timeout $(cap 100) $PY -m maskar bench casmar --batch 64 --sample-reps 1 --linears low \
    --json "$OUT/casmar_low.json" > "$OUT/casmar_low.txt" 2>&1
  echo "casmar rc=$?"; grep -E "^sample|Error" "$OUT/casmar_low.txt" | tail -n 4
elif [ "${PART}" = decodec ]; then
  el "bench decode: bf16 eager, compiled, max-autotune"
  timeout $(cap 400) $PY -m maskar bench decode quality=false speed=true cases=256x64,1024x8 \
    variants=bf16,bf16-compiled,bf16-autotune json="$OUT/decode_compiled.json" > "$OUT/decode_compiled.txt" 2>&1
  echo "decode rc=$?"; grep -vE "$NOISE" "$OUT/decode_compiled.txt" | tail -n 12
  el "bench decode: every convolution shape alone (bf16, NCHW / NHWC)"
  timeout $(cap 90) $PY -m maskar bench decode quality=false convs=true cases=256x64,1024x8 \
    json="$OUT/decode_convs.json" > "$OUT/decode_convs.txt" 2>&1
  echo "convs rc=$?"; grep -vE "$NOISE" "$OUT/decode_convs.txt" | tail -n 36
elif [ "${PART}" = decodee2e ]; then
  el "GPU test: the compiled decoder inside the sampling graphs"
  timeout $(cap 60) $PY -m pytest -q -m gpu tests/test_sampling_speed.py -k compiled_decoder \
    > "$OUT/decoder_gpu_test.txt" 2>&1
  echo "test rc=$?"; tail -n 3 "$OUT/decoder_gpu_test.txt"
  for dec in true false; do
    el "bench sample HMAR-d16 256 px compiled-w16, compile_decoder=$dec"
    sample_run sample_dec_$dec 115 6 models=hmar-d16 cases=256x64 modes=compiled-w16 reps=5 compile_decoder=$dec
  done
elif [ "${PART}" = pool ]; then
  el "GPU tests: the graphs' pool reservation"
  timeout $(cap 120) $PY -m pytest -q -m gpu tests/test_sampling_speed.py tests/test_attention.py \
    -k "reserved_pool or captured_graphs or cudnn" > "$OUT/pool_gpu_tests.txt" 2>&1
  echo "tests rc=$?"; tail -n 5 "$OUT/pool_gpu_tests.txt"
  # 1024 px first (issue 14's memory target is there), then the 256 px rows with the reservation
  for run in "0 0 1024x8" "1 0 1024x8" "1 1 1024x8" "1 0 256x64"; do
    set -- $run
    el "bench sample compiled-w16 $3, MASKAR_GRAPH_POOL_RESERVE=$1 MASKAR_SDPA_CUDNN=$2"
    timeout $(cap 125) env MASKAR_GRAPH_POOL_RESERVE=$1 MASKAR_SDPA_CUDNN=$2 $PY -m maskar bench sample \
      models=hmar-d16,var-d16 cases=$3 modes=compiled-w16 reps=5 json="$OUT/sample_pool$1_cudnn$2_$3.json" \
      > "$OUT/sample_pool$1_cudnn$2_$3.txt" 2>&1
    echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample_pool$1_cudnn$2_$3.txt" | tail -n 16
  done
elif [ "${PART}" = headtune ]; then
  # the heads' per-step calls alone under max-autotune (PART=autotune also tuned the blocks, which
  # lost): MAR's MLP head runs ~35 small kernels a step at 128 rows, where a Triton template with
  # bias + SiLU or gate + residual in its epilogue may beat cuBLAS plus the separate kernels.
  # First the GPU tests of the head's time-embedding table (on by default on CUDA since 2026-12-04)
  el "GPU tests: the time-embedding table in compiled graphs, in-place weight updates"
  timeout $(cap 90) $PY -m pytest -q -rP -m gpu -p no:cacheprovider tests/test_cuda_graph_sampling.py \
    -k "time_table or in_place_weight_updates or fused_posterior" > "$OUT/gpu_tests_time_table.txt" 2>&1
  echo "tests rc=$?"; grep -E "rel max|passed|failed|Error" "$OUT/gpu_tests_time_table.txt" | tail -n 8
  for mode in default max-autotune-no-cudagraphs; do
    el "bench mar num_iter 256, --linears low, the MLP head's step compiled with mode $mode"
    timeout $(cap 240) $PY -m maskar bench mar --batch 64 --num-iters 256 --sample-reps 1 --train-batch 0 \
      --linears low --head-compile-mode $mode --json "$OUT/mar256_head_$mode.json" > "$OUT/mar256_head_$mode.txt" 2>&1
    echo "mar head $mode rc=$?"; grep -vE "$NOISE" "$OUT/mar256_head_$mode.txt" | grep -E "^sample|Error" | tail -n 4
  done
  el "bench casmar, --linears low, the heads' steps compiled with max-autotune-no-cudagraphs (blocks default)"
  timeout $(cap 260) $PY -m maskar bench casmar --batch 64 --sample-reps 1 --linears low \
    --head-compile-mode max-autotune-no-cudagraphs --json "$OUT/casmar_head_autotune.json" \
    > "$OUT/casmar_head_autotune.txt" 2>&1
  echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar_head_autotune.txt" | grep -E "^sample|Error" | tail -n 4
elif [ "${PART}" = linact ]; then
  el "GPU tests: linear_act, adaln_mlp, the head's time-embedding table (on by default, never run on a GPU)"
  timeout $(cap 170) $PY -m pytest -q -rP -m gpu -p no:cacheprovider tests/test_linear_act.py tests/test_adaln_mlp.py \
    tests/test_cuda_graph_sampling.py -k "not test_cuda_graph_sampling or time_table or in_place_weight_updates" \
    > "$OUT/gpu_tests_linear_act.txt" 2>&1
  echo "tests rc=$?"; grep -E "tuned|rel max|passed|failed|Error" "$OUT/gpu_tests_linear_act.txt" | tail -n 10
  # the path measured before; + time table and deferred adds (the defaults now); + the fused head
  # blocks; + linear_act (its first call compiles and times ~17 configs per shape: a longer cap)
  for v in "off off off off" "auto on off off" "auto on off on" "auto on on on"; do
    set -- $v
    tag="tt-$1_da-$2_la-$3_fh-$4"
    el "bench mar num_iter 256, --linears low, --time-table $1 --defer-adds $2 --linear-act $3 --fused-head $4"
    timeout $(cap 150) $PY -m maskar bench mar --batch 64 --num-iters 256 --sample-reps 1 --train-batch 0 \
      --linears low --time-table $1 --defer-adds $2 --linear-act $3 --fused-head $4 \
      --json "$OUT/mar256_$tag.json" > "$OUT/mar256_$tag.txt" 2>&1
    echo "mar rc=$?"; grep -vE "$NOISE" "$OUT/mar256_$tag.txt" | grep -E "^switches|^sample|Error" | tail -n 4
  done
elif [ "${PART}" = linact2 ]; then
  el "bench linear_act (tile configs vs cuBLAS + the separate GELU; the head step fused vs compiled)"
  timeout $(cap 170) $PY -m maskar bench linear_act --json "$OUT/linear_act.json" > "$OUT/linear_act.txt" 2>&1
  echo "linear_act rc=$?"; grep -vE "$NOISE" "$OUT/linear_act.txt" | tail -n 110
  # ON: the switches PART=linact found faster, e.g. ON="--linear-act on --fused-head on"
  for sw in "--linear-act off --fused-head off" "${ON:---linear-act on --fused-head on}"; do
    tag=$(echo "$sw" | tr -d ' -')
    el "bench casmar, --linears low, $sw"
    timeout $(cap 110) $PY -m maskar bench casmar --batch 64 --sample-reps 1 --linears low $sw \
      --json "$OUT/casmar_$tag.json" > "$OUT/casmar_$tag.txt" 2>&1
    echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar_$tag.txt" | grep -E "^switches|^sample|Error" | tail -n 4
  done
  el "bench mar num_iter 64, 256, --linears low, ${ON:---linear-act on --fused-head on}"
  timeout $(cap 150) $PY -m maskar bench mar --batch 64 --num-iters 64,256 --sample-reps 1 --train-batch 0 \
    --linears low ${ON:---linear-act on --fused-head on} --json "$OUT/mar_la-on.json" > "$OUT/mar_la-on.txt" 2>&1
  echo "mar rc=$?"; grep -vE "$NOISE" "$OUT/mar_la-on.txt" | grep -E "^switches|^sample|Error" | tail -n 4
  for la in 0 1; do
    el "bench sample HMAR-d16 256 px B 64, compiled-w16, MASKAR_LINEAR_ACT=$la (the FFN's tanh GELU)"
    MASKAR_LINEAR_ACT=$la timeout $(cap 90) $PY -m maskar bench sample models=hmar-d16 cases=256x64 \
      modes=compiled-w16 reps=5 json="$OUT/sample_hmar_la$la.json" > "$OUT/sample_hmar_la$la.txt" 2>&1
    echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample_hmar_la$la.txt" | tail -n 4
  done
  on=$(ls "$OUT"/casmar_*.json | grep -v "linearactofffusedheadoff" | head -n 1)
  [ -n "$on" ] && [ -f "$OUT/mar_la-on.json" ] && \
    $PY -m maskar bench masked_sampling "$on" "$OUT/mar_la-on.json" | tee "$OUT/targets.txt"
elif [ "${PART}" = gelu3 ]; then
  # CASMAR-B's DiT fc1 + tanh GELU three ways, two timed calls each: the two kernels (default),
  # the per-shape tuned Triton op (--linear-act on: its tile configs, cuBLASLt's epilogue or the
  # pair, whichever its tuner times fastest), cuBLASLt's epilogue alone (MASKAR_FUSED_GELU=1)
  for sw in "off" "on" "cublaslt"; do
    el "bench casmar, --linears low, fc1 + GELU: $sw"
    if [ "$sw" = cublaslt ]; then env_sw="MASKAR_FUSED_GELU=1"; la=off; else env_sw="MASKAR_FUSED_GELU=0"; la=$sw; fi
    prof=""; [ "$sw" = off ] && prof="--profile"  # the default's profile: where its time goes now
    env $env_sw timeout $(cap 200) $PY -m maskar bench casmar --batch 64 --sample-reps 2 --linears low \
      --linear-act $la --fused-head off $prof --json "$OUT/casmar_gelu-$sw.json" > "$OUT/casmar_gelu-$sw.txt" 2>&1
    echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar_gelu-$sw.txt" | grep -E "^switches|^sample|Error" | tail -n 4
  done
elif [ "${PART}" = modulate ] || [ "${PART}" = modulate2 ]; then
  if [ "$PART" = modulate ]; then
    el "GPU tests: adaln_modulate, gated_residual, PSA fused q/k/v at CASMAR-B's shapes"
    timeout $(cap 150) $PY -m pytest -q -rP -m gpu -p no:cacheprovider tests/test_adaln_modulate.py \
      tests/test_gated_residual.py tests/test_proximal_attention.py > "$OUT/gpu_tests_modulate.txt" 2>&1
    echo "tests rc=$?"; grep -E "rel|passed|failed|Error" "$OUT/gpu_tests_modulate.txt" | tail -n 20
    casmar_variant default
    casmar_variant modulate MASKAR_DIT_MODULATE=1
    casmar_variant residual MASKAR_DIT_MODULATE=1 MASKAR_DIT_RESIDUAL=1 -- --profile
  else
    casmar_variant default
    el "bench mar num_iter 256 (defaults)"
    timeout $(cap 120) $PY -m maskar bench mar --batch 64 --num-iters 256 --sample-reps 1 --train-batch 0 \
      --linears low --json "$OUT/mar.json" > "$OUT/mar.txt" 2>&1
    echo "mar rc=$?"; grep -vE "$NOISE" "$OUT/mar.txt" | grep -E "^sample|Error" | tail -n 3
    casmar_variant qkv MASKAR_PSA_QKV=1
    # shellcheck disable=SC2086
    casmar_variant all MASKAR_DIT_MODULATE=1 MASKAR_DIT_RESIDUAL=1 MASKAR_PSA_QKV=1 ${EXTRA_ENV:-}
    for v in default all; do
      [ -f "$OUT/casmar_$v.json" ] && [ -f "$OUT/mar.json" ] && \
        $PY -m maskar bench masked_sampling "$OUT/casmar_$v.json" "$OUT/mar.json" | tee "$OUT/targets_$v.txt"
    done
  fi
elif [ "${PART}" = profile2 ]; then
  # where the time goes after PART=linact / linact2: the DiT step's kernels with the Triton GELU
  # matmul, and MAR-B num_iter 256's profile with the switches in ON
  el "casmar_parts with MASKAR_LINEAR_ACT=1 (the DiT step and its top kernels)"
  MASKAR_LINEAR_ACT=1 timeout $(cap 200) $PY -m maskar bench casmar_parts --compare-steps 10 \
    --json "$OUT/casmar_parts_la.json" > "$OUT/casmar_parts_la.txt" 2>&1
  echo "parts rc=$?"; grep -vE "$NOISE" "$OUT/casmar_parts_la.txt" | head -n 45
  el "bench mar num_iter 256 --profile, ${ON:---linear-act on --fused-head on}"
  timeout $(cap 200) $PY -m maskar bench mar --batch 64 --num-iters 256 --sample-reps 1 --train-batch 0 \
    --linears low ${ON:---linear-act on --fused-head on} --profile --json "$OUT/mar256_profile.json" \
    > "$OUT/mar256_profile.txt" 2>&1
  echo "mar rc=$?"; grep -vE "$NOISE" "$OUT/mar256_profile.txt" | tail -n 30
  el "bench sample 1024 px B 8, fast-w16: memory by pool (issue 14's 3x memory target)"
  timeout $(cap 150) $PY -m maskar bench sample models=hmar-d16,var-d16 cases=1024x8 modes=fast-w16 reps=3 \
    json="$OUT/sample_1024_pools.json" > "$OUT/sample_1024_pools.txt" 2>&1
  echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample_1024_pools.txt" | tail -n 12
elif [ "${PART}" = autotune ]; then
  for mode in default max-autotune-no-cudagraphs; do
    el "bench mar num_iter 256, blocks compiled with mode $mode"
    timeout $(cap 330) $PY -m maskar bench mar --batch 64 --num-iters 256 --sample-reps 1 --train-batch 0 \
      --compile-mode $mode --json "$OUT/mar256_$mode.json" > "$OUT/mar256_$mode.txt" 2>&1
    echo "mar $mode rc=$?"; grep -vE "$NOISE" "$OUT/mar256_$mode.txt" | grep -E "^sample|first|Error" | tail -n 4
  done
  el "bench casmar, blocks and the heads' steps compiled with mode max-autotune-no-cudagraphs"
  timeout $(cap 300) $PY -m maskar bench casmar --batch 64 --sample-reps 1 --compile-mode max-autotune-no-cudagraphs \
    --head-compile-mode max-autotune-no-cudagraphs --json "$OUT/casmar_autotune.json" > "$OUT/casmar_autotune.txt" 2>&1
  echo "casmar rc=$?"; grep -vE "$NOISE" "$OUT/casmar_autotune.txt" | grep -E "^sample|Error" | tail -n 4
  el "bench sample HMAR-d16 256 px, compiled with max-autotune-no-cudagraphs (time left)"
  timeout $(cap 200) $PY -m maskar bench sample models=hmar-d16 cases=256x64 modes=compiled reps=5 \
    compile_mode=max-autotune-no-cudagraphs json="$OUT/sample_autotune.json" > "$OUT/sample_autotune.txt" 2>&1
  echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample_autotune.txt" | tail -n 6
else
  el "bench sample: fast, compiled"
  timeout $(cap 330) $PY -m maskar bench sample models=hmar-d16,var-d16 modes=fast,compiled reps=5 \
    json="$OUT/sample.json" > "$OUT/sample.txt" 2>&1
  echo "sample rc=$?"; grep -vE "$NOISE" "$OUT/sample.txt" | tail -n 40
  el "bench train_step 256 px, compiled blocks (issue 13)"
  timeout $(cap 200) env PYTHONWARNINGS=ignore $PY -m maskar bench train_step res=256 steps=25 warmup=5 \
    rows=hmar/d16/blocks,var/d16/blocks json="$OUT/train_256.json" > "$OUT/train_256.txt" 2>&1
  echo "train rc=$?"; grep -vE "$NOISE" "$OUT/train_256.txt" | tail -n 30
fi
# more than 8 files do not all come back from the device: pack them into one
if [ "$(ls "$OUT" | wc -l)" -gt 8 ]; then
  pack=$(mktemp -d)/raw_${PART:-masked}.tgz
  tar czf "$pack" -C "$OUT" . && find "$OUT" -type f -delete && mv "$pack" "$OUT/"
  el "packed $OUT into raw_${PART:-masked}.tgz"
fi
el "done"
