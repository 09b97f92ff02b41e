#!/usr/bin/env bash
# Quality study, device call 2 of 2 (docs/quality.md): MAR vs CASMAR on Fashion-MNIST 32x32 at an equal
# budget, on the KL tokenizer trained in call 1 (carried as .carry/kl), and the shipped demos.
#   1. a 60-step calibration of MAR and CASMAR side by side -> STEPS: the slower one's speed x TRAIN_S
#   2. MAR || CASMAR, STEPS steps each (same batch 1024, lr 4e-4, EMA 0.999, same tokenizer),
#      5 checkpoints each for the training curves
#   3. bf16 export of both as the shipped checkpoints (checkpoints/mar-fmnist, checkpoints/casmar-fmnist):
#      the EMA weights, tokenizer inside, sampling defaults cut down for the CPU (SHIP_*_SAMPLE)
#   4. maskar bench quality with scripts/gpu/quality/plan_mar_casmar.yaml on those exported files (so
#      `maskar eval ckpt=checkpoints/casmar-fmnist ...` reproduces the table): classifier FD /
#      accuracy / precision-recall, images/s, CASMAR num_iter and DiT-step curves, MAR num_iter, cfg
#      sweeps, training curves; samples for the TF-Inception FID (on the CPU afterwards)
# Returns under $OUT: mar_casmar.tar (study JSON, samples, logs, configs, grids) and ckpts.tar[.part-*]
# (the two bf16 checkpoints). Needs carry .carry/fmnist and .carry/kl (scripts/quality_collect.sh).
# Expected wall time on one H200: 7-8.5 min (TRAIN_S 210 s of training, <= STUDY_T 190 s of study, ~80 s
# setup, calibration, export, grids; the study stops at STUDY_T with every row measured so far written).
source "$(dirname "$0")/quality/common.sh"
TRAIN_S=${TRAIN_S:-210}; TRAIN_T=${TRAIN_T:-$((TRAIN_S + 60))}; CAL=${CAL:-60}; STUDY_T=${STUDY_T:-190}; BS=${BS:-1024}; WORKERS=${WORKERS:-6}
KL=${KL:-.carry/kl}
SHIP_MAR_SAMPLE=${SHIP_MAR_SAMPLE:-"sample.num_iter=16 sample.num_sampling_steps=25 sample.cfg=2.0"}
SHIP_CASMAR_SAMPLE=${SHIP_CASMAR_SAMPLE:-"sample.num_iter=4 sample.scaffold_num_iter=8 sample.num_sampling_steps=20 \
sample.refine_num_sampling_steps=10 sample.cfg=2.0 sample.re_cfg=2.0"}
command -v nvidia-smi >/dev/null && nvidia-smi -L
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
el "data"; prepare_data
SF=$($PY -c "import yaml; print(yaml.safe_load(open('$KL/config.yaml'))['model']['scale_factor'])")
echo "KL tokenizer $KL, scale_factor $SF"
C="data.root=$DATA data.num_workers=$WORKERS train.progress=false train.tensorboard=false \
train.batch_size=$BS train.lr=4e-4 train.min_lr=4e-5 train.ema=0.999 train.compile=false device=$DEVICE \
model.tokenizer_ckpt=$KL model.tokenizer.scale_factor=$SF"

el "calibration: $CAL steps of MAR and CASMAR side by side"
CALC="train.steps=$CAL train.log_every=$((CAL / 2)) train.ckpt_every=0 train.warmup_steps=10"
$M train preset=mar-fmnist-s $C $CALC train.out_dir=$RUNS/cal_mar > $RUNS/cal_mar.log 2>&1 & P1=$!
$M train preset=casmar-fmnist-s $C $CALC train.out_dir=$RUNS/cal_casmar > $RUNS/cal_casmar.log 2>&1 & P2=$!
wait $P1 $P2
IPS_MAR=$(it_per_s $RUNS/cal_mar); IPS_CASMAR=$(it_per_s $RUNS/cal_casmar)
if [ -z "$IPS_MAR" ] || [ -z "$IPS_CASMAR" ]; then  # a calibration run failed: its log says why
  tail -n 5 $RUNS/cal_mar.log $RUNS/cal_casmar.log; IPS_MAR=${IPS_MAR:-8}; IPS_CASMAR=${IPS_CASMAR:-8}
fi
STEPS=$(steps_for $TRAIN_S $IPS_MAR $IPS_CASMAR)
echo "calibration it/s: mar $IPS_MAR casmar $IPS_CASMAR -> $STEPS steps each (batch $BS)" | tee $RUNS/budget.txt

el "train MAR || CASMAR"
T="train.steps=$STEPS train.warmup_steps=$((STEPS / 20)) train.ckpt_every=$((STEPS / 5)) train.keep_last=10 \
train.log_every=$(( STEPS / 20 > 10 ? STEPS / 20 : 10 ))"
timed mar timeout -s TERM $TRAIN_T $M train preset=mar-fmnist-s $C $T train.out_dir=$RUNS/mar \
  > $RUNS/mar_train.log 2>&1 & P1=$!
timed casmar timeout -s TERM $TRAIN_T $M train preset=casmar-fmnist-s $C $T \
  model.pred_cond_warmup_steps=$((STEPS * 3 / 10)) train.out_dir=$RUNS/casmar > $RUNS/casmar_train.log 2>&1 & P2=$!
wait $P1 $P2
tail -n 2 $RUNS/mar_train.log $RUNS/casmar_train.log

el "bf16 export (the shipped checkpoints)"
SHIP="dtype=bf16 model.tokenizer_ckpt=null data.root=$DATA_ROOT data.num_workers=0"
$M convert dtype src=$RUNS/mar out=$PACK/mar-fmnist $SHIP $SHIP_MAR_SAMPLE
$M convert dtype src=$RUNS/casmar out=$PACK/casmar-fmnist $SHIP $SHIP_CASMAR_SAMPLE

el "study (maskar bench quality)"
timeout -s TERM $STUDY_T $M bench quality plan=scripts/gpu/quality/plan_mar_casmar.yaml out=$RUNS/study \
  tag=mar_casmar classifier=$CLF device=$DEVICE scale=$SCALE ckpt.mar=$PACK/mar-fmnist \
  ckpt.casmar=$PACK/casmar-fmnist run.mar=$RUNS/mar run.casmar=$RUNS/casmar \
  as.mar=checkpoints/mar-fmnist as.casmar=checkpoints/casmar-fmnist ${STUDY_EXTRA:-} 2>&1 | grep --line-buffered -v Warning | tee $RUNS/study.log

el "grids + pack"
$M sample ckpt=$PACK/mar-fmnist out=$RUNS/study/grid_mar.png per_class=${GRID_PC:-8} device=$DEVICE \
  sample.num_iter=64 sample.num_sampling_steps=100 ${GRID_EXTRA:-} > /dev/null 2>&1
$M sample ckpt=$PACK/casmar-fmnist out=$RUNS/study/grid_casmar.png per_class=${GRID_PC:-8} device=$DEVICE \
  sample.scaffold_num_iter=16 sample.num_sampling_steps=100 sample.refine_num_sampling_steps=250 ${GRID_EXTRA:-} ${GRID_EXTRA_CASMAR:-} > /dev/null 2>&1
mkdir -p $RUNS/logs
for r in mar casmar cal_mar cal_casmar; do
  cp $RUNS/$r/log.txt $RUNS/logs/${r}_log.txt 2>/dev/null; cp $RUNS/$r/config.yaml $RUNS/logs/${r}_config.yaml 2>/dev/null
done
cp $RUNS/*.log $RUNS/*.txt $RUNS/logs/ 2>/dev/null
pack mar_casmar study logs
(cd $RUNS && mv pack ckpts && tar -cf $RUNS/ckpts.tar ckpts && mv ckpts pack)
if [ "$(stat -c %s $RUNS/ckpts.tar)" -gt 15000000 ]; then split -b 15000000 $RUNS/ckpts.tar $OUT/ckpts.tar.part-
else cp $RUNS/ckpts.tar $OUT/; fi
ls -la $OUT; el "done"
summary mar_casmar
