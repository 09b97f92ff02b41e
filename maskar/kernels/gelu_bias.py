"""The tanh GELU of a linear's output whose backward also sums the linear's bias gradient (Triton).

VAR / HMAR's FFN computes ``gelu(fc1(x))`` (the tanh approximation). In training the backward
of that pair is, under Inductor, two passes over the (rows, 4 W) activation: one computes
d pre = d act * gelu'(pre) for fc1's matmuls, and a second reads d act and pre again to sum
d pre's columns into fc1's bias gradient (``triton_red_fused_gelu_gelu_backward_sum``,
0.054 ms a block, 0.87 ms of HMAR-d16's 1024 px B 2 step on an H100, docs/benchmarks.md,
*Run 11*). Here the backward kernel writes d pre and sums its columns as stored in the same
pass: each program walks ``iters`` row tiles of one column block, accumulates elementwise in
fp32 registers, reduces across the tile once and writes one partial row; a fixed-order sum
over the partials (deterministic) gives the bias gradient, rounded to the activation's dtype
as the linear's own bias gradient is under autocast. The caller computes the linear with a
detached bias and passes the bias here (:func:`gelu_with_bias_grad`), as
``maskar.kernels.qk_norm`` does for the attention projection.

Math (PyTorch's tanh GELU and its backward, in fp32, cast to the input's dtype at the end):
``u = b (x + k x^3)``, ``t = tanh(u)``, ``y = x (1 + t) / 2``,
``dy/dx = (1 + t) / 2 + x (1 - t^2) b (1 + 3 k x^2) / 2``, with ``b = sqrt(2 / pi)``,
``k = 0.044715``.

Autograd and torch.compile as ``maskar.kernels.qk_norm``: ``maskar::gelu_tanh`` and
``maskar::gelu_tanh_bwd`` are custom ops with fake implementations and a CPU body (the same
formulas in torch: the reference the kernels are tested against); an autograd.Function calls
the launches eagerly and the ops under compile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.block_sparse import (
    _INTERPRET,
    _launch,
    _on_reference,
    _via_ops,
    cdiv,
    kernel_dtype_ok,
)
from maskar.nn.precision import compute_dtype

_BETA = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): exact at +-inf, one exp
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit  # n specialised: a 16-divisible count lets the loads and stores vectorise
def _gelu_tanh_fwd(X, Y, n, beta, kappa, BLOCK: tl.constexpr):
    """Y = gelu_tanh(X) over n elements (flat)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    t = _tanh(beta * (x + kappa * x * x * x))
    tl.store(Y + offs, (0.5 * x * (1.0 + t)).to(Y.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n_rows"])  # n_cols specialised: 16-divisible rows vectorise
def _gelu_tanh_bwd(X, DY, DX, PART, n_rows, n_cols, beta, kappa, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, ITERS: tl.constexpr, BIAS_GRAD: tl.constexpr):
    """DX = DY * gelu_tanh'(X) for rows [r0, r0 + ITERS * BLOCK_M) and one block of columns, all
    (n_rows, n_cols) contiguous; with BIAS_GRAD, PART[r0 / (ITERS * BLOCK_M), cols] = the column
    sums of DX as stored."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(ITERS):
        rows = (pid_m.to(tl.int64) * ITERS + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows < n_rows)[:, None] & col_ok[None, :]
        at = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(X + at, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + at, mask=ok, other=0.0).to(tl.float32)
        x2 = x * x
        t = _tanh(beta * (x + kappa * x2 * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * beta * (1.0 + 3.0 * kappa * x2)
        dx = (dy * d).to(DX.dtype.element_ty)
        tl.store(DX + at, dx, mask=ok)
        if BIAS_GRAD:
            acc += dx.to(tl.float32)  # masked entries are zeros
    if BIAS_GRAD:
        tl.store(PART + pid_m.to(tl.int64) * n_cols + cols, tl.sum(acc, 0), mask=col_ok)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class GeluConfig:
    block: int  # forward: elements per program
    block_m: int  # backward: rows per tile
    block_n: int  # backward: columns per program
    iters: int  # backward: row tiles per program
    num_warps: int


FORCE_CONFIG: GeluConfig | None = None  # tests / sweeps pin a config
# the fastest of 36 configs for HMAR-d16's 1024 px B 2 FFN on an H100 (scripts/gpu/gelu_bias_sweep.py,
# 2026-12-06): backward with the sums 0.179 ms against 0.211 for Inductor's two kernels
_DEFAULT = GeluConfig(4096, 32, 128, 16, 8)
_INTERPRET_CONFIG = GeluConfig(64, 4, 16, 2, 1)


def _config() -> GeluConfig:
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG
    return _INTERPRET_CONFIG if _INTERPRET else _DEFAULT


def _forward(x: Tensor) -> Tensor:
    y = torch.empty_like(x)
    cfg = _config()
    n = x.numel()
    _launch(_gelu_tanh_fwd, (cdiv(n, cfg.block),), (x, y, n, _BETA, _KAPPA), dict(BLOCK=cfg.block),
            cfg.num_warps, 1)
    return y


def _backward(x: Tensor, dy: Tensor, bias_grad: bool) -> tuple[Tensor, Tensor]:
    """(d x, the column sums of d x over every leading dim in x's dtype, or empty)."""
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    cfg = _config()
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    n_pm = cdiv(n_rows, cfg.block_m * cfg.iters)
    part = torch.empty((n_pm, n_cols), dtype=torch.float32, device=x.device) if bias_grad else dx
    _launch(_gelu_tanh_bwd, (n_pm, cdiv(n_cols, cfg.block_n)),
            (x, dy, dx, part, n_rows, n_cols, _BETA, _KAPPA),
            dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ITERS=cfg.iters, BIAS_GRAD=bias_grad),
            cfg.num_warps, 1)
    return dx, (part.sum(0).to(x.dtype) if bias_grad else x.new_empty(0))


# ----------------------------------------------------------------------------- reference


def _acc(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _reference_forward(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x.to(_acc(x)), approximate="tanh").to(x.dtype)


def _reference_backward(x: Tensor, dy: Tensor, bias_grad: bool) -> tuple[Tensor, Tensor]:
    xf = x.to(_acc(x))
    dx = torch.ops.aten.gelu_backward(dy.to(xf.dtype), xf, approximate="tanh").to(x.dtype)
    dbias = dx.to(xf.dtype).reshape(-1, x.shape[-1]).sum(0).to(x.dtype) if bias_grad else x.new_empty(0)
    return dx, dbias


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("maskar::gelu_tanh", mutates_args=())
def gelu_tanh_op(x: Tensor) -> Tensor:
    """The tanh GELU of ``x`` in its dtype (fp32 inside)."""
    if _on_reference(x):
        return _reference_forward(x)
    return _forward(x.contiguous())


@gelu_tanh_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("maskar::gelu_tanh_bwd", mutates_args=())
def gelu_tanh_bwd_op(x: Tensor, dy: Tensor, bias_grad: bool) -> tuple[Tensor, Tensor]:
    """(d x, and where ``bias_grad`` d x summed over every leading dim, (x.shape[-1],) in x's
    dtype; else empty)."""
    if _on_reference(x):
        return _reference_backward(x, dy, bias_grad)
    return _backward(x.contiguous(), dy, bias_grad)


@gelu_tanh_bwd_op.register_fake
def _(x, dy, bias_grad):
    return torch.empty_like(x), x.new_empty(x.shape[-1] if bias_grad else 0)


class _GeluBias(torch.autograd.Function):
    """gelu_tanh(pre); ``bias`` (fc1's, or None) is not used forward: its gradient, d pre summed
    over the rows, comes from the backward launch (the caller's linear took a detached copy)."""

    @staticmethod
    def forward(ctx, pre: Tensor, bias: Tensor | None):
        ctx.save_for_backward(pre)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return gelu_tanh_op(pre) if _via_ops(pre) else _forward(pre)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (pre,) = ctx.saved_tensors
        bias_grad = ctx.needs_input_grad[1]
        bwd = gelu_tanh_bwd_op if _via_ops(pre) else _backward
        dx, dbias = bwd(pre, dy, bias_grad)
        return dx, dbias.to(ctx.bias_dtype) if bias_grad else None


def gelu_with_bias_grad(pre: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.gelu(pre, approximate="tanh")`` for a contiguous fp16 / bf16 ``pre`` (a linear's output
    computed with a detached copy of ``bias``); ``bias`` gets the linear's bias gradient from the
    GELU's backward launch."""
    if not pre.is_contiguous():
        raise ValueError(
            f"gelu_with_bias_grad: pre {tuple(pre.shape)} strides {pre.stride()} is not contiguous"
        )
    if bias is not None and bias.shape != (pre.shape[-1],):
        raise ValueError(f"gelu_with_bias_grad: bias {tuple(bias.shape)} for pre {tuple(pre.shape)}")
    return _GeluBias.apply(pre, bias)


# ----------------------------------------------------------------------------- support

CPU_REFERENCE = False  # tests: CPU calls go to the ops' torch bodies
ENABLED = True  # False: the FFN keeps F.gelu and the linear's own bias gradient (A/B)


def supports_linear(x: Tensor) -> bool:
    """Whether the FFN takes this path for a linear of input ``x``: training (autograd on) in fp16 /
    bf16 (autocast's dtype where autocast is on for x's device) on CUDA sm80+ or the interpreter;
    on the CPU reference (tests) any float dtype."""
    if not ENABLED or not torch.is_grad_enabled():
        return False
    return kernel_dtype_ok(compute_dtype(x), x.device, CPU_REFERENCE)


__all__ = ["gelu_with_bias_grad", "gelu_tanh_op", "gelu_tanh_bwd_op", "supports_linear", "GeluConfig"]
