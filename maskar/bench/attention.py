"""Benchmark of the scale-pattern attention backends (docs/protocol.md).

Every variant computes the same function (same mask, same scale) and is checked against
fp32 SDPA with the boolean mask on fresh random inputs before it is timed. Forward and
forward+backward are timed separately (median of ``--reps`` CUDA-event timings after
warm-up; compilation and autotuning happen in the warm-up and are reported apart), with
the peak extra memory of one forward+backward and the HBM / FLOP floor beside them.

q, k, v are (B, H, L, D) views of one (B, L, 3, H, D) buffer, the layout the models
produce; gradients are taken with respect to those views.

    python benchmarks/attention.py                     # the full table
    python benchmarks/attention.py --dtypes fp16 --cases 680:32:16 --methods sdpa,triton
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from maskar.nn.attention import ScalePattern, available_backends, sdpa_attention

SCHEDULES = {  # tokens per side per scale (VAR's patch_nums)
    680: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    2240: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    9451: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_CASES = "680:32:16,2240:8:16,680:4:30,2240:4:30"
DEFAULT_METHODS = "sdpa,flex128,flex64,varlen,triton,dense_nomask"  # also: triton_fast, triton_jit
# error bound vs the fp32 reference (relative Frobenius norm) per dtype
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
FLEX64_OPTIONS = {
    "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32,
}


def _methods(names: list[str]) -> dict[str, Callable]:
    available_backends()  # imports the optional backends
    out: dict[str, Callable] = {}
    for name in names:
        if name == "sdpa":
            out[name] = sdpa_attention
        elif name == "dense_nomask":  # NOT the same function: an upper bound, labelled as such
            out[name] = lambda q, k, v, p, s: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, scale=s
            )
        elif name in ("flex128", "flex64"):
            try:
                from maskar.nn.attention_flex import flex_attention_backend
            except ImportError:
                continue
            bs = int(name[4:])
            opts = FLEX64_OPTIONS if bs == 64 else None
            out[name] = lambda q, k, v, p, s, bs=bs, opts=opts: flex_attention_backend(
                q, k, v, p, s, block_size=bs, kernel_options=opts
            )
        elif name == "varlen":
            try:
                from maskar.nn.attention_varlen import varlen_attention
            except ImportError:
                continue
            out[name] = varlen_attention
        elif name in ("triton", "triton_fast", "triton_jit"):  # FAST_LAUNCH default / on / off
            try:
                from maskar.kernels.block_sparse import block_sparse_attention
            except ImportError:
                continue
            out[name] = block_sparse_attention
        else:
            raise SystemExit(f"--methods: unknown method {name!r}; expected some of {DEFAULT_METHODS}")
    return out


def _make_inputs(B: int, L: int, H: int, D: int, dtype: torch.dtype):
    qkv = torch.randn(B, L, 3, H, D, device="cuda", dtype=dtype)  # (B, L, 3, H, D), the model layout
    qkv.requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D) strided view
    return qkv, q, k, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


def check(fn: Callable, pattern: ScalePattern, B: int, H: int, D: int, dtype, scale: float,
          backward: bool = True) -> float:
    """Max relative error of out (and dq, dk, dv) vs fp32 SDPA + bool mask, on fresh random inputs."""
    _, q, k, v = _make_inputs(B, pattern.total, H, D, dtype)
    out = fn(q, k, v, pattern, scale)
    ref_in = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    ref = sdpa_attention(*ref_in, pattern, scale)
    errs = [_rel(out, ref)]
    if backward:
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
        errs += [_rel(g, r) for g, r in zip(grads, ref_grads)]
    if not all(e == e for e in errs):  # NaN never passes
        return float("nan")
    return max(errs)


def time_ms(fn: Callable, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event timings after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_back_to_back_ms(fn: Callable, n: int = 50, rounds: int = 5) -> float:
    """Mean ms per call over ``n`` calls issued back to back (host runs ahead, as in a training
    step), median over ``rounds``."""
    from maskar.kernels.tuning import time_ms

    return time_ms(fn, rounds=rounds, per_round=n)


def measure_hbm_gbs() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    x = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), reps=20, warmup=3)
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def measure_matmul_tflops(dtype: torch.dtype) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ b, reps=10, warmup=3)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def floors_ms(pattern: ScalePattern, B: int, H: int, D: int, elem: int, gbs: float, tflops: float):
    """(fwd, fwd+bwd) physical floors in ms: max(bytes / HBM bandwidth, FLOPs / matmul peak)."""
    L = pattern.total
    t = B * H * L * D * elem  # one (B, H, L, D) tensor
    rows = B * H * L * 4  # one fp32 per row (lse / delta)
    fwd_bytes = 4 * t + rows  # read q, k, v; write o, lse
    bwd_bytes = 8 * t + 3 * rows  # read q, k, v, o, dO, lse; write dq, dk, dv, delta (+ read)
    allowed = pattern.density() * L * L * B * H
    fwd_flops = 4 * D * allowed  # QK^T and PV
    bwd_flops = 10 * D * allowed  # QK^T recomputed, dV, dP, dQ, dK
    f = max(fwd_bytes / (gbs * 1e9), fwd_flops / (tflops * 1e12)) * 1e3
    b = max(bwd_bytes / (gbs * 1e9), bwd_flops / (tflops * 1e12)) * 1e3
    return f, f + b


@contextlib.contextmanager
def _launch_mode(method: str):
    """``triton_fast`` / ``triton_jit``: the same kernels with FAST_LAUNCH forced on / off."""
    if method not in ("triton_fast", "triton_jit"):
        yield
        return
    import maskar.kernels.block_sparse as bs

    before = bs.FAST_LAUNCH
    bs.FAST_LAUNCH = method == "triton_fast"
    try:
        yield
    finally:
        bs.FAST_LAUNCH = before


def bench_case(method: str, fn: Callable, pattern: ScalePattern, B: int, H: int, D: int, dtype,
               scale: float, reps: int, warmup: int) -> dict:
    with _launch_mode(method):
        return _bench_case(method, fn, pattern, B, H, D, dtype, scale, reps, warmup)


def _bench_case(method: str, fn: Callable, pattern: ScalePattern, B: int, H: int, D: int, dtype,
                scale: float, reps: int, warmup: int) -> dict:
    row: dict = {"method": method}
    if method == "varlen" and pattern.kind != "block_diagonal":
        return row | {"skip": "cannot express block_causal"}
    qkv, q, k, v = _make_inputs(B, pattern.total, H, D, dtype)
    try:
        t0 = time.perf_counter()
        out = fn(q, k, v, pattern, scale)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0  # compile / autotune / mask build
        if method != "dense_nomask":
            row["err"] = check(fn, pattern, B, H, D, dtype, scale)
            if not row["err"] <= TOLERANCE[dtype]:
                return row | {"skip": f"FAILED check (rel err {row['err']:.2e})"}
        dout = torch.randn_like(out)

        def fwd():
            return fn(q, k, v, pattern, scale)

        def fwd_bwd():
            o = fn(q, k, v, pattern, scale)
            torch.autograd.grad(o, (q, k, v), dout)

        row["fwd_ms"] = time_ms(fwd, reps, warmup)
        row["fwd_bwd_ms"] = time_ms(fwd_bwd, reps, warmup)
        row["fwd_bwd_b2b_ms"] = time_back_to_back_ms(fwd_bwd)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as e:  # a peer failing (e.g. an unsupported flex block config) is a result too
        row["skip"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        try:  # forward alone may still work (flex with 64-token blocks)
            row["err"] = check(fn, pattern, B, H, D, dtype, scale, backward=False)
            if row["err"] <= TOLERANCE[dtype]:
                with torch.no_grad():
                    row["fwd_ms"] = time_ms(lambda: fn(q, k, v, pattern, scale), reps, warmup)
        except Exception:
            pass
    return row


def _fmt(row: dict) -> str:
    if "skip" in row and "fwd_ms" in row:
        return f"{row['fwd_ms']:.3f} (no-grad) / fail"
    if "skip" in row:
        return "n/a" if row["skip"].startswith("cannot") else "fail"
    return f"{row['fwd_ms']:.3f} / {row['fwd_bwd_ms']:.3f}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (tests parse documented commands with it)."""
    ap = argparse.ArgumentParser(
        prog="maskar bench attention", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    ap.add_argument("--patterns", default="block_diagonal,block_causal")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--cases", default=DEFAULT_CASES, help="L:B:H,... with L one of 680, 2240, 9451")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--scale", type=float, default=None, help="softmax scale (default D**-0.5)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write all rows to this file")
    ap.add_argument("--check-configs", action="store_true",
                    help="first check every triton candidate config against fp32 SDPA (B 2, H 2)")
    ap.add_argument("--tuning-log", action="store_true",
                    help="print the triton tuner's time of every candidate")
    ap.add_argument("--profile", type=int, default=0,
                    help="instead of the table: cProfile N fwd+bwd calls per method at the first case")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    # each (shape, BlockMask) is one Dynamo compile of flex_attention: allow all of them,
    # otherwise Dynamo silently falls back to the unfused path and flex is mis-timed
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)

    import triton

    print("command: python benchmarks/attention.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"CUDA {torch.version.cuda}")
    gbs = measure_hbm_gbs()
    tflops = {dt: measure_matmul_tflops(dt) for dt in {DTYPES[d] for d in args.dtypes.split(",")}}
    print(f"measured: HBM copy {gbs:.0f} GB/s (read+write); 8192^3 matmul "
          + ", ".join(f"{str(dt)[6:]} {tf:.0f} TFLOP/s" for dt, tf in tflops.items()))
    methods = _methods(args.methods.split(","))
    D = args.head_dim
    scale = D**-0.5 if args.scale is None else args.scale
    if args.profile:
        L, B, H = (int(x) for x in args.cases.split(",")[0].split(":"))
        pattern = ScalePattern.from_sides(args.patterns.split(",")[0], SCHEDULES[L])
        for name, fn in methods.items():
            with _launch_mode(name):
                _profile(name, fn, pattern, B, H, D, DTYPES[args.dtypes.split(",")[0]], scale, args.profile)
        return 0
    if args.check_configs:
        bad = check_triton_configs(args.patterns.split(","), [DTYPES[d] for d in args.dtypes.split(",")],
                                   sorted({int(c.split(":")[0]) for c in args.cases.split(",")}), D, scale)
        if bad:
            print(f"check-configs: {bad} config(s) FAILED", flush=True)
            return 1
    rows = []
    for kind in args.patterns.split(","):
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            for case in args.cases.split(","):
                L, B, H = (int(x) for x in case.split(":"))
                pattern = ScalePattern.from_sides(kind, SCHEDULES[L])
                fl = floors_ms(pattern, B, H, D, dtype.itemsize, gbs, tflops[dtype])
                for name, fn in methods.items():
                    torch.manual_seed(0)
                    r = bench_case(name, fn, pattern, B, H, D, dtype, scale, args.reps, args.warmup)
                    r |= {"pattern": kind, "dtype": dname, "L": L, "B": B, "H": H, "D": D,
                          "floor_fwd_ms": fl[0], "floor_fwd_bwd_ms": fl[1]}
                    rows.append(r)
                    print("  " + json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    _print_tables(rows, list(methods))
    if "triton" in methods or "triton_fast" in methods:
        from maskar.kernels.block_sparse import tuned_configs

        print("\ntriton configs chosen (phase, device, dtype, D, pattern, L, many-programs):")
        for key, cfg in tuned_configs().items():
            print(f"  {key}: {cfg}")
        if args.tuning_log:
            from maskar.kernels.block_sparse import tuning_log

            print("\ntriton tuner, ms per call of every candidate (back-to-back launches):")
            for key, log in tuning_log().items():
                print(f"  {key}:")
                for cfg, t in sorted(log, key=lambda x: x[1] if isinstance(x[1], float) else 1e9):
                    print(f"    {t if isinstance(t, str) else f'{t:.4f}'}  {cfg}")
    return 0


def check_triton_configs(kinds: list[str], dtypes: list, lengths: list[int], D: int, scale: float) -> int:
    """Check every forward and backward triton candidate config against fp32 SDPA; returns the failures."""
    import maskar.kernels.block_sparse as bs

    bad = 0
    try:
        for kind in kinds:
            for L in lengths:
                pattern = ScalePattern.from_sides(kind, SCHEDULES[L])
                for dtype in dtypes:
                    long = pattern.total >= bs.LONG_L
                    fwds, bwds = bs._fwd_candidates(D, long), bs._bwd_candidates(D, long)
                    pairs = [(f, bwds[0]) for f in fwds] + [(fwds[0], b) for b in bwds[1:]]
                    for fcfg, cfg in pairs:
                        bs.FORCE_FWD_CONFIG, bs.FORCE_BWD_CONFIG = fcfg, cfg
                        torch.manual_seed(1)
                        try:  # twice: with FAST_LAUNCH the second call takes the direct launch path
                            err = max(check(bs.block_sparse_attention, pattern, 2, 2, D, dtype, scale)
                                      for _ in range(2))
                            ok = err <= TOLERANCE[dtype]
                            msg = f"{err:.2e}"
                        except Exception as e:  # out of resources: the tuner skips it as well
                            ok = type(e).__name__ == "OutOfResources"
                            msg = f"{'skipped' if ok else 'error'} ({type(e).__name__}: {str(e)[:300]})"
                        bad += not ok
                        status = "" if ok else "  FAILED"
                        print(f"check {kind} L{L} {str(dtype)[6:]} {fcfg} {cfg}: {msg}{status}", flush=True)
    finally:
        bs.FORCE_FWD_CONFIG = bs.FORCE_BWD_CONFIG = None
    return bad


def _profile(name: str, fn: Callable, pattern: ScalePattern, B: int, H: int, D: int, dtype, scale: float,
             n: int) -> None:
    """Host-side cost of ``n`` fwd+bwd calls (launch-bound shapes are limited by this)."""
    import cProfile
    import pstats

    _, q, k, v = _make_inputs(B, pattern.total, H, D, dtype)
    out = fn(q, k, v, pattern, scale)
    dout = torch.randn_like(out)

    def step():
        torch.autograd.grad(fn(q, k, v, pattern, scale), (q, k, v), dout)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    total = (time.perf_counter() - t0) / n * 1e3
    print(f"\n== {name}: host {host:.3f} ms/call (issue only), {total:.3f} ms/call incl. GPU drain")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def _print_tables(rows: list[dict], names: list[str]) -> None:
    keys = []
    for r in rows:
        k = (r["pattern"], r["dtype"], r["L"], r["B"], r["H"])
        if k not in keys:
            keys.append(k)
    by = {(r["pattern"], r["dtype"], r["L"], r["B"], r["H"], r["method"]): r for r in rows}
    print("\nms, fwd / fwd+bwd (median); floor = max(HBM bytes / copy bandwidth, FLOPs / matmul peak)")
    print("dense_nomask is NOT the same function (no mask): an upper bound for reference only\n")
    print("| pattern | dtype | L | B | H | floor | " + " | ".join(names) + " |")
    print("|---" * (6 + len(names)) + "|")
    for k in keys:
        any_row = next(r for r in rows if (r["pattern"], r["dtype"], r["L"], r["B"], r["H"]) == k)
        floor = f"{any_row['floor_fwd_ms']:.3f} / {any_row['floor_fwd_bwd_ms']:.3f}"
        cells = [_fmt(by[k + (n,)]) if k + (n,) in by else "-" for n in names]
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | {floor} | " + " | ".join(cells) + " |")
    print("\npeak extra MiB (fwd+bwd) / max rel err vs fp32 / first call s (compile, autotune) / "
          "fwd+bwd ms issued back to back (mean of 50; host latency hidden):\n")
    print("| pattern | dtype | L | B | H | " + " | ".join(names) + " |")
    print("|---" * (5 + len(names)) + "|")
    for k in keys:
        cells = []
        for n in names:
            r = by.get(k + (n,))
            if r is None or "fwd_bwd_ms" not in r:
                cells.append(r["skip"][:40] if r and "skip" in r else "-")
            else:
                err = f"{r['err']:.1e}" if "err" in r else "-"
                cells.append(f"{r['peak_extra_mib']:.0f} / {err} / {r['first_call_s']:.1f} / "
                             f"{r['fwd_bwd_b2b_ms']:.3f}")
        print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {k[4]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
