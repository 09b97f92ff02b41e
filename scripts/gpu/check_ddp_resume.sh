#!/usr/bin/env bash
# Multi-GPU training and crash-resume (docs/training.md, *Measured on GPUs*), on 2+ GPUs of one
# host: torchrun/NCCL trains HMAR-tiny (bf16, fused attention kernel) for 300 steps uninterrupted,
# then again killed with SIGKILL once step 150 is on disk and resumed; prints whether the final
# model and EMA weights of the two runs are bitwise equal.
# Produces in $OUT: a.log (uninterrupted), b1.log (killed), b2.log (resumed); the comparison is in
# stdout. Takes about 3 minutes on 2 x H200 (timeouts 200 + 200 s for the full runs).
# Run from the repository root: OUT=/tmp/out NP=2 scripts/gpu/check_ddp_resume.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; R=/tmp/ddp; rm -rf $R; mkdir -p $R
NP=${NP:-2}; STEPS=${STEPS:-300}; KILL_AT=${KILL_AT:-150}
nvidia-smi -L 2>/dev/null || true
C="preset=hmar-tiny train.steps=$STEPS train.batch_size=64 train.precision=bf16 train.ckpt_every=${CKPT_EVERY:-50} \
  train.log_every=50 train.progress=false train.tensorboard=false train.schedule=cosine train.ema=0.99 train.compile=false \
  model.depth=4 model.width=128 model.heads=2 data.num_workers=2 attention_backend=auto ${EXTRA:-}"
el "uninterrupted run, $NP GPUs"
timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node $NP -m maskar train $C train.out_dir=$R/a > $R/a.log 2>&1
echo "rc=$?"; tail -n 4 $R/a.log
el "run to be killed"
setsid python3 -m torch.distributed.run --standalone --nproc_per_node $NP -m maskar train $C train.out_dir=$R/b > $R/b1.log 2>&1 &
PID=$!
for i in $(seq 1 600); do
  s=$(cat $R/b/latest 2>/dev/null | sed 's/[^0-9]//g'); s=${s:-0}
  if [ "$((10#$s))" -ge "$KILL_AT" ]; then break; fi; sleep 0.2
done
kill -KILL -- -$PID 2>/dev/null; sleep 2; pkill -KILL -f "maskar train" ; sleep 1
echo "killed at latest=$(cat $R/b/latest 2>/dev/null)"; tail -n 3 $R/b1.log
el "resume"
timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node $NP -m maskar train $C train.out_dir=$R/b > $R/b2.log 2>&1
echo "rc=$?"; grep -i -E "resum|step" $R/b2.log | head -n 3; tail -n 4 $R/b2.log
el "compare"
python3 - <<'PY'
import torch
from safetensors.torch import load_file
from maskar.checkpoint import latest_checkpoint
a, b = latest_checkpoint("/tmp/ddp/a"), latest_checkpoint("/tmp/ddp/b")
print("final checkpoints:", a, b)
for f in ("model.safetensors", "ema.safetensors"):
    ta, tb = load_file(str(a / f)), load_file(str(b / f))
    assert ta.keys() == tb.keys()
    diff = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    scale = max(ta[k].float().abs().max().item() for k in ta)
    same = sum(torch.equal(ta[k], tb[k]) for k in ta)
    print(f"{f}: max |a-b| {diff:.3e} (max |a| {scale:.3e}); {same}/{len(ta)} tensors bitwise equal")
PY
cp $R/*.log $OUT/ 2>/dev/null
el "done"
