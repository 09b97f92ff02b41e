#!/usr/bin/env bash
# After maskar.kernels.adaln_norm went on by default (2026-12-07, fifth session), one device call:
#   OUT=$OUT bash scripts/gpu/adaln_default_call.sh
# Both GPUs: the GPU tests of the VAR / HMAR training paths with the kernels in them by default
# (CUDA-graph step, bf16 copies, VAR, HMAR, the kernels' own); the q/k norm's backward with IEEE
# division against a reciprocal (qk_norm_sweep.py SUBSET=div: QKConfig.exact_div).
# H200 (issue 13's GPU): then the 1024 px B 2 and 256 px B 32 rows at the defaults (`scales` at
# 1024 px; FlashAttention-4 needs its bundle: fa4_rows.sh PART=master1024 in the next call).
# Anything else (an H100): the A/B without the step's CUDA graph of MASKAR_ADALN_SUMS (on / off,
# the LayerNorm kernels on both sides; adaln_norm_rows.sh SUMS=1 ONLY=nograph), where the ops' host
# work is not hidden by a graph. (The same A/B of MASKAR_ADALN_NORM ran on 2026-12-07, fifth session.)
# Then, carrying .carry/fa4b: PART=switch1024 bash scripts/gpu/fa4_rows.sh (MASKAR_ADALN_SUMS with
# FlashAttention-4).
# Copies .carry/fa4a to .persist/ where it was carried (fa4_rows.sh's first part).
set -uo pipefail
source "$(dirname "$0")/clock.sh"
prelude
el "GPU tests, adaln_norm on by default"
timeout $(cap 230) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_train_cuda_graph.py \
  tests/test_master_weights.py tests/test_hmar.py tests/test_var.py tests/test_adaln_norm_kernel.py \
  > "$OUT/gpu-tests.txt" 2>&1
echo "rc=$?"; tail -n 4 "$OUT/gpu-tests.txt" | cut -c1-300
el "the q/k norm's backward: IEEE division by the norm against a reciprocal (qk_norm_sweep.py SUBSET=div)"
SUBSET=div timeout $(cap 90) python3 scripts/gpu/qk_norm_sweep.py > "$OUT/qk-div-sweep.txt" 2>&1
echo "rc=$?"; grep -E '"fastest"|rror' "$OUT/qk-div-sweep.txt" | cut -c1-200
case "$g" in
  *H200*)
    for res in 1024 256; do
      el "train_step $res px at the defaults"
      rows=hmar/d16/blocks/graph/master/attn-scales,var/d16/blocks/graph/master/attn-scales; st=20; wu=3
      [ $res = 256 ] && rows=hmar/d16/blocks/graph/master,var/d16/blocks/graph/master && st=25 && wu=5
      timeout $(cap 160) python3 -m maskar bench train_step res=$res steps=$st warmup=$wu rows=$rows \
        json="$OUT/train-$res.json" > "$OUT/train-$res.txt" 2>&1
      echo "rc=$?"; grep -E "^(hmar|var)-|rror" "$OUT/train-$res.txt" | cut -c1-230 | tail -n 3
    done ;;
  *) SUMS=1 BEST=2,16,4 ONLY=nograph AB_S=120 DEADLINE=$(( T0 + DEADLINE - $(date +%s) )) \
       bash "$(dirname "$0")/adaln_norm_rows.sh" ;;
esac
el done
pack_out "$OUT"
