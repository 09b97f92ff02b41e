"""Benchmark of CASMAR's Proximal Self-Attention (PSA), docs/protocol.md.

PSA: every token of an h x w grid attends to its k x k (dilated) window; the window's
zero-padded border slots stay in the softmax (logit 0, value 0), as in the official
unfold code. Variants of exactly that function:

- ``triton``: the fused window kernel ``maskar.kernels.neighborhood`` (what
  ``proximal_attention`` runs on CUDA in fp16 / bf16); its first call compiles and
  autotunes, and the chosen block shapes and tuning time are reported with its row;
- ``sdpa_bias``: ``proximal_attention(..., backend="sdpa")`` (SDPA + float bias over all
  keys plus one zero key whose bias is ``log(k*k - n_valid)``), the exact reference path;
- ``flex``: compiled FlexAttention, a BlockMask of the window plus the same zero key
  (KV padded to a multiple of 128) and a score_mod adding ``log(k*k - n_valid)`` to it;
- ``unfold``: the official formulation re-implemented here (K, V unfolded into k*k
  zero-padded windows, softmax over the k*k slots); slow, so timed with few reps;
- ``dense_nomask``: plain SDPA over all keys. NOT the same function: an upper bound.

Every exact variant is checked (out, dq, dk, dv) against the unfold formulation in fp32
(fp64 on the CPU) on fresh random inputs before it is timed. Forward and forward+backward
are timed separately (median of CUDA-event timings after warm-up); the first call
(compile, mask build) and the peak extra memory of one forward+backward are reported
apart, with the HBM / FLOP floor of the window attention beside them.

q, k, v are (B, H, L, D) views of (B, L, H, D) tensors, the layout the DiT's separate
q/k/v projections produce; gradients are taken with respect to those views.

    python benchmarks/psa.py                                    # the full table (CUDA)
    python benchmarks/psa.py --dtypes bf16 --cases 16x16:64:16 --windows 7:1 --methods triton,flex
    python benchmarks/psa.py --device cpu                       # tiny CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from maskar.bench.attention import measure_hbm_gbs, measure_matmul_tflops
from maskar.bench.kernel_time import kernel_ms_per_call
from maskar.nn.proximal_attention import proximal_attention

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# grid:B:H: the neighbourhood table of docs/protocol.md (B * L = 16384 tokens in every row) and 128 x 128
DEFAULT_CASES = "16x16:64:16,32x32:16:16,64x64:4:16,128x128:1:16"
CPU_CASES = "8x8:2:2,6x5:1:2"
DEFAULT_WINDOWS = "7:1,13:2"  # k:dilation; 7:1 is CASMAR's released setting
DEFAULT_METHODS = "triton,sdpa_bias,flex,unfold,dense_nomask"
EXACT_METHODS = ("triton", "sdpa_bias", "flex", "unfold")
# issue 16's targets (one H200, bf16, H 16, D 64, k 7, fwd+bwd ms of the kernel)
TARGETS_MS = {("16x16", 64, 7, 1): 0.29, ("32x32", 16, 7, 1): 0.40, ("64x64", 4, 7, 1): 0.40}
# error bound vs the fp32 reference (relative Frobenius norm) per dtype, as benchmarks/attention.py
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
UNFOLD_MAX_REPS = 5  # the unfold peer takes tens of ms per call
FLEX_BLOCK = 128  # FlexAttention's default tile; the KV axis is padded to a multiple of it


@dataclass(frozen=True)
class Problem:
    """One PSA configuration: an (h, w) grid, odd window size, dilation, softmax scale."""

    grid: tuple[int, int]
    kernel: int = 7
    dilation: int = 1
    scale: float | None = None

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


# ---------------------------------------------------------------------------- variants


def unfold_psa(q: Tensor, k: Tensor, v: Tensor, p: Problem) -> Tensor:
    """The official formulation: K, V cut into k*k zero-padded windows, softmax over the slots.

    q, k, v (B, H, L, D) -> (B, H, L, D). Materialises k*k copies of K and V.
    """
    b, nh, n, d = q.shape
    h, w = p.grid
    ks, dil = p.kernel, p.dilation
    scale = d**-0.5 if p.scale is None else p.scale

    def slots(x: Tensor) -> Tensor:  # (B, H, L, D) -> (B*H, L, k*k, D), zeros off the grid
        img = x.reshape(b * nh, h, w, d).permute(0, 3, 1, 2)  # (BH, D, h, w)
        cols = F.unfold(img, ks, dilation=dil, padding=dil * (ks - 1) // 2)  # (BH, D*k*k, L)
        return cols.view(b * nh, d, ks * ks, n).permute(0, 3, 2, 1)

    k_win, v_win = slots(k), slots(v)
    logits = torch.einsum("bld,blsd->bls", q.reshape(b * nh, n, d), k_win) * scale  # (BH, L, k*k)
    out = torch.einsum("bls,blsd->bld", logits.softmax(-1), v_win)
    return out.reshape(b, nh, n, d)


def padded_slots(p: Problem, device: torch.device | str = "cpu") -> Tensor:
    """(L,) int64: per query, how many of its k*k window slots fall off the grid."""
    r = (p.kernel - 1) // 2
    steps = torch.arange(-r, r + 1, device=device) * p.dilation  # (k,)

    def on_axis(size: int) -> Tensor:  # (size,) window slots inside [0, size) along one axis
        pos = torch.arange(size, device=device)[:, None] + steps
        return ((pos >= 0) & (pos < size)).sum(1)

    rows, cols = on_axis(p.grid[0]), on_axis(p.grid[1])
    return p.kernel**2 - (rows[:, None] * cols[None, :]).flatten()  # raster order


def flex_kv_len(p: Problem) -> int:
    """Keys seen by the flex variant: L grid keys + 1 zero key, padded to a FLEX_BLOCK multiple."""
    return -(-(p.tokens + 1) // FLEX_BLOCK) * FLEX_BLOCK


@functools.lru_cache(maxsize=32)
def flex_parts(p: Problem, device: str, score_dtype: torch.dtype = torch.float32):
    """(block_mask, score_mod) of PSA for FlexAttention, cached per problem, device, score dtype.

    Key L is an all-zero key standing for the padded slots: the mask admits it for queries
    that have any, and score_mod adds log(#padded) to its logit (which is 0), so it puts
    #padded * exp(0) into the denominator and nothing into the numerator. Scores are fp32
    in the kernel for fp16/bf16/fp32 inputs; ``score_dtype`` fp64 keeps fp64 checks exact.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    n, w = p.tokens, p.grid[1]
    reach, dil = (p.kernel - 1) // 2 * p.dilation, p.dilation
    missing = padded_slots(p, device)
    has_pad = missing > 0  # (L,) bool
    log_missing = missing.clamp(min=1).to(score_dtype).log()  # (L,); unused where no pad

    def mask_mod(b, hh, q_idx, kv_idx):
        dy = kv_idx // w - q_idx // w
        dx = kv_idx % w - q_idx % w
        window = (dy.abs() <= reach) & (dx.abs() <= reach) & (dy % dil == 0) & (dx % dil == 0)
        return ((kv_idx < n) & window) | ((kv_idx == n) & has_pad[q_idx])

    def score_mod(score, b, hh, q_idx, kv_idx):
        return torch.where(kv_idx == n, score + log_missing[q_idx], score)

    mask = create_block_mask(mask_mod, None, None, n, flex_kv_len(p), device=device,
                             BLOCK_SIZE=FLEX_BLOCK)
    return mask, score_mod


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_psa(q: Tensor, k: Tensor, v: Tensor, p: Problem, compiled: bool = True) -> Tensor:
    """PSA through FlexAttention; q, k, v (B, H, L, D). ``compiled=False``: eager (CPU tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    b, nh, n, d = q.shape
    score_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask, score_mod = flex_parts(p, str(q.device), score_dtype)
    pad = flex_kv_len(p) - n
    k = torch.cat([k, k.new_zeros(b, nh, pad, d)], dim=2)  # (B, H, L_kv, D)
    v = torch.cat([v, v.new_zeros(b, nh, pad, v.shape[-1])], dim=2)
    if compiled:
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=mask, scale=p.scale)
    with warnings.catch_warnings():  # eager flex warns that it is slow; it is only used to check
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=mask, scale=p.scale)


def sdpa_bias_psa(q: Tensor, k: Tensor, v: Tensor, p: Problem) -> Tensor:
    return proximal_attention(q, k, v, p.grid, p.kernel, p.dilation, scale=p.scale, backend="sdpa")


def triton_psa(q: Tensor, k: Tensor, v: Tensor, p: Problem) -> Tensor:
    from maskar.kernels.neighborhood import neighborhood_attention

    return neighborhood_attention(q, k, v, p.grid, p.kernel, p.dilation, scale=p.scale)


def triton_available() -> bool:
    try:
        import maskar.kernels.neighborhood  # noqa: F401
    except ImportError:
        return False
    return True


def dense_nomask(q: Tensor, k: Tensor, v: Tensor, p: Problem) -> Tensor:
    """Global attention, no window: NOT PSA. An upper bound, labelled as such."""
    return F.scaled_dot_product_attention(q, k, v, scale=p.scale)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def methods(names: list[str], compile_flex: bool = True) -> dict[str, Callable]:
    """name -> fn(q, k, v, problem); unknown names raise, flex is left out if torch lacks it."""
    out: dict[str, Callable] = {}
    for name in names:
        if name == "sdpa_bias":
            out[name] = sdpa_bias_psa
        elif name == "triton":
            if not triton_available():
                print("triton: the triton package is unavailable, skipped", flush=True)
                continue
            out[name] = triton_psa
        elif name == "unfold":
            out[name] = unfold_psa
        elif name == "dense_nomask":
            out[name] = dense_nomask
        elif name == "flex":
            if not flex_available():
                print("flex: torch.nn.attention.flex_attention unavailable, skipped", flush=True)
                continue
            out[name] = functools.partial(flex_psa, compiled=compile_flex)
        else:
            raise SystemExit(f"--methods: unknown method {name!r}; expected some of {DEFAULT_METHODS}")
    return out


# ---------------------------------------------------------------------------- checking


def make_inputs(B: int, H: int, L: int, D: int, dtype: torch.dtype, device, requires_grad: bool = True):
    """q, k, v (B, H, L, D) as transposed views of (B, L, H, D) leaves (the projection layout)."""
    leaves = [torch.randn(B, L, H, D, device=device, dtype=dtype, requires_grad=requires_grad)
              for _ in range(3)]
    return [x.transpose(1, 2) for x in leaves]


def _rel(a: Tensor, b: Tensor) -> float:
    b = b.detach()
    return float((a.detach().to(b.dtype) - b).norm() / b.norm().clamp_min(1e-30))


def check(fn: Callable, p: Problem, B: int, H: int, D: int, dtype: torch.dtype, device,
          backward: bool = True) -> float:
    """Max relative error of out (and dq, dk, dv) vs the unfold formulation in fp32 (fp64 on CPU)."""
    ref_dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
    q, k, v = make_inputs(B, H, p.tokens, D, dtype, device, requires_grad=backward)
    out = fn(q, k, v, p)
    ref_in = [x.detach().to(ref_dtype).requires_grad_(backward) for x in (q, k, v)]
    ref = unfold_psa(*ref_in, p)
    errs = [_rel(out, ref)]
    if backward:
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_grads = torch.autograd.grad(ref, ref_in, dout.to(ref_dtype))
        errs += [_rel(g, r) for g, r in zip(grads, ref_grads)]
    if not all(e == e for e in errs):  # NaN never passes
        return float("nan")
    return max(errs)


# ---------------------------------------------------------------------------- timing


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable, reps: int, warmup: int, device="cuda") -> float:
    """Median ms of ``fn`` over ``reps`` timings after ``warmup`` calls (CUDA events; wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if torch.device(device).type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graph_time_ms(make_fn: Callable[[], Callable], reps: int, warmup: int) -> float:
    """Median ms of one replay of a call captured in a CUDA graph: the GPU work of the call and
    the gaps between its kernels, without the host's per-call time (autograd, allocations,
    launches), as inside a training step captured as one graph (``train.cuda_graph``). Tuning
    happened in the eager calls before, so the capture launches the tuned configs.

    ``make_fn`` builds the call and its inputs; it runs on the capture stream, because autograd
    makes the stream a leaf was created on wait for the backward: for leaves of the legacy
    default stream that wait is illegal inside a capture (H200, torch 2.11:
    ``cudaErrorStreamCaptureImplicit``, for SDPA as for the kernel)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn = make_fn()
        for _ in range(3):  # capture's warm-up: allocator pools, lazy inits
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        fn()
    try:
        return time_ms(graph.replay, reps, warmup, "cuda")
    finally:
        del graph


def window_pairs(p: Problem) -> int:
    """(query, key) pairs of one head with the key inside the query's window and on the grid.

    The window is a product of per-axis windows, so this is (sum over rows of the in-grid
    window rows) * (sum over columns of the in-grid window columns); padded slots cost no
    FLOPs (their logit is the constant 0)."""
    r = (p.kernel - 1) // 2

    def axis(n: int) -> int:
        return sum(sum(0 <= i + a * p.dilation < n for a in range(-r, r + 1)) for i in range(n))

    return axis(p.grid[0]) * axis(p.grid[1])


def floors_ms(p: Problem, B: int, H: int, D: int, elem: int, gbs: float, tflops: float):
    """(fwd, fwd+bwd) floors in ms of the window attention: max(bytes / HBM, FLOPs / matmul peak).

    Bytes: q, k, v, out (+ dO, dq, dk, dv backward) once each; FLOPs: only the in-grid
    window pairs (padded slots cost nothing), QK^T and PV forward, five such products backward.
    """
    L = p.tokens
    t = B * H * L * D * elem  # one (B, H, L, D) tensor
    rows = B * H * L * 4  # one fp32 per row (lse / delta)
    pairs = B * H * window_pairs(p)
    fwd_bytes, bwd_bytes = 4 * t + rows, 8 * t + 3 * rows
    fwd_flops, bwd_flops = 4 * D * pairs, 10 * D * pairs
    f = max(fwd_bytes / (gbs * 1e9), fwd_flops / (tflops * 1e12)) * 1e3
    b = max(bwd_bytes / (gbs * 1e9), bwd_flops / (tflops * 1e12)) * 1e3
    return f, f + b


def _fwd_bwd_call(fn: Callable, p: Problem, qkv: list[Tensor], dout: Tensor) -> Callable[[], None]:
    def call() -> None:
        torch.autograd.grad(fn(*qkv, p), qkv, dout)
    return call


def bench_case(method: str, fn: Callable, p: Problem, B: int, H: int, D: int, dtype: torch.dtype,
               reps: int, warmup: int, device="cuda", probes: list | None = None) -> dict:
    """One table cell: first-call s, check error, fwd / fwd+bwd median ms, peak extra MiB.

    ``probes``: where the kernel rows leave (row, fwd, fwd_bwd) for ``kernel_time_probes``, which
    profiles them after every row is timed (without it they are profiled here, at once)."""
    row: dict = {"method": method}
    cuda = torch.device(device).type == "cuda"
    if method == "unfold":
        reps, warmup = min(reps, UNFOLD_MAX_REPS), min(warmup, 2)
    q, k, v = make_inputs(B, H, p.tokens, D, dtype, device)
    try:
        t0 = time.perf_counter()
        out = fn(q, k, v, p)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        _sync(device)
        row["first_call_s"] = time.perf_counter() - t0  # compile / mask build / bias build
        if method in EXACT_METHODS:
            row["err"] = check(fn, p, B, H, D, dtype, device)
            if not row["err"] <= TOLERANCE[dtype]:
                return row | {"skip": f"FAILED check (rel err {row['err']:.2e})"}
        dout = torch.randn_like(out)
        del out

        def fwd():
            return fn(q, k, v, p)

        fwd_bwd = _fwd_bwd_call(fn, p, [q, k, v], dout)
        row["fwd_ms"] = time_ms(fwd, reps, warmup, device)
        row["fwd_bwd_ms"] = time_ms(fwd_bwd, reps, warmup, device)
        row["reps"] = reps
        if cuda and method != "unfold":
            try:
                row["fwd_bwd_graph_ms"] = graph_time_ms(
                    lambda: _fwd_bwd_call(fn, p, make_inputs(B, H, p.tokens, D, dtype, device), dout.clone()),
                    reps, warmup)
            except Exception as e:  # a method that cannot be captured: its per-call time stands
                row["graph_skip"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        if cuda and method == "triton":  # kernel time per call: the median's excess over it is host time
            if probes is None:
                _kernel_time(row, fwd, fwd_bwd)
            else:
                probes.append((row, fwd, fwd_bwd, reps, warmup, device))
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fwd_bwd()
            torch.cuda.synchronize()
            row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except Exception as e:  # a peer failing (e.g. flex backward on the CPU) is a result too
        row["skip"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        row.pop("first_call_s", None)
        try:  # forward alone may still work: check and time it without grad
            with torch.no_grad():
                qn, kn, vn = (x.detach() for x in (q, k, v))
                t0 = time.perf_counter()
                fn(qn, kn, vn, p)
                _sync(device)
                row["first_call_s"] = time.perf_counter() - t0
                row["err"] = check(fn, p, B, H, D, dtype, device, backward=False)
                if row["err"] <= TOLERANCE[dtype] or method not in EXACT_METHODS:
                    row["fwd_ms"] = time_ms(lambda: fn(qn, kn, vn, p), reps, warmup, device)
        except Exception:
            pass
    if method == "flex" and cuda:
        try:
            row["flex_sparsity_pct"] = float(flex_parts(p, str(torch.device(device)))[0].sparsity())
        except Exception:
            pass
    return row


def _kernel_time(row: dict, fwd: Callable, fwd_bwd: Callable) -> None:
    row["fwd_kernel_ms"] = sum(kernel_ms_per_call(fwd).values())
    row["fwd_bwd_kernels"] = kernel_ms_per_call(fwd_bwd)
    row["fwd_bwd_kernel_ms"] = sum(row["fwd_bwd_kernels"].values())


def kernel_time_probes(probes: list) -> None:
    """Profile the kernel rows' calls once every row is timed, and time their fwd+bwd once more
    after that (``fwd_bwd_ms_after_profile``). On 2026-12-04 the k 7 rows timed after the first
    row's profiling ran 0.26-0.32 ms above their kernel time and the first row did not: profiling
    last keeps the table's medians free of whatever a profiler session leaves behind, and the
    re-timing shows whether it leaves anything."""
    for row, fwd, fwd_bwd, reps, warmup, device in probes:
        _kernel_time(row, fwd, fwd_bwd)
        row["fwd_bwd_ms_after_profile"] = time_ms(fwd_bwd, reps, warmup, device)
    probes.clear()


# ---------------------------------------------------------------------------- report


def _fmt(row: dict | None) -> str:
    if row is None:
        return "-"
    if "skip" in row and "fwd_ms" in row:
        return f"{row['fwd_ms']:.3f} (fwd only) / fail"
    if "skip" in row:
        return "fail"
    return f"{row['fwd_ms']:.3f} / {row['fwd_bwd_ms']:.3f}"


def print_tables(rows: list[dict], names: list[str]) -> None:
    keys: list[tuple] = []
    for r in rows:
        key = (r["dtype"], r["grid"], r["B"], r["H"])
        if key not in keys:
            keys.append(key)
    by = {(r["dtype"], r["grid"], r["B"], r["H"], r["method"]): r for r in rows}
    first = rows[0] if rows else {}
    print(f"\nPSA k={first.get('kernel')} dilation {first.get('dilation')}, head dim {first.get('D')}; "
          "ms, fwd / fwd+bwd (median); floor = max(HBM bytes / copy bandwidth, window FLOPs / matmul peak)")
    print("dense_nomask is NOT the same function (global attention, no window): an upper bound only;"
          f" unfold is timed over at most {UNFOLD_MAX_REPS} reps\n")
    print("| dtype | grid | B | H | floor | " + " | ".join(names) + " |")
    print("|---" * (5 + len(names)) + "|")
    for key in keys:
        any_row = next(r for r in rows if (r["dtype"], r["grid"], r["B"], r["H"]) == key)
        floor = ("-" if any_row.get("floor_fwd_ms") is None
                 else f"{any_row['floor_fwd_ms']:.3f} / {any_row['floor_fwd_bwd_ms']:.3f}")
        cells = [_fmt(by.get(key + (n,))) for n in names]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {floor} | " + " | ".join(cells) + " |")
    print("\npeak extra MiB (fwd+bwd) / max rel err of out, dq, dk, dv vs fp32 unfold / "
          "first call s (compile, mask or bias build):\n")
    print("| dtype | grid | B | H | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for key in keys:
        cells = []
        for n in names:
            r = by.get(key + (n,))
            if r is None:
                cells.append("-")
                continue
            mib = f"{r['peak_extra_mib']:.0f}" if "peak_extra_mib" in r else "-"
            err = f"{r['err']:.1e}" if "err" in r else "-"
            first_s = f"{r['first_call_s']:.1f}" if "first_call_s" in r else "-"
            cell = f"{mib} / {err} / {first_s}"
            if "skip" in r:
                cell += f" ({r['skip'][:60]})"
            cells.append(cell)
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + " |")
    sparsity = {(r["grid"]): r["flex_sparsity_pct"] for r in rows if "flex_sparsity_pct" in r}
    if sparsity:
        print("\nflex BlockMask sparsity (% of 128x128 tiles skipped): "
              + ", ".join(f"{g} {s:.1f}%" for g, s in sparsity.items()))


def parse_window(spec: str) -> tuple[int, int]:
    """'K:DILATION' (or 'K' for dilation 1) -> (k, dilation), k odd and positive."""
    try:
        parts = [int(x) for x in spec.split(":")]
        k, dil = parts[0], (parts[1] if len(parts) > 1 else 1)
    except (ValueError, IndexError):
        raise SystemExit(f"--windows: expected K:DILATION such as 7:1, got {spec!r}") from None
    if k < 1 or k % 2 == 0 or dil < 1:
        raise SystemExit(f"--windows: expected an odd positive window size and dilation >= 1, got {spec!r}")
    return k, dil


def _kernel_tuning_keys() -> set:
    if not triton_available():
        return set()
    from maskar.kernels.neighborhood import tuning_log

    return set(tuning_log())


def _kernel_tuning_since(before: set) -> dict:
    """The kernel's autotuning done in this row's first call: chosen configs, seconds, candidate ms."""
    from maskar.kernels.neighborhood import tuning_log

    out: dict = {}
    for key, entry in tuning_log().items():
        if key in before:
            continue
        phase = key[0]
        out[f"tuned_{phase}"] = _cfg_str(entry["chosen"])
        out[f"tune_{phase}_s"] = entry["seconds"]
        out[f"tune_{phase}_candidates"] = [
            f"{_cfg_str(c)}: {t:.4f} ms" if isinstance(t, float) else f"{_cfg_str(c)}: {t}"
            for c, t in entry["candidates"]]
    return out


def _cfg_str(c) -> str:
    """NaConfig -> 'TH x TW tile, BLOCK_N, warps / stages', '/fd' for a backward that recomputes
    delta in its programs (without it, the time includes the separate delta launch), '/whole'
    for the one-program-per-sub-grid backward, '/split' for the two launches (dQ writing delta,
    then dK / dV)."""
    fused = "/fd" if getattr(c, "fused_delta", False) else ""
    whole = "/whole" if getattr(c, "whole", False) else ""
    split = "/split" if getattr(c, "split", False) else ""
    return f"{c.th}x{c.tw}/n{c.block_n}/w{c.num_warps}/s{c.num_stages}{fused}{whole}{split}"


def _ms_cell(row: dict | None, key: str) -> str:
    return "-" if row is None or key not in row else f"{row[key]:.3f}"


def _graph_cells(t: dict | None, by: dict, key: tuple) -> str:
    """'triton / best exact peer (name) / dense' fwd+bwd ms, each replayed from a CUDA graph."""
    peers = {m: by[key + (m,)]["fwd_bwd_graph_ms"] for m in ("sdpa_bias", "flex")
             if "fwd_bwd_graph_ms" in by.get(key + (m,), {})}
    best = min(peers.items(), key=lambda kv: kv[1]) if peers else None
    dense = by.get(key + ("dense_nomask",), {}).get("fwd_bwd_graph_ms")
    return " / ".join([_ms_cell(t, "fwd_bwd_graph_ms"), "-" if best is None else f"{best[1]:.3f} ({best[0]})",
                       "-" if dense is None else f"{dense:.3f}"])


def print_summary(rows: list[dict]) -> None:
    """The kernel against the best exact peer, dense attention over the whole grid, the floor
    and issue 16's targets, one line per case."""
    by = {(r["dtype"], r["grid"], r["B"], r["kernel"], r["dilation"], r["method"]): r for r in rows}
    keys = list(dict.fromkeys((r["dtype"], r["grid"], r["B"], r["kernel"], r["dilation"]) for r in rows))
    print("\nSUMMARY: fwd+bwd ms (median); speed-up = best exact peer (sdpa_bias, flex) / triton; "
          "dense_nomask is NOT the same function\n")
    print("| dtype | grid | B | k | dil | floor | triton | its GPU kernels | triton after profiling "
          "| best exact peer | speed-up | dense_nomask (≠) | target | graph replay: triton / best exact "
          "peer / dense_nomask (≠) | target, graph replay | kernel tiles fwd / bwd |")
    print("|---" * 16 + "|")

    def ms(r):
        return r.get("fwd_bwd_ms") if r and "skip" not in r else None

    for key in keys:
        t = by.get(key + ("triton",))
        peers = {m: ms(by.get(key + (m,))) for m in ("sdpa_bias", "flex")}
        peers = {m: v for m, v in peers.items() if v is not None}
        best = min(peers.items(), key=lambda kv: kv[1]) if peers else None
        dense = ms(by.get(key + ("dense_nomask",)))
        tk = ms(t)
        any_row = next(r for r in rows if (r["dtype"], r["grid"], r["B"], r["kernel"], r["dilation"]) == key)
        floor = any_row.get("floor_fwd_bwd_ms")
        target = TARGETS_MS.get((key[1], key[2], key[3], key[4])) if key[0] == "bf16" else None
        cells = [
            "-" if floor is None else f"{floor:.3f}",
            "fail" if t is not None and tk is None else ("-" if tk is None else f"{tk:.3f}"),
            _ms_cell(t, "fwd_bwd_kernel_ms"),
            _ms_cell(t, "fwd_bwd_ms_after_profile"),
            "-" if best is None else f"{best[1]:.3f} ({best[0]})",
            "-" if best is None or tk is None else f"{best[1] / tk:.1f}x",
            "-" if dense is None else f"{dense:.3f}",
            "-" if target is None else f"<= {target:.2f}: " + ("MET" if tk and tk <= target else "missed"),
            _graph_cells(t, by, key),
            "-" if target is None or not t or "fwd_bwd_graph_ms" not in t
            else f"<= {target:.2f}: " + ("MET" if t["fwd_bwd_graph_ms"] <= target else "missed"),
            "-" if t is None else f"{t.get('tuned_fwd', '?')} / {t.get('tuned_bwd', '?')}",
        ]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | " + " | ".join(cells) + " |")
    tuned = [r for r in rows if r["method"] == "triton" and ("tune_fwd_s" in r or "tune_bwd_s" in r)]
    if tuned:
        print("\nkernel autotuning (first call of a new key: compiles on first use of a config, then times "
              "each candidate; first_call_s includes it):")
        for r in tuned:
            for phase in ("fwd", "bwd"):
                if f"tune_{phase}_s" in r:
                    case = f"{r['dtype']} {r['grid']} B {r['B']} k {r['kernel']} dil {r['dilation']}"
                    print(f"  {case} {phase}: {r[f'tuned_{phase}']} in {r[f'tune_{phase}_s']:.1f} s; "
                          + ", ".join(r[f"tune_{phase}_candidates"]))


def parse_case(case: str) -> tuple[tuple[int, int], int, int]:
    """'HxW:B:H' (or 'S:B:H' for a square grid) -> ((h, w), batch, heads)."""
    try:
        grid_s, b, h = case.split(":")
        sides = [int(s) for s in grid_s.lower().split("x")]
        grid = (sides[0], sides[-1])
        return grid, int(b), int(h)
    except ValueError:
        raise SystemExit(f"--cases: expected GRIDxGRID:B:H such as 16x16:64:16, got {case!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (tests parse documented commands with it)."""
    ap = argparse.ArgumentParser(
        prog="maskar bench psa", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a smoke run (fp32, tiny cases, flex forward only, eager)")
    ap.add_argument("--dtypes", default=None, help="some of fp16,bf16,fp32 (default bf16,fp16; cpu fp32)")
    ap.add_argument("--cases", default=None,
                    help=f"GRID:B:H,... (default {DEFAULT_CASES}; cpu {CPU_CASES})")
    ap.add_argument("--methods", default=None,
                    help=f"default {DEFAULT_METHODS} (cpu: without triton unless TRITON_INTERPRET=1)")
    ap.add_argument("--windows", default=DEFAULT_WINDOWS,
                    help="K:DILATION,... window sizes k (odd) and dilations")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--scale", type=float, default=None, help="softmax scale (default D**-0.5)")
    ap.add_argument("--reps", type=int, default=100)  # the protocol: median of >= 100 runs
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write all rows to this file")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("benchmarks/psa.py: needs a CUDA GPU (or --device cpu for a smoke run)", file=sys.stderr)
        return 2
    windows = [parse_window(w) for w in args.windows.split(",")]
    dtypes = (args.dtypes or ("bf16" if cuda else "fp32")).split(",")
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r}; expected some of {','.join(DTYPES)}")
    cases = [parse_case(c) for c in (args.cases or (DEFAULT_CASES if cuda else CPU_CASES)).split(",")]
    if cuda:
        # each (shape, BlockMask) is one Dynamo compile of flex_attention: allow all of them,
        # otherwise Dynamo silently falls back to the unfused path and flex is mis-timed
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)

    print("command: python benchmarks/psa.py " + " ".join(sys.argv[1:] if argv is None else argv), flush=True)
    if cuda:
        import triton

        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
              f"CUDA {torch.version.cuda}", flush=True)
        gbs = measure_hbm_gbs()
        tflops = {dt: measure_matmul_tflops(DTYPES[dt]) for dt in dict.fromkeys(dtypes)}
        print(f"measured: HBM copy {gbs:.0f} GB/s (read+write); 8192^3 matmul "
              + ", ".join(f"{dt} {tf:.0f} TFLOP/s" for dt, tf in tflops.items()), flush=True)
    else:
        gbs, tflops = 0.0, {}
        print(f"CPU smoke run: torch {torch.__version__}, {torch.get_num_threads()} threads; "
              "flex runs eager and forward only (no flex backward on the CPU)", flush=True)
    default_methods = DEFAULT_METHODS
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        default_methods = default_methods.replace("triton,", "")  # the kernel needs CUDA or the interpreter
    fns = methods((args.methods or default_methods).split(","), compile_flex=cuda)
    D = args.head_dim
    rows = []
    probes: list = []  # the kernel rows' calls, profiled after every row is timed
    t_start = time.perf_counter()
    for kernel, dilation in windows:
        for dname in dtypes:
            dtype = DTYPES[dname]
            for grid, B, H in cases:
                p = Problem(grid, kernel, dilation, args.scale)
                fl = floors_ms(p, B, H, D, dtype.itemsize, gbs, tflops[dname]) if cuda else (None, None)
                for name, fn in fns.items():
                    print(f"  [{time.perf_counter() - t_start:6.1f} s] {name} {dname} {grid[0]}x{grid[1]} "
                          f"B {B} H {H} k {kernel} dilation {dilation} ...", flush=True)
                    torch.manual_seed(0)
                    tuned_before = _kernel_tuning_keys() if name == "triton" else set()
                    r = bench_case(name, fn, p, B, H, D, dtype, args.reps, args.warmup, args.device,
                                   probes=probes)
                    if name == "triton":
                        r |= _kernel_tuning_since(tuned_before)
                    r |= {"dtype": dname, "grid": f"{grid[0]}x{grid[1]}", "B": B, "H": H, "D": D,
                          "kernel": p.kernel, "dilation": p.dilation,
                          "floor_fwd_ms": fl[0], "floor_fwd_bwd_ms": fl[1]}
                    rows.append(r)
                    print(f"  [{time.perf_counter() - t_start:6.1f} s] " + json.dumps(r), flush=True)
                    if cuda:
                        torch.cuda.empty_cache()
    if probes:
        print(f"  [{time.perf_counter() - t_start:6.1f} s] kernel time of the {len(probes)} kernel rows "
              "(torch.profiler), then their fwd+bwd timed again", flush=True)
        kernel_time_probes(probes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for window in windows:
        print_tables([r for r in rows if (r["kernel"], r["dilation"]) == window], list(fns))
    print_summary(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
