"""How fast could block-diagonal attention be? The best dense kernels on each scale alone.

Block-diagonal attention over a scale schedule is, exactly, one dense attention per scale.
So the throughput of the fastest dense attention kernels available on the GPU, run on each
scale as its own dense problem, gives a reference for what a fused block-sparse kernel can
reach: it has no mask arithmetic, no tile that straddles two scales and no empty work.

For every scale of at least ``--min-tokens`` tokens this times forward and forward+backward
of SDPA without a mask under each fused backend (cuDNN, FlashAttention-2, memory-efficient)
and of this library's kernel on the same dense problem. The batch is multiplied by
``k`` (reported) until one call takes at least ``--target-ms`` of GPU time, and the time is
divided by ``k``: per-launch tails and host latency are amortised away, which can only
lower the estimate. Summing the best backend over the scales, and leaving the smaller
scales out entirely, gives a figure that no per-scale use of these kernels beats.

    python benchmarks/attention_dense_bound.py                 # 512 px schedule, B 8, H 16, fp16
    python benchmarks/attention_dense_bound.py --schedule 680 --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys

import torch

from maskar.bench.attention import SCHEDULES, _make_inputs, _rel, time_back_to_back_ms
from maskar.nn.attention import ScalePattern

BACKENDS = ("cudnn", "flash", "efficient")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[name])


def _fn(method: str, n: int):
    if method == "triton":
        from maskar.kernels.block_sparse import block_sparse_attention

        pattern = ScalePattern("block_diagonal", (n,))  # one scale: dense attention
        return lambda q, k, v, s: block_sparse_attention(q, k, v, pattern, s)

    def sdpa(q, k, v, s):
        with _sdpa_backend(method):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=s)

    return sdpa


def _check(fn, n: int, H: int, D: int, dtype, scale: float) -> float:
    _, q, k, v = _make_inputs(2, n, H, D, dtype)
    out = fn(q, k, v, scale)
    ref_in = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, scale=scale)
    do = torch.randn_like(out)
    errs = [_rel(out, ref)]
    errs += [_rel(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), do),
                                         torch.autograd.grad(ref, ref_in, do.float()))]
    return max(errs)


def measure(method: str, n: int, B: int, H: int, D: int, dtype, target_ms: float) -> dict:
    """Per-(B, H) ms of fwd and fwd+bwd of dense attention over ``n`` tokens, batch scaled by k."""
    fn = _fn(method, n)
    scale = D**-0.5
    err = _check(fn, n, H, D, dtype, scale)
    if not err <= 5e-3 * (6 if dtype == torch.bfloat16 else 1):
        return {"skip": f"check failed: rel err {err:.2e}"}
    k = 1
    while True:
        _, q, kk, v = _make_inputs(B * k, n, H, D, dtype)
        do = torch.randn(B * k, H, n, D, device="cuda", dtype=dtype)

        def fwd_bwd(q=q, kk=kk, v=v, do=do):
            o = fn(q, kk, v, scale)
            torch.autograd.grad(o, (q, kk, v), do)

        t = time_back_to_back_ms(fwd_bwd, n=20, rounds=3)
        if t >= target_ms or k >= 4096:
            break
        k = min(4096, k * max(2, math.ceil(target_ms / max(t, 1e-3))))
        del q, kk, v, do
    with torch.no_grad():
        t_fwd = time_back_to_back_ms(lambda: fn(q, kk, v, scale), n=20, rounds=3)
    t_fb = time_back_to_back_ms(fwd_bwd, n=20, rounds=5)
    return {"k": k, "err": err, "fwd_ms": t_fwd / k, "fwd_bwd_ms": t_fb / k}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", type=int, default=2240, choices=sorted(SCHEDULES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    ap.add_argument("--min-tokens", type=int, default=81, help="scales below this are left out (bound)")
    ap.add_argument("--target-ms", type=float, default=1.0, help="GPU time per call the batch is scaled to")
    ap.add_argument("--methods", default=",".join((*BACKENDS, "triton")))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_dense_bound: needs a CUDA GPU")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    sides = SCHEDULES[a.schedule]
    lengths = [s * s for s in sides]
    pairs = sum(n * n for n in lengths)
    methods = a.methods.split(",")
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"cuDNN {torch.backends.cudnn.version()}")
    print(f"schedule L {a.schedule}, B {a.batch}, H {a.heads}, D {a.head_dim}, {a.dtype}; "
          f"scales >= {a.min_tokens} tokens (ms per B x H problem, batch scaled by k)")
    rows = []
    for n in lengths:
        if n < a.min_tokens:
            continue
        row = {"n": n, "share": n * n / pairs}
        for m in methods:
            try:
                row[m] = measure(m, n, a.batch, a.heads, a.head_dim, dtype, a.target_ms)
            except Exception as e:  # a backend refusing a shape is a result too
                row[m] = {"skip": f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"}
            torch.cuda.empty_cache()
        rows.append(row)
        cells = []
        for m in methods:
            r = row[m]
            t = r["skip"] if "skip" in r else f"{r['fwd_ms']:.4f} / {r['fwd_bwd_ms']:.4f} (k {r['k']})"
            cells.append(f"{m} {t}")
        print(f"n {n:5d} ({100 * row['share']:5.1f}% of pairs): " + " | ".join(cells), flush=True)
    print("\nsum over the scales above (fwd / fwd+bwd ms):")
    best_fwd = best_fb = 0.0
    for m in methods:
        ok = [r[m] for r in rows if "skip" not in r[m]]
        if len(ok) == len(rows):
            print(f"  {m:10s} {sum(r['fwd_ms'] for r in ok):.4f} / {sum(r['fwd_bwd_ms'] for r in ok):.4f}")
    sdpa = [m for m in methods if m != "triton"]
    for r in rows:
        fine = [r[m] for m in sdpa if "skip" not in r[m]]
        if fine:
            best_fwd += min(x["fwd_ms"] for x in fine)
            best_fb += min(x["fwd_bwd_ms"] for x in fine)
    print(f"  best SDPA backend per scale: {best_fwd:.4f} / {best_fb:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows, "best_sdpa_sum": [best_fwd, best_fb]}, f, indent=1)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
