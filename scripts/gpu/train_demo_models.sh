#!/usr/bin/env bash
# Train the shipped Fashion-MNIST demo (checkpoints/hmar-fmnist, docs/tokenizers.md) on one GPU,
# in two calls that each fit a 10-minute device slot:
#   scripts/gpu/train_demo_models.sh tokenizers   VQ and KL tokenizers side by side (200 s budget
#       each, batch 256), then their PSNR / codebook usage on the test split. About 5 minutes.
#   scripts/gpu/train_demo_models.sh hmar         HMAR stage 1 (270 s budget) and stage 2 (150 s)
#       on the VQ tokenizer, the bf16 export and two 8-per-class sample grids. About 8 minutes.
# Produces in $OUT: pack.tar.part-* (15 MB pieces of a tar of pack/: the bf16 checkpoints, the
# training logs, the tokenizer quality txt/json, the grids); `cat pack.tar.part-* | tar x`.
# Inputs: DATA, the Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist; on the
# device machine carry it and pass DATA=.carry/fmnist); TOKENIZER, the VQ checkpoint for `hmar`
# (default /tmp/runs/vq from a `tokenizers` call on the same machine, or the unpacked pack/vq).
# Step counts and budgets: VQ_STEPS KL_STEPS TOK_T, S1_STEPS S1_T, S2_STEPS S2_T. EXTRA: more
# overrides for every training run; QUALITY_ARGS: more options for the quality measurement.
# Run from the repository root.
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
stage=${1:-}
case "$stage" in tokenizers|hmar) ;; *) echo "usage: $0 tokenizers|hmar" >&2; exit 2;; esac
PY=${PY:-python3}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}; RUNS=${RUNS:-/tmp/runs}; PACK=${PACK:-/tmp/pack}
OUT=${OUT:-/tmp/out}; mkdir -p "$RUNS" "$PACK" "$OUT"
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)"

if [ "$stage" = tokenizers ]; then
  C="data.root=$DATA train.progress=false train.log_every=500 train.ckpt_every=0 train.batch_size=256 ${EXTRA:-}"
  el "tokenizers"
  timeout -s TERM ${TOK_T:-200} $PY -m maskar train preset=vqvae-fmnist $C train.out_dir=$RUNS/vq \
    train.steps=${VQ_STEPS:-4000} train.warmup_steps=200 > $RUNS/vq_train.log 2>&1 &
  timeout -s TERM ${TOK_T:-200} $PY -m maskar train preset=klvae-fmnist $C train.out_dir=$RUNS/kl \
    train.steps=${KL_STEPS:-4000} train.warmup_steps=200 > $RUNS/kl_train.log 2>&1 &
  wait; tail -n 3 $RUNS/vq_train.log $RUNS/kl_train.log
  el "quality"
  for r in vq kl; do
    timeout 80 $PY -m maskar.bench.tokenizer_quality $RUNS/$r split=test json=$RUNS/${r}_quality.json \
      ${QUALITY_ARGS:-} > $RUNS/${r}_quality.txt 2>&1 &
  done
  wait; cat $RUNS/vq_quality.txt $RUNS/kl_quality.txt
  el "pack"
  for r in vq kl; do
    $PY -m maskar convert dtype src=$RUNS/$r out=$PACK/$r dtype=${PACK_DTYPE:-bf16}
    cp $RUNS/$r/log.txt $PACK/${r}_log.txt 2>/dev/null
  done
  cp $RUNS/*.log $RUNS/*_quality.txt $RUNS/*_quality.json $PACK/ 2>/dev/null
else
  TOKENIZER=${TOKENIZER:-$RUNS/vq}
  C="data.root=$DATA data.num_workers=8 train.progress=false train.log_every=500 train.batch_size=256 train.compile=false ${EXTRA:-}"
  NET="model.depth=6 model.width=256 model.heads=4"
  el "hmar stage 1"
  timeout -s TERM ${S1_T:-270} $PY -m maskar train preset=hmar-fmnist $C $NET model.tokenizer_ckpt=$TOKENIZER \
    train.out_dir=$RUNS/hmar1 train.steps=${S1_STEPS:-6000} train.warmup_steps=300 train.ckpt_every=1000 \
    > $RUNS/hmar1_train.log 2>&1
  tail -n 3 $RUNS/hmar1_train.log
  el "hmar stage 2"
  timeout -s TERM ${S2_T:-150} $PY -m maskar train preset=hmar-fmnist-finetune $C $NET model.stage1_ckpt=$RUNS/hmar1 \
    train.out_dir=$RUNS/hmar2 train.steps=${S2_STEPS:-3000} train.warmup_steps=100 train.ckpt_every=500 \
    > $RUNS/hmar2_train.log 2>&1
  tail -n 3 $RUNS/hmar2_train.log
  el "export + sample"
  $PY -m maskar convert dtype src=$RUNS/hmar2 out=$PACK/hmar-fmnist dtype=bf16
  $PY -m maskar sample ckpt=$PACK/hmar-fmnist out=$PACK/grid_gpu.png per_class=8
  $PY -m maskar sample ckpt=$PACK/hmar-fmnist out=$PACK/grid_norefine.png per_class=8 sample.refine=false
  cp $RUNS/hmar*_train.log $PACK/
  for r in hmar1 hmar2; do cp $RUNS/$r/log.txt $PACK/${r}_log.txt; done
fi
rm -f "$OUT"/pack.tar.part-*
tar -C "$(dirname "$PACK")" -cf /tmp/pack.tar "$(basename "$PACK")" && split -b 15M /tmp/pack.tar "$OUT/pack.tar.part-"
ls -la "$OUT"; el "done"
