#!/usr/bin/env bash
# The first device call of a session (starts are scarce: one script that does the most next):
#   TESTS=0 OUT=$OUT bash scripts/gpu/first_call.sh      (carry .carry/fa4a, checkpoints out of the tree)
# Any GPU: keeps .carry/fa4a in .persist/ (seconds); without TESTS=0 it also runs the GPU tests of
# the training paths at the defaults (about 2.5 min; 38 passed on an H100 on 2026-12-07, ninth
# session, so TESTS=0 is the choice while an H200's time is short). Then at once, carrying .carry/fa4b,
# on an H200:
#   PART=defaults1024 TRAIN=0 bash scripts/gpu/fa4_rows.sh      (issue 13's 1024 px pair; H100s:
#                                                               78.7-79.6 / 111.4-111.9 ms)
#   PART=rows bash scripts/gpu/h200_rows.sh      (issues 14 and 15)
# (PART=onecall1024 LAST_DENSE=1 ran on 2026-12-07, thirteenth session, on an H100: both switches are
#  now on by default, docs/benchmarks.md Run 22; defaults1024 times VAR-d16 with them.)
# (PART=onecall1024 ran on 2026-12-07, twelfth session, on an H100: MASKAR_FA4_ONE_CALL alone gained nothing,
#  docs/benchmarks.md Run 21; PART=blockcausal, the op alone, ran in the same session.)
# (PART=defaults1024 TRAIN=0 times the pair alone; without TRAIN=0 it also runs `maskar train`
#  at its defaults at 1024 px beside them, done on an H100 in Run 19.)
# (The final step's profile at every default ran on 2026-12-07, tenth session: PART=profiledefaults.)
# (The loss-curve recheck ran on 2026-12-07, eighth session: TOKENIZER=.carry/vq STAGES="3 4"
#  bash scripts/gpu/train_speed_more.sh, carrying .carry/fmnist and .carry/vq.)
# (adaln_prefetch_call.sh ran on 2026-12-07, eighth session: MASKAR_ADALN_PREFETCH stays off.)
set -uo pipefail
DEADLINE=${DEADLINE:-300}
source "$(dirname "$0")/clock.sh"
prelude
[ "${TESTS:-1}" = 0 ] && exit 0
el "GPU tests of the training paths at the defaults"
timeout $(cap 280) python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs \
  tests/test_train_cuda_graph.py tests/test_master_weights.py tests/test_adaln_norm_kernel.py \
  tests/test_ffn_epilogue.py > "$OUT/defaults-gpu-tests.txt" 2>&1
echo "rc=$?"; grep -E "Error|assert|passed|failed" "$OUT/defaults-gpu-tests.txt" | head -n 12 | cut -c1-300
el done
pack_out "$OUT"
