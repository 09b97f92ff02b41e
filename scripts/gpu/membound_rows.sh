#!/usr/bin/env bash
# The training step's memory-bound cuts of 2026-12-06 (gradient clipping inside fused AdamW's pass,
# maskar.train.clipping; the qkv bias gradient summed by the q/k norm's backward launch,
# maskar.kernels.qk_norm.BIAS_GRAD) measured on one device machine:
#   PART=sweep  (about 7 min, DEADLINE=560): scripts/gpu/qk_norm_sweep.py (the q/k norm's launch
#               configs at HMAR-d16's 1024 px B 2 and 256 px B 32 shapes, the bias gradient checked);
#               then the GPU tests the last full run did not reach (tests/test_neighborhood_kernel.py
#               on, alphabetically) and the q/k norm's.
#   PART=ab256  (about 5 min): 256 px B 32 HMAR-d16 and VAR-d16 (the step as one CUDA graph, auto
#               attention) with the cuts (the defaults) and without, each side in its own process.
#   PART=ab1024 (about 6 min): the same at 1024 px B 2 with FlashAttention-4 (needs scripts/fa4_bundle.sh's
#               first part in .persist/fa4a from the call before and .carry/fa4b carried by this one);
#               the side with the cuts profiled (where the step's time goes).
#   PART=gelu   (about 5 min): the training GELU with fc1's bias sums (maskar.kernels.gelu_bias): its GPU
#               tests, scripts/gpu/gelu_bias_sweep.py (configs, Inductor's pair, errors), then HMAR-d16
#               1024 px B 2 with attention scales and 256 px B 32, with it and without
#               (gelu_bias.ENABLED = False), each side in its own process at the sweep's fastest config.
# QK_CFG=BLOCK_T,WARPS,ITERS (ab256, ab1024): the q/k norm's launch config on both sides (the sweep
# writes its fastest to BEST=PATH).
# Run from the repository root: OUT=/tmp/out PART=sweep bash scripts/gpu/membound_rows.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
case "${PART:-}" in
  sweep|ab256|ab1024|gelu) ;;
  *) echo "PART: expected sweep, ab256, ab1024 or gelu; got '${PART:-}'" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/clock.sh"
NOISE="UserWarning|generate_mlir_function_types|JitArgument|^\s*$|warn_once|This call originates|cu_seqlens = "
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# ab TAG RES STEPS WARMUP ROWS: `maskar bench train_step` with the defaults (new) and with $OFF run
# first (old), each side in its own process, both after $BOTH; into $OUT/TAG_RES_SIDE.{txt,json}
# (TAG train at 1024 px: the new side profiled too)
ab() {
  local tag=$1 res=$2 st=$3 wu=$4 rows=$5 side
  for side in new old; do
    el "train_step $res px, $tag, $side path"
    local pre="import sys; ${BOTH:-pass}"; [ $side = old ] && pre="$pre; $OFF"
    local extra=""; [ $side = new ] && [ "$tag$res" = train1024 ] && extra="profile=$OUT/train_${res}_new_profile.txt"
    timeout $(cap "${AB_S:-200}") python3 -c "$pre
from maskar.cli import main
raise SystemExit(main(sys.argv[1:]))" bench train_step res=$res steps=$st warmup=$wu rows=$rows $extra \
      json="$OUT/${tag}_${res}_$side.json" > "$OUT/${tag}_${res}_$side.txt" 2>&1
    echo "rc=$?"; grep -vE "$NOISE" "$OUT/${tag}_${res}_$side.txt" | grep -E "^(hmar|var)-|rror" | tail -n 4
  done
  [ -f "$OUT/${tag}_${res}_new_profile.txt" ] && head -n 12 "$OUT/${tag}_${res}_new_profile.txt"
}
# the old path of PART=ab256 / ab1024: clipping by clip_grad_norm_, the qkv bias gradient summed by
# the linear's backward; QK_CFG=BLOCK_T,WARPS,ITERS: the q/k norm's launch config on both sides
OFF="import maskar.train.clipping as c, maskar.kernels.qk_norm as q; c.ENABLED = False; q.BIAS_GRAD = False"
BOTH=""
[ -n "${QK_CFG:-}" ] && BOTH="import maskar.kernels.qk_norm as q; q.FORCE_CONFIG = q.QKConfig($QK_CFG)"
if [ "$PART" = sweep ]; then
  el "q/k norm launch configs"
  OUT=$OUT timeout $(cap 240) python3 scripts/gpu/qk_norm_sweep.py > "$OUT/qk_norm_sweep.txt" 2>&1
  echo "rc=$?"; python3 - "$OUT/qk_norm_sweep.txt" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    if not line.startswith("{"): print(line.rstrip()[:200]); continue
    r = json.loads(line)
    if "block_t" in r:
        print(r["shape"], r["block_t"], r["num_warps"], r["iters"], "sums" if r["bias_sums"] else "no-sums",
              f"fwd {r['fwd_ms']:.4f} ({r['fwd_tbs']:.2f} TB/s) bwd {r['bwd_ms']:.4f} ({r['bwd_tbs']:.2f} TB/s)")
    else:
        print(line.strip()[:300])
PY
  el "GPU tests: the q/k norm, then the files the last full run did not reach"
  timeout $(cap 330) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_qk_norm_kernel.py \
    tests/test_train_cuda_graph.py tests/test_neighborhood_kernel.py tests/test_proximal_attention.py \
    tests/test_psa_bench.py tests/test_resample.py tests/test_sampling_speed.py tests/test_var.py \
    > "$OUT/gpu_tests.txt" 2>&1
  echo "rc=$?"; grep -E "passed|failed|FAILED|ERROR" "$OUT/gpu_tests.txt" | tail -n 12
  exit 0
fi
if [ "$PART" = gelu ]; then
  el "GPU tests of the training GELU"
  timeout $(cap 90) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gelu_bias_kernel.py > "$OUT/gpu_tests_gelu.txt" 2>&1
  echo "rc=$?"; tail -n 2 "$OUT/gpu_tests_gelu.txt"
  el "GELU launch configs"
  BEST=$OUT/gelu_best OUT=$OUT timeout $(cap 150) python3 scripts/gpu/gelu_bias_sweep.py > "$OUT/gelu_sweep.txt" 2>&1
  echo "rc=$?"; grep -E "fastest|inductor|check|Error" "$OUT/gelu_sweep.txt" | cut -c1-300
  BOTH=""  # the sweep's fastest config on both sides, where it wrote one
  [ -f "$OUT/gelu_best" ] && BOTH="import maskar.kernels.gelu_bias as g; g.FORCE_CONFIG = g.GeluConfig($(cat "$OUT/gelu_best"))"
  OFF="import maskar.kernels.gelu_bias as g; g.ENABLED = False"
  for res in ${GELU_RES:-1024 256}; do
    if [ $res = 1024 ]; then ab gelu 1024 20 3 hmar/d16/blocks/graph/attn-scales; else ab gelu 256 25 5 hmar/d16/blocks/graph; fi
  done
  exit 0
fi
if [ "$PART" = ab256 ]; then
  ab train 256 25 5 hmar/d16/blocks/graph,var/d16/blocks/graph
  exit 0
fi
source scripts/gpu/fa4_install.sh || exit 1
ab train 1024 20 3 hmar/d16/blocks/graph/attn-fa4,var/d16/blocks/graph/attn-fa4
