#!/usr/bin/env bash
# maskar.kernels.adaln_norm (the blocks' LayerNorm + modulate with the residual add, one launch
# each way) on a GPU, in one device call (about 9 min, DEADLINE=560):
#   OUT=$OUT bash scripts/gpu/adaln_norm_rows.sh
# 1. its GPU tests (the op against torch at 2 x 1031 x 1024 bf16; a compiled d16-width block's
#    gradients against the torch code's under bf16 autocast);
# 2. scripts/gpu/adaln_norm_sweep.py: every launch config at HMAR-d16's 1024 px B 2 and 256 px B 32
#    shapes, and the block's pair of norms fwd + bwd against Inductor's (its "BEST" line picks the
#    config the A/B below runs with);
# 3. `maskar bench train_step` A/B, each side in its own process (new: adaln_norm.ENABLED = True,
#    old: False):
#    HMAR-d16 1024 px B 2 (`scales`, the step as one CUDA graph with the bf16 copies; new side
#    profiled), then VAR-d16 1024 px, then HMAR-d16 and VAR-d16 256 px B 32; ONLY=nograph: the
#    rows without the CUDA graph.
# SUMS=1: the same for MASKAR_ADALN_SUMS (the FFN residual's backward and the proj / fc2 bias sums
# in the kernels' launches): GPU tests, scripts/gpu/adaln_sums_sweep.py (its GATED_BEST config, or
# BEST=m,i,w), then the rows with an.SUMS True (new) and False (old), both with the kernels on.
# Writes $OUT/an-*.txt / .json.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source "$(dirname "$0")/clock.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -z "${BEST:-}" ]; then  # BEST given: straight to the A/B rows with that config (ONLY=tag,... picks rows)
  el "GPU tests: adaln_norm"
  timeout $(cap 150) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs -s tests/test_adaln_norm_kernel.py \
    > "$OUT/an-gpu-tests.txt" 2>&1
  echo "rc=$?"; grep -E "adaln_norm res|gated_add|block grads|passed|failed|FAILED|ERROR|Error" "$OUT/an-gpu-tests.txt" \
    | cut -c1-300 | tail -n 12
  if [ "${SUMS:-0}" = 1 ]; then  # MASKAR_ADALN_SUMS's launches; BEST: gated_add's m,i,w
    el "MASKAR_ADALN_SUMS's launches"
    timeout $(cap 120) python3 scripts/gpu/adaln_sums_sweep.py > "$OUT/an-sums-sweep.txt" 2>&1
    echo "rc=$?"; grep -E '"best"|norm_bwd|inductor|BEST|rror' "$OUT/an-sums-sweep.txt" | cut -c1-200
    BEST=$(grep "^GATED_BEST" "$OUT/an-sums-sweep.txt" | cut -d' ' -f2- | tr ' ' ',')
  else  # the norm's launch configs; BEST: m,w,m,i,w
    el "launch configs and the pair against Inductor"
    timeout $(cap 150) python3 scripts/gpu/adaln_norm_sweep.py > "$OUT/an-sweep.txt" 2>&1
    echo "rc=$?"; grep -E '"best"|"pair"|BEST|rror' "$OUT/an-sweep.txt" | cut -c1-200
    BEST=$(grep "^BEST" "$OUT/an-sweep.txt" | cut -d' ' -f2- | tr ' ' ',')
  fi
fi
SET="import maskar.kernels.adaln_norm as an; an.ENABLED = True"
if [ "${SUMS:-0}" = 1 ]; then  # new: with MASKAR_ADALN_SUMS, old: without (the kernels on both sides)
  SET="$SET; an.SUMS = True"; OLD_SET="an.SUMS = False"
  [ -n "$BEST" ] && SET="$SET; an.GATED_FORCE_CONFIG = an.GatedAddConfig($BEST)"
else  # new: the kernels, old: Inductor's code
  OLD_SET="an.ENABLED = False"
  [ -n "$BEST" ] && SET="$SET; an.FORCE_CONFIG = an.AdaLNNormConfig($BEST)"
fi
ab() {  # ab TAG RES STEPS WARMUP ROWS
  local tag=$1 res=$2 st=$3 wu=$4 rows=$5 side
  for side in new old; do
    el "train_step $res px $tag, $side"
    local pre="import sys; $SET"; [ $side = old ] && pre="$pre; $OLD_SET"
    local extra=""; [ $side = new ] && [ "$tag" = hmar1024 ] && extra="profile=$OUT/an-$tag-new-profile.txt"
    timeout $(cap "${AB_S:-130}") python3 -c "$pre
from maskar.cli import main
raise SystemExit(main(sys.argv[1:]))" bench train_step res=$res steps=$st warmup=$wu rows=$rows $extra \
      json="$OUT/an-$tag-$side.json" > "$OUT/an-$tag-$side.txt" 2>&1
    echo "rc=$?"; grep -E "^(hmar|var)-|rror" "$OUT/an-$tag-$side.txt" | cut -c1-230 | tail -n 3
  done
}
want() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
want hmar1024 && ab hmar1024 1024 20 3 hmar/d16/blocks/graph/master/attn-scales
[ -f "$OUT/an-hmar1024-new-profile.txt" ] && grep -E "^(==|class|matmul|attention|other|norms|optimizer|cross|idle)|_adaln" \
  "$OUT/an-hmar1024-new-profile.txt" | cut -c1-160 | head -n 14
want var1024 && [ "${QUICK:-0}" != 1 ] && ab var1024 1024 20 3 var/d16/blocks/graph/master/attn-scales
want 256 && [ "${QUICK:-0}" != 1 ] && ab 256 256 25 5 hmar/d16/blocks/graph/master,var/d16/blocks/graph/master
# ONLY=nograph (only when named): the same A/B without the step's CUDA graph (train.cuda_graph off,
# maskar train's default), where the ops' host work is not hidden by a graph
if [[ ",${ONLY:-}," == *",nograph,"* ]]; then
  ab nograph1024 1024 20 3 hmar/d16/blocks/attn-scales
  ab nograph256 256 25 5 hmar/d16/blocks,var/d16/blocks
fi
el done
