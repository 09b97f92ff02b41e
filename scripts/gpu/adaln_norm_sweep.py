"""maskar.kernels.adaln_norm on a GPU: every launch configuration of its two kernels at HMAR-d16's
training shapes, then the block's pair of norms (h1; the residual add and h2) forward + backward
as `maskar train` compiles it, with the kernels against Inductor's code for the torch ops.

    python3 scripts/gpu/adaln_norm_sweep.py      # one JSON line per result, then "BEST ..."

Kernel times are CUDA-graph replays of 10 launches (median of 15 replays, per launch;
``qk_norm_sweep.graph_ms``). GB/s counts
the bytes each launch must move: forward 6 (12 with the residual) bytes an element, backward 14
(18). The pair is timed with CUDA events over 20 back-to-back forward + backward calls of the
compiled function (the host's share hides behind the GPU's at these sizes).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from qk_norm_sweep import graph_ms  # scripts/gpu: CUDA-graph replay timing of a launch

import maskar.kernels.adaln_norm as an


def graph_us(fn) -> float:
    return graph_ms(fn) * 1000


SHAPES = {"1024px-B2": (2, 9451, 1024), "256px-B32": (32, 680, 1024)}
# the first sweep's grid (2026-12-07) and, around its fastest (forward 1 row / 4 warps, backward
# 1 row x 32 / 4 warps, both at the grid's edge), fewer warps and longer walks
FWD = [(m, w) for m in (1, 2, 4, 8) for w in (4, 8)] + [(1, 2), (2, 2), (4, 2)]
BWD = [(1, 16, 4), (1, 32, 4), (2, 8, 4), (2, 16, 4), (2, 8, 8), (4, 4, 8), (4, 8, 8), (4, 16, 8), (8, 4, 8),
       (8, 4, 16), (1, 64, 4), (1, 32, 2), (1, 64, 2), (1, 32, 8), (2, 16, 2), (2, 32, 4)]
BYTES = {("fwd", False): 6, ("fwd", True): 12, ("bwd", False): 14, ("bwd", True): 18}


def inputs(B: int, L: int, C: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, L, C, device="cuda", generator=g)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    v = [torch.randn(B, 1, C, generator=g, device="cuda").to(torch.bfloat16) * 0.3 for _ in range(5)]
    return {"x": x, "o": torch.randn(B, L, C, **bf), "dh": torch.randn(B, L, C, **bf),
            "dxo": torch.randn(B, L, C, device="cuda"),
            "g": v[0], "s1": v[1], "sh1": v[2], "s2": v[3], "sh2": v[4]}


def sweep(name: str, t: dict) -> dict:
    best = {}
    n = t["x"].numel()
    for kind in ("fwd", "bwd"):
        for cfg in FWD if kind == "fwd" else BWD:
            total = 0.0
            for res in (False, True):
                o, g = (t["o"], t["g"]) if res else (None, None)
                full = (cfg[0], cfg[1], 4, 8, 8) if kind == "fwd" else (4, 8, *cfg)
                an.FORCE_CONFIG = an.AdaLNNormConfig(*full)
                try:
                    _, _, mean, rstd = an._forward(t["x"], o, g, t["s1"], t["sh1"], 1e-6, torch.bfloat16)
                    if kind == "fwd":
                        us = graph_us(lambda o=o, g=g: an._forward(t["x"], o, g, t["s1"], t["sh1"], 1e-6,
                                                                     torch.bfloat16))
                    else:
                        us = graph_us(lambda o=o, g=g, mean=mean, rstd=rstd: an._backward(
                            t["dh"], t["x"], t["dxo"], o, g, t["s1"], mean, rstd))  # x: the op's input
                except Exception as e:  # a config that does not compile or fit
                    print(json.dumps({"shape": name, "kind": kind, "config": cfg, "error": str(e)[:200]}))
                    total = float("inf")
                    break
                gbs = BYTES[(kind, res)] * n / us / 1e3
                total += us
                print(json.dumps({"shape": name, "kind": kind, "residual": res, "config": cfg,
                                  "us": round(us, 2), "GB/s": round(gbs, 1)}), flush=True)
            if total < best.get(kind, (float("inf"),))[0]:
                best[kind] = (total, cfg)
    an.FORCE_CONFIG = None
    return best


def paired_ab(name: str, t: dict, cfg: tuple) -> None:
    """The backward at ``cfg`` with its two row sums as one paired reduction and as two tl.sum."""
    an.FORCE_CONFIG = an.AdaLNNormConfig(4, 8, *cfg)
    for paired in (True, False):
        an.PAIRED_REDUCE = paired
        for res in (False, True):
            o, g = (t["o"], t["g"]) if res else (None, None)
            _, _, mean, rstd = an._forward(t["x"], o, g, t["s1"], t["sh1"], 1e-6, torch.bfloat16)
            us = graph_us(lambda o=o, g=g, mean=mean, rstd=rstd: an._backward(
                t["dh"], t["x"], t["dxo"], o, g, t["s1"], mean, rstd))
            print(json.dumps({"shape": name, "kind": "bwd", "paired": paired, "residual": res, "config": cfg,
                              "us": round(us, 2)}), flush=True)
    an.PAIRED_REDUCE = True
    an.FORCE_CONFIG = None


def pair(kernels: bool):
    """The block's two norms as `maskar.nn.blocks` writes them: h1 = LN(x) (1 + s1) + sh1; x2 = x +
    o g; h2 = LN(x2) (1 + s2) + sh2 (h in bf16 as the linears take it)."""
    def f(x, o, g, s1, sh1, s2, sh2):
        if kernels:
            h1, x = an.adaln_norm(x, None, None, s1, sh1, 1e-6)
            h2, x2 = an.adaln_norm(x, o, g, s2, sh2, 1e-6)
            return h1, h2, x2
        h1 = torch.addcmul(sh1, F.layer_norm(x, x.shape[-1:], eps=1e-6), 1 + s1).to(torch.bfloat16)
        x2 = torch.addcmul(x, o, g)
        h2 = torch.addcmul(sh2, F.layer_norm(x2, x2.shape[-1:], eps=1e-6), 1 + s2).to(torch.bfloat16)
        return h1, h2, x2
    return torch.compile(f)


def time_pair(name: str, t: dict, kernels: bool) -> float:
    f = pair(kernels)
    leaves = {k: t[k].clone().requires_grad_() for k in ("x", "o", "g", "s1", "sh1", "s2", "sh2")}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):  # as in training: h in the linears' bf16
            h1, h2, x2 = f(*leaves.values())
        torch.autograd.backward([h1, h2, x2], [t["dh"], t["dh"], t["dxo"]])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(20):
        step()
    b.record()
    torch.cuda.synchronize()
    ms = a.elapsed_time(b) / 20
    side = "kernels" if kernels else "inductor"
    print(json.dumps({"shape": name, "pair": side, "fwd+bwd ms": round(ms, 4)}), flush=True)
    return ms


def main() -> int:
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
    best = None
    for name, shape in SHAPES.items():
        t = inputs(*shape)
        b = sweep(name, t)
        if best is None:
            best = b  # the 1024 px shape decides (#13's open rows)
        print(json.dumps({"shape": name, "best": {k: v[1] for k, v in b.items()},
                          "best_us": {k: round(v[0], 2) for k, v in b.items()}}))
        paired_ab(name, t, b["bwd"][1])
        an.FORCE_CONFIG = an.AdaLNNormConfig(*best["fwd"][1], *best["bwd"][1])
        time_pair(name, t, True)
        an.FORCE_CONFIG = None
        time_pair(name, t, False)
        del t
        torch.cuda.empty_cache()
    print("BEST", *best["fwd"][1], *best["bwd"][1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
