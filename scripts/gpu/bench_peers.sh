#!/usr/bin/env bash
# Device call: the official implementations (HMAR, VAR, MAR, CASMAR v1/v2) timed as peers on this GPU:
# random weights, official code paths, official sizes (benchmarks/peers.py, docs/benchmarks.md "Peers").
# Needs .carry/peers (scripts/extract_peers.sh; pass `.carry/peers` in the device call's carry list).
# Writes $OUT/peers.txt (table + JSON path), $OUT/peers.json, $OUT/peers_log.txt (the official code's
# own output and tracebacks). The standard set (VAR / HMAR first, then MAR-B num_iter 64, then the
# cases that fail as released) runs in about 2.5 minutes on one H200, cut at BUDGET seconds (default
# 175). The long cases run alone: CASES=mar-b-256 BUDGET=0 (about 2 minutes), CASES=casmar-b-v2
# BUDGET=0 TIMEOUT=360 (cap 330 s). PEERS_ARGS adds arguments (PEERS_ARGS=--tiny: every case at small
# sizes, a smoke test, about a minute).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout "${TIMEOUT:-290}" python3 benchmarks/peers.py --peers-dir .carry/peers --cases "${CASES:-standard}" \
  --budget-s "${BUDGET:-175}" --json "$OUT/peers.json" --log "$OUT/peers_log.txt" ${PEERS_ARGS:-} \
  > "$OUT/peers.txt" 2>&1
echo "peers rc=$?"
cat "$OUT/peers.txt"
