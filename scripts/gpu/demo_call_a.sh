#!/usr/bin/env bash
# Device call A: train the Fashion-MNIST VQ and KL tokenizers in parallel, measure them, then
# HMAR stage 1. Packs bf16 checkpoints + logs into $OUT/pack.tar.part-* (<= 15 MB each).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-.carry/fmnist}; RUNS=/tmp/runs; mkdir -p $RUNS
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
C="data.root=$DATA train.progress=false train.log_every=500 train.ckpt_every=0 train.batch_size=256"
el "tokenizers"
timeout -s TERM ${TOK_T:-200} python3 -m maskar train preset=vqvae-fmnist $C train.out_dir=$RUNS/vq \
  train.steps=${VQ_STEPS:-4000} train.warmup_steps=200 > $RUNS/vq_train.log 2>&1 &
timeout -s TERM ${TOK_T:-200} python3 -m maskar train preset=klvae-fmnist $C train.out_dir=$RUNS/kl \
  train.steps=${KL_STEPS:-4000} train.warmup_steps=200 > $RUNS/kl_train.log 2>&1 &
wait; tail -n 3 $RUNS/vq_train.log $RUNS/kl_train.log
el "quality"
timeout 80 python3 -m maskar.bench.tokenizer_quality $RUNS/vq split=test json=$RUNS/vq_quality.json > $RUNS/vq_quality.txt 2>&1 &
timeout 80 python3 -m maskar.bench.tokenizer_quality $RUNS/kl split=test json=$RUNS/kl_quality.json > $RUNS/kl_quality.txt 2>&1 &
wait; cat $RUNS/vq_quality.txt $RUNS/kl_quality.txt
el "hmar stage 1"
timeout -s TERM ${S1_T:-220} python3 -m maskar train preset=hmar-fmnist $C model.depth=6 model.width=256 \
  model.heads=4 model.tokenizer_ckpt=$RUNS/vq train.out_dir=$RUNS/hmar1 train.steps=${S1_STEPS:-6000} \
  train.warmup_steps=300 > $RUNS/hmar1_train.log 2>&1
tail -n 4 $RUNS/hmar1_train.log
el "pack"
mkdir -p /tmp/pack
for r in vq kl hmar1; do python3 -m maskar convert dtype src=$RUNS/$r out=/tmp/pack/$r dtype=${PACK_DTYPE:-bf16}; done
cp $RUNS/*.log $RUNS/*.txt $RUNS/*.json /tmp/pack/ 2>/dev/null
for r in vq kl hmar1; do cp $RUNS/$r/log.txt /tmp/pack/${r}_log.txt 2>/dev/null; done
tar -C /tmp -cf /tmp/pack.tar pack && split -b 15M /tmp/pack.tar $OUT/pack.tar.part-
ls -la $OUT; el "done"
