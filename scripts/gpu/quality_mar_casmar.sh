#!/usr/bin/env bash
# Quality study, device call 2 of 3 (docs/quality.md): MAR vs CASMAR on Fashion-MNIST 32x32 at an equal
# budget, on the KL tokenizer trained in call 1 (carried as .carry/kl), and the shipped demos.
#   0. pre-flight (~20 s): MAR and CASMAR (random weights) sample through the study's entry and the
#      diffusion heads' CUDA-graph chains; a failure stops the call before anything is trained
#   1. a 60-step calibration of CASMAR and MAR at two sizes side by side -> the MAR size whose step
#      costs nearest CASMAR's (equal GPU-minutes), STEPS: the slower one's speed x TRAIN_S
#   2. MAR || CASMAR, STEPS steps each (same batch 1024, lr 4e-4, no EMA, same tokenizer), 5 checkpoints
#      each for the training curves; as soon as one is trained: its bf16 export as the shipped
#      checkpoint (checkpoints/mar-fmnist, checkpoints/casmar-fmnist: tokenizer inside, sampling
#      defaults cut down for the CPU, SHIP_*_SAMPLE), then its study rows on that exported file (so
#      `maskar eval ckpt=checkpoints/casmar-fmnist ...` reproduces the table; plan
#      scripts/gpu/quality/plan_mar_casmar.yaml: the diffusion spacing check, cfg / num_iter / DiT-step
#      curves, training curves) until STUDY_END; CASMAR's rows in two processes (alone, one process
#      reached 5 of its 24 rows by the deadline of the first 2026-12-03 run)
#   3. one JSON (mar_casmar.json). The main rows (10,000 samples a seed) and the speed rows run in
#      call 3 (scripts/gpu/quality_main_fid.sh) on the checkpoints this call leaves in RUNS/pack.
# No EMA: the 2026-12-03 run exported 0.999-EMA weights after 1,110 steps, a third still the random
# initialisation (docs/quality.md). Sampling uses "ddimN" diffusion spacing (the plan says why).
# Returns under $OUT: mar_casmar.tar (study JSON, samples, grids, logs, configs) and ckpts.tar[.part-*]
# (the two bf16 checkpoints). Needs carry .carry/fmnist and .carry/kl (scripts/quality_collect.sh).
# Expected wall time on one H200: 7.5-8 min (STUDY_END 450 s + packing); the command's limit is 10 min.
# Keep RUNS on the device machine for call 3 (e.g. RUNS=$PWD/.persist/q2: .persist/ is git-ignored and
# stays while the machine is warm). Every study process stops at STUDY_END with its rows so far written.
source "$(dirname "$0")/quality/common.sh"
TRAIN_S=${TRAIN_S:-210}; TRAIN_T=${TRAIN_T:-$((TRAIN_S + 60))}; CAL=${CAL:-60}; BS=${BS:-1024}; WORKERS=${WORKERS:-6}
STUDY_END=${STUDY_END:-450}
KL=${KL:-.carry/kl}
PLAN=scripts/gpu/quality/plan_mar_casmar.yaml
SHIP_MAR_SAMPLE=${SHIP_MAR_SAMPLE:-"sample.num_iter=16 sample.num_sampling_steps=ddim25 sample.cfg=2.0"}
SHIP_CASMAR_SAMPLE=${SHIP_CASMAR_SAMPLE:-"sample.num_iter=4 sample.scaffold_num_iter=8 sample.num_sampling_steps=ddim20 \
sample.refine_num_sampling_steps=ddim10 sample.cfg=2.0 sample.re_cfg=2.0"}
command -v nvidia-smi >/dev/null && nvidia-smi -L
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
smoke mar casmar
el "data"; prepare_data
SF=$($PY -c "import yaml; print(yaml.safe_load(open('$KL/config.yaml'))['model']['scale_factor'])")
echo "KL tokenizer $KL, scale_factor $SF"
C="data.root=$DATA data.num_workers=$WORKERS train.progress=false train.tensorboard=false \
train.batch_size=$BS train.lr=4e-4 train.min_lr=4e-5 train.ema=0 train.compile=false device=$DEVICE \
model.tokenizer_ckpt=$KL model.tokenizer.scale_factor=$SF"

# Equal steps x batch and equal GPU-minutes (issue 17) need a MAR whose step costs what CASMAR's does:
# CASMAR's step is its MAR backbone's plus the scaffold pass and the DiT head (2.6x mar-fmnist-s's in
# the 2026-12-03 run). The calibration times CASMAR beside two MAR sizes, mar-fmnist-s and MAR_M (by
# default the backbone and head widths of the 30k-step mar-fmnist preset), and the study trains the
# MAR whose speed is nearer CASMAR's (MAR_SIZE=s|m forces one).
MAR_M=${MAR_M:-"model.encoder_embed_dim=256 model.encoder_depth=4 model.decoder_embed_dim=256 \
model.decoder_depth=4 model.diffloss_w=256"}
el "calibration: $CAL steps of CASMAR and MAR at two sizes side by side"
CALC="train.steps=$CAL train.log_every=$((CAL / 2)) train.ckpt_every=0 train.warmup_steps=10"
CT="timeout -s TERM ${CAL_T:-150}"
$CT $M train preset=mar-fmnist-s $C $CALC train.out_dir=$RUNS/cal_mar > $RUNS/cal_mar.log 2>&1 & P1=$!
$CT $M train preset=mar-fmnist-s $MAR_M $C $CALC train.out_dir=$RUNS/cal_mar_m > $RUNS/cal_mar_m.log 2>&1 & P3=$!
$CT $M train preset=casmar-fmnist-s $C $CALC train.out_dir=$RUNS/cal_casmar > $RUNS/cal_casmar.log 2>&1 & P2=$!
wait $P1 $P2 $P3
IPS_MAR_S=$(it_per_s $RUNS/cal_mar); IPS_MAR_M=$(it_per_s $RUNS/cal_mar_m); IPS_CASMAR=$(it_per_s $RUNS/cal_casmar)
if [ -z "$IPS_MAR_S" ] || [ -z "$IPS_MAR_M" ] || [ -z "$IPS_CASMAR" ]; then  # a run failed: its log says why
  tail -n 5 $RUNS/cal_mar.log $RUNS/cal_mar_m.log $RUNS/cal_casmar.log
  IPS_MAR_S=${IPS_MAR_S:-5}; IPS_MAR_M=${IPS_MAR_M:-0}; IPS_CASMAR=${IPS_CASMAR:-5}
fi
MAR_SIZE=${MAR_SIZE:-$($PY -c "import math, sys; s, m, c = map(float, sys.argv[1:]); \
print('m' if m > 0 and abs(math.log(m / c)) < abs(math.log(s / c)) else 's')" $IPS_MAR_S $IPS_MAR_M $IPS_CASMAR)}
if [ "$MAR_SIZE" = m ]; then MAR_NET=$MAR_M; IPS_MAR=$IPS_MAR_M; else MAR_NET=""; IPS_MAR=$IPS_MAR_S; fi
STEPS=$(steps_for $TRAIN_S $IPS_MAR $IPS_CASMAR)
echo "calibration it/s: mar-s $IPS_MAR_S mar-m $IPS_MAR_M casmar $IPS_CASMAR -> MAR size $MAR_SIZE" \
  "(${MAR_NET:-mar-fmnist-s as is}), $STEPS steps each (batch $BS)" | tee $RUNS/budget.txt

el "train MAR || CASMAR; each one's export and study rows as soon as it is trained"
T="train.steps=$STEPS train.warmup_steps=$((STEPS / 20)) train.ckpt_every=$((STEPS / 5)) train.keep_last=10 \
train.log_every=$(( STEPS / 20 > 10 ? STEPS / 20 : 10 ))"
SHIP="dtype=bf16 model.tokenizer_ckpt=null data.root=$DATA_ROOT data.num_workers=0"
pipeline() {  # pipeline NAME TRAIN_EXTRA SHIP_SAMPLE
  local m=$1 extra=$2 ship=$3
  timed $m timeout -s TERM $TRAIN_T $M train preset=$m-fmnist-s $C $T $extra train.out_dir=$RUNS/$m \
    > $RUNS/${m}_train.log 2>&1
  el "$m trained: $(tail -n 2 $RUNS/${m}_train.log | head -n 1)"
  $M convert dtype src=$RUNS/$m out=$PACK/$m-fmnist $SHIP $ship > $RUNS/${m}_export.log 2>&1
  local shown=checkpoints/$m-fmnist
  [ $m = mar ] && [ "$MAR_SIZE" = m ] && shown=runs/quality/mar  # not shipped: scripts/quality_collect.sh
  local args="ckpt.$m=$PACK/$m-fmnist run.$m=$RUNS/$m as.$m=$shown"
  if [ $m = casmar ]; then  # two processes: one alone reached 5 of 24 rows by the first run's deadline
    study casmar_curves $PLAN $m $args rows=dit_steps,num_iter & local PC=$!
    study $m $PLAN $m $args rows=spacing,cfg,train_curve; wait $PC
  else
    study $m $PLAN $m $args 'rows=!main'
  fi
}
pipeline mar "$MAR_NET" "$SHIP_MAR_SAMPLE" & P1=$!
pipeline casmar "model.pred_cond_warmup_steps=$((STEPS * 3 / 10))" "$SHIP_CASMAR_SAMPLE" & P2=$!
wait $P1 $P2

echo "MAR_SIZE=$MAR_SIZE" > $RUNS/mar_size.txt  # call 3 names the MAR as this call did
$M bench quality merge=$RUNS/study/mar_casmar.json $RUNS/study/mar.json $RUNS/study/casmar.json \
  $RUNS/study/casmar_curves.json

el "pack"
mkdir -p $RUNS/logs
for r in mar casmar cal_mar cal_mar_m cal_casmar; do
  cp $RUNS/$r/log.txt $RUNS/logs/${r}_log.txt 2>/dev/null; cp $RUNS/$r/config.yaml $RUNS/logs/${r}_config.yaml 2>/dev/null
done
cp $RUNS/*.log $RUNS/*.txt $RUNS/logs/ 2>/dev/null
pack mar_casmar study logs
(cd $RUNS && mv pack ckpts && tar -cf $RUNS/ckpts.tar ckpts && mv ckpts pack)
if [ "$(stat -c %s $RUNS/ckpts.tar)" -gt 15000000 ]; then split -b 15000000 $RUNS/ckpts.tar $OUT/ckpts.tar.part-
else cp $RUNS/ckpts.tar $OUT/; fi
ls -la $OUT; el "done"
summary mar_casmar
