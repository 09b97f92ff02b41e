"""PSA's inference forward at CASMAR-B's DiT-head call, config by config: the tuner's candidates
and the head-grouped forwards (``NaConfig.heads``: one program per query tile and several heads,
the tile's geometry and, with the key rectangle in one chunk, its window tests worked out once).

Why: in CASMAR-B sampling the forward takes ≈ 80 µs a call on an H100 and ≈ 76 on an H200, 6,000
calls a sampling call (0.48 s of 7.25 on the H100), against ≈ 40 / 28 µs of traffic (q, k, v read
once, o and the log-sum-exp written). The same time on both GPUs says it is not the memory.

The call: B 128 (64 with CFG), 16 x 16 grid, H 8, D 64, k 7, bf16, q / k / v the strided
thirds of one (B, L, 3 x 512) projection, as the DiT's fused q/k/v gives them. Every config's
output is checked against the default's (the same arithmetic: equal up to the summation order of
the chunks), then timed (median of 5 rounds of 20 back-to-back calls) with its GPU kernel time.

OUT=/tmp/out python3 scripts/gpu/psa_fwd_sweep.py   (about 1 min); writes $OUT/psa_fwd_sweep.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import maskar.kernels.neighborhood as nb
from maskar.bench.kernel_time import kernel_ms_per_call
from maskar.kernels.tuning import time_ms

OUT = os.environ.get("OUT", "/tmp/out")
B, GRID, H, D, K = 128, (16, 16), 8, 64, 7
L = GRID[0] * GRID[1]
torch.manual_seed(0)
# PSA_LAYOUT: fused (the strided thirds of one projection, the default), blhd (three (B, L, H, D)
# tensors) or bhld (three contiguous (B, H, L, D) tensors)
LAYOUT = os.environ.get("PSA_LAYOUT", "fused")
qkv = torch.randn(B, L, 3 * H * D, device="cuda", dtype=torch.bfloat16)
q, k, v = (t.reshape(B, L, H, D).transpose(1, 2) for t in qkv.chunk(3, -1))
if LAYOUT == "blhd":
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
elif LAYOUT == "bhld":
    q, k, v = (t.contiguous() for t in (q, k, v))
elif LAYOUT != "fused":
    sys.exit(f"PSA_LAYOUT: expected fused, blhd or bhld, got {LAYOUT!r}")
geom = nb.Window(GRID, (K, K), (1, 1), "zeros")
scale = D**-0.5
moved = 4 * B * L * H * D * 2 + B * H * L * 4  # q, k, v read, o written (bf16); lse written (fp32)

configs = list(nb._fwd_candidates(D))
for warps in (4, 8):
    for stages in (1, 2, 3):
        for heads in (1, 2, 4, 8):
            configs.append(nb.NaConfig(8, 8, 128, warps, stages, heads=heads))
for heads in (2, 4, 8):
    configs += [nb.NaConfig(8, 8, 64, 4, 1, heads=heads), nb.NaConfig(8, 8, 64, 4, 2, heads=heads)]
configs += [nb.NaConfig(8, 16, 256, 8, 1, heads=h) for h in (1, 2, 4)]
# fewer registers, more programs resident (the default takes 220 registers a thread on sm90)
configs += [nb.NaConfig(8, 8, 16, 4, s) for s in (1, 2, 4)] + [nb.NaConfig(8, 8, 32, 4, 2),
                                                               nb.NaConfig(8, 8, 16, 8, 2)]
configs = [c for c in dict.fromkeys(configs) if nb._offered(c, geom)]
if os.environ.get("SWEEP_FEW"):  # the default and the tuner's candidates only
    configs = [c for c in nb._fwd_candidates(D) if nb._offered(c, geom)]

print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  B {B} grid {GRID} H {H} D {D} k {K} "
      f"{LAYOUT}; {moved / 1e6:.0f} MB moved a call")
ref = None
rows = []
for cfg in configs:
    nb.FORCE_FWD_CONFIG = cfg
    try:
        o = nb._forward(q, k, v, geom, scale)[0].float()
    except Exception as e:  # out of shared memory / registers: skip the config
        print(f"{cfg}: {type(e).__name__}: {str(e)[:120]}")
        continue
    if ref is None:
        ref = o
    err = (o - ref).abs().max().item()
    assert torch.isfinite(o).all() and err < 2e-2, f"{cfg}: max difference {err} from {configs[0]}"
    ms = time_ms(lambda: nb._forward(q, k, v, geom, scale), rounds=5, per_round=20)
    kern = sum(kernel_ms_per_call(lambda: nb._forward(q, k, v, geom, scale), calls=10).values())
    rows.append(dict(config=repr(cfg), ms=ms, kernel_ms=kern, max_diff=err, gbs=moved / kern / 1e6,
                     single=nb._one_chunk(geom, cfg)))
    print(f"{str(cfg):100s} {ms * 1e3:7.1f} us  kernel {kern * 1e3:6.1f} us  {moved / kern / 1e6:6.0f} GB/s  "
          f"single {nb._one_chunk(geom, cfg)}  diff {err:.1e}", flush=True)
nb.FORCE_FWD_CONFIG = None
rows.sort(key=lambda r: r["kernel_ms"])
print("fastest (kernel time):")
for r in rows[:6]:
    print(f"  {r['kernel_ms'] * 1e3:6.1f} us  {r['config']}")
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, f"psa_fwd_sweep_{LAYOUT}.json"), "w") as f:
    json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
