"""Fused 2D neighbourhood (proximal) attention (Triton), forward and backward.

Every token of an h x w grid (raster order) attends to the kh x kw window of keys around
it, dilated by (dh, dw). Two border rules:

- ``zeros`` (CASMAR's PSA, the default): the window is centred on the query; its slots
  that fall off the grid stay in the softmax with logit 0 and value 0, so a query with
  ``n_pad`` such slots gets ``n_pad * exp(0 - m)`` more in its softmax denominator and
  nothing more in the numerator;
- ``clamp`` (NATTEN): the window is shifted to lie inside the grid (per axis
  ``start = clamp(i - r, 0, n - k)``) and the softmax runs over its keys only. A window
  larger than an axis covers the whole axis.

Dilation splits each axis into ``d`` interleaved sub-grids (positions of one residue mod
d); a window lives inside its query's sub-grid, so all the geometry below is in sub-grid
units, where dilation 2 costs exactly what dilation 1 costs.

Forward (and dQ): a program owns a TH x TW tile of queries of one sub-grid (flattened to
BLOCK_M = TH * TW rows). Its queries' windows together cover a rectangle of at most
(TH + kh - 1) x (TW + kw - 1) keys (clipped to the grid), which the program walks in
chunks of BLOCK_N keys along the rectangle's flattened rows: per chunk one tensor-core
QK^T, the out-of-window pairs set to -inf, a FlashAttention-2 online-softmax update and
one PV. Keys outside the rectangle are never loaded; nothing of size L * k^2 or L^2
exists. The zeros rule enters as the initial state of the online softmax:
``m = 0, l = n_pad`` for a query with padded slots.

Backward: delta = rowsum(dO * O) in its own small launch (or recomputed from O where it
is used, a tuning option), then one launch whose first half of programs each own a
TH x TW tile of keys (dK, dV; they walk the rectangle of queries whose windows reach the
tile) and whose second half each own a tile of queries (dQ; they walk the key rectangle
as the forward does). Each gradient row is written by exactly one program: no atomics,
deterministic. A second backward (``NaConfig.whole``, for grids of few tiles such as CASMAR's
16 x 16) gives each program a whole sub-grid of one batch * head: it walks every key tile for
dK, dV and adds dS K into an fp32 dQ scratch of its own rows, so dQ needs no second walk that
recomputes S and dP (5 products per visited pair instead of 7), still without atomics.

Layout and numerics are those of ``maskar.kernels.block_sparse``: q, k, v (B, H, L, D)
strided views with a contiguous last dim; out and gradients written (B, L, H, D) and
returned as (B, H, L, D) views; fp16 / bf16 operands with fp32 accumulation (fp32 inputs
allowed, for tests: their dots run in IEEE fp32); softmax in base 2; the log-sum-exp is
kept for the backward pass (extra memory: one fp32 per row for lse and one for delta).
Block shapes are chosen per (grid, window, dilation, border, head dim, dtype, batch*heads
class) by timing a few candidates once; every geometry is a runtime argument, so new
grids, windows or batch sizes re-time but never recompile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from maskar import env

# Shared with the block-sparse kernel: its launch path (direct launcher calls, little
# host time), its delta kernel, its (B, L, H, D) allocations and its interpreter switch.
from maskar.kernels.block_sparse import (
    _INTERPRET,
    LOG2E,
    _blhd_empty,
    _bwd_bases,
    _bwd_delta,
    _grads_empty,
    _launch,
    _time_ms,
    _view_spec,
    cdiv,
)
from maskar.kernels.tuning import pick_fastest

BORDERS = ("zeros", "clamp")
_NOWHERE = tl.constexpr(1 << 30)  # window start of a padding query: no key is ever inside its window


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # UPCAST: bf16 under TRITON_INTERPRET (the CPU interpreter multiplies bf16 operands as
    # raw integers). IEEE: fp32 inputs (tests) multiply in full fp32, not tf32.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _window(i, n, K, CLAMP: tl.constexpr):
    """[start, stop) of the window of sub-grid position i on an axis of n positions.

    zeros: centred, clipped to the axis (the clipped slots are the padded ones); clamp:
    shifted inside the axis, min(K, n) long."""
    r = K // 2
    if CLAMP:
        kk = tl.minimum(K, n)
        start = tl.minimum(tl.maximum(i - r, 0), n - kk)
        stop = start + kk
    else:
        start = tl.maximum(i - r, 0)
        stop = tl.minimum(i + r + 1, n)
    return start, stop


@triton.jit
def _seen_by(u, n, K, CLAMP: tl.constexpr):
    """[first, last] sub-grid positions whose windows contain position u (windows are
    monotone in the position, so this is an interval)."""
    r = K // 2
    if CLAMP:
        kk = tl.minimum(K, n)
        first = tl.where(u < kk, 0, u - kk + 1 + r)
        last = tl.where(u >= n - kk, n - 1, u + r)
    else:
        first = tl.maximum(u - r, 0)
        last = tl.minimum(u + r, n - 1)
    return first, last


@triton.jit
def _tile(pid, GH, GW, DH, DW, TILES_R, TILES_C, TH: tl.constexpr, TW: tl.constexpr):
    """Tile ``pid`` -> (row residue, column residue, first sub-grid row, first sub-grid
    column, sub-grid rows, sub-grid columns). Tiles of one residue pair are consecutive
    programs, so the keys they share are read while still in L2."""
    per_row = DW * TILES_C
    row_t = pid // per_row
    col_t = pid % per_row
    rr = row_t // TILES_R
    rc = col_t // TILES_C
    i0 = (row_t % TILES_R) * TH
    j0 = (col_t % TILES_C) * TW
    nr = (GH - rr + DH - 1) // DH
    nc = (GW - rc + DW - 1) // DW
    return rr, rc, i0, j0, nr, nc


@triton.jit
def _tile_rows(i0, j0, nr, nc, TH: tl.constexpr, TW: tl.constexpr):
    """Sub-grid (row, column) of the tile's TH * TW flattened positions and whether each is on the grid."""
    offs = tl.arange(0, TH * TW)
    ti = i0 + offs // TW
    tj = j0 + offs % TW
    return ti, tj, (ti < nr) & (tj < nc)


@triton.jit
def _key_rect(i0, j0, nr, nc, KH, KW, CLAMP: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Rectangle of keys the windows of a query tile cover: first row, first column, width, count."""
    last_i = tl.minimum(i0 + TH, nr) - 1
    last_j = tl.minimum(j0 + TW, nc) - 1
    r0, _r = _window(i0, nr, KH, CLAMP)
    _s, r1 = _window(last_i, nr, KH, CLAMP)
    c0, _c = _window(j0, nc, KW, CLAMP)
    _d, c1 = _window(last_j, nc, KW, CLAMP)
    width = c1 - c0
    count = tl.where((i0 < nr) & (j0 < nc), (r1 - r0) * width, 0)
    return r0, c0, width, count


@triton.jit
def _query_rect(i0, j0, nr, nc, KH, KW, CLAMP: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Rectangle of queries whose windows reach a key tile: first row, first column, width, count."""
    last_i = tl.minimum(i0 + TH, nr) - 1
    last_j = tl.minimum(j0 + TW, nc) - 1
    r0, _r = _seen_by(i0, nr, KH, CLAMP)
    _s, r1 = _seen_by(last_i, nr, KH, CLAMP)
    c0, _c = _seen_by(j0, nc, KW, CLAMP)
    _d, c1 = _seen_by(last_j, nc, KW, CLAMP)
    width = c1 + 1 - c0
    count = tl.where((i0 < nr) & (j0 < nc), (r1 + 1 - r0) * width, 0)
    return r0, c0, width, count


@triton.jit
def _rect_chunk(start, r0, c0, width, count, rr, rc, GW, DH, DW, BLOCK: tl.constexpr):
    """Positions [start, start + BLOCK) of a rectangle's flattened rows: sub-grid row and
    column, token index in the grid and whether each is inside the rectangle."""
    n = start + tl.arange(0, BLOCK)
    du = n // width
    u = r0 + du
    c = c0 + (n - du * width)
    tok = (rr + DH * u) * GW + rc + DW * c
    return u, c, tok, n < count


@triton.jit
def _windows(qi, qj, q_ok, nr, nc, KH, KW, CLAMP: tl.constexpr):
    """Per query: [ws_r, we_r) x [ws_c, we_c), its window in sub-grid units; a padding query
    (``q_ok`` False) gets a window no key is inside."""
    ws_r, we_r = _window(qi, nr, KH, CLAMP)
    ws_c, we_c = _window(qj, nc, KW, CLAMP)
    return tl.where(q_ok, ws_r, _NOWHERE), we_r, ws_c, we_c


@triton.jit
def _inside(ki, kj, ws_r, we_r, ws_c, we_c, Q_ROWS: tl.constexpr):
    """Mask of key (ki, kj) inside the query's window: (queries x keys), or (keys x queries)
    when not Q_ROWS."""
    if Q_ROWS:
        return ((ki[None, :] >= ws_r[:, None]) & (ki[None, :] < we_r[:, None])
                & (kj[None, :] >= ws_c[:, None]) & (kj[None, :] < we_c[:, None]))
    else:
        return ((ki[:, None] >= ws_r[None, :]) & (ki[:, None] < we_r[None, :])
                & (kj[:, None] >= ws_c[None, :]) & (kj[:, None] < we_c[None, :]))


@triton.jit(do_not_specialize=["H", "L", "GH", "GW", "KH", "KW", "DH", "DW", "TILES_R", "TILES_C"])
def _na_fwd(
    Q, K, V, O, LSE,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl,
    H, L, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, qk_scale,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    CLAMP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rr, rc, i0, j0, nr, nc = _tile(tl.program_id(0), GH, GW, DH, DW, TILES_R, TILES_C, TH, TW)
    qi, qj, q_ok = _tile_rows(i0, j0, nr, nc, TH, TW)
    q_tok = (rr + DH * qi) * GW + rc + DW * qj
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + q_tok[:, None] * sql + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh

    ws_r, we_r, ws_c, we_c = _windows(qi, qj, q_ok, nr, nc, KH, KW, CLAMP)
    if CLAMP:
        m_i = tl.full([TH * TW], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([TH * TW], dtype=tl.float32)
    else:
        # the padded slots as the first softmax terms: logit 0, so m = 0 and l = n_pad
        n_pad = tl.where(q_ok, KH * KW - (we_r - ws_r) * (we_c - ws_c), 0).to(tl.float32)
        m_i = tl.where(n_pad > 0, 0.0, -1.0e30)
        l_i = n_pad
    acc = tl.zeros([TH * TW, HEAD_DIM], dtype=tl.float32)

    r0, c0, width, count = _key_rect(i0, j0, nr, nc, KH, KW, CLAMP, TH, TW)
    for start in range(0, count, BLOCK_N):
        ki, kj, k_tok, k_in = _rect_chunk(start, r0, c0, width, count, rr, rc, GW, DH, DW, BLOCK_N)
        k = tl.load(k_base + k_tok[:, None] * skl + offs_d[None, :], mask=k_in[:, None], other=0.0)
        v = tl.load(v_base + k_tok[:, None] * svl + offs_d[None, :], mask=k_in[:, None], other=0.0)
        s = _mm(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        s = tl.where(_inside(ki, kj, ws_r, we_r, ws_c, we_c, True), s, float("-inf"))
        # m_i is finite from the start, so a row without keys in this chunk gets p = 0, not NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, UPCAST, IEEE)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # padding rows only
    # O is written (B, L, H, D) contiguous
    o_ptrs = O + (b * L * H + h) * HEAD_DIM + q_tok[:, None] * (H * HEAD_DIM) + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * L + q_tok, m_i + tl.log2(l_i), mask=q_ok)


@triton.jit
def _delta(o_base, delta_base, do, tok, ok, g_row, HEAD_DIM: tl.constexpr, FUSED_DELTA: tl.constexpr):
    """delta = rowsum(O * dO) of the rows ``tok``: recomputed from O (FUSED_DELTA; O rows are
    read by several programs, mostly from L2) or read from the buffer a separate launch filled."""
    if FUSED_DELTA:
        offs_d = tl.arange(0, HEAD_DIM)
        o = tl.load(o_base + tok[:, None] * g_row + offs_d[None, :], mask=ok[:, None], other=0.0)
        return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    else:
        return tl.load(delta_base + tok, mask=ok, other=0.0)


@triton.jit
def _dkdv_program(
    tile, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DK, DV, g_off, g_row,
    sql, skl, svl, sdol, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, qk_scale, sm_scale, dq_acc_base,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    CLAMP: tl.constexpr, FUSED_DELTA: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    DQ_ACC: tl.constexpr,
):
    """dK, dV of a TH x TW tile of keys, walking the queries whose windows reach it. DQ_ACC: also
    add dS K to the fp32 dQ rows at ``dq_acc_base`` (rows this program's caller alone owns)."""
    rr, rc, i0, j0, nr, nc = _tile(tile, GH, GW, DH, DW, TILES_R, TILES_C, TH, TW)
    ki, kj, k_ok = _tile_rows(i0, j0, nr, nc, TH, TW)
    k_tok = (rr + DH * ki) * GW + rc + DW * kj
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(k_base + k_tok[:, None] * skl + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    v = tl.load(v_base + k_tok[:, None] * svl + offs_d[None, :], mask=k_ok[:, None], other=0.0)
    dk = tl.zeros([TH * TW, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([TH * TW, HEAD_DIM], dtype=tl.float32)
    r0, c0, width, count = _query_rect(i0, j0, nr, nc, KH, KW, CLAMP, TH, TW)
    for start in range(0, count, BLOCK_N):
        qi, qj, q_tok, q_in = _rect_chunk(start, r0, c0, width, count, rr, rc, GW, DH, DW, BLOCK_N)
        q = tl.load(q_base + q_tok[:, None] * sql + offs_d[None, :], mask=q_in[:, None], other=0.0)
        do = tl.load(do_base + q_tok[:, None] * sdol + offs_d[None, :], mask=q_in[:, None], other=0.0)
        lse = tl.load(lse_base + q_tok, mask=q_in, other=0.0)
        delta = _delta(o_base, delta_base, do, q_tok, q_in, g_row, HEAD_DIM, FUSED_DELTA)
        s_t = _mm(k, tl.trans(q), UPCAST, IEEE) * qk_scale  # (keys, queries): S transposed
        ws_r, we_r, ws_c, we_c = _windows(qi, qj, q_in, nr, nc, KH, KW, CLAMP)
        s_t = tl.where(_inside(ki, kj, ws_r, we_r, ws_c, we_c, False), s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += _mm(p_t.to(do.dtype), do, UPCAST, IEEE)
        dp_t = _mm(v, tl.trans(do), UPCAST, IEEE)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += _mm(ds_t, q, UPCAST, IEEE)
        if DQ_ACC:
            # the positions of one walk are distinct, so only another tile's walk (after the
            # caller's barrier) reads these rows again; .cg: straight from L2, where the store went
            acc_ptrs = dq_acc_base + q_tok[:, None] * HEAD_DIM + offs_d[None, :]
            part = _mm(tl.trans(ds_t), k, UPCAST, IEEE)
            acc = tl.load(acc_ptrs, mask=q_in[:, None], other=0.0, cache_modifier=".cg")
            tl.store(acc_ptrs, acc + part, mask=q_in[:, None])
    g_ptrs = g_off + k_tok[:, None] * g_row + offs_d[None, :]
    tl.store(DK + g_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    tl.store(DV + g_ptrs, dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


@triton.jit
def _dq_program(
    tile, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DQ, g_off, g_row,
    sql, skl, svl, sdol, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, qk_scale, sm_scale,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    CLAMP: tl.constexpr, FUSED_DELTA: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    STORE_DELTA: tl.constexpr = False,
):
    """dQ of a TH x TW tile of queries, walking the keys of their windows (as the forward).
    STORE_DELTA: delta computed here from the tile's O and dO rows and written for a later
    dK/dV launch (each query row belongs to one tile: every row is written once)."""
    rr, rc, i0, j0, nr, nc = _tile(tile, GH, GW, DH, DW, TILES_R, TILES_C, TH, TW)
    qi, qj, q_ok = _tile_rows(i0, j0, nr, nc, TH, TW)
    q_tok = (rr + DH * qi) * GW + rc + DW * qj
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_base + q_tok[:, None] * sql + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    do = tl.load(do_base + q_tok[:, None] * sdol + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    lse = tl.load(lse_base + q_tok, mask=q_ok, other=0.0)
    delta = _delta(o_base, delta_base, do, q_tok, q_ok, g_row, HEAD_DIM, FUSED_DELTA or STORE_DELTA)
    if STORE_DELTA:
        tl.store(delta_base + q_tok, delta, mask=q_ok)
    ws_r, we_r, ws_c, we_c = _windows(qi, qj, q_ok, nr, nc, KH, KW, CLAMP)
    dq = tl.zeros([TH * TW, HEAD_DIM], dtype=tl.float32)
    r0, c0, width, count = _key_rect(i0, j0, nr, nc, KH, KW, CLAMP, TH, TW)
    for start in range(0, count, BLOCK_N):
        ki, kj, k_tok, k_in = _rect_chunk(start, r0, c0, width, count, rr, rc, GW, DH, DW, BLOCK_N)
        k = tl.load(k_base + k_tok[:, None] * skl + offs_d[None, :], mask=k_in[:, None], other=0.0)
        v = tl.load(v_base + k_tok[:, None] * svl + offs_d[None, :], mask=k_in[:, None], other=0.0)
        s = _mm(q, tl.trans(k), UPCAST, IEEE) * qk_scale
        s = tl.where(_inside(ki, kj, ws_r, we_r, ws_c, we_c, True), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = _mm(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, UPCAST, IEEE)
    g_ptrs = g_off + q_tok[:, None] * g_row + offs_d[None, :]
    tl.store(DQ + g_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])


@triton.jit(do_not_specialize=["H", "L", "GH", "GW", "KH", "KW", "DH", "DW", "TILES_R", "TILES_C", "N_TILES"])
def _na_bwd(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
    H, L, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, N_TILES, qk_scale, sm_scale,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    CLAMP: tl.constexpr, FUSED_DELTA: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    PHASE: tl.constexpr = 0,
):
    """PHASE 0: programs [0, N_TILES): dK, dV of one key tile; [N_TILES, 2 N_TILES): dQ of one
    query tile. O (B, L, H, D) is read only with FUSED_DELTA, DELTA only without it.
    PHASE 1 (the first of two launches): the dQ programs alone, each writing its rows' delta;
    PHASE 2 (the second): the dK/dV programs alone, reading that delta."""
    pid = tl.program_id(0)
    q_base, k_base, v_base, do_base, lse_base, delta_base, g_off, g_row = _bwd_bases(
        tl.program_id(1), H, L, Q, K, V, DO, LSE, DELTA, sqb, sqh, skb, skh, svb, svh, sdob, sdoh, HEAD_DIM)
    o_base = O + g_off  # O has the gradients' layout
    if PHASE == 1:
        _dq_program(pid, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DQ, g_off,
                    g_row, sql, skl, svl, sdol, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, qk_scale, sm_scale,
                    TH, TW, BLOCK_N, HEAD_DIM, CLAMP, False, UPCAST, IEEE, True)
    elif PHASE == 2:
        _dkdv_program(pid, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DK, DV, g_off,
                      g_row, sql, skl, svl, sdol, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, qk_scale,
                      sm_scale, delta_base, TH, TW, BLOCK_N, HEAD_DIM, CLAMP, False, UPCAST, IEEE,
                      False)
    elif pid < N_TILES:
        _dkdv_program(pid, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DK, DV, g_off,
                      g_row, sql, skl, svl, sdol, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, qk_scale,
                      sm_scale, delta_base, TH, TW, BLOCK_N, HEAD_DIM, CLAMP, FUSED_DELTA, UPCAST, IEEE,
                      False)
    else:
        _dq_program(pid - N_TILES, q_base, k_base, v_base, do_base, o_base, lse_base, delta_base, DQ, g_off,
                    g_row, sql, skl, svl, sdol, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, qk_scale, sm_scale,
                    TH, TW, BLOCK_N, HEAD_DIM, CLAMP, FUSED_DELTA, UPCAST, IEEE)


@triton.jit
def _subgrid_tile(t, rr, rc, GH, GW, DH, DW, TILES_R, TILES_C, TH: tl.constexpr, TW: tl.constexpr):
    """The t-th tile of residue pair (rr, rc), as a ``_tile`` program id and its (tokens, on grid)."""
    pid = (rr * TILES_R + t // TILES_C) * (DW * TILES_C) + rc * TILES_C + t % TILES_C
    _rr, _rc, i0, j0, nr, nc = _tile(pid, GH, GW, DH, DW, TILES_R, TILES_C, TH, TW)
    ti, tj, ok = _tile_rows(i0, j0, nr, nc, TH, TW)
    return pid, (rr + DH * ti) * GW + rc + DW * tj, ok


@triton.jit(do_not_specialize=["H", "L", "GH", "GW", "KH", "KW", "DH", "DW", "TILES_R", "TILES_C"])
def _na_bwd_whole(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, DQ_ACC,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol,
    H, L, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, qk_scale, sm_scale,
    TH: tl.constexpr, TW: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    CLAMP: tl.constexpr, FUSED_DELTA: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One program per (residue pair, batch * head) walks every key tile of its sub-grid for dK, dV
    and adds each dS K into the fp32 dQ rows of the sub-grid (``DQ_ACC``, (B * H, L, D)), which
    no other program touches: the dQ programs' second walk of the windows (S and dP recomputed)
    is gone, the order of the sums is fixed (deterministic, no atomics). Worth it where a
    sub-grid has few tiles (CASMAR's 16 x 16 grid: 4), so the programs stay many and short."""
    bh = tl.program_id(1)
    rr = tl.program_id(0) // DW
    rc = tl.program_id(0) % DW
    q_base, k_base, v_base, do_base, lse_base, delta_base, g_off, g_row = _bwd_bases(
        bh, H, L, Q, K, V, DO, LSE, DELTA, sqb, sqh, skb, skh, svb, svh, sdob, sdoh, HEAD_DIM)
    acc_base = DQ_ACC + bh.to(tl.int64) * L * HEAD_DIM
    offs_d = tl.arange(0, HEAD_DIM)
    n_tiles = TILES_R * TILES_C
    for t in range(0, n_tiles):
        _pid, tok, ok = _subgrid_tile(t, rr, rc, GH, GW, DH, DW, TILES_R, TILES_C, TH, TW)
        tl.store(acc_base + tok[:, None] * HEAD_DIM + offs_d[None, :],
                 tl.zeros([TH * TW, HEAD_DIM], dtype=tl.float32), mask=ok[:, None])
    tl.debug_barrier()  # every thread's zeros (and later sums) visible before another reads the rows
    for t in range(0, n_tiles):
        pid, _tok, _ok = _subgrid_tile(t, rr, rc, GH, GW, DH, DW, TILES_R, TILES_C, TH, TW)
        _dkdv_program(pid, q_base, k_base, v_base, do_base, O + g_off, lse_base, delta_base, DK, DV, g_off,
                      g_row, sql, skl, svl, sdol, GH, GW, KH, KW, DH, DW, TILES_R, TILES_C, qk_scale,
                      sm_scale, acc_base, TH, TW, BLOCK_N, HEAD_DIM, CLAMP, FUSED_DELTA, UPCAST, IEEE,
                      True)
        tl.debug_barrier()
    for t in range(0, n_tiles):
        _pid, tok, ok = _subgrid_tile(t, rr, rc, GH, GW, DH, DW, TILES_R, TILES_C, TH, TW)
        acc = tl.load(acc_base + tok[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0,
                      cache_modifier=".cg")
        tl.store(DQ + g_off + tok[:, None] * g_row + offs_d[None, :],
                 (acc * sm_scale).to(DQ.dtype.element_ty), mask=ok[:, None])


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class NaConfig:
    """Tile of TH x TW queries (forward, dQ) or keys (dK/dV) and the walk's chunk length."""

    th: int
    tw: int
    block_n: int
    num_warps: int
    num_stages: int
    # backward only: recompute delta = rowsum(O * dO) per visit instead of a separate launch
    fused_delta: bool = False
    # backward only: one program per sub-grid and batch * head, dQ summed in an fp32 scratch
    # (``_na_bwd_whole``); offered only where a sub-grid has at most WHOLE_MAX_TILES tiles
    whole: bool = False
    # backward only: two launches, the dQ programs first (each writes its rows' delta, from the
    # O and dO rows it loads anyway), then the dK/dV programs: no separate delta launch (a pass
    # over O and dO: 20 us of a 0.29 ms fwd + bwd at CASMAR-B's 16 x 16, B 64, H 16)
    split: bool = False


# Candidates. Every query of a tile multiplies against the whole key rectangle of the tile,
# so small tiles waste the fewest pairs: an 8 x 8 tile with k 7 walks a 14 x 14 rectangle
# (196 keys, 25% of its pairs in a window; 224 slots in chunks of 32), a 4 x 8 tile 10 x 14
# (140 keys, 35%; 160 slots) but only with mma.sync (M 32; wgmma needs M 64 on Hopper), an
# 8 x 16 tile 14 x 22 (308 keys, 16%) with half the programs. Where the grid clips the
# rectangle (CASMAR's 16 x 16 grid: 11 x 11 keys per 8 x 8 tile) the differences shrink.
# The first of each list is the heuristic used without tuning (interpreter off, CUDA-graph
# capture) and what the GPU tests pin.
#
# 128-key chunks (one chunk per 8 x 8 tile on CASMAR's 16 x 16 grid) were candidates on 2026-12-04
# and lost on every measured key (H200, bf16, D 64, 16x16 to 128x128, k 7 and k 13 dil 2): forward
# 1.3-1.8x, backward 2.1-3.1x the best config (docs/benchmarks.md, *CASMAR proximal attention*).
def _fwd_candidates(head_dim: int) -> list[NaConfig]:
    if head_dim <= 64:
        return [NaConfig(8, 8, 64, 4, 2), NaConfig(8, 8, 32, 4, 3), NaConfig(8, 16, 64, 8, 2),
                NaConfig(16, 8, 32, 8, 2), NaConfig(8, 8, 64, 4, 3), NaConfig(4, 8, 32, 2, 2),
                # since 2026-12-04 night (32-key chunks won from 32 x 32 up): deeper, and 16-key chunks
                NaConfig(8, 8, 32, 4, 4), NaConfig(8, 8, 16, 4, 3),
                # since 2026-12-05: unpipelined, as the backward's winner (CASMAR's 16 x 16 grid
                # gives an 8 x 8 tile two 64-key chunks: little for a pipeline to overlap)
                NaConfig(8, 8, 64, 4, 1), NaConfig(8, 8, 32, 4, 1),
                # since 2026-12-05 (fourth session): one 16 x 16 tile covering a whole grid of at
                # most that size (CASMAR's DiT head): every key and value is loaded once per batch
                # and head instead of by four overlapping 8 x 8 tiles (484 key rows against 256),
                # for 2x the pairs (256 x 256, 19% of them in a k 7 window, against 31%). The
                # inference forward moves ~134 MB in 76 us at B 64 with CFG, about 35% of the
                # bandwidth: fewer, fuller programs may hide more latency. Offered only where the
                # tile covers the (sub-)grid (_offered).
                NaConfig(16, 16, 64, 8, 2), NaConfig(16, 16, 64, 8, 1), NaConfig(16, 16, 32, 8, 2)]
    return [NaConfig(8, 8, 64, 4, 2), NaConfig(8, 8, 32, 4, 2), NaConfig(8, 16, 64, 8, 2),
            NaConfig(8, 8, 64, 8, 2)]


def _bwd_candidates(head_dim: int) -> list[NaConfig]:
    if head_dim <= 64:
        return [NaConfig(8, 8, 64, 4, 2), NaConfig(8, 8, 32, 4, 2), NaConfig(8, 8, 64, 4, 2, True),
                NaConfig(8, 8, 32, 4, 2, True), NaConfig(8, 8, 64, 4, 3), NaConfig(8, 16, 64, 8, 2),
                NaConfig(4, 8, 32, 2, 2, True), NaConfig(8, 8, 32, 4, 2, whole=True),
                NaConfig(8, 8, 64, 4, 2, whole=True), NaConfig(8, 8, 32, 4, 2, True, whole=True),
                # since 2026-12-04 night: low-register forms (no pipelining, 16-key chunks, the
                # whole-sub-grid walk with 16-key chunks), none spilling in the sm90 compile as
                # launched. Spills do not explain the measured ranking (docs/kernels.md, *Register
                # spills*).
                NaConfig(8, 8, 32, 4, 1), NaConfig(8, 8, 16, 4, 2), NaConfig(8, 8, 16, 4, 2, True),
                NaConfig(8, 8, 16, 4, 2, whole=True), NaConfig(8, 8, 16, 4, 1, whole=True),
                NaConfig(8, 8, 16, 4, 2, True, whole=True),
                # since 2026-12-05: the unpipelined form won every k 7 key on the H200
                # (8x8/n32/w4/s1); its neighbours: delta recomputed in the walk (one launch
                # fewer), 16- and 64-key chunks
                NaConfig(8, 8, 32, 4, 1, True), NaConfig(8, 8, 16, 4, 1), NaConfig(8, 8, 16, 4, 1, True),
                NaConfig(8, 8, 64, 4, 1),
                # since 2026-12-05 (second session): the winners' tiles with the delta written by
                # the dQ launch (two backward launches, no delta launch)
                NaConfig(8, 8, 16, 4, 1, split=True), NaConfig(8, 8, 32, 4, 1, split=True),
                NaConfig(8, 8, 16, 4, 2, split=True)]
    return [NaConfig(8, 8, 32, 4, 2), NaConfig(8, 8, 64, 4, 2), NaConfig(8, 8, 32, 4, 2, True),
            NaConfig(8, 8, 64, 8, 2), NaConfig(8, 16, 32, 8, 2), NaConfig(8, 8, 32, 4, 2, whole=True)]


# A whole-sub-grid backward program walks its tiles one after another: with many tiles the
# programs get few and long (a 32 x 32 grid: 16 tiles each, 256 programs at B 16, H 16).
WHOLE_MAX_TILES = 4
# The whole-sub-grid backward passes the interpreter and compiles for sm80 / sm90, but has not
# run on a GPU yet (its dQ sums rely on barriers between tile walks, which the interpreter cannot
# test): the tuner times it only when asked (MASKAR_PSA_WHOLE=1); on an H200 it lost at 16 x 16 (2026-12-05).
TUNE_WHOLE = bool(env.switch("MASKAR_PSA_WHOLE"))


WHOLE_GRID_TILE = 256  # a forward tile of this many queries is offered only as a whole grid


def _offered(cfg: NaConfig, geom: Window) -> bool:
    """Whether the tuner times ``cfg`` for ``geom``."""
    if cfg.th * cfg.tw >= WHOLE_GRID_TILE and not cfg.whole:
        (_gh, _gw, _kh, _kw, _dh, _dw, tiles_r, tiles_c), _n = _geometry(geom, cfg.th, cfg.tw)
        return tiles_r * tiles_c == 1
    if not cfg.whole:
        return True
    if not TUNE_WHOLE:
        return False
    (_gh, _gw, _kh, _kw, _dh, _dw, tiles_r, tiles_c), _n = _geometry(geom, cfg.th, cfg.tw)
    return tiles_r * tiles_c <= WHOLE_MAX_TILES


# Tests set these to pin the configs (the CPU interpreter has no timing to tune on).
FORCE_FWD_CONFIG: NaConfig | None = None
FORCE_BWD_CONFIG: NaConfig | None = None
_INTERPRET_CONFIG = NaConfig(4, 4, 16, 4, 1)  # 16-row dots: the smallest tl.dot takes

_tuned: dict[tuple, NaConfig] = {}
_tune_log: dict[tuple, dict] = {}


def _tune(key: tuple, candidates: list[NaConfig], launch_with) -> NaConfig:
    """Time every candidate once for ``key`` and keep the fastest (compile errors skip one)."""
    return pick_fastest(key, candidates, launch_with, _tuned, _tune_log, "neighborhood attention", _time_ms)


def tuned_configs() -> dict[tuple, NaConfig]:
    """The configs chosen so far (for benchmarks and reports)."""
    return dict(_tuned)


def tuning_log() -> dict[tuple, dict]:
    """Per tuned key: the chosen config, (config, ms or error name) per candidate, and the
    seconds the tuning took (compiles included)."""
    return {k: dict(v) for k, v in _tune_log.items()}


def _capturing(q: Tensor) -> bool:
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _config(phase: str, q: Tensor, geom: Window, launch_with) -> NaConfig:
    forced = FORCE_FWD_CONFIG if phase == "fwd" else FORCE_BWD_CONFIG
    if forced is not None:
        return forced
    if _INTERPRET:
        return _INTERPRET_CONFIG
    B, H, L, D = q.shape
    # not keyed on B or H: a coarse "few vs many programs" class, so a new batch size
    # re-times at most once per class, and the kernels never recompile for it
    key = (phase, q.get_device(), q.dtype, D, geom, B * H >= 256)
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    every = _fwd_candidates(D) if phase == "fwd" else _bwd_candidates(D)
    candidates = [c for c in every if _offered(c, geom)]
    if _capturing(q):  # no timing inside a CUDA-graph capture
        return candidates[0]
    return _tune(key, candidates, launch_with)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class Window:
    """The attention pattern: grid (h, w), window (kh, kw), dilation (dh, dw), border rule."""

    grid: tuple[int, int]
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    border: str = "zeros"


@functools.lru_cache(maxsize=256)
def _geometry(geom: Window, th: int, tw: int) -> tuple[tuple[int, ...], int]:
    """(GH, GW, KH, KW, DH, DW, TILES_R, TILES_C), the kernels' geometry arguments, and the
    number of tiles of th x tw positions: per row residue, ceil(sub-grid rows / th) tile rows."""
    (h, w), (dh, dw) = geom.grid, geom.dilation
    tr, tc = cdiv(cdiv(h, dh), th), cdiv(cdiv(w, dw), tw)
    return (*geom.grid, *geom.kernel, *geom.dilation, tr, tc), dh * tr * dw * tc


def _consts(cfg: NaConfig, q: Tensor, geom: Window, backward: bool = False) -> dict:
    c = dict(TH=cfg.th, TW=cfg.tw, BLOCK_N=cfg.block_n, HEAD_DIM=q.shape[-1], CLAMP=geom.border == "clamp")
    if backward:
        c["FUSED_DELTA"] = cfg.fused_delta
    return c | dict(UPCAST=_INTERPRET and q.dtype == torch.bfloat16, IEEE=q.dtype == torch.float32)


def _launch_fwd(q, k, v, o, lse, qk_scale: float, geom: Window, cfg: NaConfig) -> None:
    B, H, L, D = q.shape
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    ints, n_tiles = _geometry(geom, cfg.th, cfg.tw)
    ints = (H, L, *ints)
    _launch(_na_fwd, (n_tiles, B * H), (q, k, v, o, lse, *strides, *ints, qk_scale),
            _consts(cfg, q, geom), cfg.num_warps, cfg.num_stages,
            (*_view_spec(q, k, v), strides, ints))  # o, lse: fresh allocations


def _launch_bwd(q, k, v, o, do, dq, dk, dv, lse, delta, qk_scale: float, scale: float, geom: Window,
                cfg: NaConfig) -> None:
    """The delta launch (unless ``cfg.fused_delta`` or ``cfg.split``), then the dK/dV + dQ launch
    (or the whole-sub-grid launch, ``cfg.whole``; or ``cfg.split``'s two launches)."""
    B, H, L, D = q.shape
    sdo = do.stride()
    if not (cfg.fused_delta or cfg.split):
        _launch(_bwd_delta, (cdiv(L, 64), B * H), (o, do, delta, sdo[0], sdo[1], sdo[2], H, L),
                dict(BLOCK_M=64, HEAD_DIM=D), 4, 3)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *sdo[:3])
    ints, n_tiles = _geometry(geom, cfg.th, cfg.tw)
    if cfg.whole:
        dq_acc = torch.empty(B * H, L, D, dtype=torch.float32, device=q.device)
        ints = (H, L, *ints)
        _launch(_na_bwd_whole, (geom.dilation[0] * geom.dilation[1], B * H),
                (q, k, v, o, do, dq, dk, dv, lse, delta, dq_acc, *strides, *ints, qk_scale, scale),
                _consts(cfg, q, geom, backward=True), cfg.num_warps, cfg.num_stages,
                (*_view_spec(q, k, v, do), strides, ints))
        return
    ints = (H, L, *ints, n_tiles)
    args = (q, k, v, o, do, dq, dk, dv, lse, delta, *strides, *ints, qk_scale, scale)
    spec = (*_view_spec(q, k, v, do), strides, ints)
    consts = _consts(cfg, q, geom, backward=True)
    if cfg.split:  # dQ + delta, then dK / dV
        for phase in (1, 2):
            _launch(_na_bwd, (n_tiles, B * H), args, consts | dict(PHASE=phase), cfg.num_warps,
                    cfg.num_stages, spec)
        return
    _launch(_na_bwd, (2 * n_tiles, B * H), args, consts | dict(PHASE=0), cfg.num_warps, cfg.num_stages, spec)


# Tests set this: fresh outputs are filled with NaN before the launches, so a row that no
# program writes shows up as non-finite.
POISON_OUTPUTS = False


def _poison(*ts: Tensor) -> None:
    if POISON_OUTPUTS:
        for t in ts:
            t.fill_(float("nan"))


def _forward(q: Tensor, k: Tensor, v: Tensor, geom: Window, scale: float) -> tuple[Tensor, Tensor]:
    """(o, lse): o a (B, H, L, D) view of (B, L, H, D), lse (B * H, L) base-2 log-sum-exp."""
    B, H, L, D = q.shape
    o = _blhd_empty(B, H, L, D, q)
    lse = torch.empty(B * H, L, dtype=torch.float32, device=q.device)
    _poison(o, lse)
    qk_scale = scale * LOG2E
    cfg = _config("fwd", q, geom, lambda c: _launch_fwd(q, k, v, o, lse, qk_scale, geom, c))
    _launch_fwd(q, k, v, o, lse, qk_scale, geom, cfg)
    return o, lse


class _NeighborhoodAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, geom: Window, scale: float) -> Tensor:
        o, lse = _forward(q, k, v, geom, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.geom, ctx.scale = geom, scale
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        geom, scale = ctx.geom, ctx.scale
        B, H, L, D = q.shape
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = _grads_empty(B, H, L, D, q)
        delta = torch.empty_like(lse)  # rowsum(O * dO), fp32 (unused by fused-delta configs)
        _poison(dq, dk, dv, delta)
        args = (q, k, v, o, do, dq, dk, dv, lse, delta, scale * LOG2E, scale, geom)
        cfg = _config("bwd", q, geom, lambda c: _launch_bwd(*args, c))
        _launch_bwd(*args, cfg)
        return dq, dk, dv, None, None


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@functools.lru_cache(maxsize=256)
def _window_of(grid, kernel_size, dilation, border: str) -> Window:
    return Window(_pair(grid), _pair(kernel_size), _pair(dilation), border)


@torch.compiler.disable  # host-side config choice and Triton launches: keep Dynamo out (graph break)
def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int],
    kernel_size: int | tuple[int, int] = 7,
    dilation: int | tuple[int, int] = 1,
    scale: float | None = None,
    border: str = "zeros",
) -> Tensor:
    """2D neighbourhood attention. q, k, v: (B, H, h*w, D) views -> (B, H, h*w, D) view of (B, L, H, D).

    ``border``: ``zeros`` (CASMAR: off-grid window slots stay in the softmax with logit 0
    and value 0) or ``clamp`` (NATTEN: windows shifted inside the grid).
    """
    geom = _window_of(tuple(grid), kernel_size if isinstance(kernel_size, int) else tuple(kernel_size),
                      dilation if isinstance(dilation, int) else tuple(dilation), border)
    problem = _check(q, k, v, geom)
    if not problem and not _device_ok(q.device):
        problem = f"needs a CUDA GPU of compute capability 8.0+ (or TRITON_INTERPRET=1), got {q.device}"
    if problem:
        raise ValueError(f"neighborhood_attention: {problem}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _NeighborhoodAttention.apply(q, k, v, geom, scale)


@torch.compiler.disable
def attention_if_supported(
    q: Tensor, k: Tensor, v: Tensor, grid, kernel_size, dilation, scale: float | None, border: str
) -> Tensor | None:
    """What ``auto`` dispatch uses: the kernel's output where :func:`supports` says yes, else None
    (one validation per call instead of two)."""
    if q.dtype not in (torch.float16, torch.bfloat16) or not _device_ok(q.device):
        return None
    geom = _window_of(tuple(grid), kernel_size if isinstance(kernel_size, int) else tuple(kernel_size),
                      dilation if isinstance(dilation, int) else tuple(dilation), border)
    if _check(q, k, v, geom):
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _NeighborhoodAttention.apply(q, k, v, geom, scale)


# ----------------------------------------------------------------------------- inside torch.compile

# The entry points above are hidden from Dynamo (host-side config choice), which breaks a compiled
# graph at every attention call. Inference under torch.compile (the sampler's compiled DiT head)
# calls this opaque op instead, so each compiled step stays one graph and Inductor fuses across
# the attention; it runs the same kernel with the same config, so its output equals the eager one.


@torch.library.custom_op("maskar::neighborhood_fwd", mutates_args=())
def neighborhood_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, window: list[int], scale: float, border: str
) -> Tensor:
    """Forward only; ``window`` = [h, w, kh, kw, dh, dw]."""
    h, w, kh, kw, dh, dw = window
    return _forward(q, k, v, _window_of((h, w), (kh, kw), (dh, dw), border), scale)[0]


@neighborhood_fwd_op.register_fake
def _(q, k, v, window, scale, border):
    B, H, L, D = q.shape
    return _blhd_empty(B, H, L, D, q)


def compiled_inference(
    q: Tensor, k: Tensor, v: Tensor, grid, kernel_size, dilation, scale: float | None, border: str
) -> Tensor | None:
    """Under torch.compile without autograd: the kernel as :func:`neighborhood_fwd_op` where
    ``auto`` dispatch would take it (the checks of :func:`supports`, traceable), else None."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if q.dtype not in (torch.float16, torch.bfloat16) or not (q.device.type == "cuda" or _INTERPRET):
        return None
    window = [*_pair(grid), *_pair(kernel_size), *_pair(dilation)]
    h, w, kh, kw, dh, dw = window
    same = q.shape == k.shape and q.shape == v.shape and k.dtype == q.dtype and v.dtype == q.dtype
    if not same or q.dim() != 4 or q.shape[2] != h * w or q.shape[3] not in _HEAD_DIMS:
        return None
    if min(window) < 1 or kh % 2 == 0 or kw % 2 == 0 or border not in BORDERS:
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return neighborhood_fwd_op(q, k, v, window, scale, border)


# ----------------------------------------------------------------------------- support

_HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q: Tensor, k: Tensor, v: Tensor, geom: Window) -> str:
    """Why the kernel cannot take this call ('' if it can)."""
    (h, w), (kh, kw), (dh, dw) = geom.grid, geom.kernel, geom.dilation
    if min(h, w, kh, kw, dh, dw) < 1 or kh % 2 == 0 or kw % 2 == 0:
        return f"expected a positive grid and dilation and odd window sizes, got {geom}"
    if geom.border not in BORDERS:
        return f"border: expected one of {BORDERS}, got {geom.border!r}"
    if q.dim() != 4 or not (tuple.__eq__(q.shape, k.shape) and tuple.__eq__(q.shape, v.shape)):
        shapes = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
        return f"expected q, k, v of equal shape (B, H, L, D), got {shapes}"
    if q.shape[2] != h * w:
        return f"{q.shape[2]} tokens do not fill grid {geom.grid}"
    if q.shape[3] not in _HEAD_DIMS:
        return f"head dim {q.shape[3]} not in {_HEAD_DIMS}"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        dtypes = ", ".join(str(t.dtype) for t in (q, k, v))
        return f"expected fp16 / bf16 (fp32 for tests) q, k, v of one dtype, got {dtypes}"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "expected a contiguous last dim"
    return ""


@functools.lru_cache(maxsize=16)
def _device_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8  # tl.dot in fp16/bf16, bf16 loads
    return _INTERPRET


def supports(q: Tensor, k: Tensor, v: Tensor, grid, kernel_size, dilation, border: str = "zeros") -> bool:
    """Whether ``auto`` uses the kernel: CUDA sm80+ (or the interpreter), fp16 / bf16 (fp32
    stays on the exact SDPA path), head dim 32 / 64 / 128, contiguous last dim."""
    if q.dtype not in (torch.float16, torch.bfloat16) or not _device_ok(q.device):
        return False
    return not _check(q, k, v, Window(_pair(grid), _pair(kernel_size), _pair(dilation), border))


__all__ = ["neighborhood_attention", "attention_if_supported", "compiled_inference", "supports",
           "tuned_configs", "tuning_log", "NaConfig", "Window", "BORDERS"]
