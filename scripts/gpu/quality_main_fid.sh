#!/usr/bin/env bash
# Quality study, device call 3 of 3 (docs/quality.md): MAR's and CASMAR's main rows, the speed rows, and
# the TF-Inception FID / precision / recall of all four models' main samples (10,000 per seed, 3 seeds,
# against the 10,000 test images) on the GPU. Run it right after calls 1 and 2 while the device machine
# is warm: it reads what they left there (Q1_RUNS, Q2_RUNS; .persist/ is git-ignored and stays).
# Without call 1's samples (a chain that reruns only MAR / CASMAR) it scores MAR and CASMAR alone; the
# three weight parts may then come with any calls of the chain before it (INC_PARTS/a and /b).
#   0. the TF-Inception TorchScript (87.3 MB: more than one call may carry beside the data) from its three
#      parts, one carried by each call (scripts/quality_collect.sh prepare: .carry/inc_a, inc_b, inc_c;
#      calls 1 and 2 copy theirs to .persist/inc), checked against its SHA-256; the test split from
#      .carry/fmnist-test
#   1. the GPU path against the CPU one: the FID of a saved 1,000-sample set whose CPU FID is committed
#      (.carry/inc_check: the first run's HMAR seed 0 and its CPU JSON, from
#      docs/results/quality/inception_cpu1000), which also caches the test split's statistics
#   2. MAR || CASMAR main rows (classifier FD / accuracy / precision-recall, grids; every sample kept),
#      each model's sets through the Inception network as soon as its rows end, with call 1's VAR and
#      HMAR sets and the training-curve samples of calls 1 and 2 going through it meanwhile
#   3. the speed rows alone (SPEED_T)
# Returns under $OUT: main_fid.tar (study JSON of the main and speed rows, grids, the Inception JSONs,
# logs). Needs carry .carry/inc_c, .carry/fmnist-test, .carry/inc_check. REF_LIMIT cuts the reference
# (CPU dry runs only). Expected wall time on one H200: 5-7 min (CASMAR's 30,000 samples take ~3.5 min);
# the command's limit is 10 min.
source "$(dirname "$0")/quality/common.sh"
Q1_RUNS=${Q1_RUNS:-$PWD/.persist/q1}; Q2_RUNS=${Q2_RUNS:-$PWD/.persist/q2}; INC_PARTS=${INC_PARTS:-$PWD/.persist/inc}
SPEED_T=${SPEED_T:-100}  # 60 s cut CASMAR's row on 2026-12-03 (night)
MAIN_T=${MAIN_T:-420}; INC_CHECK=${INC_CHECK:-.carry/inc_check}
INC_SHA=7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34
PLAN=scripts/gpu/quality/plan_mar_casmar.yaml
command -v nvidia-smi >/dev/null && nvidia-smi -L

el "inputs"
missing=""
for p in "$INC_PARTS/a" "$INC_PARTS/b" .carry/inc_c/part .carry/fmnist-test \
    "$Q2_RUNS/pack/mar-fmnist" "$Q2_RUNS/pack/casmar-fmnist"; do
  [ -e "$p" ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
  el "missing:$missing (the machine went cold between calls, or call 1 / 2 did not finish): nothing run"
  exit 3
fi
INC=$RUNS/default_1.pt
cat "$INC_PARTS/a" "$INC_PARTS/b" .carry/inc_c/part > $INC
echo "$INC_SHA  $INC" | sha256sum -c - || { el "the assembled Inception weights do not match their SHA-256"; exit 3; }
export MASKAR_FID_INCEPTION=$INC
TEST=$RUNS/fmnist-test; unpack_idx .carry/fmnist-test $TEST
INC_OUT=$RUNS/inception; mkdir -p $INC_OUT
# inception NPZ: TF-Inception FID / precision / recall of a sample set vs the 10,000 test images
inception() {
  local name; name=$(basename "$1" .npz)
  $M eval samples="$1" ref=data data.name=fashion_mnist data.root=$TEST data.split=test data.channels=1 \
    metrics=fid,pr device=$DEVICE batch_size=${INC_BS:-500} json=$INC_OUT/$name.json \
    ${REF_LIMIT:+ref_limit=$REF_LIMIT} > $RUNS/inc_$name.log 2>&1 \
    || { el "inception $name failed:"; tail -n 5 $RUNS/inc_$name.log; }
  echo "inception $name: $(grep -h -m1 'FID' $RUNS/inc_$name.log)"
}

el "1. GPU vs CPU on a 1,000-sample set with a CPU result (and the test split's statistics)"
if [ ! -f $INC_CHECK/hmar_main_default_s0.npz ]; then
  # a fresh checkout has no check set (its samples were a run's output, not committed); the GPU path
  # matched the CPU one to 6e-6 on 2026-12-03 (docs/results/quality/logs/main_fid_inc_check.txt)
  el "no check set at $INC_CHECK: the GPU-vs-CPU Inception check is skipped" | tee $RUNS/inc_check.txt
else
inception $INC_CHECK/hmar_main_default_s0.npz
mv $INC_OUT/hmar_main_default_s0.json $RUNS/inc_check_gpu.json
$PY - $RUNS/inc_check_gpu.json $INC_CHECK/cpu.json <<'PY' | tee $RUNS/inc_check.txt
import json, sys
gpu, cpu = (json.load(open(p)) for p in sys.argv[1:])
get = lambda r, k: next(x["value"] for x in r["results"] if x["metric"] == k)
for k in ("FID", "precision", "recall"):
    g, c = get(gpu, k), get(cpu, k)
    print(f"check {k}: GPU {g:.6f} CPU {c:.6f} diff {g - c:+.2e}")
PY
fi

el "2. MAR || CASMAR main rows, each then its sets through Inception; VAR and HMAR sets meanwhile"
SHOWN_MAR=checkpoints/mar-fmnist; [ -f $Q2_RUNS/mar_size.txt ] && source $Q2_RUNS/mar_size.txt
# temperature MODEL: the main rows' noise temperature and guidance. TEMP=auto (default): the
# sample.temperature / cfg / re_cfg of the model's call-2 temperature point with the lowest FD_clf
# (none: the plan's cfg and the checkpoint's temperature, official 1.0); TEMP=official: none;
# TEMP_MAR / TEMP_CASMAR: that temperature.
temperature() {
  local v="TEMP_${1^^}"; local forced=${!v:-}
  if [ -n "$forced" ]; then echo "sample.temperature=$forced"; return; fi
  [ "${TEMP:-auto}" = auto ] || return 0
  $PY - $1 $Q2_RUNS/study/mar_casmar.json <<'PY'
import json, sys
from pathlib import Path
model, path = sys.argv[1], Path(sys.argv[2])
rows = json.loads(path.read_text())["rows"] if path.exists() else []
rows = [r for r in rows if r["row"] == "temperature" and r["model"] == model and "FD_clf" in r["metrics"]]
if rows:
    best = min(rows, key=lambda r: r["metrics"]["FD_clf"])
    keys = ("sample.temperature", "sample.cfg", "sample.re_cfg")
    picked = {o.split("=", 1)[0]: o for o in best["overrides"] if o.split("=", 1)[0] in keys}  # last wins
    print(" ".join(picked.values()))
PY
}
main_rows() {  # main_rows MODEL SHOWN
  local t; t=$(temperature $1)
  el "$1 main rows at ${t:-the temperature of the checkpoint}"
  timeout -s TERM $MAIN_T $M bench quality plan=$PLAN out=$RUNS/study tag=$1_main models=$1 kinds=quality \
    rows=main classifier=$CLF device=$DEVICE scale=$SCALE ckpt.$1=$Q2_RUNS/pack/$1-fmnist as.$1=$2 \
    ${STUDY_EXTRA:-} $t > $RUNS/study_$1_main.log 2>&1
  el "$1 main rows (exit $?): $(grep -c ' FD_clf ' $RUNS/study_$1_main.log) points"
}
# each model's sets go through Inception as soon as its rows end (MAR's while CASMAR still samples:
# about a minute of the call on 2026-12-04)
main_then_inception() {  # main_then_inception MODEL SHOWN
  main_rows $1 $2
  for f in $(ls $RUNS/study/samples/$1_main_*.npz 2>/dev/null | sort); do inception $f; done
}
main_then_inception mar $SHOWN_MAR & P1=$!
main_then_inception casmar checkpoints/casmar-fmnist & P2=$!
if [ -d "$Q1_RUNS/study/samples" ]; then
  for f in $(ls $Q1_RUNS/study/samples/*_main_*.npz | sort); do inception $f; done
else
  el "no call-1 samples in $Q1_RUNS: VAR and HMAR keep their committed Inception JSONs"
fi
# the training-curve rows' samples (1,000 a checkpoint; 500 for CASMAR) of calls 1 and 2
for f in $(ls $Q1_RUNS/study/samples/*_train_curve*.npz $Q2_RUNS/study/samples/*_train_curve*.npz 2>/dev/null); do
  inception $f
done
wait $P1 $P2

el "3. speed rows, alone on the GPU"
timeout -s TERM $SPEED_T $M bench quality plan=$PLAN out=$RUNS/study tag=speed kinds=speed classifier=$CLF \
  device=$DEVICE scale=$SCALE ckpt.mar=$Q2_RUNS/pack/mar-fmnist ckpt.casmar=$Q2_RUNS/pack/casmar-fmnist \
  ${STUDY_EXTRA:-} > $RUNS/study_speed.log 2>&1
grep -h "^speed" $RUNS/study_speed.log
$M bench quality merge=$RUNS/study/main_fid.json $RUNS/study/mar_main.json $RUNS/study/casmar_main.json \
  $RUNS/study/speed.json

el "pack"
mkdir -p $RUNS/logs && cp $RUNS/*.log $RUNS/*.txt $RUNS/inc_check_gpu.json $RUNS/logs/ 2>/dev/null
rm -rf $RUNS/study/samples  # 60,000 samples stay on the device: the Inception JSONs hold their numbers
pack main_fid study inception logs
ls -la $OUT; el "done"
summary main_fid
