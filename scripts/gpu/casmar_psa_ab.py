"""CASMAR-B sampling, profiled, with PSA's forward pinned to one config: the in-situ A/B of the
head-grouped forward (``NaConfig.heads``) that the isolated sweep (scripts/gpu/psa_fwd_sweep.py)
found 13% faster at the DiT head's call, and which the tuner picks there.

Why: with the tuner free, one profiled CASMAR-B call on an H100 (2026-12-06, third session) spent
483 ms in ``_na_fwd``, as much as before the new configs (480 ms, 2026-12-05): the isolated gain did
not show. Pinning each config in its own process says whether it is the kernel or the setting.

PSA_FWD=default|heads8 OUT=/tmp/out python3 scripts/gpu/casmar_psa_ab.py   (about 90 s each)
"""

from __future__ import annotations

import os
import sys

import maskar.kernels.neighborhood as nb
from maskar.cli import main

CONFIGS = {"default": nb._fwd_candidates(64)[0], "heads8": nb.NaConfig(8, 8, 128, 4, 2, heads=8)}
which = os.environ.get("PSA_FWD", "default")
if which not in CONFIGS:
    sys.exit(f"PSA_FWD: expected one of {sorted(CONFIGS)}, got {which!r}")
nb.FORCE_FWD_CONFIG = CONFIGS[which]
print(f"PSA forward pinned to {which}: {CONFIGS[which]}", flush=True)
out = os.environ.get("OUT", "/tmp/out")
sys.exit(main(["bench", "casmar", "--batch", "64", "--sample-reps", "2", "--profile",
               "--json", os.path.join(out, f"casmar_psa_{which}.json")]))
