"""MASKAR_ADALN_PREFETCH on a GPU: the LayerNorm + modulate backward and the gated residual add's
backward (maskar.kernels.adaln_norm) with each row tile's loads issued one tile ahead, against the
kernels as they are, at HMAR-d16's training shapes and around their default launch configs.

    python3 scripts/gpu/adaln_prefetch_sweep.py      # one JSON line per result, then "BEST ..." lines
    APF_SHAPES=1024px-B2 python3 scripts/gpu/adaln_prefetch_sweep.py      # one shape only
    TRITON_INTERPRET=1 python3 scripts/gpu/adaln_prefetch_sweep.py --dry   # the logic on a CPU, tiny

Each launch is first checked to give the same bits with and without the prefetch. Times are
CUDA-graph replays of 10 launches (median of 15 replays, per launch; ``qk_norm_sweep.graph_ms``);
GB/s counts the bytes a launch must move: the norm's backward 14 bytes an element without the
residual, 18 with it (dh bf16, x fp32, d x_out fp32, o bf16 read; d x fp32, d o bf16 written), the
gated add's 8 (dy fp32, f bf16 read; d f bf16 written), as in training (bias sums on).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import maskar.kernels.adaln_norm as an

SHAPES = {"1024px-B2": (2, 9451, 1024), "256px-B32": (32, 680, 1024)}
# (bwd_block_m, bwd_iters, bwd_warps): the default first, then the earlier sweeps' nearest rivals
NORM = [(1, 32, 8), (1, 32, 4), (1, 16, 4), (2, 16, 4), (1, 64, 4), (2, 8, 8), (1, 16, 8)]
# (block_m, iters, warps)
GATED = [(2, 16, 4), (1, 32, 4), (2, 16, 8), (4, 8, 8), (1, 32, 8), (2, 8, 4)]
DRY = "--dry" in sys.argv  # CPU, tiny shapes, one timed call: checks the script, times nothing real
DEV = "cpu" if DRY else "cuda"
if DRY:
    SHAPES = {"tiny": (2, 37, 64)}
    NORM, GATED = NORM[:2], GATED[:2]

    def graph_ms(fn) -> float:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
else:
    from qk_norm_sweep import graph_ms  # scripts/gpu: CUDA-graph replay timing of a launch
if os.environ.get("APF_SHAPES"):  # e.g. APF_SHAPES=1024px-B2: those shapes only
    SHAPES = {k: SHAPES[k] for k in os.environ["APF_SHAPES"].split(",")}


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def launches(t: dict, res: bool):
    """The norm's backward (with the residual: x2 made again, d o, the bias sum) as training calls it."""
    o, gate = (t["o"], t["gate"]) if res else (None, None)
    _, _, mean, rstd = an._forward(t["x"], o, gate, t["s"], t["s"], 1e-6, torch.bfloat16)
    return lambda: an._backward(t["dh"], t["x"], t["dxo"], o, gate, t["s"], mean, rstd, res)


def timed(name: str, kind: str, cfg: tuple, fn, nbytes: int, extra: dict) -> dict[bool, float]:
    """Each way timed, then the same bits checked; the times (µs) by prefetch off / on."""
    outs, us = [], {}
    for pf in (False, True):
        an.PREFETCH = pf
        outs.append(fn())
        us[pf] = 1e3 * graph_ms(fn)
        emit({"shape": name, "kind": kind, **extra, "config": cfg, "prefetch": pf, "us": round(us[pf], 2),
              "GB/s": round(nbytes / us[pf] / 1e3, 1)})
    an.PREFETCH = False
    same = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))
    emit({"shape": name, "kind": kind, **extra, "config": cfg, "same_bits": same,
          "prefetch_gain_us": round(us[False] - us[True], 2)})
    if not same:
        raise SystemExit(f"{kind} {cfg}: the prefetch changed the results")
    return us


def one_shape(name: str, B: int, L: int, C: int) -> dict:
    g0 = torch.Generator(device=DEV).manual_seed(0)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    t = {"x": torch.randn(B, L, C, device=DEV, generator=g0),
         "dxo": torch.randn(B, L, C, device=DEV, generator=g0),
         "o": torch.randn(B, L, C, generator=g0, device=DEV).to(torch.bfloat16),
         "dh": torch.randn(B, L, C, generator=g0, device=DEV).to(torch.bfloat16),
         "gate": (torch.randn(B, 1, C, device=DEV, generator=g0) * 0.3).to(torch.bfloat16),
         "s": (torch.randn(B, 1, C, device=DEV, generator=g0) * 0.3).to(torch.bfloat16)}
    f = torch.randn(B, L, C, **bf)
    n = B * L * C
    best = {}
    for cfg in NORM:
        an.FORCE_CONFIG = an.AdaLNNormConfig(1, 4, *cfg)
        total = {False: 0.0, True: 0.0}
        for res in (False, True):
            us = timed(name, "norm_bwd", cfg, launches(t, res), (18 if res else 14) * n, {"residual": res})
            for pf in us:
                total[pf] += us[pf]
        for pf in total:
            best[("norm_bwd", pf)] = min(best.get(("norm_bwd", pf), (float("inf"), None)), (total[pf], cfg))
    an.FORCE_CONFIG = None
    for cfg in GATED:
        an.GATED_FORCE_CONFIG = an.GatedAddConfig(*cfg)
        us = timed(name, "gated_add_bwd", cfg, lambda: an._gated_add_backward(t["dxo"], f, t["gate"], True),
                   8 * n, {})
        for pf in us:
            best[("gated", pf)] = min(best.get(("gated", pf), (float("inf"), None)), (us[pf], cfg))
    an.GATED_FORCE_CONFIG = None
    for (kind, pf), (us, cfg) in best.items():
        emit({"shape": name, "best": kind, "prefetch": pf, "config": cfg, "us": round(us, 2)})
    return best


def main() -> int:
    emit({"gpu": "dry run" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__})
    for name, shape in SHAPES.items():
        best = one_shape(name, *shape)
        for (kind, pf), (us, cfg) in best.items():
            print("BEST", name, kind, "prefetch" if pf else "plain", *cfg, f"{us:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
