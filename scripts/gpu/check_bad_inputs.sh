#!/usr/bin/env bash
# The CUDA side of docs/reliability.md, on one GPU: the sampling memory bound refuses a batch
# that cannot fit the GPU (before any sampling), a missing cuda:N is refused, sampling on CUDA
# writes arr_1 labels, and a nan loss under bf16 autocast stops training at the right step with
# the last good checkpoint kept. Produces in $OUT: bad_inputs.txt (every check's output).
# Takes about 1 minute on one H200. Run from the repository root: OUT=/tmp/out scripts/gpu/check_bad_inputs.sh
# (scripts/gpu/check_ddp_resume.sh on 2 GPUs also exercises the run-dir lock: its SIGKILLed run
# leaves a stale lock that the resumed torchrun run must take over.)
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG=$OUT/bad_inputs.txt; : > "$LOG"
W=$(mktemp -d)
declare -a NAMES RESULTS
check() {  # check NAME EXPECTED_RC FRAGMENT -- command...
  local name=$1 want=$2 frag=$3; shift 4
  local t0=$(date +%s.%N)
  "$@" > "$W/out.txt" 2>&1; local rc=$?
  local dt=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')")
  { echo "== $name (rc $rc, ${dt}s): $*"; tail -n 5 "$W/out.txt"; } >> "$LOG"
  if [ "$rc" = "$want" ] && grep -q -- "$frag" "$W/out.txt"; then RESULTS+=("ok   ${dt}s"); else RESULTS+=("FAIL rc=$rc ${dt}s"); fi
  NAMES+=("$name")
}
CK=checkpoints/hmar-fmnist; DEV=${DEV:-cuda}  # DEV=cpu runs the same checks on a CPU (smoke test)
check "memory bound on cuda" 2 "need at least" -- \
  python3 -m maskar sample ckpt=$CK per_class=100000 batch_size=1000000 device=$DEV out=$W/a.png
check "missing cuda:N" 2 "CUDA device(s)" -- python3 -m maskar sample ckpt=$CK device=cuda:64 out=$W/a.png
check "sample on cuda, npz labels" 0 "arr_1 labels" -- \
  python3 -m maskar sample ckpt=$CK labels=0,7 per_class=3 device=$DEV out=$W/s.png npz=$W/s.npz
check "npz labels are the classes" 0 "labels ok" -- python3 -c "
import numpy as np; f = np.load('$W/s.npz'); assert f['arr_1'].tolist() == [0, 0, 0, 7, 7, 7], f['arr_1']
assert f['arr_0'].shape == (6, 32, 32, 3); print('labels ok')"
check "nan loss stops on cuda bf16" 0 "nan stop ok" -- python3 -c "
import torch
from maskar.config import load_config
from maskar.data import build_dataset
from maskar.checkpoint import latest_checkpoint, load_model
from maskar.train.trainer import NonFiniteLossError, train
class NanAfter(torch.utils.data.Dataset):  # images turn nan from the 33rd read: step 5 of batch 8
    def __init__(self, base): self.base, self.reads, self.num_classes = base, 0, base.num_classes
    def __len__(self): return len(self.base)
    def __getitem__(self, i):
        item = dict(self.base[i]); self.reads += 1
        if self.reads > 32: item['image'] = torch.full_like(item['image'], float('nan'))
        return item
cfg = load_config('toy', ['train.out_dir=$W/nan', 'train.progress=false', 'train.steps=10', 'train.batch_size=8',
    'data.synthetic_size=32', 'train.ckpt_every=2', 'train.precision=bf16', 'device=$DEV'])
try:
    train(cfg, dataset=NanAfter(build_dataset(cfg.data))); raise SystemExit('no stop')
except NonFiniteLossError as e:
    assert 'at step 5' in str(e) and latest_checkpoint('$W/nan').name == 'step-0000004', e
m, _ = load_model('$W/nan'); assert all(torch.isfinite(p).all() for p in m.parameters())
print('nan stop ok')"
rm -rf "$W"
echo; echo "check                           result"
for i in "${!NAMES[@]}"; do printf "%-31s %s\n" "${NAMES[$i]}" "${RESULTS[$i]}"; done
