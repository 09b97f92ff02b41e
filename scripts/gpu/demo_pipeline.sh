#!/usr/bin/env bash
# Train the shipped Fashion-MNIST demo: VQ tokenizer -> HMAR stage 1 -> HMAR stage 2.
# usage: scripts/gpu/demo_pipeline.sh STAGE   (STAGE: vq | hmar1 | hmar2 | all)
# env: DATA (IDX folder), RUNS (run dirs), VQ_STEPS, S1_STEPS, S2_STEPS, BS, WIDTH, HEADS, DEPTH
set -euo pipefail
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
PY=${PY:-python3}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
RUNS=${RUNS:-runs/demo}
BS=${BS:-256}
DEPTH=${DEPTH:-6}; WIDTH=${WIDTH:-256}; HEADS=${HEADS:-4}
common="data.root=$DATA train.progress=false train.log_every=${LOG_EVERY:-500} train.ckpt_every=0 train.batch_size=$BS"
net="model.depth=$DEPTH model.width=$WIDTH model.heads=$HEADS"
stage=${1:-all}
if [[ $stage == vq || $stage == all ]]; then
  $PY -m maskar train preset=vqvae-fmnist $common train.out_dir=$RUNS/vq train.steps=${VQ_STEPS:-3000} \
      train.warmup_steps=200
  $PY -m maskar.bench.tokenizer_quality $RUNS/vq split=test json=$RUNS/vq_quality.json
fi
if [[ $stage == hmar1 || $stage == all ]]; then
  $PY -m maskar train preset=hmar-fmnist $common $net model.tokenizer_ckpt=$RUNS/vq \
      train.out_dir=$RUNS/hmar1 train.steps=${S1_STEPS:-6000} train.warmup_steps=300
fi
if [[ $stage == hmar2 || $stage == all ]]; then
  $PY -m maskar train preset=hmar-fmnist-finetune $common $net model.stage1_ckpt=$RUNS/hmar1 \
      train.out_dir=$RUNS/hmar2 train.steps=${S2_STEPS:-2000} train.warmup_steps=100
fi
