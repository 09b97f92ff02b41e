"""Fused L2 norm of the attention queries and keys (Triton), forward and backward.

VAR and HMAR normalise q and k per head before the attention (``attn_l2_norm``; see
``maskar.nn.blocks``): with x one head's D-vector of the fused projection, n = |x|,

    q_hat = q / max(n_q, eps) * gain_h,    k_hat = k / max(n_k, eps),
    gain_h = exp(min(s_h, ln 100))         (s = ``scale_mul_1H11``, learned per head),

eps = 1e-12 (F.normalize's), all in fp32, cast to the projection's dtype at the end. The
backward is the same chain's exact gradient, written out: with y = x / max(n, eps),
dy = d(x_hat) * gain (gain 1 for k),

    dx = (dy - [n >= eps] * y * sum_d(dy * y)) / max(n, eps)
    ds_h = [s_h <= ln 100] * gain_h * sum_{B, L, d}(d(q_hat) * y_q)

(clamp_min passes the gradient where n >= eps, the norm's gradient is 0 where n = 0 and
the clamp's where s <= ln 100, as torch's formulas do up to 2.13; torch 2.14 passes neither at
equality, n > eps and s < ln 100, and the kernels follow the torch they run with,
:func:`clamp_grad_at_bound`; ``ln 100`` and ``gain`` are rounded
to the parameter's dtype first, as torch computes them in it).

Why a kernel: under torch.compile Inductor split this into seven kernels per block
(normalize, the gain's two reductions, two norms, a sum and one that re-assembled dq, dk,
dv into the projection's gradient with layout transposes): ~9.9 ms of an 84.6 ms HMAR-d16
256 px B32 step against a ~2 ms byte floor (docs/kernels.md).

Layout. The projection's output ``qkv`` is (B, L, 3, H, D) contiguous. The forward reads
its q and k parts once and writes q_hat, k_hat into one fresh (B, L, 2, H, D) buffer,
returned as (B, H, L, D) views (what every attention backend takes); v stays a view of
``qkv``, never copied. The backward takes d(q_hat), d(k_hat) and dv as (B, H, L, D) views
of any strides and writes the projection's gradient (B, L, 3, H, D) directly (dv copied
into its slot), so the linear's backward reads it as is. A program owns BLOCK_T tokens of
one head: each row's D values are one contiguous run, every reduction over D stays in
registers, and consecutive programs take consecutive heads of the same tokens. The gain's
gradient is a two-stage reduction without atomics (deterministic): one fp32 partial per
program, then one small program sums them per head.

Autograd. ``maskar::qk_norm`` / ``maskar::qk_norm_bwd`` are torch.library custom ops with
fake implementations (shapes for torch.compile) and a CPU reference body, as
``maskar::block_sparse_attn``. The model calls :func:`qk_norm`, an autograd.Function over
them whose outputs are q_hat, k_hat *and v*: only so does dv reach the same backward
launch (a custom op's output may not alias its input, so v cannot be an op output without
a copy, and a v taken outside would have autograd and Inductor sum its gradient into the
projection's in one more pass over (B, L, 3, H, D)). The op keeps its own registered
autograd (v part of the gradient zero) for direct callers and ``opcheck``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Shared with the block-sparse kernel: its launch path (direct launcher calls, little host
# time), its GPU capability check, and its interpreter / CPU-reference switch.
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

EPS = 1e-12  # F.normalize's
MAX_LOG_GAIN = math.log(100.0)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _gain(s_raw, log_max):
    """(gain, s) in fp32 of the loaded parameter: exp(min(s, log_max)) rounded to the parameter's
    dtype (torch computes it there)."""
    s = s_raw.to(tl.float32)
    g = tl.exp(tl.minimum(s, log_max))
    return g.to(s_raw.dtype).to(tl.float32), s


@triton.jit
def _unit(x, eps, exact: tl.constexpr):
    """(x / max(|x|, eps), |x|, max(|x|, eps)) per row of a (rows, D) fp32 tile (the division as
    :func:`_over` makes it)."""
    n = tl.sqrt_rn(tl.sum(x * x, 1))
    den = tl.maximum(n, eps)
    return _over(x, den, exact), n, den


@triton.jit
def _over(x, den, exact: tl.constexpr):
    """x / den per row of a (rows, D) tile: IEEE division (torch's), or with ``exact`` False a
    multiply by the row's reciprocal (one division a row; within a few ulp of fp32)."""
    if exact:  # one return: Triton 3.6 cannot lower a helper that returns from both branches
        y = tl.div_rn(x, den[:, None])
    else:
        y = x * (1.0 / den)[:, None]
    return y


@triton.jit
def _passes(x, bound, at_bound: tl.constexpr, upper: tl.constexpr):
    """Where a clamp to ``bound`` (an upper one, or a lower one) passes the gradient: strictly
    inside, and at the bound too where ``at_bound`` (torch <= 2.13)."""
    if upper:
        inside = x < bound
    else:
        inside = x > bound
    if at_bound:
        inside = inside | (x == bound)
    return inside


@triton.jit(do_not_specialize=["n_tok", "H"])  # new batch sizes / lengths / head counts reuse the binary
def _qk_norm_fwd(QKV, S, OUT, n_tok, H, eps, log_max, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr):
    """OUT (n_tok, 2, H, D): q_hat * gain, k_hat of QKV (n_tok, 3, H, D), BLOCK_T tokens of head h."""
    pid = tl.program_id(0)
    h = pid % H
    t = (pid // H).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = (t < n_tok)[:, None]
    hd = H * HEAD_DIM
    col = h * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    src = QKV + t[:, None] * (3 * hd) + col
    xq = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    xk = tl.load(src + hd, mask=ok, other=0.0).to(tl.float32)
    g, _ = _gain(tl.load(S + h), log_max)
    yq, _, _ = _unit(xq, eps, True)
    yk, _, _ = _unit(xk, eps, True)
    dst = OUT + t[:, None] * (2 * hd) + col
    tl.store(dst, (yq * g).to(OUT.dtype.element_ty), mask=ok)
    tl.store(dst + hd, yk.to(OUT.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n_tok", "L", "H"])  # strides: specialised (16-divisible ones vectorise)
def _qk_norm_bwd(
    QKV, S, DQ, DK, DV, DQKV, PART, BPART, n_tok, L, H,
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, eps, log_max,
    BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_DV: tl.constexpr, GAIN_GRAD: tl.constexpr,
    AT_BOUND: tl.constexpr, BIAS_GRAD: tl.constexpr, ITERS: tl.constexpr, EXACT_DIV: tl.constexpr = True,
):
    """DQKV (n_tok, 3, H, D) of tokens [t0, t0 + ITERS * BLOCK_T) of head h, BLOCK_T at a time: dq,
    dk through the norm and the gain, dv copied (zeros without DV); PART[pid] = this program's sum
    of d(q_hat) * y_q; with BIAS_GRAD, BPART[t0 / (ITERS * BLOCK_T), :, h, :] = the column sums of
    its DQKV rows as stored (the projection's bias gradient, first stage). The sums accumulate
    elementwise in registers and reduce across the tile once, at the end."""
    pid = tl.program_id(0)
    h = pid % H
    hd = H * HEAD_DIM
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    g, _ = _gain(tl.load(S + h), log_max)
    acc_g = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_q = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    acc_k = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    for i in range(ITERS):
        t = ((pid // H).to(tl.int64) * ITERS + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = (t < n_tok)[:, None]
        b = t // L
        l_ = t - b * L
        row = t[:, None] * (3 * hd) + h * HEAD_DIM + offs_d
        xq = tl.load(QKV + row, mask=ok, other=0.0).to(tl.float32)
        xk = tl.load(QKV + row + hd, mask=ok, other=0.0).to(tl.float32)
        dq = tl.load(DQ + (b * sqb + h * sqh + l_ * sql)[:, None] + offs_d, mask=ok, other=0.0).to(tl.float32)
        dk = tl.load(DK + (b * skb + h * skh + l_ * skl)[:, None] + offs_d, mask=ok, other=0.0).to(tl.float32)

        yq, nq, denq = _unit(xq, eps, EXACT_DIV)
        pg = tl.sum(dq * yq, 1)  # d(loss)/d(gain) of each row
        # sum_d(dy * y) with dy = dq * g; 0 where clamp_min cut
        proj_q = tl.where(_passes(nq, eps, AT_BOUND, False), pg * g, 0.0)
        dxq = _over(dq * g - proj_q[:, None] * yq, denq, EXACT_DIV).to(DQKV.dtype.element_ty)
        yk, nk, denk = _unit(xk, eps, EXACT_DIV)
        proj_k = tl.where(_passes(nk, eps, AT_BOUND, False), tl.sum(dk * yk, 1), 0.0)
        dxk = _over(dk - proj_k[:, None] * yk, denk, EXACT_DIV).to(DQKV.dtype.element_ty)

        tl.store(DQKV + row, dxq, mask=ok)
        tl.store(DQKV + row + hd, dxk, mask=ok)
        if HAS_DV:
            dv = tl.load(DV + (b * svb + h * svh + l_ * svl)[:, None] + offs_d, mask=ok, other=0.0)
            dv = dv.to(DQKV.dtype.element_ty)
        else:
            dv = tl.zeros([BLOCK_T, HEAD_DIM], DQKV.dtype.element_ty)
        tl.store(DQKV + row + 2 * hd, dv, mask=ok)
        # rows past n_tok loaded zeros and give zeros: no mask needed in the sums
        acc_g += pg
        if BIAS_GRAD:
            acc_q += dxq.to(tl.float32)
            acc_k += dxk.to(tl.float32)
            acc_v += dv.to(tl.float32)
    if GAIN_GRAD:
        tl.store(PART + pid, tl.sum(acc_g, 0))
    if BIAS_GRAD:
        col = (pid // H).to(tl.int64) * (3 * hd) + h * HEAD_DIM + tl.arange(0, HEAD_DIM)
        tl.store(BPART + col, tl.sum(acc_q, 0))
        tl.store(BPART + col + hd, tl.sum(acc_k, 0))
        tl.store(BPART + col + 2 * hd, tl.sum(acc_v, 0))


@triton.jit(do_not_specialize=["n_rows", "H"])
def _qk_norm_gain_grad(PART, S, DS, n_rows, H, log_max, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                      AT_BOUND: tl.constexpr):
    """DS[h] = [s_h <= log_max] * gain_h * sum_r PART[r, h] (< where not AT_BOUND): the second
    stage, one program, fixed order."""
    hh = tl.arange(0, BLOCK_H)
    h_ok = hh < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < n_rows)[:, None] & h_ok[None, :]
        p = tl.load(PART + r[:, None] * H + hh[None, :], mask=ok, other=0.0)
        acc += tl.sum(p, 0)
    g, s = _gain(tl.load(S + hh, mask=h_ok, other=0.0), log_max)
    ds = tl.where(_passes(s, log_max, AT_BOUND, True), acc * g, 0.0)
    tl.store(DS + hh, ds.to(DS.dtype.element_ty), mask=h_ok)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class QKConfig:
    block_t: int  # tokens per tile (each program: one head)
    num_warps: int
    iters: int = 1  # backward: tiles per program (fewer bias / gain partial sums to write)
    # backward: IEEE divisions by the row's norm (torch's), or False: one reciprocal a row and
    # multiplies (within a few ulp of fp32; 19 fewer registers, 32 fewer div.rn a tile at D 64)
    exact_div: bool = True


def _config(head_dim: int) -> QKConfig:
    # The kernels are memory-bound. Tiles of 16 tokens, 16 tiles per backward program: the
    # fastest of 27 configs for HMAR-d16's 1024 px B 2 call with the bias sums on an H100
    # (scripts/gpu/qk_norm_sweep.py, 2026-12-06: 0.155 ms against 0.179 for the earlier 32 / 4 / 1;
    # the forward is within 2% across block_t 16-32 with 4 warps). D 32 keeps 2 KiB rows per tile.
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG
    # MASKAR_QK_RECIPROCAL (on by default): the backward multiplies by one reciprocal a row,
    # 132.7 against 154.0 us at 1024 px B 2 and 147.0 against 189.9 at 256 px B 32 on an H100
    # (qk_norm_sweep.py SUBSET=div, 2026-12-07); 0.4-0.8 ms a d16 training step.
    if _INTERPRET:
        return QKConfig(4, 1, exact_div=not RECIPROCAL)
    return QKConfig(max(1024 // head_dim, 16), 4, 16, exact_div=not RECIPROCAL)


FORCE_CONFIG: QKConfig | None = None  # tests / sweeps pin a config
RECIPROCAL = bool(env.switch("MASKAR_QK_RECIPROCAL"))

_log_max_cache: dict[torch.dtype, float] = {}


@functools.lru_cache(maxsize=1)
def clamp_grad_at_bound() -> bool:
    """Whether this torch's clamp passes the gradient where the input equals the bound.

    torch 2.11-2.13 do (``x.clamp(max=b)`` has gradient 1 at x == b), torch 2.14 does not. The
    kernels' and the reference backward's masks follow, so both equal autograd of the model's
    torch code (``maskar.nn.blocks.l2_norm_qk``) in the torch they run with."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.ones(1, requires_grad=True)
        (grad,) = torch.autograd.grad(x.clamp(max=1.0).sum(), x)
    return bool(grad[0] == 1.0)


def _log_max(dtype: torch.dtype) -> float:
    """ln 100 rounded to the gain parameter's dtype: the bound torch's clamp and its gradient use."""
    v = _log_max_cache.get(dtype)
    if v is None:
        v = _log_max_cache[dtype] = float(torch.tensor(MAX_LOG_GAIN, dtype=dtype))
    return v


def _forward(qkv: Tensor, scale_mul: Tensor) -> Tensor:
    """Kernel launch: (B, L, 2, H, D) q_hat * gain, k_hat of a contiguous (B, L, 3, H, D) qkv."""
    B, L, _, H, D = qkv.shape
    out = torch.empty((B, L, 2, H, D), dtype=qkv.dtype, device=qkv.device)
    cfg = _config(D)
    grid = (cdiv(B * L, cfg.block_t) * H,)
    _launch(_qk_norm_fwd, grid, (qkv, scale_mul, out, B * L, H, EPS, _log_max(scale_mul.dtype)),
            dict(BLOCK_T=cfg.block_t, HEAD_DIM=D), cfg.num_warps, 1)
    return out


def _backward(qkv: Tensor, scale_mul: Tensor, dq: Tensor, dk: Tensor, dv: Tensor | None,
              gain_grad: bool, bias_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel launches: (d qkv (B, L, 3, H, D), d scale_mul (zeros unless ``gain_grad``), the
    column sums of d qkv (3 H D,) in its dtype where ``bias_grad``, else an empty tensor)."""
    B, L, _, H, D = qkv.shape
    dq, dk = (t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk))
    if dv is not None and dv.stride(-1) != 1:
        dv = dv.contiguous()
    dqkv = torch.empty((B, L, 3, H, D), dtype=qkv.dtype, device=qkv.device)
    cfg = _config(D)
    n_tb = cdiv(B * L, cfg.block_t * cfg.iters)  # programs per head
    log_max = _log_max(scale_mul.dtype)
    part = torch.empty((n_tb, H), dtype=torch.float32, device=qkv.device) if gain_grad else dqkv
    bpart = torch.empty((n_tb, 3 * H * D), dtype=torch.float32, device=qkv.device) if bias_grad else dqkv
    sv = dv.stride() if dv is not None else (0, 0, 0, 1)
    _launch(_qk_norm_bwd, (n_tb * H,),
            (qkv, scale_mul, dq, dk, dv if dv is not None else dq, dqkv, part, bpart, B * L, L, H,
             *dq.stride()[:3], *dk.stride()[:3], *sv[:3], EPS, log_max),
            dict(BLOCK_T=cfg.block_t, HEAD_DIM=D, HAS_DV=dv is not None, GAIN_GRAD=gain_grad,
                 AT_BOUND=clamp_grad_at_bound(), BIAS_GRAD=bias_grad, ITERS=cfg.iters,
                 EXACT_DIV=cfg.exact_div),
            cfg.num_warps, 1)
    # the second stage: a fixed-order sum over the tiles (deterministic), rounded as the
    # projection's own bias gradient would be (its dtype)
    dbias = bpart.sum(0).to(qkv.dtype) if bias_grad else qkv.new_empty(0)
    if not gain_grad:
        return dqkv, torch.zeros_like(scale_mul), dbias
    ds = torch.empty_like(scale_mul)
    block_h = next_power_of_2(H)
    _launch(_qk_norm_gain_grad, (1,), (part, scale_mul, ds, n_tb, H, log_max),
            dict(BLOCK_R=max(4096 // block_h, 16), BLOCK_H=block_h, AT_BOUND=clamp_grad_at_bound()), 4, 1)
    return dqkv, ds, dbias


# ----------------------------------------------------------------------------- reference
#
# The CPU body of the ops: the same formulas in torch (>= fp32), below autograd. The model's
# own torch path (F.normalize and the clamped exp in maskar.nn.blocks, differentiated by
# autograd) is the reference the tests hold both against.


def _reference_unit(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """y, |x|, max(|x|, eps) of the q and k parts, (B, L, 2, H, D) / (B, L, 2, H, 1), in >= fp32."""
    x = qkv[:, :, :2].to(torch.promote_types(qkv.dtype, torch.float32))
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    den = n.clamp_min(EPS)
    return x / den, n, den


def _reference_gain(scale_mul: Tensor) -> Tensor:
    return scale_mul.clamp(max=MAX_LOG_GAIN).exp().reshape(1, 1, -1, 1)  # (1, 1, H, 1), its dtype


def _reference_forward(qkv: Tensor, scale_mul: Tensor) -> Tensor:
    y, _, _ = _reference_unit(qkv)
    out = torch.empty(y.shape, dtype=qkv.dtype, device=qkv.device)
    out[:, :, 0] = y[:, :, 0] * _reference_gain(scale_mul)
    out[:, :, 1] = y[:, :, 1]
    return out


def _reference_backward(qkv: Tensor, scale_mul: Tensor, dq: Tensor, dk: Tensor, dv: Tensor | None,
                        gain_grad: bool, bias_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    y, n, den = _reference_unit(qkv)
    g = _reference_gain(scale_mul).to(y.dtype)  # (1, 1, H, 1)
    dhat = torch.stack([dq.transpose(1, 2), dk.transpose(1, 2)], 2).to(y.dtype)  # (B, L, 2, H, D)
    dy = torch.stack([dhat[:, :, 0] * g, dhat[:, :, 1]], 2)
    at_bound = clamp_grad_at_bound()
    proj = (dy * y).sum(-1, keepdim=True) * ((n >= EPS) if at_bound else (n > EPS))
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dqkv[:, :, :2] = (dy - proj * y) / den
    dqkv[:, :, 2] = 0 if dv is None else dv.transpose(1, 2)
    dbias = dqkv.to(y.dtype).sum((0, 1)).reshape(-1).to(qkv.dtype) if bias_grad else qkv.new_empty(0)
    if not gain_grad:
        return dqkv, torch.zeros_like(scale_mul), dbias
    dgain = (dhat[:, :, 0] * y[:, :, 0]).sum((0, 1, 3)).reshape(scale_mul.shape)
    # compared in the parameter's dtype, as clamp's gradient
    keep = (scale_mul <= MAX_LOG_GAIN) if at_bound else (scale_mul < MAX_LOG_GAIN)
    ds = torch.where(keep, dgain * g.reshape(scale_mul.shape), 0.0)
    return dqkv, ds.to(scale_mul.dtype), dbias


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("maskar::qk_norm", mutates_args=())
def qk_norm_op(qkv: Tensor, scale_mul: Tensor) -> Tensor:
    """(B, L, 2, H, D) q_hat * gain and k_hat of the (B, L, 3, H, D) projection, in its dtype."""
    if _on_reference(qkv):
        return _reference_forward(qkv, scale_mul)
    return _forward(qkv.contiguous(), scale_mul.contiguous())


@qk_norm_op.register_fake
def _(qkv, scale_mul):
    B, L, _, H, D = qkv.shape
    return qkv.new_empty((B, L, 2, H, D))


@torch.library.custom_op("maskar::qk_norm_bwd", mutates_args=())
def qk_norm_bwd_op(
    qkv: Tensor, scale_mul: Tensor, dq: Tensor, dk: Tensor, dv: Tensor | None, gain_grad: bool,
    bias_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d qkv (B, L, 3, H, D) contiguous, with dv (B, H, L, D) in its v slot or zeros without it;
    d scale_mul, zeros unless ``gain_grad``; d qkv summed over its rows, (3 H D,) in its dtype,
    where ``bias_grad``, else empty)."""
    if _on_reference(qkv):
        return _reference_backward(qkv, scale_mul, dq, dk, dv, gain_grad, bias_grad)
    return _backward(qkv.contiguous(), scale_mul.contiguous(), dq, dk, dv, gain_grad, bias_grad)


@qk_norm_bwd_op.register_fake
def _(qkv, scale_mul, dq, dk, dv, gain_grad, bias_grad=False):
    n = qkv.shape[2] * qkv.shape[3] * qkv.shape[4] if bias_grad else 0
    return qkv.new_empty(qkv.shape), scale_mul.new_empty(scale_mul.shape), qkv.new_empty(n)


def _op_setup_context(ctx, inputs, output) -> None:
    qkv, scale_mul = inputs
    ctx.save_for_backward(qkv, scale_mul)


def _op_backward(ctx, dqk: Tensor):
    qkv, scale_mul = ctx.saved_tensors
    dq, dk = dqk.permute(2, 0, 3, 1, 4).unbind(0)
    gain_grad = ctx.needs_input_grad[1]
    dqkv, ds, _ = qk_norm_bwd_op(qkv, scale_mul, dq, dk, None, gain_grad)
    return dqkv, ds if gain_grad else None


qk_norm_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------- model entry


class _QKNorm(torch.autograd.Function):
    """q_hat, k_hat and v: the v output (a view of the input) routes dv into the one backward
    launch. ``bias`` (the projection's (3 H D,) bias, or None) is not used forward: its gradient,
    the column sums of d qkv, comes from the same launch (the caller added a detached copy)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, scale_mul: Tensor, bias: Tensor | None):
        qk = qk_norm_op(qkv, scale_mul) if _via_ops(qkv) else _forward(qkv, scale_mul)
        ctx.save_for_backward(qkv, scale_mul)
        ctx.bias_dtype = None if bias is None else bias.dtype
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, qkv.select(2, 2).transpose(1, 2)

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):
        qkv, scale_mul = ctx.saved_tensors
        gain_grad, bias_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        bwd = qk_norm_bwd_op if _via_ops(qkv) else _backward
        dqkv, ds, dbias = bwd(qkv, scale_mul, dq, dk, dv, gain_grad, bias_grad)
        return dqkv, ds if gain_grad else None, dbias.to(ctx.bias_dtype) if bias_grad else None


def qk_norm(qkv: Tensor, scale_mul: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """q_hat * exp(min(scale_mul, ln 100)), k_hat (L2-normalised per head, fp32 inside) and v.

    qkv: the (B, L, 3, H, D) output of the fused projection; scale_mul (1, H, 1, 1). Returns
    (B, H, L, D) views: q_hat and k_hat of one fresh (B, L, 2, H, D) buffer, v of ``qkv``.
    ``bias``: the projection's (3 H D,) bias where the caller computed ``qkv`` with a detached
    copy of it; its gradient (the column sums of d qkv, rounded to qkv's dtype as the linear's
    own bias gradient is) then comes from the backward launch instead of a separate pass over
    d qkv (0.66 of HMAR-d16's 86 ms at 1024 px B 2 on an H100, docs/benchmarks.md).
    """
    if not _shape_ok(qkv, scale_mul):
        raise ValueError(
            f"qk_norm: expected qkv (B, L, 3, H, D) with D in {_HEAD_DIMS}, a contiguous layout and a "
            f"(1, H, 1, 1) scale_mul of a float dtype; got qkv {tuple(qkv.shape)} {qkv.dtype} strides "
            f"{qkv.stride()}, scale_mul {tuple(scale_mul.shape)} {scale_mul.dtype}"
        )
    if bias is not None and bias.shape != (qkv.shape[2] * qkv.shape[3] * qkv.shape[4],):
        raise ValueError(f"qk_norm: bias {tuple(bias.shape)} for a (B, L, 3, H, D) qkv {tuple(qkv.shape)}")
    return _QKNorm.apply(qkv, scale_mul, bias)


# ----------------------------------------------------------------------------- support

_HEAD_DIMS = (32, 64, 128)

# Tests set this to send CPU calls of the model's q/k norm to the custom op's reference body
# (so a CPU-compiled model traces the op a GPU run would); off, the CPU runs the torch code.
CPU_REFERENCE = False
# False: the model runs its torch code on every device (A/B timing, or ruling the op out).
ENABLED = True
# False: the block's linear keeps its bias and sums its gradient itself (A/B timing of the
# kernel's bias-gradient sums).
BIAS_GRAD = True


def _shape_ok(qkv: Tensor, scale_mul: Tensor) -> bool:
    if qkv.dim() != 5 or qkv.shape[2] != 3 or qkv.shape[-1] not in _HEAD_DIMS:
        return False
    H = qkv.shape[3]
    return (
        qkv.is_contiguous()
        and scale_mul.is_contiguous()
        and scale_mul.numel() == H
        and scale_mul.dim() == 4
        and scale_mul.is_floating_point()
        and scale_mul.device == qkv.device
    )


def supports(qkv: Tensor, scale_mul: Tensor) -> bool:
    """Whether the model uses the fused op: CUDA sm80+ with fp16 / bf16 qkv (or the interpreter on
    the CPU); on the CPU reference (tests) any float dtype. Otherwise the torch code runs."""
    return ENABLED and _shape_ok(qkv, scale_mul) and kernel_dtype_ok(qkv.dtype, qkv.device, CPU_REFERENCE)


def supports_projection(x: Tensor, weight: Tensor, num_heads: int, scale_mul: Tensor) -> bool:
    """:func:`supports` of ``F.linear(x, weight, bias).view(B, L, 3, H, D)`` without computing it:
    the caller decides before the linear whether its bias gradient comes from the kernel. The
    linear's output is contiguous and in autocast's dtype where autocast is on for x's device."""
    dtype = compute_dtype(x)
    out = weight.shape[0]
    if x.dim() != 3 or out % (3 * num_heads):
        return False
    head_dim = out // (3 * num_heads)
    return (
        ENABLED
        and head_dim in _HEAD_DIMS
        and scale_mul.is_contiguous()
        and scale_mul.numel() == num_heads
        and scale_mul.dim() == 4
        and scale_mul.is_floating_point()
        and scale_mul.device == x.device
        and kernel_dtype_ok(dtype, x.device, CPU_REFERENCE)
    )


__all__ = ["qk_norm", "qk_norm_op", "qk_norm_bwd_op", "supports", "supports_projection", "QKConfig", "EPS",
           "MAX_LOG_GAIN"]
