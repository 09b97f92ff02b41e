# Sourced by the device scripts that run several stages inside one device call:
#   el MSG      prints MSG with the seconds since the script started
#   cap LIMIT   the stage's own limit, or the seconds left before DEADLINE (default 570 s) if fewer
#               (at least 5), so a slow stage shortens the later ones instead of the call ending
#               with no summary
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
DEADLINE=${DEADLINE:-570}
cap() { local s=$(( T0 + DEADLINE - $(date +%s) )); [ $s -lt 5 ] && s=5; echo $(( $1 < s ? $1 : s )); }
# pack_out DIR: only 8 files under $OUT come back from a device call; with more, one tarball holds them
pack_out() { ( cd "$1" && n=$(ls | wc -l) && [ "$n" -gt 8 ] && tar czf /tmp/results.tgz . \
  && find . -type f -delete && mv /tmp/results.tgz . && echo "packed $n files into results.tgz" ); }
# prelude: what every device call script does first: PYTHONPATH, OUT made, the GPU's name printed
# (and left in $g), FlashAttention-4's first part kept in .persist/ where carried (for a second call
# that carries .carry/fa4b: scripts/gpu/fa4_rows.sh)
prelude() {
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
  OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
  g=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1); echo "GPU: $g"
  if [ -d .carry/fa4a ] && [ ! -d .persist/fa4a ]; then
    mkdir -p .persist && cp -r .carry/fa4a .persist/ && echo "fa4a kept in .persist/"
  fi
}
# switch_rows256 SWITCH TAG LIMIT VALUES...: the 256 px B 32 training-step rows (HMAR-d16, VAR-d16,
# /graph/master) with the environment switch at each value, each side in its own process:
# $OUT/TAG-256-VALUE.txt / .json
switch_rows256() {
  local sw=$1 tag=$2 lim=$3 a; shift 3
  for a in "$@"; do
    el "train_step 256 px B 32, $sw=$a"
    env "$sw=$a" timeout $(cap "$lim") python3 -m maskar bench train_step res=256 steps=25 warmup=5 \
      rows=hmar/d16/blocks/graph/master,var/d16/blocks/graph/master json="$OUT/$tag-256-$a.json" \
      > "$OUT/$tag-256-$a.txt" 2>&1
    echo "rc=$?"; grep -E "^(hmar|var)-|rror" "$OUT/$tag-256-$a.txt" | cut -c1-230 | tail -n 3
  done
}
