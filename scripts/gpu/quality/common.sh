# Shared by scripts/gpu/quality_var_hmar.sh and quality_mar_casmar.sh (sourced, not run).
# Environment: OUT (files that come back), RUNS (scratch), DATA (an IDX folder; default: unpack
# .carry/fmnist), DEVICE (cuda), SCALE (study sample-count factor, 1 = the plan's counts), STUDY_END
# (seconds after the start by which every study process stops), SPEED_T (the speed rows' limit),
# SMOKE_T / CAL_T (the pre-flight's and the calibration's limits),
# and the budgets each script names. Dry run on a CPU: see docs/quality.md ("Dry run on a CPU").
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/quality_out}; RUNS=${RUNS:-/tmp/quality_runs}; PACK=$RUNS/pack
mkdir -p "$OUT" "$RUNS" "$PACK"
PY=${PY:-python3}
M="$PY -m maskar"
DEVICE=${DEVICE:-cuda}
SCALE=${SCALE:-1.0}
CLF=checkpoints/fmnist-classifier
DATA_ROOT=/usr/share/datasets/fashion-mnist   # what shipped configs name (the Debian package)
T0=$(date +%s)
el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }

# smoke MODEL...: the pre-flight (scripts/gpu/quality/smoke_graphs.py): the study's sampling entry
# through the device-only paths, seconds; on failure the call stops before any training.
smoke() {
  el "pre-flight: $* sample through the device paths"
  if timeout -s TERM ${SMOKE_T:-150} $PY scripts/gpu/quality/smoke_graphs.py $DEVICE "$@" > $RUNS/smoke.log \
      2> $RUNS/smoke_err.log; then
    cat $RUNS/smoke.log
  else
    cat $RUNS/smoke.log; grep -v -e Warning -e 'step/s' $RUNS/smoke_err.log | tail -n 30
    el "pre-flight FAILED: nothing trained; fix the error above and rerun"; exit 3
  fi
}

# left [MIN]: seconds until STUDY_END (at least MIN, default 20): a study process's timeout.
left() { local s=$(( T0 + STUDY_END - $(date +%s) )); echo $(( s > ${1:-20} ? s : ${1:-20} )); }

# study TAG PLAN MODELS EXTRA...: the scored rows of MODELS in PLAN, until STUDY_END; TAG.json in $RUNS/study.
study() {
  local tag=$1 plan=$2 models=$3; shift 3
  el "study $tag starts ($(left) s left)"
  timeout -s TERM $(left) $M bench quality plan=$plan out=$RUNS/study tag=$tag models=$models kinds=quality \
    classifier=$CLF device=$DEVICE scale=$SCALE "$@" ${STUDY_EXTRA:-} > $RUNS/study_$tag.log 2>&1
  local rc=$?
  el "study $tag ends (exit $rc$([ $rc = 124 ] && echo ': the deadline')): $(grep -c ' FD_clf ' $RUNS/study_$tag.log) points"
}

# unpack_idx CARRY DST: a carried Fashion-MNIST split into DST: images xz-compressed in the carry (xz
# saves 4 MB of the 64 MiB a device call may carry) are unpacked; labels stay .gz (the IDX reader takes it).
unpack_idx() {
  mkdir -p "$2"
  $PY - "$1" "$2" <<'PY'
import lzma, shutil, sys
from pathlib import Path
src_dir, dst = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(src_dir.iterdir()):
    if f.suffix == ".xz":
        with lzma.open(f) as src, open(dst / f.stem, "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        shutil.copy(f, dst / f.name)
print("data:", sorted(p.name for p in dst.iterdir()))
PY
}

# The Fashion-MNIST train split (.carry/fmnist) into $RUNS/fmnist, unless DATA names an IDX folder.
prepare_data() {
  if [ -n "${DATA:-}" ]; then return; fi
  DATA=$RUNS/fmnist
  # a later call of a chain on the same warm machine finds it unpacked (and need not carry it again)
  if [ -f "$DATA/train-images-idx3-ubyte" ] && [ ! -d .carry/fmnist ]; then echo "data: $DATA (unpacked before)"; return; fi
  unpack_idx .carry/fmnist "$DATA"
}

# it_per_s RUN_DIR: training speed over the last logged window of a run.
it_per_s() { grep -o 'it_per_s [0-9.]*' "$1/log.txt" | tail -n 1 | cut -d' ' -f2; }

# timed NAME CMD...: run CMD, append "NAME wall_seconds exit_code" to $RUNS/times.txt.
timed() {
  local name=$1; shift
  local t=$(date +%s.%N)
  "$@"; local rc=$?
  echo "$name $($PY -c "print(round($(date +%s.%N) - $t, 2))") $rc" >> "$RUNS/times.txt"
  return $rc
}

# steps_for WINDOW_S IPS...: equal step count for a pair: the slower member's speed x window,
# rounded down to a multiple of 10 (at least STEPS_MIN).
steps_for() {
  $PY -c "import sys; w=float(sys.argv[1]); ips=min(float(v) for v in sys.argv[2:]); \
print(max(int('${STEPS_MIN:-20}'), int(w * ips / 10) * 10))" "$@"
}

# pack NAME PATHS...: tar PATHS (relative to $RUNS) into $OUT/NAME.tar, split at 15 MB if larger.
pack() {
  local name=$1; shift
  tar -C "$RUNS" -cf "$RUNS/$name.tar" "$@"
  if [ "$(stat -c %s "$RUNS/$name.tar")" -gt 15000000 ]; then
    split -b 15000000 "$RUNS/$name.tar" "$OUT/$name.tar.part-"
  else
    cp "$RUNS/$name.tar" "$OUT/$name.tar"
  fi
}

# summary TAG: the table printed last (from the study JSON and times.txt).
summary() {
  $PY - "$RUNS/study/$1.json" "$RUNS/times.txt" <<'PY'
import json, sys
from pathlib import Path
print("\n== training wall time (s), exit code")
print(Path(sys.argv[2]).read_text() if Path(sys.argv[2]).exists() else "(none)")
p = Path(sys.argv[1])
if not p.exists():
    print("no study JSON"); sys.exit()
rep = json.loads(p.read_text())
print("== study rows (classifier metrics)")
for r in rep["rows"]:
    m = r["metrics"]
    print(f"{r['model']:7s} {r['row']:14s} {r['label']:18s} s{r['seed']} n{r['n']:6d} "
          f"FD_clf {m.get('FD_clf', float('nan')):8.3f} acc {m.get('accuracy', float('nan')):.3f} "
          f"P/R {m.get('prec_clf', float('nan')):.3f}/{m.get('recall_clf', float('nan')):.3f} "
          f"{r['images_per_s']:8.1f} img/s")
for s in rep["speed"]:
    print(f"speed {s['model']}: {s['images_per_s']:.1f} img/s at batch {s['batch']} ({s['device']})")
PY
}
