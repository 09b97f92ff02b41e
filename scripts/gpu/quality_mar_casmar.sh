#!/usr/bin/env bash
# Quality study, device call 2 of 3 (docs/quality.md): MAR vs CASMAR on Fashion-MNIST 32x32 at an equal
# budget, on the KL tokenizer trained in call 1 (carried as .carry/kl), and the shipped demos.
#   0. pre-flight (~20 s): MAR and CASMAR (random weights) sample through the study's entry and the
#      diffusion heads' CUDA-graph chains; a failure stops the call before anything is trained
#   1. a 40-step calibration of CASMAR and of MAR at four sizes, each alone on the GPU -> the MAR size
#      whose step costs nearest CASMAR's (equal GPU-minutes), STEPS: TRAIN_S x SHARE x the slower speed
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
# Expected wall time on one H200: 8.5 min (STUDY_END 500 s + packing); the command's limit is 10 min.
# CAL_ONLY=1 stops after the calibration (about 2 minutes). Keep RUNS on the device machine for call 3
# (e.g. RUNS=$PWD/.persist/q2: .persist/ is git-ignored and stays while the machine is warm). Every study process stops at STUDY_END with its rows so far written.
# PHASE=train | study splits the call in two chained calls on one RUNS, so that training gets a whole
# call: PHASE=train runs steps 0-1 and the training and export of step 2 (and returns the checkpoints);
# PHASE=study runs the study rows of step 2 and step 3 on what PHASE=train left. PHASE=all (default)
# does both in one call, with the shorter training that leaves time for the rows.
source "$(dirname "$0")/quality/common.sh"
PHASE=${PHASE:-all}
case $PHASE in all|train|study) ;; *) echo "PHASE: expected all, train or study, got '$PHASE'" >&2; exit 2 ;; esac
# PHASE=train has the whole call for training: 400 s side by side (its timeout: below)
if [ $PHASE = train ]; then TRAIN_S=${TRAIN_S:-400}; else TRAIN_S=${TRAIN_S:-210}; fi
CAL=${CAL:-40}; BS=${BS:-1024}; WORKERS=${WORKERS:-6}
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
# CASMAR and four MAR sizes (mar-fmnist-s, MAR_M, MAR_L, MAR_X), each ALONE on the GPU, one after another:
# processes that share one GPU are time-sliced, which evens their speeds out (the 2026-12-03 evening
# run calibrated three at once: 9.9 / 10.2 it/s for MAR at two widths, 6.4 for CASMAR, and the MAR it
# picked then trained in half CASMAR's time). The study trains the MAR whose alone speed is nearest
# CASMAR's (MAR_SIZE=s|m|l|x forces one); "GPU-minutes" is then steps / alone speed for each, and the
# two runs, of equal cost a step, also take about the same wall time side by side.
MAR_M=${MAR_M:-"model.encoder_embed_dim=256 model.encoder_depth=4 model.decoder_embed_dim=256 \
model.decoder_depth=4 model.diffloss_w=256"}
MAR_L=${MAR_L:-"model.encoder_embed_dim=256 model.encoder_depth=6 model.decoder_embed_dim=256 \
model.decoder_depth=6 model.diffloss_d=6 model.diffloss_w=256"}
# the night run of 2026-12-03: MAR_L still stepped 1.42x as fast as CASMAR alone (10.74 / 7.57 it/s);
# MAR_X has 8 + 8 blocks and an 8-layer head (about 4/3 of MAR_L's work) to bracket CASMAR
MAR_X=${MAR_X:-"model.encoder_embed_dim=256 model.encoder_depth=8 model.decoder_embed_dim=256 \
model.decoder_depth=8 model.diffloss_d=8 model.diffloss_w=256"}
SHARE=${SHARE:-0.47}  # the share of the GPU each of two equal-cost runs gets side by side (a bit under 1/2)
if [ $PHASE != study ]; then
  el "calibration: $CAL steps each of CASMAR and MAR at four sizes, one at a time"
  CALC="train.steps=$CAL train.log_every=$((CAL / 2)) train.ckpt_every=0 train.warmup_steps=10"
  calibrate() {  # calibrate NAME PRESET EXTRA: CAL steps alone -> it/s over the last CAL/2
    timeout -s TERM ${CAL_T:-150} $M train preset=$2 $3 $C $CALC train.out_dir=$RUNS/cal_$1 > $RUNS/cal_$1.log 2>&1
    local ips; ips=$(it_per_s $RUNS/cal_$1)
    [ -n "$ips" ] || { tail -n 5 $RUNS/cal_$1.log >&2; ips=0; }  # a failed run: its log says why
    echo $ips
  }
  IPS_CASMAR=$(calibrate casmar casmar-fmnist-s "")
  IPS_MAR_S=$(calibrate mar mar-fmnist-s "")
  IPS_MAR_M=$(calibrate mar_m mar-fmnist-s "$MAR_M")
  IPS_MAR_L=$(calibrate mar_l mar-fmnist-s "$MAR_L")
  IPS_MAR_X=$(calibrate mar_x mar-fmnist-s "$MAR_X")
  [ "$IPS_CASMAR" != 0 ] || IPS_CASMAR=5
  MAR_SIZE=${MAR_SIZE:-$($PY -c "import math, sys; c = float(sys.argv[1]); \
  ips = {k: float(v) for k, v in zip('smlx', sys.argv[2:]) if float(v) > 0}; \
  print(min(ips, key=lambda k: abs(math.log(ips[k] / c))) if ips else 's')" \
    $IPS_CASMAR $IPS_MAR_S $IPS_MAR_M $IPS_MAR_L $IPS_MAR_X)}
  case $MAR_SIZE in
    m) MAR_NET=$MAR_M; IPS_MAR=$IPS_MAR_M ;;
    l) MAR_NET=$MAR_L; IPS_MAR=$IPS_MAR_L ;;
    x) MAR_NET=$MAR_X; IPS_MAR=$IPS_MAR_X ;;
    *) MAR_SIZE=s; MAR_NET=""; IPS_MAR=$IPS_MAR_S ;;
  esac
  [ "$IPS_MAR" != 0 ] || IPS_MAR=5
  # both train at once: each gets about SHARE of the GPU; the slower one's alone speed sets the steps
  STEPS=$(steps_for "$(awk -v w=$TRAIN_S -v f=$SHARE 'BEGIN { print w * f }')" $IPS_MAR $IPS_CASMAR)
  GPU_MIN=$($PY -c "import sys; n, a, b = map(float, sys.argv[1:]); print(f'{n / a / 60:.2f} / {n / b / 60:.2f}')" \
    $STEPS $IPS_MAR $IPS_CASMAR)
  echo "calibration it/s alone: mar-s $IPS_MAR_S mar-m $IPS_MAR_M mar-l $IPS_MAR_L mar-x $IPS_MAR_X casmar $IPS_CASMAR -> MAR size" \
    "$MAR_SIZE (${MAR_NET:-mar-fmnist-s as is}), $STEPS steps each (batch $BS); GPU-minutes alone MAR / CASMAR" \
    "$GPU_MIN" | tee $RUNS/budget.txt
  if [ "${CAL_ONLY:-0}" = 1 ]; then  # the calibration alone (a short call): its logs, then stop
    mkdir -p $RUNS/logs && for r in cal_mar cal_mar_m cal_mar_l cal_mar_x cal_casmar; do cp $RUNS/$r/log.txt $RUNS/logs/${r}_log.txt; done
    cp $RUNS/budget.txt $RUNS/logs/ && pack calibration logs && el "done (CAL_ONLY=1)"; exit 0
  fi

  printf "STEPS=%s\nMAR_SIZE=%s\nMAR_NET='%s'\n" $STEPS $MAR_SIZE "$MAR_NET" > $RUNS/phase.env
else
  source $RUNS/phase.env  # what PHASE=train decided
fi

el "MAR || CASMAR (PHASE=$PHASE): each one's training and export, then its study rows"
# the training timeout: PHASE=train until 35 s before the call's limit, else the window + 120 s
if [ $PHASE = train ]; then TRAIN_T=${TRAIN_T:-$(( T0 + 565 - $(date +%s) ))}; else TRAIN_T=${TRAIN_T:-$((TRAIN_S + 120))}; fi
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
    timed $m timeout -s TERM $TRAIN_T $M train preset=$m-fmnist-s $C $T $extra train.out_dir=$RUNS/$m \
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
pipeline mar "$MAR_NET" "$SHIP_MAR_SAMPLE" & P1=$!
pipeline casmar "model.pred_cond_warmup_steps=$((STEPS * 3 / 10))" "$SHIP_CASMAR_SAMPLE" & P2=$!
wait $P1 $P2

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
for r in mar casmar cal_mar cal_mar_m cal_mar_l cal_mar_x cal_casmar; do
  cp $RUNS/$r/log.txt $RUNS/logs/${r}_log.txt 2>/dev/null; cp $RUNS/$r/config.yaml $RUNS/logs/${r}_config.yaml 2>/dev/null
done
cp $RUNS/*.log $RUNS/*.txt $RUNS/logs/ 2>/dev/null
pack mar_casmar --exclude=study/samples study logs  # the curve samples stay for call 3
pack_ckpts
ls -la $OUT; el "done"
summary mar_casmar
