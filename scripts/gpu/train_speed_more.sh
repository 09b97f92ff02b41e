#!/usr/bin/env bash
# Issue 13, run 2 (one H200; about 8.5 minutes, every stage under its own timeout, 9 minutes at most):
# the rest of the training-step table and the loss-curve check. Rows are ordered by importance, so a
# stage cut by its timeout keeps the rows already measured (the JSON is written after every row).
#   1. `maskar bench train_step` at 256 px: HMAR-d16 train.compile=full (the whole step in one graph,
#      against run 1's blocks row), HMAR stage 2 (blocks), HMAR-d24 B16 and HMAR-d30 B16 without
#      activation checkpointing (memory), VAR-d16 full, HMAR stage 2 eager, HMAR-d20 blocks.
#   2. 512 px, batch 8: HMAR-d16 and VAR-d16 blocks, HMAR-d16 eager; 1024 px, batch 2: HMAR-d16 and
#      VAR-d16 eager.
#   3. HMAR stage 1 on Fashion-MNIST, the shipped demo's recipe (depth 6, width 256, batch 256, 6000-step
#      lin0 schedule, warm-up 300), stopped at step 2000, default train.compile (blocks on CUDA), with
#      the tokenizer of checkpoints/hmar-fmnist (or $TOKENIZER, e.g. .carry/vq where the checkpoints stay
#      out of the tree); its loss against docs/results/hmar-fmnist-stage1-log.txt.
#      Needs Fashion-MNIST's train-{images-idx3,labels-idx1}-ubyte.gz under $DATA (default
#      /usr/share/datasets/fashion-mnist, else .carry/fmnist: carry it with the run).
#      The recheck alone at today's defaults: `scripts/quality_collect.sh loss_curve` here (makes
#      .carry/fmnist and .carry/vq), then carrying both, checkpoints out of the tree:
#        TOKENIZER=.carry/vq OUT=$OUT STAGES="3 4" bash scripts/gpu/train_speed_more.sh
#      FM_OVERRIDES adds key=value overrides to that run, e.g. FM_OVERRIDES=train.cuda_graph=true (the
#      step as one CUDA graph, where train.master_weights=auto takes the bf16 copies: the benchmark's
#      /graph/master step); the log names them.
# Writes to $OUT (8 files): bench_more_256.{txt,json}, bench_more_512_1024.{txt,json},
# fmnist_s1_log.txt, fmnist_loss.png (if matplotlib is installed), summary_more.txt.
# STAGES (default "1 2 3 4") picks the stages and their order, e.g. STAGES="3 1 4" when the call has
# less than the whole 9 minutes (the loss-curve check first).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
DATA=${DATA:-/usr/share/datasets/fashion-mnist}; [ -d "$DATA" ] || DATA=.carry/fmnist
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

stage1() {
el "1. bench 256 px: full compile, stage 2, d24 / d30 memory, d20"
timeout 230 python3 -m maskar bench train_step res=256 steps=25 warmup=5 explain=true \
  rows=hmar/d16/full,hmar-s2/d16/blocks,hmar/d24/blocks,hmar/d30/blocks,var/d16/full,hmar-s2/d16/false,hmar/d20/blocks \
  json="$OUT/bench_more_256.json" 2>&1 | tee "$OUT/bench_more_256.txt"

}

stage2() {
el "2. bench 512 px and 1024 px eager"
( timeout 90 python3 -m maskar bench train_step res=512 steps=20 warmup=3 \
    rows=hmar/d16/blocks,var/d16/blocks,hmar/d16/false json=/tmp/bench_512.json
  timeout 60 python3 -m maskar bench train_step res=1024 steps=20 warmup=3 \
    rows=hmar/d16/false,var/d16/false json=/tmp/bench_1024_eager.json ) 2>&1 | tee "$OUT/bench_more_512_1024.txt"
python3 -c "
import json, sys
rows = []
for f in ('/tmp/bench_512.json', '/tmp/bench_1024_eager.json'):
    try: rows += json.load(open(f))['rows']
    except OSError: pass
json.dump({'rows': rows}, open(sys.argv[1], 'w'), indent=1)" "$OUT/bench_more_512_1024.json"

}

stage3() {
el "3. Fashion-MNIST HMAR stage 1, 2000 steps (data: $DATA)"
rm -rf /tmp/runs/fm1
echo "overrides: ${FM_OVERRIDES:-none}"
timeout ${FM_TIMEOUT:-240} python3 - "$DATA" "${TOKENIZER:-checkpoints/hmar-fmnist}" ${FM_OVERRIDES:-} <<'EOF'
import sys
from maskar.config import load_config
from maskar.train.trainer import train
cfg = load_config("hmar-fmnist", [
    f"data.root={sys.argv[1]}", "data.num_workers=8", "train.batch_size=256", "train.steps=6000",
    "train.warmup_steps=300", "train.log_every=100", "train.ckpt_every=0", "train.progress=false",
    "train.tensorboard=false", "train.out_dir=/tmp/runs/fm1", "model.depth=6", "model.width=256",
    "model.heads=4", f"model.tokenizer_ckpt={sys.argv[2]}", *sys.argv[3:],
])
train(cfg, stop_at=2000)  # the 6000-step schedule of the old run, stopped where the comparison ends
EOF
echo "rc=$?"; cp /tmp/runs/fm1/log.txt "$OUT/fmnist_s1_log.txt" 2>/dev/null

}

stage4() {
el "4. summary"
python3 - "$OUT" <<'EOF' | tee "$OUT/summary_more.txt"
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in ("bench_more_256.json", "bench_more_512_1024.json"):
    if not (out / f).is_file():
        print(f, "missing"); continue
    for r in json.loads((out / f).read_text())["rows"]:
        if "error" in r:
            print("FAILED ROW:", r["row"], r["error"]); continue
        print(f"{r['model']} stage {r['stage']} {r['res']} px B{r['batch']} {r['compile']:<6} ac={r['ac']} {r['step_ms']:7.1f} ms "
              f"MFU {100 * r['mfu']:5.1f}% peak {r['peak_gb']:6.2f} GB compile {r.get('compile_s', float('nan')):5.1f} s "
              f"graphs {r['graphs']} {r.get('check', '')}")
        if r.get("explain"):
            print("   explain:", r["explain"])
old = {500: 4.1828, 1000: 3.0359, 1500: 2.8432, 2000: 2.7444}  # docs/results/hmar-fmnist-stage1-log.txt
log = (out / "fmnist_s1_log.txt").read_text() if (out / "fmnist_s1_log.txt").is_file() else ""
new = {int(s): float(l) for s, l in re.findall(r"step (\d+)/\d+ \| loss ([0-9.]+)", log)}
print("Fashion-MNIST HMAR stage 1, loss averaged over the 500 steps up to each step (old run: eager, H100):")
for s, o in old.items():
    w = [new[k] for k in range(s - 400, s + 1, 100) if k in new]
    avg = sum(w) / len(w) if len(w) == 5 else float("nan")
    print(f"  step {s:>4}: old {o:.4f}  new {avg:.4f}  diff {avg - o:+.4f}")
rate = re.findall(r"step_ms ([0-9.]+)", log)
print("  logged step_ms per 100-step window:", rate)
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = sorted(new)
    plt.figure(figsize=(5, 3.2))
    means = {s: sum(new[k] for k in range(s - 400, s + 1, 100)) / 5 for s in old if s in new}
    plt.plot(ks, [new[k] for k in ks], color="tab:blue", alpha=0.5, label="this code (100-step means)")
    plt.plot(list(means), list(means.values()), "s", color="tab:blue", label="this code (500-step means)")
    plt.plot(list(old), list(old.values()), "o", color="tab:orange", ms=4, label="before (500-step means)")
    plt.xlabel("step"); plt.ylabel("training loss (lognorm-weighted CE)"); plt.legend(); plt.tight_layout()
    plt.savefig(out / "fmnist_loss.png", dpi=120)
except Exception as e:  # noqa: BLE001
    print("  no plot:", type(e).__name__, e)
EOF
}

for st in ${STAGES:-1 2 3 4}; do "stage$st"; done
el "done"
