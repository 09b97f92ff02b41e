#!/usr/bin/env bash
# Device call B: HMAR stage 1 and stage 2 on Fashion-MNIST with the tokenizer from call A
# (.carry/vq), a sample grid, and the shipped bf16 checkpoint in $OUT/pack.tar.part-*.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-.carry/fmnist}; RUNS=/tmp/runs; mkdir -p $RUNS /tmp/pack
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
C="data.root=$DATA data.num_workers=8 train.progress=false train.log_every=500 train.batch_size=256"
NET="model.depth=6 model.width=256 model.heads=4"
el "hmar stage 1"
timeout -s TERM ${S1_T:-270} python3 -m maskar train preset=hmar-fmnist $C $NET model.tokenizer_ckpt=.carry/vq \
  train.out_dir=$RUNS/hmar1 train.steps=${S1_STEPS:-6000} train.warmup_steps=300 train.ckpt_every=1000 \
  > $RUNS/hmar1_train.log 2>&1
tail -n 3 $RUNS/hmar1_train.log
el "hmar stage 2"
timeout -s TERM ${S2_T:-150} python3 -m maskar train preset=hmar-fmnist-finetune $C $NET model.stage1_ckpt=$RUNS/hmar1 \
  train.out_dir=$RUNS/hmar2 train.steps=${S2_STEPS:-3000} train.warmup_steps=100 train.ckpt_every=500 \
  > $RUNS/hmar2_train.log 2>&1
tail -n 3 $RUNS/hmar2_train.log
el "pack + sample"
python3 -m maskar convert dtype src=$RUNS/hmar2 out=/tmp/pack/hmar-fmnist dtype=bf16
python3 -m maskar sample ckpt=/tmp/pack/hmar-fmnist out=/tmp/pack/grid_gpu.png per_class=8
python3 -m maskar sample ckpt=/tmp/pack/hmar-fmnist out=/tmp/pack/grid_norefine.png per_class=8 sample.refine=false
cp $RUNS/*.log /tmp/pack/; cp $RUNS/hmar1/log.txt /tmp/pack/hmar1_log.txt; cp $RUNS/hmar2/log.txt /tmp/pack/hmar2_log.txt
tar -C /tmp -cf /tmp/pack.tar pack && split -b 15M /tmp/pack.tar $OUT/pack.tar.part-
ls -la $OUT; el "done"
