"""An AdaLN block's LayerNorm + modulate, with the gated residual add in front, forward and
backward in one pass each (Triton): the training path of VAR / HMAR blocks.

Each ``AdaLNSelfAttnBlock`` (``maskar.nn.blocks``) computes, with x the fp32 residual stream
(B, L, C), o the attention's projected output, and per-sample (B, 1, C) modulation vectors,

    h1 = LN(x) (1 + scale1) + shift1                  -> qkv
    x2 = x + o * gamma1,  h2 = LN(x2) (1 + scale2) + shift2   -> FFN

LN without affine parameters (eps 1e-6), everything in fp32, h cast to the linears' compute
dtype. Under torch.compile Inductor makes the forward two passes, but the backward of the
pair nine kernels a block: the LayerNorm's row reductions and the modulation's per-sample
column sums (over L) go to separate kernels, each reading the fp32 stream again (≈ 480 µs
of a 1024 px B 2 block's backward against ≈ 185 µs of traffic on an H100, docs/benchmarks.md).
Here one backward program walks ``ITERS`` row tiles of one sample, keeps each row's C values
in registers for both row reductions, writes d x (and d o = gamma d x2), and accumulates
d scale = Σ_L dh · x̂, d shift = Σ_L dh and d gamma = Σ_L d x2 · o in registers; one fp32
partial row per program, summed in a fixed order after (deterministic, no atomics).

Math, with x̂ = (x - μ) r, r = 1 / sqrt(var + eps), g = dh (1 + scale):

    d x  = d x_out + r (g - mean_C(g) - x̂ mean_C(g x̂))

where d x_out is the gradient that reaches the residual stream past the norm: for h1 the
gradient of x itself (the op returns x as a view so that it arrives here, not in one more
autograd sum over (B, L, C), the trick of ``maskar.kernels.qk_norm``'s v), for h2 that of x2.

With ``MASKAR_ADALN_SUMS`` (on by default, :data:`SUMS`) four of Inductor's passes over the stream's
gradient a block become one: the FFN residual add x3 = x2 + f gamma2 runs through
:func:`gated_add`, whose backward is one launch (d f = gamma2 d x3, d gamma2 = Σ_L d x3 f, and
fc2's bias gradient) where Inductor made a pointwise pass and two reductions; and the proj bias's
gradient is one more partial row of the norm's backward, not one more reduction. Both linears add
their biases detached (the trick of ``maskar.kernels.gelu_bias`` for fc1's); a bias added before
the gate has the gradient Σ_{B,L} gamma d x = Σ_B gamma Σ_L d x.

Autograd and torch.compile as ``maskar.kernels.gelu_bias``: ``maskar::adaln_norm``,
``maskar::adaln_norm_bwd`` and ``maskar::gated_add_bwd`` are custom ops with fake implementations
and a CPU body (the same formulas in torch: the reference the kernels are tested against); an
autograd.Function calls the launches eagerly and the ops under compile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from maskar import env
from maskar.kernels.block_sparse import (
    _INTERPRET,
    _launch,
    _on_reference,
    _via_ops,
    cdiv,
    kernel_dtype_ok,
    next_power_of_2,
)
from maskar.nn.precision import compute_dtype

# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["L"])
def _adaln_norm_fwd(X, O, G, S, SH, X2, H, MEAN, RSTD, L, C, sg, ss, ssh, eps,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RESIDUAL: tl.constexpr):
    """Rows [pm BLOCK_M, +BLOCK_M) of sample b: (x2 = x + o g), H = LN(x2) (1 + s) + sh, and the
    rows' mean and 1/std. X, O, X2, H (B L, C) contiguous; G, S, SH rows of stride sg, ss, ssh."""
    pm = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < L
    col_ok = cols < C
    ok = row_ok[:, None] & col_ok[None, :]
    grow = b * L + rows
    at = grow[:, None] * C + cols[None, :]
    x = tl.load(X + at, mask=ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        g = tl.load(G + b * sg + cols, mask=col_ok, other=0.0).to(tl.float32)
        x = x + tl.load(O + at, mask=ok, other=0.0).to(tl.float32) * g[None, :]
        tl.store(X2 + at, x.to(X2.dtype.element_ty), mask=ok)
    mean = tl.sum(x, 1) / C
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
    s = tl.load(S + b * ss + cols, mask=col_ok, other=0.0).to(tl.float32)
    sh = tl.load(SH + b * ssh + cols, mask=col_ok, other=0.0).to(tl.float32)
    h = xc * rstd[:, None] * (1.0 + s)[None, :] + sh[None, :]
    tl.store(H + at, h.to(H.dtype.element_ty), mask=ok)
    tl.store(MEAN + grow, mean, mask=row_ok)
    tl.store(RSTD + grow, rstd, mask=row_ok)


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _bwd_tile(DH, X, DXO, O, MEAN, RSTD, b, rows, end, L, C, cols, col_ok,
              RESIDUAL: tl.constexpr, HAS_DXO: tl.constexpr):
    """The backward's loads of rows ``rows`` (those below ``end``) of sample b; d x_out and o are
    dh where the kernel has none (never read then)."""
    row_ok = rows < end
    ok = row_ok[:, None] & col_ok[None, :]
    at = (b * L + rows)[:, None] * C + cols[None, :]
    dh = tl.load(DH + at, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(X + at, mask=ok, other=0.0).to(tl.float32)
    dxo = dh
    if HAS_DXO:
        dxo = tl.load(DXO + at, mask=ok, other=0.0).to(tl.float32)
    o = dh
    if RESIDUAL:
        o = tl.load(O + at, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + b * L + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + b * L + rows, mask=row_ok, other=0.0)
    return dh, x, dxo, o, mean, rstd


@triton.jit(do_not_specialize=["L"])
def _adaln_norm_bwd(DH, X, DXO, O, G, S, MEAN, RSTD, DX, DO, PS, PSH, PG, PB, L, C, sg, ss, n_chunks,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
                    RESIDUAL: tl.constexpr, HAS_DXO: tl.constexpr, PAIRED: tl.constexpr,
                    BIAS_SUM: tl.constexpr, PREFETCH: tl.constexpr):
    """Rows [pm ITERS BLOCK_M, +ITERS BLOCK_M) of sample b: DX (and DO = g DX), and one partial
    row each of Σ dh x̂ (PS), Σ dh (PSH), Σ DX o (PG) and (BIAS_SUM) Σ DO = g Σ DX (PB) at
    [b n_chunks + pm]. X is the op's input: with the residual, x2 = x + o g is made again here,
    as the forward made it, so the step keeps one fp32 stream a block saved instead of two.
    PREFETCH: each tile's loads are issued one tile ahead, before the current tile's reductions,
    so a program's reads overlap its cross-warp exchanges (the same values, the same order)."""
    pm = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    s1 = 1.0 + tl.load(S + b * ss + cols, mask=col_ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        g = tl.load(G + b * sg + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_s = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_sh = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    end = tl.minimum(L, (pm + 1) * ITERS * BLOCK_M)
    if PREFETCH:
        n_dh, n_x, n_dxo, n_o, n_mean, n_rstd = _bwd_tile(
            DH, X, DXO, O, MEAN, RSTD, b, pm * ITERS * BLOCK_M + tl.arange(0, BLOCK_M), end, L, C, cols,
            col_ok, RESIDUAL, HAS_DXO)
    for i in range(ITERS):
        rows = (pm * ITERS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        ok = row_ok[:, None] & col_ok[None, :]
        at = (b * L + rows)[:, None] * C + cols[None, :]
        # every load of the row before the reductions' barriers
        if PREFETCH:
            dh, x, dxo, o, mean, rstd = n_dh, n_x, n_dxo, n_o, n_mean, n_rstd
            n_dh, n_x, n_dxo, n_o, n_mean, n_rstd = _bwd_tile(
                DH, X, DXO, O, MEAN, RSTD, b, rows + BLOCK_M, end, L, C, cols, col_ok, RESIDUAL, HAS_DXO)
        else:
            dh, x, dxo, o, mean, rstd = _bwd_tile(DH, X, DXO, O, MEAN, RSTD, b, rows, end, L, C, cols,
                                                  col_ok, RESIDUAL, HAS_DXO)
        if RESIDUAL:
            x = x + o * g[None, :]
        xh = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        gh = dh * s1[None, :]
        if PAIRED:  # both row sums in one reduction (one round of cross-warp exchange)
            c1, c2 = tl.reduce((gh * xh, gh), 1, _add_pair)
        else:
            c1, c2 = tl.sum(gh * xh, 1), tl.sum(gh, 1)
        dx = rstd[:, None] * (gh - (c2 / C)[:, None] - xh * (c1 / C)[:, None])
        if HAS_DXO:
            dx += dxo
        dx = tl.where(ok, dx, 0.0)
        tl.store(DX + at, dx.to(DX.dtype.element_ty), mask=ok)
        acc_s += dh * xh
        acc_sh += dh
        if RESIDUAL:
            tl.store(DO + at, (dx * g[None, :]).to(DO.dtype.element_ty), mask=ok)
            acc_g += dx * o
            if BIAS_SUM:
                acc_b += dx
    part = (b * n_chunks + pm) * C + cols
    tl.store(PS + part, tl.sum(acc_s, 0), mask=col_ok)
    tl.store(PSH + part, tl.sum(acc_sh, 0), mask=col_ok)
    if RESIDUAL:
        tl.store(PG + part, tl.sum(acc_g, 0), mask=col_ok)
        if BIAS_SUM:
            tl.store(PB + part, tl.sum(acc_b, 0) * g, mask=col_ok)


@triton.jit
def _pair_tile(A, B_, b, rows, end, L, C, cols, col_ok):
    """Rows ``rows`` (those below ``end``) of sample b of two (B, L, C) tensors, in fp32."""
    ok = (rows < end)[:, None] & col_ok[None, :]
    at = (b * L + rows)[:, None] * C + cols[None, :]
    a = tl.load(A + at, mask=ok, other=0.0).to(tl.float32)
    return a, tl.load(B_ + at, mask=ok, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["L"])
def _gated_add_bwd(DY, F, G, DF, PG, PB, L, C, sg, n_chunks, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                   ITERS: tl.constexpr, BIAS_SUM: tl.constexpr, PREFETCH: tl.constexpr):
    """The backward of y = x + f g (g per sample) over rows [pm ITERS BLOCK_M, +ITERS BLOCK_M) of
    sample b: DF = g DY, and one partial row each of Σ DY f (PG) and (BIAS_SUM) Σ DF = g Σ DY
    (PB) at [b n_chunks + pm]. d x is DY itself (no launch). PREFETCH as in the norm's backward."""
    pm = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    g = tl.load(G + b * sg + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    end = tl.minimum(L, (pm + 1) * ITERS * BLOCK_M)
    if PREFETCH:
        first = pm * ITERS * BLOCK_M + tl.arange(0, BLOCK_M)
        n_dy, n_f = _pair_tile(DY, F, b, first, end, L, C, cols, col_ok)
    for i in range(ITERS):
        rows = (pm * ITERS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows < L)[:, None] & col_ok[None, :]
        at = (b * L + rows)[:, None] * C + cols[None, :]
        if PREFETCH:
            dy, f = n_dy, n_f
            n_dy, n_f = _pair_tile(DY, F, b, rows + BLOCK_M, end, L, C, cols, col_ok)
        else:
            dy, f = _pair_tile(DY, F, b, rows, end, L, C, cols, col_ok)
        tl.store(DF + at, (dy * g[None, :]).to(DF.dtype.element_ty), mask=ok)
        acc_g += dy * f
        if BIAS_SUM:
            acc_b += dy
    part = (b * n_chunks + pm) * C + cols
    tl.store(PG + part, tl.sum(acc_g, 0), mask=col_ok)
    if BIAS_SUM:
        tl.store(PB + part, tl.sum(acc_b, 0) * g, mask=col_ok)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class AdaLNNormConfig:
    fwd_block_m: int  # forward: rows per program
    fwd_warps: int
    bwd_block_m: int  # backward: rows per tile
    bwd_iters: int  # backward: row tiles per program (one partial row each of the three sums)
    bwd_warps: int


FORCE_CONFIG: AdaLNNormConfig | None = None  # tests / sweeps pin a config
# the backward's two row sums in one tl.reduce over a pair: as fast as two tl.sum on an H100
# (102.9 / 103.2 us without the residual, 159.6 / 155.5 with; scripts/gpu/adaln_norm_sweep.py)
PAIRED_REDUCE = True
# MASKAR_ADALN_PREFETCH: the backward kernels' loads issued one row tile ahead (both kernels; the
# same results bit for bit); off until timed on a GPU (scripts/gpu/adaln_prefetch_sweep.py)
PREFETCH = bool(env.switch("MASKAR_ADALN_PREFETCH"))
# the fastest at HMAR-d16's 1024 px B 2 on an H100 (scripts/gpu/adaln_norm_sweep.py, the shipped form,
# 2026-12-07): forward 11 configs within 10%, backward 103.8 / 160.4 us (78% / 65% of the bandwidth)
_DEFAULT = AdaLNNormConfig(1, 4, 1, 32, 8)
_INTERPRET_CONFIG = AdaLNNormConfig(2, 1, 2, 2, 1)


def _config() -> AdaLNNormConfig:
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG
    return _INTERPRET_CONFIG if _INTERPRET else _DEFAULT


@dataclass(frozen=True)
class GatedAddConfig:
    block_m: int  # rows a tile
    iters: int  # row tiles a program (one partial row each of the sums)
    warps: int


GATED_FORCE_CONFIG: GatedAddConfig | None = None
# the fastest of 12 at HMAR-d16's 1024 px B 2 on an H100 (scripts/gpu/adaln_sums_sweep.py,
# 2026-12-07): 62.2 us, 74% of the bandwidth (Inductor's code for the same results: 112.8)
_GATED_DEFAULT = GatedAddConfig(2, 16, 4)
_GATED_INTERPRET_CONFIG = GatedAddConfig(2, 2, 1)


def _gated_config() -> GatedAddConfig:
    if GATED_FORCE_CONFIG is not None:
        return GATED_FORCE_CONFIG
    return _GATED_INTERPRET_CONFIG if _INTERPRET else _GATED_DEFAULT


def _rows(t: Tensor | None, B: int, C: int) -> tuple[Tensor | None, int]:
    """A (B | 1, 1, C) modulation vector as (B, C) rows with unit column stride, and its row stride."""
    if t is None:
        return None, 0
    t = t.reshape(t.shape[0], C) if t.shape[0] == B else t.reshape(1, C).expand(B, C)
    if t.stride(1) != 1:
        t = t.contiguous()
    return t, t.stride(0)


def _forward(x: Tensor, o: Tensor | None, gate: Tensor | None, scale: Tensor, shift: Tensor, eps: float,
             out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, L, C = x.shape
    cfg = _config()
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    x2 = torch.empty_like(x) if o is not None else x.new_empty(0)
    mean = torch.empty((B, L), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    g, sg = _rows(gate, B, C)
    s, ss = _rows(scale, B, C)
    sh, ssh = _rows(shift, B, C)
    res = o is not None
    _launch(_adaln_norm_fwd, (cdiv(L, cfg.fwd_block_m), B),
            (x, o.contiguous() if res else x, g if res else s, s, sh, x2 if res else h, h, mean, rstd,
             L, C, sg, ss, ssh, eps),
            dict(BLOCK_M=cfg.fwd_block_m, BLOCK_C=next_power_of_2(C), RESIDUAL=res), cfg.fwd_warps, 1)
    return h, x2, mean, rstd


def _n_sums(res: bool, bias_sum: bool) -> int:
    return 2 + res + (res and bias_sum)


def _backward(dh: Tensor, x: Tensor, dx_out: Tensor | None, o: Tensor | None, gate: Tensor | None,
              scale: Tensor, mean: Tensor, rstd: Tensor,
              bias_sum: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(d x, d o, sums): sums (k, B, 1, C) fp32 holds d scale, d shift and, with the residual,
    d gate (k = 3) and with ``bias_sum`` Σ_L d o (k = 4); d o empty without the residual."""
    B, L, C = x.shape
    cfg = _config()
    res = o is not None
    bias_sum = bias_sum and res
    dh = dh.contiguous()
    dx = torch.empty_like(x)
    do = torch.empty_like(o) if res else dx.new_empty(0)
    n_chunks = cdiv(L, cfg.bwd_block_m * cfg.bwd_iters)
    parts = torch.empty((_n_sums(res, bias_sum), B, n_chunks, C), dtype=torch.float32, device=x.device)
    g, sg = _rows(gate, B, C)
    s, ss = _rows(scale, B, C)
    dxo = dx_out.contiguous() if dx_out is not None else None
    _launch(_adaln_norm_bwd, (n_chunks, B),
            (dh, x, dxo if dxo is not None else dh, o.contiguous() if res else dh, g if res else s, s,
             mean, rstd, dx, do if res else dx, parts[0], parts[1], parts[2] if res else parts[1],
             parts[-1], L, C, sg, ss, n_chunks),
            dict(BLOCK_M=cfg.bwd_block_m, BLOCK_C=next_power_of_2(C), ITERS=cfg.bwd_iters, RESIDUAL=res,
                 HAS_DXO=dxo is not None, PAIRED=PAIRED_REDUCE, BIAS_SUM=bias_sum, PREFETCH=PREFETCH),
            cfg.bwd_warps, 1)
    # one reduction for all the sums, in a fixed order (one tensor: a custom op's outputs may not
    # alias each other, so the caller splits it)
    return dx, do, parts.sum(2, keepdim=True)


def _gated_add_backward(dy: Tensor, f: Tensor, gate: Tensor, bias_sum: bool) -> tuple[Tensor, Tensor]:
    """(d f, sums) of y = x + f gate: sums (k, B, 1, C) fp32 holds d gate and, with ``bias_sum``
    (k = 2), Σ_L d f (a bias added to f before the gate gets its sum over B)."""
    B, L, C = f.shape
    cfg = _gated_config()
    dy, f = dy.contiguous(), f.contiguous()
    df = torch.empty_like(f)
    n_chunks = cdiv(L, cfg.block_m * cfg.iters)
    parts = torch.empty((1 + bias_sum, B, n_chunks, C), dtype=torch.float32, device=f.device)
    g, sg = _rows(gate, B, C)
    _launch(_gated_add_bwd, (n_chunks, B), (dy, f, g, df, parts[0], parts[-1], L, C, sg, n_chunks),
            dict(BLOCK_M=cfg.block_m, BLOCK_C=next_power_of_2(C), ITERS=cfg.iters, BIAS_SUM=bias_sum,
                 PREFETCH=PREFETCH),
            cfg.warps, 1)
    return df, parts.sum(2, keepdim=True)


# ----------------------------------------------------------------------------- reference


def _reference_forward(x: Tensor, o: Tensor | None, gate: Tensor | None, scale: Tensor, shift: Tensor,
                       eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    if o is not None:
        xf = xf + o.to(acc) * gate.to(acc)
    var, mean = torch.var_mean(xf, -1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    h = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * (1 + scale.to(acc)) + shift.to(acc)
    x2 = xf.to(x.dtype) if o is not None else x.new_empty(0)
    return h.to(out_dtype), x2, mean.float(), rstd.float()


def _reference_backward(dh: Tensor, x: Tensor, dx_out: Tensor | None, o: Tensor | None,
                        gate: Tensor | None, scale: Tensor, mean: Tensor, rstd: Tensor,
                        bias_sum: bool = False):
    acc = torch.promote_types(x.dtype, torch.float32)
    dhf, r = dh.to(acc), rstd.to(acc).unsqueeze(-1)
    xs = x.to(acc) if o is None else x.to(acc) + o.to(acc) * gate.to(acc)  # the stream, made again
    xh = (xs - mean.to(acc).unsqueeze(-1)) * r
    gh = dhf * (1 + scale.to(acc))
    dx = r * (gh - gh.mean(-1, keepdim=True) - xh * (gh * xh).mean(-1, keepdim=True))
    if dx_out is not None:
        dx = dx + dx_out.to(acc)
    sums = [(dhf * xh).sum(1, keepdim=True), dhf.sum(1, keepdim=True)]
    if o is None:
        return dx.to(x.dtype), x.new_empty(0), torch.stack(sums).float()
    do = dx * gate.to(acc)
    sums.append((dx * o.to(acc)).sum(1, keepdim=True))
    if bias_sum:
        sums.append(do.sum(1, keepdim=True))
    return dx.to(x.dtype), do.to(o.dtype), torch.stack(sums).float()


def _reference_gated_add_backward(dy: Tensor, f: Tensor, gate: Tensor, bias_sum: bool):
    acc = torch.promote_types(dy.dtype, torch.float32)
    df = dy.to(acc) * gate.to(acc)
    sums = [(dy.to(acc) * f.to(acc)).sum(1, keepdim=True)]
    if bias_sum:
        sums.append(df.sum(1, keepdim=True))
    return df.to(f.dtype), torch.stack(sums).float()


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("maskar::adaln_norm", mutates_args=())
def adaln_norm_op(x: Tensor, o: Tensor | None, gate: Tensor | None, scale: Tensor, shift: Tensor, eps: float,
                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h, x2 or empty, mean, 1/std): x2 = x + o gate where o is given, h = LN(x2) (1 + scale) +
    shift in ``out_dtype``; x (B, L, C), the vectors (B | 1, 1, C)."""
    if _on_reference(x):
        return _reference_forward(x, o, gate, scale, shift, eps, out_dtype)
    return _forward(x.contiguous(), o, gate, scale, shift, eps, out_dtype)


@adaln_norm_op.register_fake
def _(x, o, gate, scale, shift, eps, out_dtype):
    B, L, _ = x.shape
    mean = x.new_empty((B, L), dtype=torch.float32)
    x2 = torch.empty_like(x) if o is not None else x.new_empty(0)
    return torch.empty_like(x, dtype=out_dtype), x2, mean, torch.empty_like(mean)


@torch.library.custom_op("maskar::adaln_norm_bwd", mutates_args=())
def adaln_norm_bwd_op(
    dh: Tensor, x: Tensor, dx_out: Tensor | None, o: Tensor | None, gate: Tensor | None, scale: Tensor,
    mean: Tensor, rstd: Tensor, bias_sum: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d x, d o, sums) of :func:`adaln_norm_op` at its input x (the stream x + o gate is made
    again from it): sums (k, B, 1, C) fp32 stacks d scale, d shift and, with o, d gate (k = 3)
    and with ``bias_sum`` Σ_L d o (k = 4); d o empty without o."""
    if _on_reference(x):
        return _reference_backward(dh, x, dx_out, o, gate, scale, mean, rstd, bias_sum)
    return _backward(dh, x.contiguous(), dx_out, o, gate, scale, mean, rstd, bias_sum)


@adaln_norm_bwd_op.register_fake
def _(dh, x, dx_out, o, gate, scale, mean, rstd, bias_sum=False):
    B, _, C = x.shape
    res = o is not None
    sums = x.new_empty((_n_sums(res, bias_sum), B, 1, C), dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(o) if res else x.new_empty(0), sums


@torch.library.custom_op("maskar::gated_add_bwd", mutates_args=())
def gated_add_bwd_op(dy: Tensor, f: Tensor, gate: Tensor, bias_sum: bool) -> tuple[Tensor, Tensor]:
    """(d f, sums) of y = x + f gate (f (B, L, C), gate (B | 1, 1, C)): sums (k, B, 1, C) fp32
    stacks d gate and, with ``bias_sum`` (k = 2), Σ_L d f."""
    if _on_reference(f):
        return _reference_gated_add_backward(dy, f, gate, bias_sum)
    return _gated_add_backward(dy, f, gate, bias_sum)


@gated_add_bwd_op.register_fake
def _(dy, f, gate, bias_sum):
    B, _, C = f.shape
    return torch.empty_like(f), f.new_empty((1 + bias_sum, B, 1, C), dtype=torch.float32)


def _sum_to(grad: Tensor, meta: tuple[torch.Size, torch.dtype]) -> Tensor:
    """A (B, 1, C) fp32 sum as the gradient of a (B | 1, 1, C) vector of shape and dtype ``meta``."""
    shape, dtype = meta
    if shape[0] != grad.shape[0]:
        grad = grad.sum(0, keepdim=True)
    return grad.reshape(shape).to(dtype)


class _AdaLNNorm(torch.autograd.Function):
    """(h, x_out): without o, x_out is x itself (a view), with o the new stream x + o gate. Either
    way x_out's gradient comes back into this backward's launch. ``bias``, where given, is the
    bias o's linear added with a detached copy: its gradient (Σ d o) comes from this launch."""

    @staticmethod
    def forward(ctx, x, o, gate, scale, shift, eps, out_dtype, bias=None):
        fwd = adaln_norm_op if _via_ops(x) else _forward
        h, x2, mean, rstd = fwd(x, o, gate, scale, shift, eps, out_dtype)
        res = o is not None
        # x, not x2: the backward makes x2 again (x is saved for the block anyway)
        ctx.save_for_backward(x, o, gate, scale, mean, rstd)
        ctx.meta = [None if t is None else (t.shape, t.dtype) for t in (gate, scale, shift, bias)]
        return h, (x2 if res else x.view_as(x))

    @staticmethod
    def backward(ctx, dh, dx_out):
        x, o, gate, scale, mean, rstd = ctx.saved_tensors
        mg, ms, msh, mb = ctx.meta
        res = o is not None
        bias_sum = res and mb is not None
        bwd = adaln_norm_bwd_op if _via_ops(x) else _backward
        dx, do, sums = bwd(dh, x, dx_out, o, gate, scale, mean, rstd, bias_sum)
        return (dx, do if res else None, _sum_to(sums[2], mg) if res else None, _sum_to(sums[0], ms),
                _sum_to(sums[1], msh), None, None, _bias_grad(sums[3], mb) if bias_sum else None)


def _bias_grad(sums: Tensor, meta: tuple[torch.Size, torch.dtype]) -> Tensor:
    """The gradient of a (C,) bias added before the gate, from the (B, 1, C) per-sample sums of
    the gated tensor's gradient."""
    shape, dtype = meta
    return sums.sum(0).reshape(shape).to(dtype)


def adaln_norm(x: Tensor, o: Tensor | None, gate: Tensor | None, scale: Tensor, shift: Tensor,
               eps: float, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(h, x2)``: x2 = x + o * gate (x itself where o is None), h = LN(x2) (1 + scale) + shift
    in the linears' compute dtype (autocast's). x (B, L, C) float32, o (B, L, C), the vectors
    (B | 1, 1, C). ``bias``: the bias of o's linear where that linear added it detached (its
    gradient comes from this backward's launch, not from one more pass over d o)."""
    return _AdaLNNorm.apply(x, o, gate, scale, shift, eps, compute_dtype(x), bias)


class _GatedAdd(torch.autograd.Function):
    """y = x + f gate as torch computes it (Inductor makes the forward one pass at the
    bandwidth); the backward in one launch: d f, d gate's sums and, with ``bias``, its gradient."""

    @staticmethod
    def forward(ctx, x, f, gate, bias=None):
        ctx.save_for_backward(f, gate)
        ctx.meta = (gate.shape, gate.dtype), None if bias is None else (bias.shape, bias.dtype)
        return torch.addcmul(x, f, gate)

    @staticmethod
    def backward(ctx, dy):
        f, gate = ctx.saved_tensors
        mg, mb = ctx.meta
        bwd = gated_add_bwd_op if _via_ops(f) else _gated_add_backward
        df, sums = bwd(dy, f, gate, mb is not None)
        return dy, df, _sum_to(sums[0], mg), _bias_grad(sums[1], mb) if mb is not None else None


def gated_add(x: Tensor, f: Tensor, gate: Tensor, bias: Tensor | None = None) -> Tensor:
    """x + f * gate (the block's FFN residual add): x (B, L, C) float32, f (B, L, C) in the
    linears' dtype, gate (B | 1, 1, C). ``bias``: as :func:`adaln_norm`'s, for f's linear."""
    return _GatedAdd.apply(x, f, gate, bias)


# ----------------------------------------------------------------------------- support

CPU_REFERENCE = False  # tests: CPU calls go to the ops' torch bodies
# on by default since the H100 A/B (scripts/gpu/adaln_norm_rows.sh, 2026-12-07: 1.5 to 1.8 ms a step
# faster, peak memory level or lower); MASKAR_ADALN_NORM=0 keeps torch's LayerNorm and addcmul.
ENABLED = bool(env.switch("MASKAR_ADALN_NORM"))
# MASKAR_ADALN_SUMS (with ENABLED; on by default, =0 turns it off): the block's FFN residual add
# goes through gated_add (its backward one launch) and the proj / fc2 bias gradients come from the
# launches that make d o and d f. H100 A/B (SUMS=1 scripts/gpu/adaln_norm_rows.sh, 2026-12-07):
# 0.3 ms a step faster at 1024 px B 2, 0.8-0.9 at 256 px B 32, peak memory level
SUMS = bool(env.switch("MASKAR_ADALN_SUMS"))
MAX_WIDTH = 4096  # a row's C values stay in one program's registers


def supports(x: Tensor) -> bool:
    """Whether a block takes this path for its residual stream ``x``: training (autograd on), x a
    contiguous fp32 (B, L, C) stream computing in fp16 / bf16 (autocast's dtype) on CUDA sm80+ or
    the interpreter; on the CPU reference (tests) any float dtype."""
    if not ENABLED or not torch.is_grad_enabled() or x.ndim != 3 or x.shape[-1] > MAX_WIDTH:
        return False
    if not x.is_contiguous() or (x.dtype != torch.float32 and not (CPU_REFERENCE and x.is_cpu)):
        return False
    return kernel_dtype_ok(compute_dtype(x), x.device, CPU_REFERENCE)


__all__ = ["adaln_norm", "gated_add", "adaln_norm_op", "adaln_norm_bwd_op", "gated_add_bwd_op", "supports",
           "AdaLNNormConfig", "GatedAddConfig"]
