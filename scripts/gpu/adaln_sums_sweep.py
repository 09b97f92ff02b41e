"""MASKAR_ADALN_SUMS on a GPU: the launches it adds, at HMAR-d16's training shapes.

    python3 scripts/gpu/adaln_sums_sweep.py      # one JSON line per result, then "GATED_BEST ..."
    TRITON_INTERPRET=1 python3 scripts/gpu/adaln_sums_sweep.py --dry   # the logic on a CPU, tiny

1. the norm's backward with the residual at its default config, without and with the proj bias's
   sum (BIAS_SUM: one more fp32 accumulator row a program);
2. every launch config of gated_add's backward (the FFN residual: d f = g dy, Σ_L dy f, g Σ_L dy;
   8 bytes an element to move: dy fp32 read, f bf16 read, d f bf16 written);
3. the same three results as torch code compiled by Inductor (what the block ran before).

Times are CUDA-graph replays of 10 calls (median of 15 replays, per call; ``qk_norm_sweep.graph_ms``).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from qk_norm_sweep import graph_ms  # scripts/gpu: CUDA-graph replay timing of a launch

import maskar.kernels.adaln_norm as an

SHAPES = {"1024px-B2": (2, 9451, 1024), "256px-B32": (32, 680, 1024)}
GATED = [(1, 32, 4), (1, 32, 8), (2, 16, 4), (2, 16, 8), (4, 8, 4), (4, 8, 8), (2, 32, 8), (4, 16, 8),
         (8, 4, 8), (1, 64, 8), (2, 8, 8), (4, 4, 8)]


DRY = "--dry" in sys.argv  # CPU, tiny shapes, one timed call: checks the script, times nothing real
DEV = "cpu" if DRY else "cuda"
if DRY:
    SHAPES = {"tiny": (2, 37, 64)}
    GATED = GATED[:2]

    def graph_ms(fn) -> float:  # noqa: F811
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def one_shape(name: str, B: int, L: int, C: int) -> tuple:
    """Every measurement at one shape; gated_add's fastest config."""
    g0 = torch.Generator(device=DEV).manual_seed(0)
    bf = dict(device=DEV, dtype=torch.bfloat16)
    x = torch.randn(B, L, C, device=DEV, generator=g0)
    o, dh, f = torch.randn(B, L, C, **bf), torch.randn(B, L, C, **bf), torch.randn(B, L, C, **bf)
    dy = torch.randn(B, L, C, device=DEV, generator=g0)
    gate, s = (torch.randn(B, 1, C, device=DEV, generator=g0) * 0.3 for _ in range(2))
    n = x.numel()
    _, _, mean, rstd = an._forward(x, o, gate, s, s, 1e-6, torch.bfloat16)
    for bias_sum in (False, True):
        us = 1e3 * graph_ms(lambda b=bias_sum: an._backward(dh, x, dy, o, gate, s, mean, rstd, b))
        emit({"shape": name, "kind": "norm_bwd", "bias_sum": bias_sum, "us": round(us, 2),
              "GB/s": round(18 * n / us / 1e3, 1)})
    best = (float("inf"), None)
    for cfg in GATED:
        an.GATED_FORCE_CONFIG = an.GatedAddConfig(*cfg)
        try:
            us = 1e3 * graph_ms(lambda: an._gated_add_backward(dy, f, gate, True))
        except Exception as e:  # a config that does not compile or fit
            emit({"shape": name, "kind": "gated_add_bwd", "config": cfg, "error": str(e)[:200]})
            continue
        emit({"shape": name, "kind": "gated_add_bwd", "config": cfg, "us": round(us, 2),
              "GB/s": round(8 * n / us / 1e3, 1)})
        best = min(best, (us, cfg))
    an.GATED_FORCE_CONFIG = None
    emit({"shape": name, "kind": "gated_add_bwd", "best": best[1], "best_us": round(best[0], 2)})

    @torch.compile
    def inductor(dy, f, gate):  # the FFN residual's backward as the block's torch code made it
        df = (dy * gate).to(torch.bfloat16)
        return df, (dy * f.float()).sum(1, keepdim=True), (dy * gate).sum((0, 1))

    us = 1e3 * graph_ms(lambda: inductor(dy, f, gate))
    emit({"shape": name, "kind": "gated_add_bwd_inductor", "us": round(us, 2)})
    # the proj bias's sum as Inductor made it: one more pass over the stream's gradient
    bias_sum = torch.compile(lambda dy, gate: (dy * gate).sum((0, 1)))
    us = 1e3 * graph_ms(lambda: bias_sum(dy, gate))
    emit({"shape": name, "kind": "bias_sum_inductor", "us": round(us, 2)})
    return best[1]


def main() -> int:
    emit({"gpu": "dry run" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__})
    best = [one_shape(name, *shape) for name, shape in SHAPES.items()]
    print("GATED_BEST", *best[0])  # the 1024 px shape decides (#13's open rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
