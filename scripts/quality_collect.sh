#!/usr/bin/env bash
# The quality study's steps on this machine (docs/quality.md), around the three device calls:
#   scripts/quality_collect.sh loss_curve     .carry/fmnist and .carry/vq only (what the training loss-curve
#                                             recheck carries: scripts/gpu/train_speed_more.sh STAGES="3 4")
#   scripts/quality_collect.sh prepare        .carry/fmnist: the Fashion-MNIST train split to carry
#                                             (train images xz-compressed: 22.6 MB; ~1 min); .carry/fmnist-test:
#                                             the test split (4 MB); .carry/vq: the VQ tokenizer alone (9.5 MB);
#                                             .carry/inc_a|b|c: the TF-Inception weights in three parts, one per
#                                             call; .carry/inc_check: a 1,000-sample set with its CPU FID
#   scripts/quality_collect.sh call1 DIR      after scripts/gpu/quality_var_hmar.sh: DIR = the call's files_at;
#                                             unpacks results to docs/results/quality (and a KL tokenizer it
#                                             trained to .carry/kl)
#   scripts/quality_collect.sh call2 DIR [DIR_2A]  after scripts/gpu/quality_mar_casmar.sh (PHASE=study's files_at;
#                                             PHASE=train's as DIR_2A, for its console): results, and the shipped
#                                             checkpoints/casmar-fmnist + checkpoints/mar-fmnist
#   scripts/quality_collect.sh call3 DIR      after scripts/gpu/quality_main_fid.sh: MAR's and CASMAR's main and
#                                             speed rows into mar_casmar.json, the TF-Inception JSONs
#   scripts/quality_collect.sh fid            the KL tokenizer on the test split; TF-Inception FID / precision /
#                                             recall of the saved samples on this CPU (INC_N per set, default
#                                             1000; ~0.25 s an image): only where call 3 could not run
#   scripts/quality_collect.sh cpu_speed      CPU images/s of the four models (this machine)
#   scripts/quality_collect.sh report         docs/quality.md and its plots from the JSON
# Run from the repository root with the project's Python (PY, default .venv/bin/python). Dry runs only:
# KL_TEST_LIMIT / REF_LIMIT cut the test images of the tokenizer check / the FID reference.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=$PWD
RES=docs/results/quality
RUNS=runs/quality
DATA_ROOT=${DATA_ROOT:-/usr/share/datasets/fashion-mnist}
INC_N=${INC_N:-1000}
mkdir -p $RES $RUNS

unpack() {  # unpack DIR NAME: NAME.tar or NAME.tar.part-* from DIR into $RUNS/NAME
  local dir=$1 name=$2
  rm -rf "$RUNS/$name"; mkdir -p "$RUNS/$name"
  if [ -f "$dir/$name.tar" ]; then tar -C "$RUNS/$name" -xf "$dir/$name.tar"
  else cat "$dir/$name.tar.part-"* | tar -C "$RUNS/$name" -xf -; fi
}

results() {  # results NAME: JSON, logs and grids of one call into docs/results/quality
  local name=$1
  cp "$RUNS/$name/study/$name.json" $RES/
  mkdir -p $RES/logs $RES/grids
  cp "$RUNS/$name"/logs/*_log.txt "$RUNS/$name"/logs/*_config.yaml $RES/logs/ 2>/dev/null || true
  for f in budget.txt times.txt; do cp "$RUNS/$name/logs/$f" "$RES/logs/${name}_$f" 2>/dev/null || true; done
  # call 2b's timing of VAR and HMAR alone (for the VAR / HMAR pair's GPU-minutes)
  cp "$RUNS/$name"/logs/var_hmar_alone.txt "$RUNS/$name"/logs/alone_*.log $RES/logs/ 2>/dev/null || true
  cp "$RUNS/$name"/study/grid_*.png $RES/grids/ 2>/dev/null || true
  mkdir -p $RUNS/samples && cp "$RUNS/$name"/study/samples/*.npz $RUNS/samples/ 2>/dev/null || true
}

ship() {  # ship NAME: checkpoints/NAME from the call-2 pack, with its README
  rm -rf checkpoints/$1 && cp -r $RUNS/ckpts/ckpts/$1 checkpoints/$1
  $PY scripts/quality_report.py --readme $1
}

extract_tokenizer() {  # extract_tokenizer GENERATOR_CKPT DEST: the tokenizer a generator checkpoint bundles
  mkdir -p "$2" && $PY - "$1" "$2" <<'PY'
import hashlib, sys, yaml
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
cfg = yaml.safe_load(open(f"{src}/config.yaml"))
cfg["model"] = cfg["model"]["tokenizer"]
cfg.pop("sample", None)  # the generator's sampling settings: a tokenizer config has none of them
yaml.safe_dump(cfg, open(f"{dst}/config.yaml", "w"), sort_keys=False)
sd = load_file(f"{src}/model.safetensors")
save_file({k[len("tokenizer."):]: v for k, v in sd.items() if k.startswith("tokenizer.")},
          f"{dst}/model.safetensors", metadata={"format": "pt"})
with open(f"{dst}/SHA256SUMS", "w") as f:
    for n in ("config.yaml", "model.safetensors"):
        f.write(f"{hashlib.sha256(open(f'{dst}/{n}', 'rb').read()).hexdigest()}  {n}\n")
PY
}

carry_train_split() {  # .carry/fmnist: the train split, its images xz-compressed (22.6 MB)
    mkdir -p .carry/fmnist
    zcat $DATA_ROOT/train-images-idx3-ubyte.gz | xz -9e -T2 > .carry/fmnist/train-images-idx3-ubyte.xz
    cp $DATA_ROOT/train-labels-idx1-ubyte.gz .carry/fmnist/
}

case "${1:-}" in
  loss_curve)  # only what the loss-curve recheck carries (scripts/gpu/train_speed_more.sh STAGES="3 4")
    carry_train_split
    extract_tokenizer checkpoints/hmar-fmnist .carry/vq
    ;;
  prepare)
    carry_train_split
    # the test split alone (4 MB): what scripts/gpu/bench_sampling.sh's decode-quality line carries
    mkdir -p .carry/fmnist-test
    zcat $DATA_ROOT/t10k-images-idx3-ubyte.gz | xz -9e -T2 > .carry/fmnist-test/t10k-images-idx3-ubyte.xz
    cp $DATA_ROOT/t10k-labels-idx1-ubyte.gz .carry/fmnist-test/
    # the VQ tokenizer of checkpoints/hmar-fmnist alone: call 1 carries it instead of that 29.6 MB checkpoint;
    # and the KL tokenizer of the study (trained by call 1) from the shipped CASMAR demo, which
    # bundles it (its bf16 copy of the fp32 original), where a fresh checkout has no .carry/kl
    extract_tokenizer checkpoints/hmar-fmnist .carry/vq
    [ -d .carry/kl ] || extract_tokenizer checkpoints/casmar-fmnist .carry/kl
    # the TF-Inception TorchScript (87.3 MB) in three parts: each call carries one (64 MiB a call in all)
    W=$($PY -c "from maskar.eval.inception import find_fid_inception; print(find_fid_inception())")
    mkdir -p .carry/inc_a .carry/inc_b .carry/inc_c .carry/inc_check
    # dd, not tail | head: head's early exit kills tail with SIGPIPE, which pipefail made fatal
    dd if="$W" of=.carry/inc_a/part bs=1M iflag=count_bytes count=21000000 status=none
    dd if="$W" of=.carry/inc_b/part bs=1M iflag=skip_bytes,count_bytes skip=21000000 count=30000000 status=none
    dd if="$W" of=.carry/inc_c/part bs=1M iflag=skip_bytes skip=51000000 status=none
    # GPU against CPU: the first run's HMAR seed-0 set (1,000 samples) and its CPU TF-Inception JSON
    # (that set was a run's output, not committed: a fresh checkout has none, and call 3 then skips the check)
    if [ -f $RUNS/inc_samples/hmar_main_default_s0.npz ]; then
      cp $RUNS/inc_samples/hmar_main_default_s0.npz .carry/inc_check/
      cp $RES/inception_cpu1000/hmar_main_default_s0.json .carry/inc_check/cpu.json
    else
      echo "prepare: no $RUNS/inc_samples/hmar_main_default_s0.npz: .carry/inc_check left empty (call 3 skips its check)"
    fi
    du -sh .carry/*; for c in ".carry/fmnist .carry/vq .carry/inc_a" ".carry/fmnist .carry/kl .carry/inc_b" \
      ".carry/fmnist-test .carry/inc_c .carry/inc_check"; do scripts/device_tree.sh size $c || true; done ;;
  call1)
    unpack "$2" var_hmar; results var_hmar
    if [ -f "$2/kl.tar" ]; then  # a call 1 that trained the KL tokenizer (KL_TRAIN=1)
      rm -rf .carry/kl && mkdir -p .carry && tar -C .carry -xf "$2/kl.tar" && mv .carry/klvae-fmnist-s .carry/kl
      cp -r .carry/kl $RUNS/kl   # the tokenizer of this study, for the fid step's test-split check
    fi ;;
  call2)
    unpack "$2" mar_casmar; results mar_casmar; unpack "$2" ckpts
    # the consoles: this call's, and PHASE=train's when its files_at comes third
    cp "$2/console.txt" $RES/logs/mar_casmar_console.txt 2>/dev/null || true
    if [ -n "${3:-}" ]; then cp "$3/console.txt" $RES/logs/mar_casmar_train_console.txt; fi
    ship casmar-fmnist
    # MAR ships when it fits: all shipped checkpoints together stay <= 60 MB (issue 17: the others are
    # 45 MB, hence SHIP_MAR_MAX_MB=15); the device calls leave the demos behind (device_tree.sh aside)
    mar_mb=$(( $(stat -c %s $RUNS/ckpts/ckpts/mar-fmnist/model.safetensors) / 1000000 ))
    if [ $mar_mb -le ${SHIP_MAR_MAX_MB:-15} ]; then ship mar-fmnist
    else
      # the earlier run's smaller MAR (its README names its run) stays the demo: a user can sample MAR
      echo "mar-fmnist not shipped: $mar_mb MB > SHIP_MAR_MAX_MB=${SHIP_MAR_MAX_MB:-15} (its study rows name runs/quality/mar;" \
        "checkpoints/mar-fmnist, if any, is left as it is)"
    fi
    total=$(du -cb checkpoints/* | tail -n 1 | cut -f1)
    echo "shipped checkpoints: $((total / 1000000)) MB (limit 60)"; [ $total -le 60000000 ] ;;
  call3)
    unpack "$2" main_fid
    cp "$2/console.txt" $RES/logs/main_fid_console.txt 2>/dev/null || true
    # the main and speed rows first, then call 2's curves
    $PY -m maskar bench quality merge=$RES/mar_casmar.json $RUNS/main_fid/study/main_fid.json \
      $RUNS/mar_casmar/study/mar_casmar.json
    mkdir -p $RES/inception $RES/grids $RES/logs
    cp $RUNS/main_fid/inception/*.json $RES/inception/
    cp $RUNS/main_fid/study/grid_*.png $RES/grids/ 2>/dev/null || true
    for f in $RUNS/main_fid/logs/*; do
      # a call without a check set keeps the committed check (an earlier call's) rather than its skip line
      if [ "$(basename "$f")" = inc_check.txt ] && grep -q 'check is skipped' "$f"; then continue; fi
      cp "$f" "$RES/logs/main_fid_$(basename "$f")"
    done
    cat $RUNS/main_fid/logs/inc_check.txt ;;
  fid)
    if [ -d $RUNS/kl ] && [ ! -f $RES/kl_quality_test.json ]; then  # the KL tokenizer on the test split
      $PY -m maskar bench tokenizer_quality $RUNS/kl split=test json=$RES/kl_quality_test.json \
        ${KL_TEST_LIMIT:+limit=$KL_TEST_LIMIT} | tee $RES/kl_quality_test.txt
    fi
    mkdir -p $RES/inception $RUNS/inc_samples
    # seed 0 of every model first: a run cut short still compares the four
    for f in $(ls $RUNS/samples/*_main_*_s0.npz; ls $RUNS/samples/*_main_*_s[1-9].npz); do
      name=$(basename "$f" .npz); out=$RES/inception/$name.json
      [ -f "$out" ] && continue
      $PY -c "import numpy as np, sys; d = np.load('$f'); n = $INC_N
np.savez('$RUNS/inc_samples/$name.npz', arr_0=d['arr_0'][:n], arr_1=d['arr_1'][:n])"
      echo "== $name ($INC_N samples)"
      $PY -m maskar eval samples=$RUNS/inc_samples/$name.npz ref=data data.name=fashion_mnist \
        data.root=$DATA_ROOT data.split=test data.channels=1 metrics=fid,pr device=cpu json=$out \
        ${REF_LIMIT:+ref_limit=$REF_LIMIT}
    done ;;
  cpu_speed)
    mk() {  # a 1-step checkpoint of a study config: sampling speed does not depend on the weights
      $PY -m maskar train config=$RES/logs/$1_config.yaml data.root=$DATA_ROOT data.num_workers=0 device=cpu \
        train.steps=1 train.batch_size=8 train.ckpt_every=0 train.resume=false train.out_dir=$RUNS/cpu_$1 \
        train.progress=false "${@:2}" > /dev/null
    }
    mk var; mk hmar2 model.stage1_ckpt=null
    # the study's MAR where call 2 left it here (too large to ship), else the shipped demo
    mar_ck=checkpoints/mar-fmnist; [ -d $RUNS/ckpts/ckpts/mar-fmnist ] && mar_ck=$RUNS/ckpts/ckpts/mar-fmnist
    $PY -m maskar bench quality plan=scripts/gpu/quality/plan_cpu_speed.yaml out=$RUNS/cpu_speed tag=cpu_speed \
      classifier=checkpoints/fmnist-classifier device=cpu ckpt.var=$RUNS/cpu_var ckpt.hmar=$RUNS/cpu_hmar2 \
      ckpt.mar=$mar_ck ckpt.casmar=checkpoints/casmar-fmnist
    cp $RUNS/cpu_speed/cpu_speed.json $RES/ ;;
  report)
    for n in casmar-fmnist mar-fmnist; do
      # a demo kept from an earlier run (its README says so) keeps that run's README
      if [ -d checkpoints/$n ] && ! grep -q 'Not the .* of the current quality table' checkpoints/$n/README.md; then
        $PY scripts/quality_report.py --readme $n
      fi
    done
    $PY scripts/quality_report.py ;;
  *)
    sed -n 2,15p "$0"; exit 2 ;;
esac
