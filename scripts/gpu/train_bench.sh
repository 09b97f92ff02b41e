# Sourced by the device scripts that time `maskar bench train_step` rows in stages (after clock.sh):
#   bench TAG RES STEPS WARMUP ROWS [EXTRA]   writes $OUT/$PREFIX-TAG.txt / .json, prints the rows
# PREFIX names the script's files (default "bench"); BENCH_S caps a stage (default 150 s).
bench() {
  local tag=$1 res=$2 st=$3 wu=$4 rows=$5 extra=${6:-} f="$OUT/${PREFIX:-bench}-$1"
  el "train_step $res px: $rows"
  timeout $(cap "${BENCH_S:-150}") python3 -m maskar bench train_step res=$res steps=$st warmup=$wu rows=$rows \
    $extra json="$f.json" > "$f.txt" 2>&1
  echo "rc=$?"; grep -E "^(hmar|var)|rror" "$f.txt" | cut -c1-230 | tail -n 4
}
