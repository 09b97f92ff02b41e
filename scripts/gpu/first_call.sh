#!/usr/bin/env bash
# The first device call of a session, chosen by the GPU that came (starts are scarce: one script
# that does the most for whichever card it gets):
#   OUT=$OUT bash scripts/gpu/first_call.sh
# H200 (the issues' GPU): issue 14's and 15's rows at the defaults (h200_rows.sh PART=rows).
# Anything else (an H100): MASKAR_FFN_EPILOGUE's GPU tests (on by default since 2026-12-07, seventh
# session: its own, the training paths') and its launches' check, no rows (ROWS= ffn_epilogue_call.sh);
# carry .carry/fa4a to keep FlashAttention-4's first part for a second call (carrying .carry/fa4b:
# PART=profile1024 bash scripts/gpu/fa4_rows.sh on an H100, where the 1024 px step's time goes now;
# on an H200 SWITCH=MASKAR_FFN_EPILOGUE PART=switch1024, issue 13's 1024 px rows on its GPU).
# DEADLINE passes on (default 560 s).
# (ffn_epilogue_call.sh with its 256 px rows ran on 2026-12-07, seventh session.)
# (adaln_default_call.sh ran on 2026-12-07, sixth session.)
# (train.master_weights' script, master_default.sh, ran on 2026-12-07: auto is the default since.)
set -uo pipefail
DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/clock.sh"
# keeps FlashAttention-4's first part where carried, for the next call on this machine (then,
# carrying .carry/fa4b: PART=switch1024 bash scripts/gpu/fa4_rows.sh; on an H200 that gives issue
# 13's 1024 px rows on their own GPU for the first time)
prelude
case "$g" in
  *H200*) PART=rows DEADLINE=${DEADLINE:-560} bash "$(dirname "$0")/h200_rows.sh" ;;
  *) ROWS="" DEADLINE=${DEADLINE:-560} bash "$(dirname "$0")/ffn_epilogue_call.sh" ;;
esac
pack_out "$OUT"
