#!/usr/bin/env bash
# FSDP2 and DDP on GPUs (issue 20): NCCL correctness of sharded training, then images/s, memory
# and scaling efficiency. Three parts, one per call (each fits the 10-minute limit):
#
#   PART=one   1 GPU, about 6 min (9 at most). `maskar bench train_step` rows HMAR-d16 B32 and
#              HMAR-d30 256 px B32 with activation checkpointing (its eager check would not fit
#              without): plain vs FSDP2 on a one-rank group (the cost of the FSDP2 machinery: bf16
#              block weights gathered per block, fp32 reduce), and HMAR-d30 FSDP2 with CPU offload
#              (no training state on the GPU). -> one_gpu.json, offload.json, one.log
#   PART=check NP >= 2 GPUs, about 4 min (10 at most). `maskar train` HMAR-tiny (depth 4, width 128, bf16, fused
#              attention, blocks compiled, EMA, constant lr, no label dropout), 200 steps:
#              NP-GPU FSDP2 vs 1-GPU plain (rounding-level difference expected); NP-GPU FSDP2 killed
#              with SIGKILL after step 100 is on disk and re-run (bitwise equal expected); saved on
#              NP GPUs at step 100 and resumed on 1 GPU (plain), and saved on 1 GPU (FSDP2) and
#              resumed on NP GPUs (both: rounding-level difference to the uninterrupted run).
#              -> check_logs.txt, check.txt
#   PART=bench NP >= 2 GPUs, about 7 min (9 at most). One-GPU baseline (HMAR-d16, VAR-d16, 256 px, B32), then
#              under torchrun on NP GPUs the same rows with DDP and FSDP2 (B32 per GPU: images/s and
#              scaling efficiency = img/s / (NP x one-GPU img/s)), then HMAR-d30 256 px B32 per GPU
#              with FSDP2 and DDP (fits? step time, peak memory). Every row first checks its gradients
#              against one process on the global batch. -> base.json, np_d16.json, np_d30.json, bench.log
#
# Targets: d16 scaling efficiency >= 90% (DDP and FSDP2) on 2 GPUs; HMAR-d30 trains at >= 32 per
# GPU under FSDP2 on 2 GPUs. The summary table is printed last (and written to summary.txt).
# Run from the repository root: OUT=/tmp/out PART=bench NP=2 scripts/gpu/bench_scaling.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=4
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; R=/tmp/scaling; rm -rf $R; mkdir -p $R
PART=${PART:-bench}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
NP=${NP:-$NGPU}
nvidia-smi -L 2>/dev/null || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
if [ "$PART" != one ] && [ "$NP" -lt 2 ]; then
  echo "PART=$PART needs 2 or more GPUs (found $NGPU); PART=one runs on one"; exit 2
fi
RUN="python3 -m torch.distributed.run --standalone --nproc_per_node $NP"
STEPS="steps=15 warmup=3"

kill_tree() {  # SIGKILL a process and all its descendants, by PID (torchrun's ranks have their own sessions)
  local c; for c in $(pgrep -P "$1"); do kill_tree "$c"; done; kill -KILL "$1" 2>/dev/null
}

compare() {  # compare RUN_A RUN_B LABEL: final model / EMA weights of two run directories
  python3 - "$1" "$2" "$3" <<'PY'
import sys, torch
from safetensors.torch import load_file
from maskar.checkpoint import latest_checkpoint
a, b, label = latest_checkpoint(sys.argv[1]), latest_checkpoint(sys.argv[2]), sys.argv[3]
for f in ("model.safetensors", "ema.safetensors"):
    ta, tb = load_file(str(a / f)), load_file(str(b / f))
    assert ta.keys() == tb.keys()
    num = sum(((ta[k].float() - tb[k].float()) ** 2).sum() for k in ta) ** 0.5
    den = sum((tb[k].float() ** 2).sum() for k in tb) ** 0.5
    diff = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    same = sum(torch.equal(ta[k], tb[k]) for k in ta)
    print(f"{label}: {a.name} vs {b.name} {f}: rel L2 {float(num / den):.2e}, max |a-b| {diff:.2e}, "
          f"{same}/{len(ta)} tensors bitwise equal")
PY
}

if [ "$PART" = one ]; then
  el "one GPU: plain vs FSDP2 (one-rank group), HMAR-d16 B32 and HMAR-d30 B32"
  timeout 330 python3 -m maskar bench train_step rows=hmar/d16/blocks,hmar/d30/blocks/ac/b32 parallel=none,fsdp2 \
    $STEPS json=$OUT/one_gpu.json 2>&1 | tee $OUT/one.log
  el "one GPU: HMAR-d30 B32, FSDP2 with CPU offload"
  timeout 200 python3 -m maskar bench train_step rows=hmar/d30/blocks/ac/b32 parallel=fsdp2 offload=true \
    steps=5 warmup=2 json=$OUT/offload.json 2>&1 | tee -a $OUT/one.log
fi

if [ "$PART" = check ]; then
  C="preset=hmar-tiny train.batch_size=64 train.precision=bf16 train.ckpt_every=50 train.log_every=50 \
    train.progress=false train.tensorboard=false train.schedule=constant train.warmup_steps=0 train.ema=0.99 \
    model.depth=4 model.width=128 model.heads=2 model.cond_drop_rate=0 attention_backend=auto"
  F="train.parallel=fsdp2"
  L=$OUT/check_logs.txt; : > $L  # written as the runs go: kept if the call is cut short
  el "a: $NP GPUs FSDP2, 200 steps"
  timeout 100 $RUN -m maskar train $C $F train.steps=200 train.out_dir=$R/a >> $L 2>&1; echo "rc=$?"
  grep -E "fsdp2:|global batch|step 200/" $R/a/log.txt | cut -c1-200
  el "one: 1 GPU plain, 200 steps"
  timeout 90 python3 -m maskar train $C train.steps=200 train.out_dir=$R/one >> $L 2>&1; echo "rc=$?"
  el "b: $NP GPUs FSDP2, killed after step 100, then re-run"
  setsid $RUN -m maskar train $C $F train.steps=200 train.out_dir=$R/b >> $L 2>&1 &
  PID=$!
  for i in $(seq 1 300); do
    s=$(cat $R/b/latest 2>/dev/null | sed 's/[^0-9]//g'); s=${s:-0}
    if [ "$((10#$s))" -ge 100 ]; then break; fi; sleep 0.2
  done
  kill_tree $PID; sleep 2
  echo "killed at latest=$(cat $R/b/latest 2>/dev/null)"
  timeout 90 $RUN -m maskar train $C $F train.steps=200 train.out_dir=$R/b >> $L 2>&1; echo "rc=$?"
  grep -h "resumed from" $R/b/log.txt | cut -c1-200
  el "c: $NP GPUs FSDP2 to step 100, resumed on 1 GPU (plain) to 200"
  timeout 90 $RUN -m maskar train $C $F train.steps=100 train.out_dir=$R/c >> $L 2>&1; echo "rc=$?"
  timeout 90 python3 -m maskar train $C train.steps=200 train.out_dir=$R/c >> $L 2>&1; echo "rc=$?"
  el "d: 1 GPU FSDP2 to step 100, resumed on $NP GPUs (FSDP2) to 200"
  timeout 90 python3 -m maskar train $C $F train.steps=100 train.out_dir=$R/d >> $L 2>&1; echo "rc=$?"
  timeout 90 $RUN -m maskar train $C $F train.steps=200 train.out_dir=$R/d >> $L 2>&1; echo "rc=$?"
  grep -h "resumed from" $R/c/log.txt $R/d/log.txt | cut -c1-200
  el "compare"
  {
    compare $R/b $R/a "killed+resumed vs uninterrupted ($NP GPUs; bitwise expected)"
    compare $R/a $R/one "$NP GPUs FSDP2 vs 1 GPU plain (rounding expected)"
    compare $R/c $R/a "saved on $NP, resumed on 1 vs uninterrupted $NP"
    compare $R/d $R/a "saved on 1 (FSDP2), resumed on $NP vs uninterrupted $NP"
    ls $R/a/step-0000200 $R/a/step-0000200/dcp
  } 2>&1 | tee $OUT/check.txt
fi

if [ "$PART" = bench ]; then
  el "one-GPU baseline: HMAR-d16, VAR-d16, B32"
  timeout 170 python3 -m maskar bench train_step rows=hmar/d16/blocks,var/d16/blocks parallel=none $STEPS \
    json=$OUT/base.json 2>&1 | tee $OUT/bench.log
  el "$NP GPUs: DDP and FSDP2, B32 per GPU"
  timeout 200 $RUN -m maskar bench train_step rows=hmar/d16/blocks,var/d16/blocks parallel=ddp,fsdp2 $STEPS \
    baseline=$OUT/base.json json=$OUT/np_d16.json 2>&1 | tee -a $OUT/bench.log
  el "$NP GPUs: HMAR-d30 256 px, B32 per GPU, FSDP2 and DDP"
  timeout 170 $RUN -m maskar bench train_step rows=hmar/d30/blocks/b32 parallel=fsdp2,ddp $STEPS \
    json=$OUT/np_d30.json 2>&1 | tee -a $OUT/bench.log
fi

el "summary"
python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'file':<14} {'row':<22} {'par':<6} {'N':>2} {'B/GPU':>5} {'step ms':>8} {'img/s':>8} {'eff':>6} "
      f"{'MFU':>6} {'peak GB':>7}  check")
for f in ("one_gpu", "offload", "base", "np_d16", "np_d30"):
    p = out / f"{f}.json"
    if not p.is_file():
        continue
    for r in json.loads(p.read_text())["rows"]:
        if "error" in r:
            print(f"{f:<14} {r['row']:<40} FAILED: {r['error']}")
            continue
        name = f"{r['model']}-s{r['stage']} {r['compile']}{' ac' if r['ac'] else ''}"
        par = r.get("parallel", "none") + ("+off" if f == "offload" else "")
        eff = f"{100 * r['scaling_eff']:.1f}%" if "scaling_eff" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] == r["mfu"] else "-"
        print(f"{f:<14} {name:<22} {par:<6} {r.get('world', 1):>2} {r['batch']:>5} {r['step_ms']:>8.1f} "
              f"{r['images_s']:>8.1f} {eff:>6} {mfu:>6} {r['peak_gb']:>7.2f}  {r.get('check', '')}")
if (out / "check.txt").is_file():
    print((out / "check.txt").read_text())
print("targets: eff >= 90% for hmar-d16 / var-d16 under ddp and fsdp2 (np_d16); hmar-d30 B/GPU >= 32 under "
      "fsdp2 on 2 GPUs runs (np_d30); killed+resumed bitwise equal (check)")
PY
el "done"
