"""Probe of Triton's Hopper warp specialisation on FlashAttention loops (a measured negative result).

Span kernels: attention over a tile of rows that all see one contiguous key range (or keys
seen by one query range), the loop a plain FlashAttention loop over (B, H, L, D) TMA
tensor-descriptor loads, optionally marked ``tl.range(..., warp_specialize=True)``, which
Triton 3.6 routes to its Hopper automatic warp specialisation (one TMA producer warp group,
two consumer groups). Run on one dense scale (L 1024, B 8, H 16, D 64, fp16), each config
is checked against fp32 SDPA and timed (back-to-back launches, GPU time); ``cur_dkdv`` /
``cur_dq`` time the library kernel's dK/dV or dQ launch alone with the given block sizes.

    python benchmarks/attention_span_probe.py fwd 128 64 4 2 1          # phase bm bn warps stages ws
    python benchmarks/attention_span_probe.py --isolate "fwd 128 64 4 2 1" "dq 64 64 4 2 0"

``--isolate`` runs each config in its own process under a timeout, since a warp-specialised
kernel that deadlocks never returns. H100 results (docs/benchmarks.md,
docs/results/span_ws_probe_h100_2026-11-22*.txt): with warp specialisation most configs
deadlock, one gives NaN and the ones that run are about 2x slower; without it the span
kernels match the library kernel (forward) or trail it (backward), so they are not used.
Rows past a span's end are loaded (zeros past L) but neutralised: key columns past it get
-inf scores (forward) or p = 0 (dQ); query rows past it get lse = +inf, so p = 0 (dK/dV).
"""

from __future__ import annotations

import subprocess
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import maskar.kernels.block_sparse as bs

# The kernels below are kept exactly as measured (their per-item prologues repeat on purpose:
# whether the warp-specialisation pass deadlocks depends on the IR it is given).


@triton.jit
def _rows(desc, b, h, start):
    """Rows [start, start + block) of head (b, h) through a (B, H, L, D) descriptor, as (block, D);
    rows past L read as zeros."""
    blk = desc.load([b, h, start, 0])
    return blk.reshape(blk.shape[2], blk.shape[3])


@triton.jit
def _span_fwd(
    QD, KD, VD, O, LSE, ITEMS, H, L, N_ITEMS, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WS: tl.constexpr,
):
    # ITEMS (4, N_ITEMS) int32: rows [m0, m_stop) see keys [lo, hi)
    it = tl.program_id(0)
    bh = tl.program_id(1)
    m0 = tl.load(ITEMS + it)
    m_stop = tl.load(ITEMS + N_ITEMS + it)
    lo = tl.load(ITEMS + 2 * N_ITEMS + it)
    hi = tl.load(ITEMS + 3 * N_ITEMS + it)
    b = bh // H
    h = bh % H
    row0 = b * L
    q = _rows(QD, b, h, m0)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0  # times alpha = exp2(-inf) = 0 at the first tile
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        k = _rows(KD, b, h, start_n).T
        s = tl.dot(q, k)
        s = tl.where((start_n + offs_n)[None, :] < hi, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _rows(VD, b, h, start_n)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < m_stop
    o_ptrs = O + ((row0 + offs_m[:, None]) * H + h).to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, m_i + tl.log2(l_i), mask=ok)


@triton.jit
def _span_dkdv(
    QD, KD, VD, DOD, LSE, DELTA, DK, DV, ITEMS, H, L, N_ITEMS, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WS: tl.constexpr,
):
    # ITEMS (4, N_ITEMS) int32: keys [n0, n_stop) are seen by queries [lo, hi)
    it = tl.program_id(0)
    bh = tl.program_id(1)
    n0 = tl.load(ITEMS + it)
    n_stop = tl.load(ITEMS + N_ITEMS + it)
    lo = tl.load(ITEMS + 2 * N_ITEMS + it)
    hi = tl.load(ITEMS + 3 * N_ITEMS + it)
    b = bh // H
    h = bh % H
    row0 = b * L
    k = _rows(KD, b, h, n0)
    v = _rows(VD, b, h, n0)
    lse_base = LSE + bh.to(tl.int64) * L
    delta_base = DELTA + bh.to(tl.int64) * L
    offs_m0 = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=WS):
        offs_m = start_m + offs_m0
        q = _rows(QD, b, h, start_m)
        # rows past the span: lse = +inf makes their probabilities exactly 0
        lse = tl.load(lse_base + offs_m, mask=offs_m < hi, other=float("inf"))
        s_t = tl.dot(k, q.T)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        do = _rows(DOD, b, h, start_m)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        delta = tl.load(delta_base + offs_m, mask=offs_m < hi, other=0.0)
        dp_t = tl.dot(v, do.T)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_n < n_stop)[:, None]
    g = ((row0 + offs_n[:, None]) * H + h).to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + g, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + g, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _span_dq(
    QD, KD, VD, DOD, LSE, DELTA, DQ, ITEMS, H, L, N_ITEMS, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, WS: tl.constexpr,
):
    # ITEMS (4, N_ITEMS) int32: queries [m0, m_stop) see keys [lo, hi)
    it = tl.program_id(0)
    bh = tl.program_id(1)
    m0 = tl.load(ITEMS + it)
    m_stop = tl.load(ITEMS + N_ITEMS + it)
    lo = tl.load(ITEMS + 2 * N_ITEMS + it)
    hi = tl.load(ITEMS + 3 * N_ITEMS + it)
    b = bh // H
    h = bh % H
    row0 = b * L
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = _rows(QD, b, h, m0)
    do = _rows(DOD, b, h, m0)
    lse = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=offs_m < m_stop, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=offs_m < m_stop, other=0.0)
    offs_n = tl.arange(0, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        k = _rows(KD, b, h, start_n)
        s = tl.dot(q, k.T)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        p = tl.where((start_n + offs_n)[None, :] < hi, p, 0.0)
        v = _rows(VD, b, h, start_n)
        dp = tl.dot(do, v.T)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    offs_d = tl.arange(0, HEAD_DIM)
    g = ((row0 + offs_m[:, None]) * H + h).to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + g, (dq * sm_scale).to(DQ.dtype.element_ty), mask=(offs_m < m_stop)[:, None])


D = 64


def _desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """(B, H, L, D) descriptor of a strided view, blocks of ``rows`` rows of one head."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, D])


def _report(name: str, err: float, ms: float, matmuls: int, L: int, B: int, H: int) -> None:
    tflops = 2 * B * H * L * L * D * matmuls / ms / 1e9
    print(f"{name} L={L} B={B} H={H}: err {err:.2e}  {ms:.4f} ms  {tflops:.0f} TFLOP/s ({matmuls} matmuls)",
          flush=True)


def main(argv: list[str]) -> None:
    phase = argv[0]
    bm, bn, w, s, ws = (int(x) for x in argv[1:6])
    L, B, H = (int(x) for x in (argv[6:9] if len(argv) > 6 else (1024, 8, 16)))
    ws = bool(ws)
    qkv = torch.randn(B, L, 3, H, D, device="cuda", dtype=torch.float16)  # the models' layout
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    do = torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
    scale = D**-0.5
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    o_ref = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, scale=scale)
    o_ref.backward(do.float())
    if phase.startswith("cur"):
        return _library_part(phase, bm, bn, w, s, q, k, v, do, qf, kf, scale)
    lse_ref = (torch.logsumexp((qf @ kf.transpose(-1, -2)) * scale, -1) * bs.LOG2E).reshape(B * H, L).detach()
    delta = (o_ref.detach() * do.float()).sum(-1).reshape(B * H, L).contiguous()
    out = torch.zeros(B, L, H, D, device="cuda", dtype=torch.float16)  # (B, L, H, D) as the library writes
    out2 = torch.zeros_like(out)
    lse = torch.zeros(B * H, L, device="cuda")
    tile = bn if phase == "dkdv" else bm
    items = torch.tensor([(t, min(t + tile, L), 0, L) for t in range(0, L, tile)], dtype=torch.int32)
    items = items.t().contiguous().cuda()  # (4, n): one dense span
    n = items.shape[1]
    opts = dict(BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, WS=ws, num_warps=w, num_stages=s)
    descs = (_desc(q, bm), _desc(k, bn), _desc(v, bn))
    if phase == "fwd":
        def launch():
            _span_fwd[(n, B * H)](*descs, out, lse, items, H, L, n, scale * bs.LOG2E, **opts)
        ref, matmuls = o_ref, 2
    elif phase == "dkdv":
        def launch():
            _span_dkdv[(n, B * H)](*descs, _desc(do, bm), lse_ref, delta, out, out2, items, H, L, n,
                                   scale * bs.LOG2E, scale, **opts)
        ref, matmuls = kf.grad, 4
    else:
        def launch():
            _span_dq[(n, B * H)](*descs, _desc(do, bm), lse_ref, delta, out, items, H, L, n,
                                 scale * bs.LOG2E, scale, **opts)
        ref, matmuls = qf.grad, 3
    launch()
    torch.cuda.synchronize()
    err = ((out.permute(0, 2, 1, 3).float() - ref).norm() / ref.norm()).item()
    ms = bs._time_ms(launch, rounds=7, per_round=10)
    _report(f"{phase} bm={bm} bn={bn} w={w} s={s} ws={int(ws)}", err, ms, matmuls, L, B, H)


def _library_part(phase, bm, bn, w, s, q, k, v, do, qf, kf, scale) -> None:
    """The library kernel's dK/dV (PART 1) or dQ (PART 2) launch alone, with the given block sizes."""
    from maskar.nn.attention import ScalePattern

    B, H, L, _ = q.shape
    pattern = ScalePattern("block_diagonal", (L,))  # one scale: dense
    bnd = bs._bounds(pattern, "cuda")
    o = bs._blhd_empty(B, H, L, D, q)
    lse = torch.empty(B * H, L, device="cuda")
    bs._launch_fwd(q, k, v, o, lse, bnd, scale * bs.LOG2E, pattern, bs._fwd_candidates(D)[0])
    dq, dk, dv = bs._grads_empty(B, H, L, D, q)
    if phase == "cur_dkdv":
        cfg, part, ref, got = bs.BwdConfig(bm, bn, 64, 32, w, s, True, 4), 1, kf.grad, dk
    else:
        cfg, part, ref, got = bs.BwdConfig(32, 64, bm, bn, 4, s, True, w), 2, qf.grad, dq
    launches = ((part, bs._bwd_table(pattern, cfg, part, "cuda"), w),)

    def launch():
        bs._launch_bwd(q, k, v, o, do, dq, dk, dv, lse, bnd, scale * bs.LOG2E, scale, pattern, cfg, launches)
    launch()
    torch.cuda.synchronize()
    err = ((got.float() - ref).norm() / ref.norm()).item()
    ms = bs._time_ms(launch, rounds=7, per_round=10)
    _report(f"{phase} b_m={bm} b_n={bn} w={w} s={s}", err, ms, 4 if part == 1 else 3, L, B, H)


def isolate(configs: list[str], timeout_s: int = 40) -> None:
    for c in configs:
        try:
            r = subprocess.run([sys.executable, __file__, *c.split()], capture_output=True, text=True,
                               timeout=timeout_s)
            lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln and not ln.startswith(" ")]
            print(lines[-1] if lines else f"{c}: no output (rc {r.returncode})", flush=True)
        except subprocess.TimeoutExpired:
            print(f"{c}: TIMEOUT after {timeout_s} s (kernel did not return)", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--isolate"]:
        isolate(sys.argv[2:])
    else:
        main(sys.argv[1:])
