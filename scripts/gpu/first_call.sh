#!/usr/bin/env bash
# The first device call of a session, chosen by the GPU that came (starts are scarce: one script
# that does the most for whichever card it gets):
#   OUT=$OUT bash scripts/gpu/first_call.sh
# H200 (the issues' GPU): issue 14's and 15's rows at the defaults (h200_rows.sh PART=rows).
# Anything else (an H100): maskar.kernels.adaln_norm's GPU tests, launch configs and A/B rows in
# the form that recomputes the stream (adaln_norm_rows.sh), what its switch needs before it goes
# on by default; an H100 settles that as well as an H200. DEADLINE passes on (default 560 s).
# (train.master_weights' script, master_default.sh, ran on 2026-12-07: auto is the default since.)
set -uo pipefail
g=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "GPU: $g"
case "$g" in
  *H200*) PART=rows DEADLINE=${DEADLINE:-560} bash "$(dirname "$0")/h200_rows.sh" ;;
  *) DEADLINE=${DEADLINE:-560} bash "$(dirname "$0")/adaln_norm_rows.sh" ;;
esac
# only 8 files under $OUT come back from a device call: pack them all into one
( cd "${OUT:-/tmp/out}" && n=$(ls | wc -l) && [ "$n" -gt 8 ] && tar czf /tmp/results.tgz . \
  && find . -type f -delete && mv /tmp/results.tgz . && echo "packed $n files into results.tgz" )
