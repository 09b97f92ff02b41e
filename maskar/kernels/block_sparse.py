"""Fused block-sparse attention (Triton) for scale-structured masks, forward and backward.

The mask is given by per-token bounds, never materialised: query row ``i`` may attend
to keys ``kv_start[i] <= j < kv_end[i]`` and, transposed, key ``j`` is seen by queries
``q_start[j] <= i < q_end[j]``. For a ``ScalePattern`` these are

- block-diagonal (HMAR): kv = [start, end) of i's scale; q = [start, end) of j's scale;
- block-causal (VAR):    kv = [0, end of i's scale);   q = [start of j's scale, L).

Work is a table of tiles: each program takes one tile of rows (at most BLOCK_M) and walks
only the key (or query) tiles inside the union of its rows' bounds, split into three
loops: a leading masked part (rows whose bounds start later), an unmasked middle that
every row may see whole (no mask arithmetic), and a trailing masked part. Tiles outside
the bounds are never loaded; that is where the speed-up over a dense masked kernel comes
from. The tiles are aligned to scales (a big scale is cut from its first token, small
consecutive scales share a tile), so few tiles mix scales and the walks stay tight, and
the table is sorted costliest first. Because the bounds encode the pattern, one compiled
kernel serves both patterns and every schedule.

Layout: q, k, v are (B, H, L, D) strided views (typically of a fused (B, L, 3, H, D)
qkv); the kernels take their strides, so nothing is transposed or copied. The output
and the gradients are written (B, L, H, D) and returned as (B, H, L, D) views, so
``out.transpose(1, 2).reshape(B, L, H * D)`` in the model is free.

Numerics: fp16 / bf16 operands, fp32 accumulation, softmax in base 2 with the scale
folded into one multiply; the log-sum-exp (base 2) is saved for the backward pass,
which recomputes P tile by tile (FlashAttention-2 scheme). dK/dV programs (one per key
tile) and dQ programs (one per query tile) run in the same launch; dQ needs no atomics,
so results are deterministic.

Block sizes are chosen per (L, head dim, dtype, pattern, batch*heads class) by timing a
few candidate configs once (kernels compile per config and dtype / head dim only, so
new batch sizes, head counts or schedules never recompile).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.tuning import pick_fastest
from maskar.kernels.tuning import time_ms as _time_ms
from maskar.nn.attention import ScalePattern, register_backend

try:  # launch hooks (profilers) live here in Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover
    _knobs = None

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    # DOT_F32 is only set under TRITON_INTERPRET for bf16: the CPU interpreter multiplies
    # bf16 operands as raw integers, so there the operands are upcast first
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _walk(BND, lo_row, hi_row, idx, stop, STEP: tl.constexpr):
    """Bounds of the rows (or columns) idx, clamped to < stop, read from BND rows lo_row / hi_row,
    and the three-loop split of the walk over them in steps of STEP: (lo_b, hi_b, lo, end1,
    end2, hi) with [lo, end1) and [end2, hi) masked and [end1, end2) seen whole by every row."""
    pos = tl.minimum(idx, stop - 1)  # padding rows copy the last row's bounds
    lo_b = tl.load(BND + lo_row + pos)
    hi_b = tl.load(BND + hi_row + pos)
    lo = tl.min(lo_b, 0)
    end1 = lo + tl.cdiv(tl.max(lo_b, 0) - lo, STEP) * STEP
    end2 = end1 + (tl.maximum(tl.min(hi_b, 0) - end1, 0) // STEP) * STEP
    return lo_b, hi_b, lo, end1, end2, tl.max(hi_b, 0)


@triton.jit
def _kv_scores(
    q, k_base, v_base, skl, svl, ks, ke, start_n, L, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_F32: tl.constexpr,
):
    """K and V rows [start_n, start_n + BLOCK_N) (zeros past L) and the scores of q against
    them, (BM, BN) in log2 units, -inf outside each row's [ks, ke) when MASKED."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        in_seq = offs_n < L
        k = tl.load(k_base + offs_n[:, None] * skl + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :], mask=in_seq[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * skl + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :])
    s = _dot(q, tl.trans(k), DOT_F32) * qk_scale
    if MASKED:
        ok = (offs_n[None, :] >= ks[:, None]) & (offs_n[None, :] < ke[:, None])
        s = tl.where(ok, s, float("-inf"))
    return k, v, s


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_base, v_base, skl, svl, ks, ke, n_lo, n_hi, L, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_F32: tl.constexpr,
):
    for start_n in range(n_lo, n_hi, BLOCK_N):
        k, v, s = _kv_scores(q, k_base, v_base, skl, svl, ks, ke, start_n, L, qk_scale,
                             BLOCK_N, HEAD_DIM, MASKED, DOT_F32)
        # m_i starts at -1e30 (finite), so a row with no allowed key in this tile keeps
        # m_i and gets p = exp2(-inf) = 0 instead of NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _program_ids(BH_FAST: tl.constexpr):
    """(work item, batch*head) of this program: the grid is (items, B*H) or, with BH_FAST, (B*H, items)."""
    if BH_FAST:
        return tl.program_id(1), tl.program_id(0)
    else:
        return tl.program_id(0), tl.program_id(1)


@triton.jit
def _bwd_bases(bh, H, L, Q, K, V, DO, LSE, DELTA, sqb, sqh, skb, skh, svb, svh, sdob, sdoh,
               HEAD_DIM: tl.constexpr):
    """Per batch*head of a backward program: the q, k, v, dO, lse and delta bases, and where its
    gradient rows start and their stride (gradients and O are written (B, L, H, D) contiguous)."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g_off = (b * L * H + h) * HEAD_DIM
    return (Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh, DO + b * sdob + h * sdoh,
            LSE + bh.to(tl.int64) * L, DELTA + bh.to(tl.int64) * L, g_off, H * HEAD_DIM)


@triton.jit(do_not_specialize=["H", "L", "N_ITEMS"])  # new head counts / schedules reuse the binary
def _attn_fwd(
    Q, K, V, O, LSE, BND, ITEMS,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
    H, L, N_ITEMS, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BH_FAST: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    # ITEMS (2, N_ITEMS) int32: the rows [start, stop) of each program, at most BLOCK_M,
    # costliest first (see ``_row_items``)
    it, bh = _program_ids(BH_FAST)
    m0 = tl.load(ITEMS + it)
    m_stop = tl.load(ITEMS + N_ITEMS + it)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < m_stop
    ks, ke, lo, end1, end2, hi = _walk(BND, 0, L, offs_m, m_stop, BLOCK_N)

    q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skl, svl, ks, ke, lo, end1, L, qk_scale,
                               BLOCK_N, HEAD_DIM, True, DOT_F32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skl, svl, ks, ke, end1, end2, L, qk_scale,
                               BLOCK_N, HEAD_DIM, False, DOT_F32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, skl, svl, ks, ke, end2, hi, L, qk_scale,
                               BLOCK_N, HEAD_DIM, True, DOT_F32)
    acc = acc / l_i[:, None]
    # O is written (B, L, H, D) contiguous
    o_ptrs = O + (b * L * H + h) * HEAD_DIM + offs_m[:, None] * (H * HEAD_DIM) + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["H", "L"])  # new head counts / schedules reuse the binary
def _bwd_delta(
    O, DO, DELTA, sdob, sdoh, sdol, H, L,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """delta[i] = sum_d O[i, d] * dO[i, d] (fp32): the softmax-backward row term."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < L
    o = tl.load(O + (b * L * H + h) * HEAD_DIM + offs_m[:, None] * (H * HEAD_DIM) + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :],
                 mask=ok[:, None], other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_base, do_base, o_base, lse_base, delta_base, sql, sdol, sol, qs, qe, m_lo, m_hi, L,
    qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
    FUSED_DELTA: tl.constexpr, DOT_F32: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(m_lo, m_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if MASKED:
            in_seq = offs_m < L
            q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :], mask=in_seq[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sdol + offs_d[None, :], mask=in_seq[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=in_seq, other=0.0)
            if FUSED_DELTA:
                o = tl.load(o_base + offs_m[:, None] * sol + offs_d[None, :], mask=in_seq[:, None], other=0.0)
                delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            else:
                delta = tl.load(delta_base + offs_m, mask=in_seq, other=0.0)
        else:
            q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * sdol + offs_d[None, :])
            lse = tl.load(lse_base + offs_m)
            if FUSED_DELTA:
                o = tl.load(o_base + offs_m[:, None] * sol + offs_d[None, :])
                delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            else:
                delta = tl.load(delta_base + offs_m)
        s_t = _dot(k, tl.trans(q), DOT_F32) * qk_scale  # (BN, BM): S transposed, log2 units
        if MASKED:
            ok = (offs_m[None, :] >= qs[:, None]) & (offs_m[None, :] < qe[:, None])
            s_t = tl.where(ok, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += _dot(p_t.to(do.dtype), do, DOT_F32)
        dp_t = _dot(v, tl.trans(do), DOT_F32)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, DOT_F32)
    return dk, dv


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, k_base, v_base, skl, svl, ks, ke, n_lo, n_hi, L, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_F32: tl.constexpr,
):
    for start_n in range(n_lo, n_hi, BLOCK_N):
        k, v, s = _kv_scores(q, k_base, v_base, skl, svl, ks, ke, start_n, L, qk_scale,
                             BLOCK_N, HEAD_DIM, MASKED, DOT_F32)
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), DOT_F32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_F32)
    return dq


@triton.jit
def _dkdv_program(
    n0, n_stop, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DK, DV, BND,
    sql, skl, svl, sdol, g_off, g_row, L, qk_scale, sm_scale,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, HEAD_DIM: tl.constexpr,
    FUSED_DELTA: tl.constexpr, DOT_F32: tl.constexpr,
):
    """dK, dV of keys [n0, min(n0 + BLOCK_N1, n_stop)), walking the query tiles that see them."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = n0 + tl.arange(0, BLOCK_N1)
    col_ok = offs_n < n_stop
    qs, qe, lo, end1, end2, hi = _walk(BND, 2 * L, 3 * L, offs_n, n_stop, BLOCK_M1)
    k = tl.load(k_base + offs_n[:, None] * skl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svl + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, HEAD_DIM], dtype=tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, o_base, lse_base, delta_base, sql, sdol, g_row,
                         qs, qe, lo, end1, L, qk_scale, BLOCK_M1, BLOCK_N1, HEAD_DIM,
                         True, FUSED_DELTA, DOT_F32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, o_base, lse_base, delta_base, sql, sdol, g_row,
                         qs, qe, end1, end2, L, qk_scale, BLOCK_M1, BLOCK_N1, HEAD_DIM,
                         False, FUSED_DELTA, DOT_F32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, o_base, lse_base, delta_base, sql, sdol, g_row,
                         qs, qe, end2, hi, L, qk_scale, BLOCK_M1, BLOCK_N1, HEAD_DIM,
                         True, FUSED_DELTA, DOT_F32)
    g_ptrs = g_off + offs_n[:, None] * g_row + offs_d[None, :]
    tl.store(DK + g_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + g_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_program(
    m0, m_stop, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DQ, BND,
    sql, skl, svl, sdol, g_off, g_row, L, qk_scale, sm_scale,
    BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, HEAD_DIM: tl.constexpr,
    FUSED_DELTA: tl.constexpr, DOT_F32: tl.constexpr,
):
    """dQ of queries [m0, min(m0 + BLOCK_M2, m_stop)), walking their key tiles."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = m0 + tl.arange(0, BLOCK_M2)
    row_ok = offs_m < m_stop
    ks, ke, lo, end1, end2, hi = _walk(BND, 0, L, offs_m, m_stop, BLOCK_N2)
    q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdol + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
    if FUSED_DELTA:
        o = tl.load(o_base + offs_m[:, None] * g_row + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    else:
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M2, HEAD_DIM], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skl, svl, ks, ke, lo, end1, L, qk_scale,
                   BLOCK_N2, HEAD_DIM, True, DOT_F32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skl, svl, ks, ke, end1, end2, L, qk_scale,
                   BLOCK_N2, HEAD_DIM, False, DOT_F32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, skl, svl, ks, ke, end2, hi, L, qk_scale,
                   BLOCK_N2, HEAD_DIM, True, DOT_F32)
    g_ptrs = g_off + offs_m[:, None] * g_row + offs_d[None, :]
    tl.store(DQ + g_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["H", "L", "N_ITEMS"])  # new head counts / schedules reuse the binary
def _attn_bwd(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, BND, ITEMS,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
    H, L, N_ITEMS, qk_scale, sm_scale,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    HEAD_DIM: tl.constexpr, FUSED_DELTA: tl.constexpr, PART: tl.constexpr, BH_FAST: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """ITEMS (3, N_ITEMS) int32: kind, start, stop, costliest first. Kind 1: dK, dV of the
    keys [start, stop) (at most BLOCK_N1); kind 2: dQ of the queries [start, stop) (at most
    BLOCK_M2). PART 0 compiles both kinds (one launch); PART 1 only dK/dV, PART 2 only dQ
    (two launches, each compiled and tuned for its own register budget).

    With FUSED_DELTA the row term delta = rowsum(O * dO) is recomputed from O tiles (cached
    in L2) instead of being read from a buffer filled by a separate launch.
    """
    it, bh = _program_ids(BH_FAST)
    kind = tl.load(ITEMS + it)
    n0 = tl.load(ITEMS + N_ITEMS + it)
    n_stop = tl.load(ITEMS + 2 * N_ITEMS + it)
    q_base, k_base, v_base, do_base, lse_base, delta_base, g_off, g_row = _bwd_bases(
        bh, H, L, Q, K, V, DO, LSE, DELTA, sqb, sqh, skb, skh, svb, svh, sdob, sdoh, HEAD_DIM)
    o_base = O + g_off  # O has the same (B, L, H, D) layout as the gradients
    if PART == 1:
        _dkdv_program(n0, n_stop, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DK, DV, BND,
                      sql, skl, svl, sdol, g_off, g_row, L, qk_scale, sm_scale,
                      BLOCK_M1, BLOCK_N1, HEAD_DIM, FUSED_DELTA, DOT_F32)
    elif PART == 2:
        _dq_program(n0, n_stop, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DQ, BND,
                    sql, skl, svl, sdol, g_off, g_row, L, qk_scale, sm_scale,
                    BLOCK_M2, BLOCK_N2, HEAD_DIM, FUSED_DELTA, DOT_F32)
    else:
        if kind == 1:
            _dkdv_program(n0, n_stop, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DK, DV,
                          BND, sql, skl, svl, sdol, g_off, g_row, L, qk_scale, sm_scale,
                          BLOCK_M1, BLOCK_N1, HEAD_DIM, FUSED_DELTA, DOT_F32)
        else:
            _dq_program(n0, n_stop, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DQ, BND,
                        sql, skl, svl, sdol, g_off, g_row, L, qk_scale, sm_scale,
                        BLOCK_M2, BLOCK_N2, HEAD_DIM, FUSED_DELTA, DOT_F32)


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # row tiles start at scale boundaries, consecutive small scales share one tile (see
    # ``_tile_spans``); False: uniform tiles from row 0
    aligned: bool = True
    bh_fast: bool = False  # grid (B*H, items) instead of (items, B*H): programs of one head spread out


@dataclass(frozen=True)
class BwdConfig:
    block_m1: int  # query step inside a dK/dV program
    block_n1: int  # keys per dK/dV program
    block_m2: int  # queries per dQ program
    block_n2: int  # key step inside a dQ program
    num_warps: int
    num_stages: int
    fused_delta: bool = True  # recompute rowsum(O * dO) in the kernel instead of a separate launch
    dq_warps: int = 0  # > 0: dK/dV and dQ in two launches, the dQ one with this many warps
    aligned: bool = True  # key / query tiles aligned to scales (as FwdConfig.aligned)
    bh_fast: bool = False  # as FwdConfig.bh_fast


# Candidates: each was the fastest, or within a few percent of it, at some benchmarked
# shape in the H100 config sweep of 2026-11-22 (docs/kernels.md, *Finished experiments*);
# the first of each list is the best overall and what the GPU tests pin.
# With ``long`` (sequences of LONG_L tokens or more: 1024 px, where one 64 x 64 scale is 4096
# dense tokens and most of the work) the lists add the larger tiles dense FlashAttention kernels
# use on Hopper (two warpgroups per 128-row tile); the 2026-11-22 sweep stopped at 512 px, where
# they lose to the small scales' waste, so shorter sequences do not pay for timing them.
LONG_L = 4096


def _fwd_candidates(head_dim: int, long: bool = False) -> list[FwdConfig]:
    if head_dim <= 64:
        base = [FwdConfig(64, 32, 4, 3), FwdConfig(64, 64, 4, 3), FwdConfig(64, 32, 4, 4),
                FwdConfig(64, 64, 4, 3, bh_fast=True), FwdConfig(64, 64, 4, 3, aligned=False)]
    else:
        base = [FwdConfig(64, 64, 4, 2), FwdConfig(128, 64, 8, 2), FwdConfig(64, 32, 4, 2),
                FwdConfig(32, 64, 4, 2), FwdConfig(64, 64, 4, 3)]
    if long:
        base += [FwdConfig(128, 64, 8, 3), FwdConfig(128, 128, 8, 3)] if head_dim <= 64 else [
            FwdConfig(128, 64, 8, 3), FwdConfig(128, 32, 8, 3)]
    return base


def _bwd_candidates(head_dim: int, long: bool = False) -> list[BwdConfig]:
    if head_dim <= 64:
        base = [BwdConfig(32, 64, 64, 32, 4, 3), BwdConfig(32, 64, 64, 32, 4, 3, aligned=False),
                BwdConfig(32, 64, 64, 32, 4, 4), BwdConfig(32, 64, 64, 32, 4, 3, False),
                BwdConfig(64, 64, 64, 64, 4, 3), BwdConfig(16, 64, 64, 16, 4, 3),
                BwdConfig(32, 64, 64, 32, 4, 3, bh_fast=True),
                # split launches: dQ programs compiled for their own register budget
                BwdConfig(32, 64, 64, 32, 4, 3, True, 4),
                # since 2026-12-04 night: two lower-register forms of the usual tiles (8 warps;
                # 16-row steps with a separate delta); as launched no 256 px candidate spills
                # (docs/kernels.md, *Register spills*)
                BwdConfig(32, 64, 64, 32, 8, 3), BwdConfig(16, 64, 64, 16, 4, 3, False)]
    else:
        base = [BwdConfig(16, 64, 64, 16, 4, 2), BwdConfig(32, 64, 64, 32, 4, 2),
                BwdConfig(16, 64, 64, 16, 4, 2, False), BwdConfig(64, 64, 64, 64, 8, 2),
                BwdConfig(32, 128, 128, 32, 8, 2), BwdConfig(32, 64, 64, 32, 4, 2, True, 4)]
    if long:
        base += [BwdConfig(32, 128, 128, 32, 4, 3), BwdConfig(64, 128, 128, 64, 8, 3),
                 BwdConfig(32, 128, 128, 32, 8, 3, True, 8)] if head_dim <= 64 else [
            BwdConfig(32, 128, 128, 32, 8, 3), BwdConfig(64, 128, 128, 64, 8, 2)]
    return base


# Tests set these to pin the configs (the CPU interpreter has no timing to tune on).
FORCE_FWD_CONFIG: FwdConfig | None = None
FORCE_BWD_CONFIG: BwdConfig | None = None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read once, as triton.jit does
_INTERPRET_FWD = FwdConfig(16, 16, 4, 1)
_INTERPRET_BWD = BwdConfig(16, 16, 16, 16, 4, 1)

_tuned: dict[tuple, object] = {}


_tune_log: dict[tuple, list] = {}


def _tune(key: tuple, candidates: list, launch_with):
    """Time every candidate once for ``key``, keep the fastest; configs that fail to compile are skipped."""
    log: dict[tuple, dict] = {}
    best = pick_fastest(key, candidates, launch_with, _tuned, log, "block-sparse attention", _time_ms)
    _tune_log[key] = log[key]["candidates"]
    return best


def tuned_configs() -> dict[tuple, object]:
    """The configs chosen so far (for benchmarks and reports)."""
    return dict(_tuned)


def tuning_log() -> dict[tuple, list]:
    """Per tuned key, (config, ms or the error's name) of every candidate timed (for benchmarks)."""
    return {k: list(v) for k, v in _tune_log.items()}


# ----------------------------------------------------------------------------- host side

_bounds_cache: dict[tuple, Tensor] = {}


def _bounds(pattern: ScalePattern, device: torch.device | str) -> Tensor:
    """(4, L) int32: kv_start, kv_end per query row; q_start, q_end per key column (cached)."""
    key = (pattern, device)
    b = _bounds_cache.get(key)
    if b is None:
        n = torch.tensor(pattern.lengths, dtype=torch.int64)
        ends = n.cumsum(0)
        starts = ends - n
        sid = torch.repeat_interleave(torch.arange(len(n)), n)  # (L,)
        start, end = starts[sid], ends[sid]
        if pattern.kind == "block_diagonal":
            b = torch.stack([start, end, start, end])
        else:
            b = torch.stack([torch.zeros_like(start), end, start, torch.full_like(end, pattern.total)])
        b = _bounds_cache[key] = b.to(torch.int32).contiguous().to(device)
    return b


# Launch path. ``kernel[grid](...)`` re-binds and re-specialises every argument on every
# call (tens of microseconds of host time, which is what the launch-bound shapes measure).
# With FAST_LAUNCH the compiled kernel it returns is kept under a key holding everything
# Triton specialises on (dtypes, 16-byte alignment of pointers, ints equal to 1 / multiples
# of 16 / 64-bit, the constexprs, warps, stages), and later calls with the same key go to
# the compiled kernel's launcher directly. If that launcher's calling convention differs
# (another Triton version), the first failure turns the fast path off for good.
FAST_LAUNCH = True
_compiled: dict[tuple, object] = {}
_fast_failed = False


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host side of launches: ``triton.cdiv`` is a constexpr function in recent
    Triton, a few microseconds a call (measured 3.2 us with Triton 3.9), which per-call paths pay."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` in plain Python (same reason as :func:`cdiv`)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


# Every maskar kernel compiles with fused multiply-adds allowed, stated at each launch: what every
# kernel was written, timed and tested with (bit-for-bit tests against torch keep an explicit
# round-to-nearest multiply where contraction would change a result, categorical._mul_rn). Triton
# 3.9 warns that its default turns to no fusion in 3.10; an explicit request keeps these kernels
# as they are there and leaves other code's kernels to Triton's default.
FP_FUSION = True


def _launch(kernel, grid: tuple, args: tuple, consts: dict, num_warps: int, num_stages: int,
            spec: tuple | None = None) -> None:
    """``kernel[grid](*args, **consts, num_warps=..., num_stages=...)``; args are the runtime
    parameters in declaration order, consts the constexpr ones that follow them.

    ``spec``: a caller-built stand-in for the per-argument part of the direct-launch key
    (every int by value, dtype and alignment of the tensors that may be unaligned views);
    the caller vouches that its other tensors are fresh allocations (always aligned).
    """
    global _fast_failed
    fast = FAST_LAUNCH and not _INTERPRET and not _fast_failed
    if fast:
        # ints (strides, H, L) by value: stricter than Triton's own classes, so one JIT
        # call per new shape; floats are never specialised. A compiled kernel is loaded
        # per device: key on the device of the first tensor.
        if spec is None:
            spec = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, Tensor)
                         else a if isinstance(a, int) else None for a in args)
        key = (id(kernel), args[0].get_device(), num_warps, num_stages, *consts.values(), spec)
        ck = _compiled.get(key)
        if ck is not None:
            g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
            try:
                if _launch_hooks_set():  # e.g. a profiler: the runner builds their metadata
                    ck[g](*args, *consts.values())
                else:  # the launcher itself: no per-call metadata dict, no hook calls
                    ck.run(*g, _current_stream(), ck.function, ck.packed_metadata, None, None, None,
                           *args, *consts.values())
                return
            except Exception:  # launcher convention of another Triton version: use the JIT path
                _fast_failed = True
                fast = False
    ck = _jit_launch(kernel, grid, args, consts, num_warps, num_stages)
    names = getattr(kernel, "arg_names", None)  # the launcher takes every parameter in this order
    if fast and ck is not None and names is not None and list(names[len(args):]) == list(consts):
        _compiled[key] = ck


@torch.compiler.disable
def _jit_launch(kernel, grid: tuple, args: tuple, consts: dict, num_warps: int, num_stages: int):
    """Triton's JIT launch, which Dynamo must not compile as a frame of its own: run eagerly after
    a graph break inside a compiled function (the sampler's compiled blocks), its frame would be
    compiled with the grid as a symbolic int once sizes vary, which Dynamo's Triton support
    cannot launch ("'SymNodeVariable' object has no attribute 'value'": VAR / HMAR compiled
    sampling at 1024 px after 256 px in one process, H200, 2026-12-05)."""
    return kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages,
                        enable_fp_fusion=FP_FUSION)


def _current_stream() -> int:
    """The raw current CUDA stream of the current device, as Triton's own launch path takes it."""
    return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())


def _launch_hooks_set() -> bool:
    """Whether Triton launch hooks are registered (Triton >= 3.4 keeps them in HookChains)."""
    hooks = (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook) if _knobs else (None, None)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def _view_spec(*views: Tensor) -> tuple:
    """Dtype and 16-byte alignment of the caller's (possibly offset) views, for ``_launch``."""
    return (views[0].dtype, *[t.data_ptr() % 16 == 0 for t in views])


def _grid(n_items: int, bh: int, bh_fast: bool) -> tuple[int, int]:
    return (bh, n_items) if bh_fast else (n_items, bh)


def _launch_fwd(q, k, v, o, lse, bnd, qk_scale, pattern, cfg: FwdConfig, items: Tensor | None = None):
    B, H, L, D = q.shape
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    if items is None:
        items = _row_items(pattern, cfg.block_m, cfg.block_n, cfg.aligned, q.device)
    n_items = items.shape[1]
    ints = (sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], H, L, n_items)
    _launch(
        _attn_fwd, _grid(n_items, B * H, cfg.bh_fast),
        (q, k, v, o, lse, bnd, items, *ints[:9], H, L, n_items, qk_scale),
        dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=D, BH_FAST=cfg.bh_fast,
             DOT_F32=_INTERPRET and q.dtype == torch.bfloat16),
        cfg.num_warps, cfg.num_stages, (*_view_spec(q, k, v), ints),  # o, lse, bnd, items: ours
    )


def _bwd_launches(pattern: ScalePattern, cfg: BwdConfig, device) -> tuple:
    """(part, work items, warps) of each ``_attn_bwd`` launch of ``cfg``."""
    if cfg.dq_warps:
        return ((1, _bwd_table(pattern, cfg, 1, device), cfg.num_warps),
                (2, _bwd_table(pattern, cfg, 2, device), cfg.dq_warps))
    return ((0, _bwd_table(pattern, cfg, 0, device), cfg.num_warps),)


def _launch_bwd(q, k, v, o, do, dq, dk, dv, lse, bnd, qk_scale, sm_scale, pattern, cfg: BwdConfig,
                launches: tuple | None = None):
    B, H, L, D = q.shape
    sq, sk, sv, sdo = q.stride(), k.stride(), v.stride(), do.stride()
    if cfg.fused_delta:
        delta = lse  # placeholder pointer: fused configs never touch it
    else:  # rowsum(O * dO) in its own launch and buffer
        delta = torch.empty_like(lse)
        _launch(_bwd_delta, (cdiv(L, 64), B * H), (o, do, delta, sdo[0], sdo[1], sdo[2], H, L),
                dict(BLOCK_M=64, HEAD_DIM=D), 4, 3)
    if launches is None:
        launches = _bwd_launches(pattern, cfg, q.device)
    strides = (sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], sdo[0], sdo[1], sdo[2])
    views = _view_spec(q, k, v, do)  # o, dq, dk, dv, lse, delta, bnd, items: fresh allocations
    for part, items, warps in launches:
        n_items = items.shape[1]
        _launch(
            _attn_bwd, _grid(n_items, B * H, cfg.bh_fast),
            (q, k, v, o, do, dq, dk, dv, lse, delta, bnd, items, *strides, H, L, n_items, qk_scale, sm_scale),
            dict(BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2,
                 HEAD_DIM=D, FUSED_DELTA=cfg.fused_delta, PART=part, BH_FAST=cfg.bh_fast,
                 DOT_F32=_INTERPRET and q.dtype == torch.bfloat16),
            warps, cfg.num_stages, (*views, strides, H, L, n_items),
        )


# ----------------------------------------------------------------------------- work items


def _tile_spans(lengths: tuple[int, ...], block: int, aligned: bool) -> list[tuple[int, int]]:
    """Row (or key) tiles [start, stop) of at most ``block`` tokens covering [0, L) once.

    Uniform: [0, block), [block, 2 block), ... Aligned: a scale longer than ``block`` is cut
    into tiles that start at its first token; consecutive shorter scales are grouped
    greedily into one tile of at most ``block`` tokens. Aligned tiles rarely mix scales,
    so their bounds (and the key range they walk) are tight: at L 680 with 64-token tiles
    the visited block-diagonal area drops from 1.52x to 1.19x the unmasked one.
    """
    total = sum(lengths)
    if not aligned:
        return [(t, min(t + block, total)) for t in range(0, total, block)]
    spans: list[tuple[int, int]] = []
    group_start = group_end = pos = 0
    for n in lengths:
        start, end = pos, pos + n
        pos = end
        if n <= block:
            if end - group_start > block:
                if group_end > group_start:
                    spans.append((group_start, group_end))
                group_start = start
            group_end = end
            continue
        if group_end > group_start:
            spans.append((group_start, group_end))
        group_start = group_end = end
        spans.extend((t, min(t + block, end)) for t in range(start, end, block))
    if group_end > group_start:
        spans.append((group_start, group_end))
    return spans


def _steps(lo_b: list[int], hi_b: list[int], start: int, stop: int, step: int) -> int:
    """Tiles of ``step`` the three-loop walk visits for rows [start, stop) with bounds lo_b / hi_b."""
    lo, lo_max = min(lo_b[start:stop]), max(lo_b[start:stop])
    hi_min, hi = min(hi_b[start:stop]), max(hi_b[start:stop])
    end1 = lo + -(-(lo_max - lo) // step) * step
    end2 = end1 + max(hi_min - end1, 0) // step * step
    return (end1 - lo) // step + (end2 - end1) // step + max(0, -(-(hi - end2) // step))


@functools.lru_cache(maxsize=64)
def _bound_lists(pattern: ScalePattern) -> tuple[list[int], ...]:
    b = _bounds(pattern, "cpu")
    return tuple(b[i].tolist() for i in range(4))


_row_items_cache: dict[tuple, Tensor] = {}


def _row_items(pattern: ScalePattern, block_m: int, block_n: int, aligned: bool, device) -> Tensor:
    """(2, n) int32 forward work items (start, stop), most key tiles first (cached)."""
    key = (pattern, block_m, block_n, aligned, device)
    t = _row_items_cache.get(key)
    if t is None:
        ks, ke, _, _ = _bound_lists(pattern)
        spans = _tile_spans(pattern.lengths, block_m, aligned)
        spans.sort(key=lambda sp: -_steps(ks, ke, sp[0], sp[1], block_n))  # longest programs first
        t = _row_items_cache[key] = torch.tensor(spans, dtype=torch.int32).t().contiguous().to(device)
    return t


_bwd_table_cache: dict[tuple, Tensor] = {}


def _bwd_table(pattern: ScalePattern, cfg: BwdConfig, part: int, device) -> Tensor:
    """(3, n) int32 backward work items (kind, start, stop) of ``_attn_bwd``, costliest first.

    Kind 1: a key tile (dK, dV; 4 matmuls per visited tile), kind 2: a query tile (dQ; 3).
    ``part`` 0 mixes both kinds in one table, 1 / 2 keeps one kind (split launches).
    """
    key = (pattern, cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2, cfg.aligned, part, device)
    t = _bwd_table_cache.get(key)
    if t is None:
        ks, ke, qs, qe = _bound_lists(pattern)
        items = []  # (cost, kind, start, stop)
        if part in (0, 1):
            for a, z in _tile_spans(pattern.lengths, cfg.block_n1, cfg.aligned):
                items.append((4 * cfg.block_n1 * cfg.block_m1 * _steps(qs, qe, a, z, cfg.block_m1), 1, a, z))
        if part in (0, 2):
            for a, z in _tile_spans(pattern.lengths, cfg.block_m2, cfg.aligned):
                items.append((3 * cfg.block_m2 * cfg.block_n2 * _steps(ks, ke, a, z, cfg.block_n2), 2, a, z))
        items.sort(key=lambda it: -it[0])
        t = torch.tensor([it[1:] for it in items], dtype=torch.int32).t().contiguous()
        t = _bwd_table_cache[key] = t.to(device)
    return t


def _blhd_empty(B: int, H: int, L: int, D: int, like: Tensor) -> Tensor:
    """(B, H, L, D) view of fresh (B, L, H, D) memory (one call: host time matters at small shapes)."""
    return torch.empty_strided((B, H, L, D), (L * H * D, D, H * D, 1), dtype=like.dtype, device=like.device)


def _grads_empty(B: int, H: int, L: int, D: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv as ``_blhd_empty`` views of one (3, B, L, H, D) allocation (one call, not three)."""
    g = torch.empty((3, B, L, H, D), dtype=like.dtype, device=like.device)
    return g.permute(0, 1, 3, 2, 4).unbind(0)


def _key(phase: str, q: Tensor, pattern: ScalePattern) -> tuple:
    # not keyed on B or H themselves: only a coarse "few vs many programs" class, so a new
    # batch size re-times at most once per class, and kernels never recompile for it.
    # get_device(): an int, cheaper than building a torch.device on every call
    B, H, L, D = q.shape
    return (phase, q.get_device(), q.dtype, D, pattern.kind, L, B * H >= 256)


# Per (phase, pattern, device, dtype, head dim, batch*heads class): the tuned config with
# its bounds and work-item tables, so that a call does one dictionary lookup (host time is
# what the small shapes measure). Not used while a config is forced or under the interpreter.
_plans: dict[tuple, tuple] = {}


def _plan(phase: str, q: Tensor, pattern: ScalePattern, forced, candidates, launch_with, tables):
    """(config, bounds, tables) for this call, tuning on first use.

    ``forced``: the pinned config (tests, interpreter) or None; ``candidates()`` the configs
    to time; ``launch_with(cfg, bounds)`` one launch of a config; ``tables(cfg)`` its work
    tables (what the launcher takes with the config).
    """
    B, H, L, D = q.shape
    pk = (phase, pattern, q.get_device(), q.dtype, D, B * H >= 256)
    plan = None if forced is not None else _plans.get(pk)
    if plan is not None:
        return plan
    bnd = _bounds(pattern, q.device)
    if forced is not None:
        return forced, bnd, tables(forced)
    key = _key(phase, q, pattern)
    # candidates built only when tuning: frozen dataclasses cost host time
    cfg = _tuned.get(key) or _tune(key, candidates(), lambda c: launch_with(c, bnd))
    plan = _plans[pk] = (cfg, bnd, tables(cfg))
    return plan


def _forward(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern, scale: float) -> tuple[Tensor, Tensor]:
    """Forward launch: (out, a (B, H, L, D) view of (B, L, H, D) memory; base-2 lse (B*H, L))."""
    B, H, L, D = q.shape
    o = _blhd_empty(B, H, L, D, q)
    lse = torch.empty(B * H, L, dtype=torch.float32, device=q.device)  # base-2 log-sum-exp
    qk_scale = scale * LOG2E
    cfg, bnd, items = _plan(
        "fwd", q, pattern, FORCE_FWD_CONFIG or (_INTERPRET_FWD if _INTERPRET else None),
        lambda: _fwd_candidates(D, L >= LONG_L),
        lambda c, bnd: _launch_fwd(q, k, v, o, lse, bnd, qk_scale, pattern, c),
        lambda c: _row_items(pattern, c.block_m, c.block_n, c.aligned, q.device))
    _launch_fwd(q, k, v, o, lse, bnd, qk_scale, pattern, cfg, items)
    return o, lse


def _backward(q, k, v, o, lse, do, pattern: ScalePattern, scale: float, grads=None) -> tuple[Tensor, ...]:
    """Kernel launches of the backward pass into ``grads`` (dq, dk, dv; fresh if None)."""
    B, H, L, D = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    dq, dk, dv = _grads_empty(B, H, L, D, q) if grads is None else grads
    args = (q, k, v, o, do, dq, dk, dv, lse)
    cfg, bnd, launches = _plan(
        "bwd", q, pattern, FORCE_BWD_CONFIG or (_INTERPRET_BWD if _INTERPRET else None),
        lambda: _bwd_candidates(D, L >= LONG_L),
        lambda c, bnd: _launch_bwd(*args, bnd, scale * LOG2E, scale, pattern, c),
        lambda c: _bwd_launches(pattern, c, q.device))
    _launch_bwd(*args, bnd, scale * LOG2E, scale, pattern, cfg, launches)
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    """Eager path: the cheapest host route to the kernels (see "The B 4 rows" in docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern, scale: float) -> Tensor:
        o, lse = _forward(q, k, v, pattern, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.pattern, ctx.scale = pattern, scale
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        return (*_backward(q, k, v, o, lse, do, ctx.pattern, ctx.scale), None, None)


# ----------------------------------------------------------------------------- custom op
#
# What torch.compile sees: ``maskar::block_sparse_attn`` (forward) and ``..._bwd``, opaque to
# Dynamo and Inductor, with fake implementations giving the output shapes and strides, and the
# backward registered as the forward's autograd formula. The pattern travels as its kind and
# token counts (ints and a string are all an op schema carries). Without a GPU (and without the
# Triton interpreter) the ops run the SDPA reference instead of the kernels, so tracing and
# compiled-vs-eager tests run on a CPU through exactly the graph a GPU run compiles.


@functools.lru_cache(maxsize=64)
def _pattern(kind: str, lengths: tuple[int, ...]) -> ScalePattern:
    return ScalePattern(kind, lengths)  # type: ignore[arg-type]


def _on_reference(q: Tensor) -> bool:
    """True where the ops run the SDPA reference: CPU tensors without the Triton interpreter."""
    return q.is_cpu and not _INTERPRET


def _reference_probs(q: Tensor, k: Tensor, pattern: ScalePattern, scale: float) -> tuple[Tensor, Tensor]:
    """Masked softmax probabilities (B, H, L, L) and natural-log lse (B, H, L), in >= fp32."""
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    s = s.masked_fill(~pattern.dense_mask(q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse.unsqueeze(-1)), lse


def _reference_forward(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern, scale: float):
    B, H, L, D = q.shape
    p, lse = _reference_probs(q, k, pattern, scale)
    o = _blhd_empty(B, H, L, D, q)
    o.copy_(p @ v.to(p.dtype))
    return o, (lse * LOG2E).float().reshape(B * H, L)  # base 2, as the kernel's


def _reference_backward(q, k, v, do, pattern: ScalePattern, scale: float):
    # explicit FlashAttention backward math (an op body runs below autograd: no autograd.grad here)
    p, _ = _reference_probs(q, k, pattern, scale)
    do = do.to(p.dtype)
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.to(p.dtype).transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return (ds @ k.to(p.dtype)) * scale, (ds.transpose(-1, -2) @ q.to(p.dtype)) * scale, dv


@torch.library.custom_op("maskar::block_sparse_attn", mutates_args=())
def block_sparse_attn_op(
    q: Tensor, k: Tensor, v: Tensor, lengths: list[int], kind: str, scale: float
) -> tuple[Tensor, Tensor]:
    """(out (B, H, L, D) view of (B, L, H, D) memory, base-2 lse (B*H, L) fp32)."""
    pattern = _pattern(kind, tuple(lengths))
    if _on_reference(q):
        return _reference_forward(q, k, v, pattern, scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _forward(q, k, v, pattern, scale)


@block_sparse_attn_op.register_fake
def _(q, k, v, lengths, kind, scale):
    B, H, L, D = q.shape
    return _blhd_empty(B, H, L, D, q), q.new_empty((B * H, L), dtype=torch.float32)


@torch.library.custom_op("maskar::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd_op(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
    lengths: list[int], kind: str, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), each a (B, H, L, D) view of its own (B, L, H, D) memory."""
    pattern = _pattern(kind, tuple(lengths))
    B, H, L, D = q.shape
    grads = tuple(_blhd_empty(B, H, L, D, q) for _ in range(3))  # op outputs may not alias each other
    if _on_reference(q):
        for g, r in zip(grads, _reference_backward(q, k, v, do, pattern, scale)):
            g.copy_(r)
        return grads
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _backward(q, k, v, o, lse, do, pattern, scale, grads)


@block_sparse_attn_bwd_op.register_fake
def _(q, k, v, o, lse, do, lengths, kind, scale):
    B, H, L, D = q.shape
    return tuple(_blhd_empty(B, H, L, D, q) for _ in range(3))


def _op_setup_context(ctx, inputs, output) -> None:
    q, k, v, lengths, kind, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.lengths, ctx.kind, ctx.scale = lengths, kind, scale


def _op_backward(ctx, do: Tensor, dlse: Tensor | None):
    q, k, v, o, lse = ctx.saved_tensors  # lse is an auxiliary output: its gradient is never used
    dq, dk, dv = block_sparse_attn_bwd_op(q, k, v, o, lse, do, ctx.lengths, ctx.kind, ctx.scale)
    return dq, dk, dv, None, None, None


block_sparse_attn_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern, scale: float | None = None
) -> Tensor:
    """Attention under a scale pattern. q, k, v: (B, H, L, D) views -> (B, H, L, D) view of (B, L, H, D).

    Eager calls on a GPU go through an autograd.Function (least host time); under torch.compile,
    and on a CPU without the Triton interpreter, through the ``maskar::block_sparse_attn`` op.
    """
    if pattern is None:
        raise ValueError("block_sparse_attention: needs a ScalePattern (dense attention: use sdpa)")
    if not _shapes_ok(q, k, v, pattern):
        raise ValueError(
            f"block_sparse_attention: expected q, k, v of equal shape (B, H, {pattern.total}, D) with D in "
            f"{_HEAD_DIMS}, fp16/bf16 (any float dtype on the CPU reference) and contiguous last dim; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {q.dtype}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling() or _on_reference(q):
        return block_sparse_attn_op(q, k, v, list(pattern.lengths), pattern.kind, scale)[0]
    return _BlockSparseAttention.apply(q, k, v, pattern, scale)


# ----------------------------------------------------------------------------- registration

_HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16)
_REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tests set this to send CPU calls of ``auto`` / ``triton`` to the custom op's SDPA reference
# (so a CPU-compiled model traces the op a GPU run would); off, CPU calls use other backends.
CPU_REFERENCE = False


def _shapes_ok(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern) -> bool:
    dtypes = _REFERENCE_DTYPES if _on_reference(q) else _DTYPES
    if torch.compiler.is_compiling():
        same = q.shape == k.shape and q.shape == v.shape
    else:  # plain tuple compare: torch.Size's goes through SymInt code (host time)
        same = tuple.__eq__(q.shape, k.shape) and tuple.__eq__(q.shape, v.shape)
    return (
        q.dim() == 4
        and same
        and q.shape[-1] in _HEAD_DIMS
        and q.shape[-2] == pattern.total
        and q.dtype in dtypes
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and v.stride(-1) == 1
    )


def _device_ok_uncached(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).major >= 8  # tl.dot in fp16/bf16, bf16 loads
    return _INTERPRET or CPU_REFERENCE


_device_ok_cached = functools.lru_cache(maxsize=16)(_device_ok_uncached)


def _device_ok(device: torch.device) -> bool:
    # Dynamo traces the plain function (it folds get_device_properties to a constant)
    if torch.compiler.is_compiling():
        return _device_ok_uncached(device)
    return _device_ok_cached(device) if device.type == "cuda" else _device_ok_uncached(device)


def _via_ops(x: Tensor) -> bool:
    """Whether a kernel module calls its custom ops rather than its launches: under torch.compile
    (Dynamo traces the ops, never the launches) and on the CPU reference."""
    return torch.compiler.is_compiling() or _on_reference(x)


_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernel_dtype_ok(dtype: torch.dtype, device: torch.device, cpu_reference: bool) -> bool:
    """Whether an elementwise kernel module (q/k norm, training GELU) runs for tensors of ``dtype``
    on ``device``: CUDA sm80+ in fp16 / bf16, or the interpreter on the CPU; with the module's
    ``cpu_reference`` switch (tests) its CPU torch body in any float dtype."""
    if device.type == "cuda":
        return dtype in _KERNEL_DTYPES and _device_ok(device)
    if device.type != "cpu":
        return False
    if cpu_reference and not _INTERPRET:
        return dtype in _REFERENCE_DTYPES
    return _INTERPRET and dtype in _KERNEL_DTYPES


def supports(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> bool:
    return pattern is not None and _device_ok(q.device) and _shapes_ok(q, k, v, pattern)


def _backend_fn(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern, scale: float | None) -> Tensor:
    return block_sparse_attention(q, k, v, pattern, scale)


# priority 10: tried before varlen (20), flex (30) and SDPA (100); see docs/kernels.md
register_backend("triton", _backend_fn, supports, priority=10)

__all__ = [
    "block_sparse_attention", "block_sparse_attn_op", "supports", "tuned_configs", "FwdConfig", "BwdConfig",
]
