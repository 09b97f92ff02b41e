#!/usr/bin/env bash
# Quality study, device call 2 of 3 (docs/quality.md): MAR vs CASMAR on Fashion-MNIST 32x32 at an equal
# budget, on the KL tokenizer trained in call 1 (carried as .carry/kl), and the shipped demos.
#   0. pre-flight (~20 s): MAR and CASMAR (random weights) sample through the study's entry and the
#      diffusion heads' CUDA-graph chains; a failure stops the call before anything is trained
#   1. a 120-step calibration of CASMAR and of MAR at CAL_SIZES (default l x y), each alone on the GPU,
#      after a 30-step untimed CASMAR run (CAL_WARM: a fresh machine's first run reads slow)
#      -> the MAR size whose step costs nearest CASMAR's (equal GPU-minutes); STEPS: the slower one's
#      alone speed x the training window
#   2. CASMAR, then MAR (PHASE=train: one after the other, each alone on the GPU, so that each one's
#      wall time is its GPU time; PHASE=all: side by side, TRAIN_S x SHARE each), STEPS steps each
#      (same batch 1024, lr 4e-4, no EMA, same tokenizer), 5 checkpoints
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
# Expected wall time on one H200: 8.5 min (STUDY_END 500 s + packing); the command's limit is 10 min.
# CAL_ONLY=1 stops after the calibration (about 2 minutes). Keep RUNS on the device machine for call 3
# (e.g. RUNS=$PWD/.persist/q2: .persist/ is git-ignored and stays while the machine is warm). Every study process stops at STUDY_END with its rows so far written.
# (PHASE=train on a CPU, a dry run: TRAIN_END=1 MIN_WINDOW=-9999 TRAIN_T=600 trains STEPS_MIN steps each.)
# PHASE=train | study splits the call in two chained calls on one RUNS, so that training gets a whole
# call: PHASE=train runs steps 0-1 and the training and export of step 2 (and returns the checkpoints);
# PHASE=study first times call 1's VAR and HMAR stages alone (VAR_HMAR_ALONE=0 skips it; about 75 s), then
# runs the study rows of step 2 and step 3 on what PHASE=train left. PHASE=all (default)
# does both in one call, with the shorter training that leaves time for the rows.
source "$(dirname "$0")/quality/common.sh"
PHASE=${PHASE:-all}
case $PHASE in all|train|study) ;; *) echo "PHASE: expected all, train or study, got '$PHASE'" >&2; exit 2 ;; esac
# PHASE=train has the whole call for training: 400 s side by side (its timeout: below)
if [ $PHASE = train ]; then TRAIN_S=${TRAIN_S:-400}; else TRAIN_S=${TRAIN_S:-210}; fi
CAL=${CAL:-120}; BS=${BS:-1024}; WORKERS=${WORKERS:-6}
STUDY_END=${STUDY_END:-500}
KL=${KL:-.carry/kl}
PLAN=scripts/gpu/quality/plan_mar_casmar.yaml
SHIP_MAR_SAMPLE=${SHIP_MAR_SAMPLE:-"sample.num_iter=16 sample.num_sampling_steps=ddim25 sample.cfg=2.0"}
SHIP_CASMAR_SAMPLE=${SHIP_CASMAR_SAMPLE:-"sample.num_iter=4 sample.scaffold_num_iter=8 sample.num_sampling_steps=ddim20 \
sample.refine_num_sampling_steps=ddim10 sample.cfg=2.0 sample.re_cfg=2.0"}
command -v nvidia-smi >/dev/null && nvidia-smi -L
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ $PHASE = study ]; then  # what PHASE=train left in RUNS
  for f in $RUNS/budget.txt $RUNS/mar_size.txt $PACK/mar-fmnist $PACK/casmar-fmnist; do
    [ -e $f ] || { el "missing $f (PHASE=train did not finish, or the machine went cold): nothing run"; exit 3; }
  done
fi
[ "${CAL_ONLY:-0}" = 1 ] || [ $PHASE = study ] || smoke mar casmar  # the calibration alone needs no pre-flight
el "data"; prepare_data
SF=$($PY -c "import yaml; print(yaml.safe_load(open('$KL/config.yaml'))['model']['scale_factor'])")
echo "KL tokenizer $KL, scale_factor $SF"
C="data.root=$DATA data.num_workers=$WORKERS train.progress=false train.tensorboard=false \
train.batch_size=$BS train.lr=4e-4 train.min_lr=4e-5 train.ema=0 train.compile=false device=$DEVICE \
model.tokenizer_ckpt=$KL model.tokenizer.scale_factor=$SF"

# Equal steps x batch and equal GPU-minutes (issue 17) need a MAR whose step costs what CASMAR's does:
# CASMAR's step is its MAR backbone's plus the scaffold pass and the DiT head. The calibration times
# CASMAR and the MAR sizes of CAL_SIZES (s: mar-fmnist-s as is, MAR_M, MAR_L, MAR_X, MAR_Y), each ALONE
# on the GPU, one after another, over the last half of CAL steps (40 steps read CASMAR, timed first on a
# cold machine, at 5.69 it/s on 2026-12-04 and 7.29 with 120 on the warm one):
# processes that share one GPU are time-sliced, which evens their speeds out (the 2026-12-03 evening
# run calibrated three at once: 9.9 / 10.2 it/s for MAR at two widths, 6.4 for CASMAR, and the MAR it
# picked then trained in half CASMAR's time). The study trains the MAR whose alone speed is nearest
# CASMAR's (MAR_SIZE=s|m|l|x|y forces one). PHASE=train then trains them one after the other, each
# alone: its wall time is its GPU-minutes (side by side, the 2026-12-04 run's MAR and CASMAR took 236
# and 247 s although CASMAR's step costs 1.23x MAR's alone: each filled the other's idle gaps).
MAR_M=${MAR_M:-"model.encoder_embed_dim=256 model.encoder_depth=4 model.decoder_embed_dim=256 \
model.decoder_depth=4 model.diffloss_w=256"}
MAR_L=${MAR_L:-"model.encoder_embed_dim=256 model.encoder_depth=6 model.decoder_embed_dim=256 \
model.decoder_depth=6 model.diffloss_d=6 model.diffloss_w=256"}
# the night run of 2026-12-03: MAR_L still stepped 1.42x as fast as CASMAR alone (10.74 / 7.57 it/s);
# MAR_X has 8 + 8 blocks and an 8-layer head (about 4/3 of MAR_L's work) to bracket CASMAR
MAR_X=${MAR_X:-"model.encoder_embed_dim=256 model.encoder_depth=8 model.decoder_embed_dim=256 \
model.decoder_depth=8 model.diffloss_d=8 model.diffloss_w=256"}
# 2026-12-04 (120 steps alone): MAR_L 11.19, MAR_X 8.94, CASMAR 7.29 it/s; each 2 + 2 blocks and 2 head
# layers add about 22 ms to the step, so MAR_Y (10 + 10, a 10-layer head) should cost about CASMAR's 137 ms
MAR_Y=${MAR_Y:-"model.encoder_embed_dim=256 model.encoder_depth=10 model.decoder_embed_dim=256 \
model.decoder_depth=10 model.diffloss_d=10 model.diffloss_w=256"}
CAL_SIZES=${CAL_SIZES:-"l x y"}
SHARE=${SHARE:-0.47}  # PHASE=all: the share of the GPU each of two equal-cost runs gets side by side
# PHASE=train: the seconds after the start by which both have trained and exported, one after the other
TRAIN_END=${TRAIN_END:-540}; PER_RUN_S=${PER_RUN_S:-30}  # a run's start-up and export
SEQUENTIAL=0; [ $PHASE = train ] && SEQUENTIAL=1
mar_net() {  # mar_net SIZE: the overrides of a MAR size (s: the preset as is)
  case $1 in m) echo "$MAR_M" ;; l) echo "$MAR_L" ;; x) echo "$MAR_X" ;; y) echo "$MAR_Y" ;; *) echo "" ;; esac
}
cal_name() { [ $1 = s ] && echo mar || echo mar_$1; }
# speed_alone RUN TRAIN_ARGS...: CAL steps of `maskar train TRAIN_ARGS` alone on the GPU -> it/s over the
# last CAL/2 (0 when the run failed: its log, RUNS/RUN.log, says why)
speed_alone() {
  timeout -s TERM ${CAL_T:-150} $M train "${@:2}" train.steps=$CAL train.log_every=$((CAL / 2)) \
    train.ckpt_every=0 train.out_dir=$RUNS/$1 > $RUNS/$1.log 2>&1
  local ips; ips=$(it_per_s $RUNS/$1)
  [ -n "$ips" ] || { tail -n 5 $RUNS/$1.log >&2; ips=0; }
  echo $ips
}
if [ $PHASE != study ]; then
  el "calibration: $CAL steps each of CASMAR and MAR sizes $CAL_SIZES, one at a time"
  calibrate() {  # calibrate NAME PRESET EXTRA: the preset's speed alone with the study's settings
    speed_alone cal_$1 preset=$2 $3 $C train.warmup_steps=10
  }
  # the first training process on a freshly started machine runs slow: CASMAR, timed first, read 5.69
  # and 5.71 it/s on two fresh machines against 7.2-7.3 warm; a short untimed run goes first (CAL_WARM=0 skips)
  if [ "${CAL_WARM:-1}" = 1 ]; then
    CAL=$(( CAL / 4 > 2 ? CAL / 4 : 2 )) speed_alone cal_warm preset=casmar-fmnist-s $C > /dev/null
  fi
  IPS_CASMAR=$(calibrate casmar casmar-fmnist-s "")
  declare -A IPS
  CAL_TEXT=""
  for z in $CAL_SIZES; do
    IPS[$z]=$(calibrate $(cal_name $z) mar-fmnist-s "$(mar_net $z)")
    CAL_TEXT="$CAL_TEXT mar-$z ${IPS[$z]}"
  done
  [ "$IPS_CASMAR" != 0 ] || IPS_CASMAR=5
  MAR_SIZE=${MAR_SIZE:-$($PY -c "import math, sys; c = float(sys.argv[1]); it = iter(sys.argv[2:]); \
  ips = {k: float(v) for k, v in zip(it, it) if float(v) > 0}; \
  print(min(ips, key=lambda k: abs(math.log(ips[k] / c))) if ips else 's')" \
    $IPS_CASMAR $(for z in $CAL_SIZES; do echo $z ${IPS[$z]}; done))}
  MAR_NET=$(mar_net $MAR_SIZE); IPS_MAR=${IPS[$MAR_SIZE]:-0}
  [ "$IPS_MAR" != 0 ] || IPS_MAR=5
  if [ $SEQUENTIAL = 1 ]; then
    # one after the other: each gets half of what is left of the window; the slower one's speed sets the steps
    WINDOW=$(( (T0 + TRAIN_END - $(date +%s)) / 2 - PER_RUN_S ))
    if [ $WINDOW -lt ${MIN_WINDOW:-60} ]; then  # a slow calibration left too little: train nothing useless
      el "only ${WINDOW} s a model left for training (MIN_WINDOW ${MIN_WINDOW:-60}): nothing trained"; exit 3
    fi
    STEPS=$(steps_for $WINDOW $IPS_MAR $IPS_CASMAR); HOW="one after the other, each alone"
  else
    # both at once: each gets about SHARE of the GPU; the slower one's alone speed sets the steps
    STEPS=$(steps_for "$(awk -v w=$TRAIN_S -v f=$SHARE 'BEGIN { print w * f }')" $IPS_MAR $IPS_CASMAR)
    HOW="side by side"
  fi
  GPU_MIN=$($PY -c "import sys; n, a, b = map(float, sys.argv[1:]); print(f'{n / a / 60:.2f} / {n / b / 60:.2f}')" \
    $STEPS $IPS_MAR $IPS_CASMAR)
  echo "calibration it/s alone:$CAL_TEXT casmar $IPS_CASMAR -> MAR size" \
    "$MAR_SIZE (${MAR_NET:-mar-fmnist-s as is}), $STEPS steps each (batch $BS), trained $HOW;" \
    "GPU-minutes alone MAR / CASMAR $GPU_MIN" | tee $RUNS/budget.txt
  if [ "${CAL_ONLY:-0}" = 1 ]; then  # the calibration alone (a short call): its logs, then stop
    mkdir -p $RUNS/logs && for r in cal_casmar $(for z in $CAL_SIZES; do echo cal_$(cal_name $z); done); do
      cp $RUNS/$r/log.txt $RUNS/logs/${r}_log.txt; done
    cp $RUNS/budget.txt $RUNS/logs/ && pack calibration logs && el "done (CAL_ONLY=1)"; exit 0
  fi

  printf "STEPS=%s\nMAR_SIZE=%s\nMAR_NET='%s'\nIPS_MAR=%s\n" $STEPS $MAR_SIZE "$MAR_NET" $IPS_MAR > $RUNS/phase.env
else
  source $RUNS/phase.env  # what PHASE=train decided
fi

# VAR and HMAR's training GPU time alone (call 1 trains them side by side): each stage of call 1's configs
# alone for CAL steps, with random weights (a step's time does not depend on them: no tokenizer carry)
if [ $PHASE = study ] && [ "${VAR_HMAR_ALONE:-1}" = 1 ] && [ -f docs/results/quality/logs/var_config.yaml ]; then
  el "VAR, HMAR stage 1 and stage 2 alone: $CAL steps each (call 1's configs)"
  alone() {  # alone NAME EXTRA...: call 1's NAME config's speed alone
    speed_alone alone_$1 config=docs/results/quality/logs/$1_config.yaml "${@:2}" data.root=$DATA \
      data.num_workers=$WORKERS model.tokenizer_ckpt=null device=$DEVICE train.resume=false \
      train.progress=false train.tensorboard=false ${ALONE_EXTRA:-}
  }
  IPS_V=$(alone var); IPS_H1=$(alone hmar1); IPS_H2=$(alone hmar2 model.stage1_ckpt=null)
  echo "var-hmar it/s alone: var $IPS_V hmar1 $IPS_H1 hmar2 $IPS_H2 ($CAL steps each, the last $((CAL / 2)) timed)" \
    | tee $RUNS/var_hmar_alone.txt
fi

el "MAR and CASMAR (PHASE=$PHASE, $([ $SEQUENTIAL = 1 ] && echo "one after the other" || echo "side by side")): each one's training and export, then its study rows"
# the training timeout: PHASE=train until 35 s before the call's limit, else the window + 120 s
# (PHASE=train: the first of the two, CASMAR, leaves the second its expected time: steps / speed + PER_RUN_S)
train_limit() {  # train_limit NAME: seconds the training of NAME may take
  if [ -n "${TRAIN_T:-}" ]; then echo $TRAIN_T; return; fi
  if [ $PHASE != train ]; then echo $((TRAIN_S + 120)); return; fi
  local left=$(( T0 + 565 - $(date +%s) ))
  [ $1 = casmar ] && left=$(( left - $(awk -v n=$STEPS -v v=$IPS_MAR 'BEGIN { printf "%d", n / v }') - PER_RUN_S ))
  echo $(( left > 30 ? left : 30 ))
}
T="train.steps=$STEPS train.warmup_steps=$((STEPS / 20)) train.ckpt_every=$((STEPS / 5)) train.keep_last=10 \
train.log_every=$(( STEPS / 20 > 10 ? STEPS / 20 : 10 ))"
SHIP="dtype=bf16 model.tokenizer_ckpt=null data.root=$DATA_ROOT data.num_workers=0"
mar_shown() {  # where MAR's rows say it is: shipped only when small enough (quality_collect.sh call2)
  if [ $(( $(stat -c %s $PACK/mar-fmnist/model.safetensors) / 1000000 )) -gt "${SHIP_MAR_MAX_MB:-15}" ]; then
    echo runs/quality/mar
  else echo checkpoints/mar-fmnist; fi
}
pipeline() {  # pipeline NAME TRAIN_EXTRA SHIP_SAMPLE
  local m=$1 extra=$2 ship=$3
  if [ $PHASE != study ]; then
    timed $m timeout -s TERM $(train_limit $m) $M train preset=$m-fmnist-s $C $T $extra train.out_dir=$RUNS/$m \
      > $RUNS/${m}_train.log 2>&1
    el "$m trained: $(tail -n 2 $RUNS/${m}_train.log | head -n 1)"
    $M convert dtype src=$RUNS/$m out=$PACK/$m-fmnist $SHIP $ship > $RUNS/${m}_export.log 2>&1
  fi
  [ $PHASE = train ] && return
  local shown=checkpoints/$m-fmnist
  [ $m = mar ] && shown=$(mar_shown)
  local args="ckpt.$m=$PACK/$m-fmnist run.$m=$RUNS/$m as.$m=$shown"
  if [ $m = casmar ]; then  # three processes: one alone reached 5 of 24 rows by the first run's deadline
    study casmar_curves $PLAN $m $args rows=dit_steps,num_iter & local PC=$!
    study casmar_temperature $PLAN $m $args rows=temperature & local PT=$!
    study $m $PLAN $m $args rows=spacing,cfg,train_curve; wait $PC $PT
  else
    study $m $PLAN $m $args 'rows=!main'
  fi
}
CASMAR_EXTRA="model.pred_cond_warmup_steps=$((STEPS * 3 / 10))"
if [ $SEQUENTIAL = 1 ]; then  # each alone: its wall time is its GPU time
  pipeline casmar "$CASMAR_EXTRA" "$SHIP_CASMAR_SAMPLE"
  pipeline mar "$MAR_NET" "$SHIP_MAR_SAMPLE"
else
  pipeline mar "$MAR_NET" "$SHIP_MAR_SAMPLE" & P1=$!
  pipeline casmar "$CASMAR_EXTRA" "$SHIP_CASMAR_SAMPLE" & P2=$!
  wait $P1 $P2
fi

printf 'MAR_SIZE=%s\nSHOWN_MAR=%s\n' $MAR_SIZE $(mar_shown) > $RUNS/mar_size.txt  # call 3 names MAR alike
pack_ckpts() {  # the two bf16 checkpoints as ckpts.tar[.part-*] under $OUT
  (cd $RUNS && mv pack ckpts && tar -cf $RUNS/ckpts.tar ckpts && mv ckpts pack)
  if [ "$(stat -c %s $RUNS/ckpts.tar)" -gt 15000000 ]; then split -b 15000000 $RUNS/ckpts.tar $OUT/ckpts.tar.part-
  else cp $RUNS/ckpts.tar $OUT/; fi
}
if [ $PHASE = train ]; then  # the checkpoints come back now, in case the machine goes cold before PHASE=study
  pack_ckpts; ls -la $OUT; cat $RUNS/times.txt; el "done (PHASE=train)"; exit 0
fi
$M bench quality merge=$RUNS/study/mar_casmar.json $RUNS/study/mar.json $RUNS/study/casmar.json \
  $RUNS/study/casmar_curves.json $RUNS/study/casmar_temperature.json

el "pack"
mkdir -p $RUNS/logs
for r in mar casmar cal_mar cal_mar_m cal_mar_l cal_mar_x cal_mar_y cal_casmar; do
  cp $RUNS/$r/log.txt $RUNS/logs/${r}_log.txt 2>/dev/null; cp $RUNS/$r/config.yaml $RUNS/logs/${r}_config.yaml 2>/dev/null
done
cp $RUNS/*.log $RUNS/*.txt $RUNS/logs/ 2>/dev/null
pack mar_casmar --exclude=study/samples study logs  # the curve samples stay for call 3
pack_ckpts
ls -la $OUT; el "done"
summary mar_casmar
