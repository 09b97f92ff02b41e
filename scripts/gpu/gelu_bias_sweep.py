"""The training GELU's launch configs (maskar.kernels.gelu_bias) at HMAR-d16's FFN shapes, on a GPU.

For the (rows, 4096) bf16 activation of 1024 px B 2 (18,902 rows) and 256 px B 32 (21,760 rows):
the forward, and the backward with the bias-gradient sums, per config, GPU time per call (ten
calls captured in one CUDA graph, the median of replays) and the bandwidth (forward: a read and
a write of the activation; backward: two reads and a write). Then Inductor's pair for the same
work (the GELU backward and the bias sum, compiled), the errors against torch, and the fastest
config written to BEST=PATH as "block, block_m, block_n, iters, warps".
Run: OUT=/tmp/out python3 scripts/gpu/gelu_bias_sweep.py
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))
from qk_norm_sweep import emit as emit_line  # noqa: E402
from qk_norm_sweep import graph_ms  # noqa: E402
from test_gelu_bias_kernel import op_vs_torch  # noqa: E402

import maskar.kernels.gelu_bias as gb  # noqa: E402

SHAPES = {"1024px-B2": (18902, 4096), "256px-B32": (21760, 4096)}
CONFIGS = [gb.GeluConfig(4096, m, n, it, w) for m in (8, 16, 32) for n in (64, 128, 256)
           for it in (4, 16) for w in (4, 8) if m * n <= 8192]


def emit(rec: dict) -> None:
    emit_line(rec, "gelu_bias_sweep.jsonl")


def main() -> None:
    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
          "default": list(gb._DEFAULT.__dict__.values())})
    best_overall = None
    for name, (M, N) in SHAPES.items():
        x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        unit = M * N * 2
        rows = []
        for cfg in CONFIGS:
            gb.FORCE_CONFIG = cfg
            f = graph_ms(lambda: gb._forward(x))  # noqa: B023
            b = graph_ms(lambda: gb._backward(x, dy, True))  # noqa: B023
            rec = {"shape": name, "config": list(cfg.__dict__.values()), "fwd_ms": f, "bwd_ms": b,
                   "fwd_tbs": 2 * unit / f / 1e9, "bwd_tbs": 3 * unit / b / 1e9}
            emit(rec)
            rows.append(rec)
        gb.FORCE_CONFIG = None
        best = min(rows, key=lambda r: r["fwd_ms"] + r["bwd_ms"])
        emit({"shape": name, "fastest": best["config"], "fwd_ms": best["fwd_ms"], "bwd_ms": best["bwd_ms"]})
        best_overall = best_overall or best["config"]

        def inductor_pair(x=x, dy=dy):
            d = torch.ops.aten.gelu_backward(dy, x, approximate="tanh")
            return d, d.float().sum(0).to(x.dtype)

        pair = torch.compile(inductor_pair)
        fwd = torch.compile(lambda x=x: F.gelu(x, approximate="tanh"))
        emit({"shape": name, "inductor_fwd_ms": graph_ms(fwd),
              "inductor_bwd_with_bias_sum_ms": graph_ms(pair)})
    for dn, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        r = op_vs_torch(gb, (2, 1031, 4096), dt, "cuda")
        emit({"check": f"against torch, {dn}, (2, 1031, 4096)", **r})
    if os.environ.get("BEST") and best_overall:
        with open(os.environ["BEST"], "w") as f:
            f.write(", ".join(map(str, best_overall)))


if __name__ == "__main__":
    main()
