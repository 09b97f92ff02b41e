"""The fused q/k norm's launch configs at HMAR-d16's training shapes, on a GPU (one JSON line each).

For each shape (1024 px B 2 and 256 px B 32; SHAPES=name,... picks) and each (block_t, num_warps,
iters: the backward's tiles per program): the forward and the
backward with the bias-gradient sums (what a training step runs), GPU time per call (ten calls
captured in one CUDA graph, as inside the training step's graph: eager calls here are bound by
their host time), the median of replays, and the bandwidth each reaches (forward: 4 (B, L, H, D)
bf16 tensors of traffic; backward: 8, and the sums' partials). Then the default config without
the sums, and the bias gradient checked against d qkv summed by torch. BEST=PATH: the first
shape's fastest config written there as "block_t, num_warps, iters[, False]" (membound_rows.sh's
QK_CFG; False: the backward's reciprocal instead of IEEE division). SUBSET=div: five configs
around the default, each with and without IEEE division.
Run: OUT=/tmp/out python3 scripts/gpu/qk_norm_sweep.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
from test_qk_norm_kernel import bias_grad_errors, make_inputs  # noqa: E402

import maskar.kernels.qk_norm as qn  # noqa: E402

SHAPES = {"1024px-B2": (2, 9451, 16, 64), "256px-B32": (32, 680, 16, 64)}
CONFIGS = [(bt, w, it, True) for bt in (16, 32, 64) for w in (2, 4, 8) for it in (1, 4, 16)]
if os.environ.get("SUBSET") == "div":  # the backward's division by the norm: IEEE or a reciprocal
    CONFIGS = [(*c, ex) for c in ((16, 4, 16), (16, 4, 4), (32, 4, 16), (16, 8, 16), (16, 2, 16))
               for ex in (True, False)]
PEAK = float(os.environ.get("PEAK_TBS", "3.35"))  # H100 SXM; 4.8 on an H200


def graph_ms(fn, calls: int = 10, rounds: int = 15) -> float:
    """GPU ms per call of ``fn``: ``calls`` calls captured in one CUDA graph, median of replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return sorted(times)[len(times) // 2]


def emit(rec: dict, name: str = "qk_norm_sweep.jsonl") -> None:
    """Print ``rec`` as one JSON line and append it to $OUT/``name``."""
    print(json.dumps(rec), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "a") as f:
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    emit({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_tbs": PEAK,
          "default": [qn._config(64).block_t, qn._config(64).num_warps]})
    names = os.environ.get("SHAPES", ",".join(SHAPES)).split(",")
    for name in names:
        B, L, H, D = SHAPES[name]
        qkv, s = (t.cuda() for t in make_inputs(B, L, H, D, torch.bfloat16))
        # dq, dk, dv as the attention backward gives them: (B, H, L, D) views of (B, L, H, D) memory
        grads = [torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                 for _ in range(3)]
        unit = B * L * H * D * 2
        rows = []
        for bt, w, it, ex in CONFIGS + [(None, None, None, None)]:
            cfg = qn._config(D) if bt is None else qn.QKConfig(bt, w, it, ex)
            qn.FORCE_CONFIG = cfg
            sums = bt is not None
            f = graph_ms(lambda: qn._forward(qkv, s))  # noqa: B023
            b = graph_ms(lambda: qn._backward(qkv, s, *grads, True, sums))  # noqa: B023
            rec = {"shape": name, "block_t": cfg.block_t, "num_warps": cfg.num_warps, "iters": cfg.iters,
                   "exact_div": cfg.exact_div, "bias_sums": sums,
                   "fwd_ms": f, "bwd_ms": b, "fwd_tbs": 4 * unit / f / 1e9, "bwd_tbs": 8 * unit / b / 1e9}
            rec["bwd_pct_peak"] = 100 * rec["bwd_tbs"] / PEAK
            emit(rec)
            rows.append(rec)
        qn.FORCE_CONFIG = None
        best = min((r for r in rows if r["bias_sums"]), key=lambda r: r["fwd_ms"] + r["bwd_ms"])
        fastest = [best["block_t"], best["num_warps"], best["iters"]]
        fastest += [] if best["exact_div"] else [False]
        emit({"shape": name, "fastest": fastest, "fwd_ms": best["fwd_ms"],
              "bwd_ms": best["bwd_ms"], "floor_fwd_bwd_ms": 12 * unit / PEAK / 1e9})
        if os.environ.get("BEST") and name == names[0]:
            with open(os.environ["BEST"], "w") as f:
                f.write(", ".join(map(str, fastest)))
    for dn in ("bf16", "fp16"):
        r = bias_grad_errors(qn, 2, 9451, 16, 64, {"bf16": torch.bfloat16, "fp16": torch.float16}[dn], "cuda")
        emit({"check": f"bias gradient {dn} 1024 px B 2", **r})


if __name__ == "__main__":
    main()
