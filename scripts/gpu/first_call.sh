#!/usr/bin/env bash
# The first device call of a session, chosen by the GPU that came (starts are scarce: one script
# that does the most for whichever card it gets):
#   OUT=$OUT bash scripts/gpu/first_call.sh
# H200 (the issues' GPU): issue 14's and 15's rows at the defaults (h200_rows.sh PART=rows).
# Anything else (an H100): train.master_weights' GPU tests (the one-pass norm; compile full,
# HMAR stage 2 and resume with the copies) and its A/B rows (master_default.sh), which an H100 can
# settle as well as an H200. DEADLINE passes on (default 560 s).
set -uo pipefail
g=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "GPU: $g"
case "$g" in
  *H200*) PART=rows DEADLINE=${DEADLINE:-560} bash "$(dirname "$0")/h200_rows.sh" ;;
  *) DEADLINE=${DEADLINE:-560} bash "$(dirname "$0")/master_default.sh" ;;
esac
