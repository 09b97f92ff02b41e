#!/usr/bin/env bash
# The first device call of a session (starts are scarce: one script that does the most next):
#   OUT=$OUT bash scripts/gpu/first_call.sh
# Any GPU: MASKAR_ADALN_PREFETCH's GPU tests (with the FFN epilogue's, whose fallback count was fixed
# after its last GPU run), its launch sweep and its 256 px A/B (adaln_prefetch_call.sh). Carry
# .carry/fa4a, so that the second call, carrying .carry/fa4b, can run
#   SWITCH=MASKAR_ADALN_PREFETCH PART=switch1024 bash scripts/gpu/fa4_rows.sh
# whose =0 rows are issue 13's 1024 px rows at the defaults (on an H200: on its GPU for the first
# time). Then, on an H200 with time left: PART=rows bash scripts/gpu/h200_rows.sh (issues 14 and 15).
# DEADLINE passes on (default 450 s).
# (ffn_epilogue_call.sh ran on 2026-12-07, seventh session: MASKAR_FFN_EPILOGUE on by default since.)
# (adaln_default_call.sh ran on 2026-12-07, sixth session.)
# (train.master_weights' script, master_default.sh, ran on 2026-12-07: auto is the default since.)
set -uo pipefail
# adaln_prefetch_call.sh makes the prelude (which keeps .carry/fa4a in .persist/ for the second call)
# and packs $OUT itself
DEADLINE=${DEADLINE:-450} exec bash "$(dirname "$0")/adaln_prefetch_call.sh"
