"""Config sweep of the fused block-sparse kernel (maskar.kernels.block_sparse) on a CUDA GPU.

For every case (pattern, L, B, H) and every forward / backward config given, the kernel is
first checked against fp32 SDPA + boolean mask (out, dq, dk, dv on fresh random inputs,
B 2, H 2, same schedule); then the GPU time of back-to-back launches of that phase alone
is measured (median of rounds, the tuner's timing). Configs that fail to compile are
reported, not fatal. This is how the tuning candidates in block_sparse.py were chosen.

    python benchmarks/attention_sweep.py --cases 680:32:16,2240:8:16 --json sweep.json
    python benchmarks/attention_sweep.py --host        # host time per call, FAST_LAUNCH on / off
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import maskar.kernels.block_sparse as bs
from maskar.bench.attention import SCHEDULES, check, time_ms
from maskar.nn.attention import ScalePattern

F, B_ = bs.FwdConfig, bs.BwdConfig
FWD = [
    F(64, 64, 4, 3), F(64, 32, 4, 3), F(64, 64, 4, 4), F(64, 32, 4, 4), F(128, 64, 8, 3),
    F(128, 64, 8, 4), F(128, 128, 8, 3), F(64, 128, 4, 3), F(128, 32, 8, 3), F(32, 64, 4, 3),
    F(64, 64, 4, 3, aligned=False), F(128, 64, 8, 3, aligned=False),
    F(64, 64, 4, 3, bh_fast=True), F(128, 64, 8, 3, bh_fast=True),
]
BWD = [
    B_(16, 64, 64, 16, 4, 3), B_(16, 64, 64, 16, 4, 3, False), B_(32, 64, 64, 32, 4, 3),
    B_(16, 64, 64, 32, 4, 3), B_(32, 64, 64, 32, 4, 3, False), B_(32, 128, 128, 32, 8, 3),
    B_(16, 64, 64, 16, 4, 4), B_(32, 64, 64, 32, 4, 3, True, 4), B_(32, 64, 128, 32, 4, 3, True, 8),
    B_(16, 64, 128, 32, 4, 3, True, 8), B_(32, 128, 128, 64, 8, 2, True, 8),
    B_(32, 128, 128, 32, 4, 4), B_(32, 128, 128, 32, 4, 5), B_(64, 128, 128, 64, 8, 3),
    B_(32, 64, 64, 32, 4, 4), B_(16, 64, 64, 16, 4, 5), B_(32, 128, 64, 32, 8, 3), B_(64, 64, 64, 64, 4, 3),
    B_(16, 64, 64, 16, 4, 3, aligned=False), B_(32, 64, 64, 32, 4, 3, aligned=False),
    B_(32, 128, 128, 32, 8, 3, aligned=False),
    B_(16, 64, 64, 16, 4, 3, bh_fast=True), B_(32, 64, 64, 32, 4, 3, bh_fast=True),
    B_(16, 64, 64, 16, 4, 3, seg=64), B_(32, 64, 64, 32, 4, 3, seg=64),
]


def _inputs(pattern: ScalePattern, B: int, H: int, D: int, dtype):
    L = pattern.total
    qkv = torch.randn(B, L, 3, H, D, device="cuda", dtype=dtype)  # the models' layout
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    o = bs._blhd_empty(B, H, L, D, q)
    lse = torch.empty(B * H, L, dtype=torch.float32, device="cuda")
    do = torch.randn(B, H, L, D, device="cuda", dtype=dtype)
    grads = [bs._blhd_empty(B, H, L, D, q) for _ in range(3)]
    return q, k, v, o, lse, do, grads


def sweep_case(kind: str, L: int, B: int, H: int, D: int, dtype, fwd_cfgs, bwd_cfgs) -> list[dict]:
    pattern = ScalePattern.from_sides(kind, SCHEDULES[L])
    scale = D**-0.5
    q, k, v, o, lse, do, (dq, dk, dv) = _inputs(pattern, B, H, D, dtype)
    bnd = bs._bounds(pattern, q.device)
    rows = []
    fwd_ref = bs._fwd_candidates(D)[0]
    for phase, cfgs in (("fwd", fwd_cfgs), ("bwd", bwd_cfgs)):
        for cfg in cfgs:
            if phase == "bwd" and cfg.seg and kind != "block_diagonal":
                continue
            row = {"pattern": kind, "L": L, "B": B, "H": H, "phase": phase, "cfg": repr(cfg)}
            try:
                if phase == "fwd":
                    bs.FORCE_FWD_CONFIG, bs.FORCE_BWD_CONFIG = cfg, bs._bwd_candidates(D)[0]
                else:
                    bs.FORCE_FWD_CONFIG, bs.FORCE_BWD_CONFIG = fwd_ref, cfg
                row["err"] = check(bs.block_sparse_attention, pattern, 2, 2, D, dtype, scale)
                if not row["err"] < 5e-3:
                    row["fail"] = "wrong result"
                elif phase == "fwd":
                    def launch(c=cfg):
                        bs._launch_fwd(q, k, v, o, lse, bnd, scale * bs.LOG2E, pattern, c)
                    row["ms"] = bs._time_ms(launch, rounds=7, per_round=10)
                else:
                    bs._launch_fwd(q, k, v, o, lse, bnd, scale * bs.LOG2E, pattern, fwd_ref)
                    row["ms"] = bs._time_ms(lambda c=cfg: bs._launch_bwd(q, k, v, o, do, dq, dk, dv, lse, bnd,
                                                                         scale * bs.LOG2E, scale, pattern, c),
                                            rounds=7, per_round=10)
            except Exception as e:  # e.g. out of shared memory for this config
                row["fail"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            finally:
                bs.FORCE_FWD_CONFIG = bs.FORCE_BWD_CONFIG = None
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def host_times(kind: str, L: int, B: int, H: int, D: int, dtype, reps: int = 200) -> dict:
    """Per-call fwd+bwd: CUDA-event median (as the benchmark) and host wall time, FAST_LAUNCH off / on."""
    pattern = ScalePattern.from_sides(kind, SCHEDULES[L])
    qkv = torch.randn(B, L, 3, H, D, device="cuda", dtype=dtype, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    dout = torch.randn(B, H, L, D, device="cuda", dtype=dtype)

    def call():
        out = bs.block_sparse_attention(q, k, v, pattern)
        torch.autograd.grad(out, (q, k, v), dout)

    res = {"pattern": kind, "L": L, "B": B, "H": H}
    for fast in (False, True):
        bs.FAST_LAUNCH = fast
        try:
            for _ in range(20):
                call()
            torch.cuda.synchronize()
            host = []
            for _ in range(reps):
                t0 = time.perf_counter()
                call()
                host.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
            res[f"host_ms_fast{int(fast)}"] = statistics.median(host)
            res[f"event_ms_fast{int(fast)}"] = time_ms(call, reps, 10)
            res[f"fast_failed{int(fast)}"] = bs._fast_failed
        finally:
            bs.FAST_LAUNCH = False
    print(json.dumps(res), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", default="block_diagonal,block_causal")
    ap.add_argument("--cases", default="680:32:16,2240:8:16,680:4:30")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--host", action="store_true", help="only host time per call, FAST_LAUNCH off / on")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_sweep.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    rows = []
    for kind in args.patterns.split(","):
        for case in args.cases.split(","):
            L, B, H = (int(x) for x in case.split(":"))
            if args.host:
                rows.append(host_times(kind, L, B, H, args.head_dim, dtype))
            else:
                rows += sweep_case(kind, L, B, H, args.head_dim, dtype, FWD, BWD)
    if not args.host:  # best per (case, phase)
        best: dict = {}
        for r in rows:
            k = (r["pattern"], r["L"], r["B"], r["H"], r["phase"])
            if "ms" in r and (k not in best or r["ms"] < best[k]["ms"]):
                best[k] = r
        for k, r in best.items():
            print("BEST", *k, f"{r['ms']:.4f} ms", r["cfg"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
