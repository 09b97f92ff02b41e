"""The matmuls of CASMAR-B sampling, one shape at a time: which run far from cuBLAS's best, and
whether the weight's layout or the workspace changes cuBLAS's choice.

Why: in the H100 profile of one CASMAR-B call (2026-12-05, eighth session) the DiT head's matmuls
reach ≈ 515 TFLOP/s together, but the kernel `nvjet_..._256x128_..._bias_TNT` alone takes 1344 ms of
the call, which at the shapes it can belong to is ≈ 380 TFLOP/s. Which linear it serves is not known.
This times every linear shape of the DiT head (rows 32,768: B 64 with CFG x 256 tokens), the
stage-1 MLP head (width 1024; rows of one scaffold step) and the stage-1 transformer (width 768),
each as Inductor calls it (`addmm(bias, x, W.t())` with W (N, K) contiguous, or
`_addmm_activation(..., use_gelu=True)` for the DiT's fc1) and with W stored (K, N) contiguous
(the same product; cuBLAS sees other operand layouts and may pick another kernel). Each variant's
output is checked against the first's (bf16 rounding), timed (median of 5 rounds of back-to-back
calls) and named (its kernels under torch.profiler).

OUT=/tmp/out python3 scripts/gpu/matmul_shapes.py   (about 1 min); writes $OUT/matmul_shapes.json.
"""

from __future__ import annotations

import json
import os

import torch

from maskar.bench.kernel_time import kernel_ms_per_call
from maskar.kernels.tuning import time_ms

OUT = os.environ.get("OUT", "/tmp/out")
dev, dt = torch.device("cuda"), torch.bfloat16
torch.manual_seed(0)

# (group, name, rows M, out N, in K, epilogue)
SHAPES = [("dit", n, 32768, o, i, e) for n, o, i, e in [
    ("qkv", 1536, 512, "bias"), ("out_proj", 512, 512, "bias"), ("fc1+gelu", 2048, 512, "gelu"),
    ("fc2", 512, 2048, "bias"), ("adaLN", 3072, 512, "bias")]]
for m in (256, 1024, 4096):
    SHAPES += [("mlp_head", f"{n} M{m}", m, o, i, "bias") for n, o, i in [
        ("linear", 1024, 1024), ("adaLN", 3072, 1024)]]
for m in (8192, 40960):
    SHAPES += [("stage1", f"{n} M{m}", m, o, i, "bias") for n, o, i in [
        ("qkv", 2304, 768), ("proj", 768, 768), ("fc1", 3072, 768), ("fc2", 768, 3072)]]


def variants(x, w, b, epilogue):
    wt = w.t().contiguous()  # (K, N) row-major: the same matrix, the other storage order
    if epilogue == "gelu":
        return {"W (N,K), as Inductor": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
                "W (K,N)": lambda: torch._addmm_activation(b, x, wt, use_gelu=True)}
    return {"W (N,K), as Inductor": lambda: torch.addmm(b, x, w.t()),
            "W (K,N)": lambda: torch.addmm(b, x, wt),
            "no bias (mm)": lambda: torch.mm(x, w.t())}


rows = []
print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  "
      f"CUBLASLT_WORKSPACE_SIZE={os.environ.get('CUBLASLT_WORKSPACE_SIZE', 'unset')}")
print(f"{'group':9s} {'shape':18s} {'variant':22s} {'us':>8s} {'TFLOP/s':>8s}  kernels")
for group, name, m, n, k, epi in SHAPES:
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
    b = torch.randn(n, device=dev, dtype=dt)
    ref = None
    for vname, fn in variants(x, w, b, epi).items():
        out = fn().float()
        if ref is None:
            ref = out
        elif "bias" not in vname:
            err = (out - ref).abs().max().item()
            assert err <= 0.05 * ref.abs().max().item(), f"{name} {vname}: max error {err}"
        ms = time_ms(fn, rounds=5, per_round=20)
        kern = kernel_ms_per_call(fn, calls=5)
        top = sorted(kern.items(), key=lambda t: -t[1])[:2]
        names = ", ".join(f"{kn[:60]} {v * 1e3:.0f}us" for kn, v in top)
        tf = 2 * m * n * k / ms / 1e9
        rows.append(dict(group=group, shape=name, m=m, n=n, k=k, variant=vname, ms=ms, tflops=tf,
                         kernels=kern))
        print(f"{group:9s} {name:18s} {vname:22s} {ms * 1e3:8.1f} {tf:8.1f}  {names}", flush=True)
os.makedirs(OUT, exist_ok=True)
tag = os.environ.get("TAG", "default")
with open(os.path.join(OUT, f"matmul_shapes_{tag}.json"), "w") as f:
    json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
