#!/usr/bin/env bash
# The first device call of a session (starts are scarce: one script that does the most next):
#   OUT=$OUT bash scripts/gpu/first_call.sh      (carry .carry/fmnist and .carry/vq, checkpoints out
#                                                 of the tree; scripts/quality_collect.sh loss_curve
#                                                 makes both here)
# Any GPU: issue 13's loss-curve recheck with the step as one CUDA graph (train.cuda_graph=true, where
# train.master_weights=auto takes the bf16 copies: the benchmark's /graph/master step), 2,000
# Fashion-MNIST HMAR steps against the 12-04 run (about 160 s). The log's `step:` line says what ran.
# Then, on an H200: a call carrying .carry/fa4a (`source scripts/gpu/clock.sh && prelude` keeps it in
# .persist/), then at once, carrying .carry/fa4b, PART=defaults1024 bash scripts/gpu/fa4_rows.sh:
# issue 13's 1024 px rows at every default on its GPU for the first time (about 130 s).
# With time left on an H200: PART=rows bash scripts/gpu/h200_rows.sh (issues 14 and 15).
# (adaln_prefetch_call.sh ran on 2026-12-07, eighth session: MASKAR_ADALN_PREFETCH stays off.)
# (ffn_epilogue_call.sh ran on 2026-12-07, seventh session: MASKAR_FFN_EPILOGUE on by default since.)
set -uo pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
FM_OVERRIDES=train.cuda_graph=true TOKENIZER=${TOKENIZER:-.carry/vq} STAGES="3 4" \
  exec bash "$(dirname "$0")/train_speed_more.sh"
