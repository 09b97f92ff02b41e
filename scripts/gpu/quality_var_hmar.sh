#!/usr/bin/env bash
# Quality study, device call 1 of 2 (docs/quality.md): VAR vs HMAR on Fashion-MNIST 32x32 at an equal
# budget, and the small KL tokenizer that call 2 (MAR vs CASMAR) needs.
#   0. pre-flight (~20 s): VAR and HMAR (random weights) sample through the study's entry and the
#      per-scale CUDA graphs; a failure stops the call before anything is trained
#   1. KL tokenizer klvae-fmnist-s, in the background (its own process); then its latent std ->
#      scale_factor, bf16 export
#   2. a 60-step calibration of VAR and HMAR stage 1 side by side -> STEPS: the slower one's speed x
#      TRAIN_S, so both fit the window; VAR gets STEPS steps, HMAR 2/3 STEPS (stage 1) + 1/3 (stage 2)
#   3. VAR || HMAR stage 1 -> stage 2 (same batch 768, lr 4e-4, no EMA, same VQ tokenizer: the one
#      inside checkpoints/hmar-fmnist), 5 checkpoints each for the training curves; each model's study
#      rows (maskar bench quality, plan scripts/gpu/quality/plan_var_hmar.yaml: classifier FD /
#      accuracy / precision-recall, grids, HMAR schedules, cfg sweeps, training curves, samples for
#      the TF-Inception FID on the CPU afterwards) start as soon as it is trained and stop at STUDY_END
#   4. the speed rows alone on the GPU (SPEED_T), then one JSON (var_hmar.json)
# Returns under $OUT: var_hmar.tar (study JSON, samples, grids, logs, configs) and kl.tar (the bf16 KL
# tokenizer for call 2). Needs carry .carry/fmnist (scripts/quality_collect.sh prepare).
# Expected wall time on one H200: 8-8.5 min (STUDY_END 450 s + SPEED_T <= 50 s + packing); the
# command's limit is 10 min. Every study process stops at STUDY_END with its rows so far written.
source "$(dirname "$0")/quality/common.sh"
TRAIN_S=${TRAIN_S:-210}; TRAIN_T=${TRAIN_T:-$((TRAIN_S + 60))}; CAL=${CAL:-60}; KL_STEPS=${KL_STEPS:-3000}
STUDY_END=${STUDY_END:-450}; SPEED_T=${SPEED_T:-50}
BS=${BS:-768}; WORKERS=${WORKERS:-4}
NET=${NET:-"model.depth=6 model.width=256 model.heads=4"}
# The VQ tokenizer: the one inside checkpoints/hmar-fmnist, or the same weights alone (.carry/vq, 9.5 MB:
# scripts/quality_collect.sh prepare) when the call leaves that 29.6 MB checkpoint behind to carry more.
TOK="model.tokenizer_ckpt=${TOK_CKPT:-checkpoints/hmar-fmnist}"
KL_TRAIN=${KL_TRAIN:-1}  # 0: keep the KL tokenizer of an earlier call 1 (.carry/kl) and train none
PLAN=scripts/gpu/quality/plan_var_hmar.yaml
command -v nvidia-smi >/dev/null && nvidia-smi -L
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
smoke var hmar
el "data"; prepare_data
C="data.root=$DATA data.num_workers=$WORKERS train.progress=false train.tensorboard=false \
train.batch_size=$BS train.lr=4e-4 train.min_lr=4e-5 train.ema=0 train.compile=false device=$DEVICE"

[ "$KL_TRAIN" = 1 ] && el "KL tokenizer (background)"
run_kl() {
  timed kl timeout -s TERM ${KL_T:-300} $M train preset=klvae-fmnist-s data.root=$DATA data.num_workers=2 \
    train.progress=false train.tensorboard=false train.steps=$KL_STEPS train.batch_size=${KL_BS:-256} \
    train.warmup_steps=$((KL_STEPS / 15)) train.ckpt_every=0 train.log_every=250 train.out_dir=$RUNS/kl \
    device=$DEVICE > $RUNS/kl_train.log 2>&1
  $M bench tokenizer_quality $RUNS/kl split=train limit=${KL_Q_LIMIT:-10000} device=$DEVICE \
    json=$RUNS/kl_quality.json > $RUNS/kl_quality.txt 2>&1
  local sf
  sf=$($PY -c "import json; print(round(json.load(open('$RUNS/kl_quality.json'))['suggested_scale_factor'], 4))")
  $M convert dtype src=$RUNS/kl out=$PACK/klvae-fmnist-s dtype=bf16 model.scale_factor=$sf data.root=$DATA_ROOT \
    > $RUNS/kl_export.log 2>&1
  el "KL tokenizer done: $(grep -h PSNR $RUNS/kl_quality.txt), scale_factor $sf"
}
KL_PID=
if [ "$KL_TRAIN" = 1 ]; then run_kl & KL_PID=$!; else el "KL tokenizer: not trained (KL_TRAIN=0; call 2 carries .carry/kl)"; fi

el "calibration: $CAL steps of VAR and HMAR stage 1 side by side"
CALC="train.steps=$CAL train.log_every=$((CAL / 2)) train.ckpt_every=0 train.warmup_steps=10"
CT="timeout -s TERM ${CAL_T:-150}"
$CT $M train preset=var-fmnist $NET $TOK $C $CALC train.out_dir=$RUNS/cal_var > $RUNS/cal_var.log 2>&1 & P1=$!
$CT $M train preset=hmar-fmnist $NET $TOK $C $CALC train.out_dir=$RUNS/cal_hmar > $RUNS/cal_hmar.log 2>&1 & P2=$!
wait $P1 $P2
IPS_VAR=$(it_per_s $RUNS/cal_var); IPS_HMAR=$(it_per_s $RUNS/cal_hmar)
if [ -z "$IPS_VAR" ] || [ -z "$IPS_HMAR" ]; then  # a calibration run failed: its log says why
  tail -n 5 $RUNS/cal_var.log $RUNS/cal_hmar.log; IPS_VAR=${IPS_VAR:-3}; IPS_HMAR=${IPS_HMAR:-3}
fi
STEPS=$(steps_for $TRAIN_S $IPS_VAR $IPS_HMAR); S1=$(( STEPS * 2 / 3 / 10 * 10 )); S2=$(( STEPS - S1 ))
echo "calibration it/s: var $IPS_VAR hmar $IPS_HMAR -> VAR $STEPS steps, HMAR $S1 + $S2 (batch $BS)" \
  | tee $RUNS/budget.txt

el "train VAR || HMAR stage 1 -> stage 2; each one's study rows as soon as it is trained"
run_var() {
  timed var timeout -s TERM $TRAIN_T $M train preset=var-fmnist $NET $TOK $C train.steps=$STEPS \
    train.warmup_steps=$((STEPS / 20)) train.ckpt_every=$((STEPS / 5)) train.keep_last=10 \
    train.log_every=$(( STEPS / 20 > 10 ? STEPS / 20 : 10 )) train.out_dir=$RUNS/var > $RUNS/var_train.log 2>&1
  el "VAR trained: $(tail -n 2 $RUNS/var_train.log | head -n 1)"
  study var $PLAN var ckpt.var=$RUNS/var run.var=$RUNS/var as.var=runs/quality/var
}
run_hmar() {
  timed hmar1 timeout -s TERM $((TRAIN_T - TRAIN_S / 3)) $M train preset=hmar-fmnist $NET $TOK $C train.steps=$S1 \
    train.warmup_steps=$((S1 / 20)) train.ckpt_every=$((S1 / 3)) train.keep_last=10 \
    train.log_every=$(( S1 / 20 > 10 ? S1 / 20 : 10 )) train.out_dir=$RUNS/hmar1 > $RUNS/hmar1_train.log 2>&1
  timed hmar2 timeout -s TERM $((TRAIN_T - TRAIN_S * 2 / 3)) $M train preset=hmar-fmnist-finetune $NET $C \
    model.stage1_ckpt=$RUNS/hmar1 train.steps=$S2 train.warmup_steps=$((S2 / 20)) train.ckpt_every=$((S2 / 2)) \
    train.keep_last=10 train.log_every=$(( S2 / 20 > 10 ? S2 / 20 : 10 )) train.out_dir=$RUNS/hmar2 \
    > $RUNS/hmar2_train.log 2>&1
  el "HMAR trained: $(tail -n 2 $RUNS/hmar2_train.log | head -n 1)"
  study hmar $PLAN hmar ckpt.hmar=$RUNS/hmar2 run.hmar1=$RUNS/hmar1 run.hmar2=$RUNS/hmar2 as.hmar=runs/quality/hmar
}
run_var & VAR_PID=$!
run_hmar & HMAR_PID=$!
wait $KL_PID $VAR_PID $HMAR_PID  # KL_PID empty: waits for the two

el "speed rows, alone on the GPU"
timeout -s TERM $SPEED_T $M bench quality plan=$PLAN out=$RUNS/study tag=speed kinds=speed classifier=$CLF \
  device=$DEVICE scale=$SCALE ckpt.var=$RUNS/var ckpt.hmar=$RUNS/hmar2 ${STUDY_EXTRA:-} > $RUNS/study_speed.log 2>&1
grep -h "^speed" $RUNS/study_speed.log
$M bench quality merge=$RUNS/study/var_hmar.json $RUNS/study/var.json $RUNS/study/hmar.json $RUNS/study/speed.json

el "pack"
mkdir -p $RUNS/logs
for r in var hmar1 hmar2 kl cal_var cal_hmar; do
  cp $RUNS/$r/log.txt $RUNS/logs/${r}_log.txt 2>/dev/null; cp $RUNS/$r/config.yaml $RUNS/logs/${r}_config.yaml 2>/dev/null
done
cp $RUNS/*.log $RUNS/*.txt $RUNS/kl_quality.json $RUNS/logs/ 2>/dev/null
pack var_hmar --exclude=study/samples study logs  # the 60,000 main samples stay for call 3
[ -d $PACK/klvae-fmnist-s ] && (cd $PACK && tar -cf $OUT/kl.tar klvae-fmnist-s)
ls -la $OUT; el "done"
summary var_hmar
