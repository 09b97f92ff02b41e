"""VAR / HMAR's FFN in training with its tanh GELU inside cuBLASLt's epilogues (``MASKAR_FFN_EPILOGUE``).

The FFN is ``fc2(gelu_tanh(fc1(x)))``. Trained with separate kernels, the GELU costs two passes
over the (rows, 4 W) activation: forward, a kernel reads fc1's output ``pre`` and writes ``act``;
backward, fc2's input-gradient matmul writes ``d act``, and a kernel reads it with ``pre`` and
writes ``d pre`` (summing fc1's bias gradient, ``maskar.kernels.gelu_bias``). Here the forward is
one matmul that writes both ``act`` and ``pre`` (cuBLASLt's ``GELU_AUX_BIAS``); fc2's
input-gradient matmul applies the GELU's derivative in its epilogue (``DGELU``), so ``d act`` is
never stored; and fc1's bias gradient is one column sum of ``d pre`` (:data:`BIAS_GRAD`). Per
FFN that saves a read of ``pre`` forward and a write and a read of (rows, 4 W) backward, and a
launch a way (docs/kernels.md has the times).

The math is the unfused FFN's up to rounding: the epilogue applies the GELU to the fp32
accumulator plus bias where the unfused path rounds ``pre`` to bf16 first, and the derivative
multiplies the fp32 ``d act`` before its rounding. Saved for the backward: x, ``pre``, ``act`` and
the weights, as autograd saves for the unfused FFN.

Autograd and torch.compile: ``maskar::ffn_fc1_gelu``, ``maskar::ffn_fc2_dgelu`` and
``maskar::ffn_fc1_wgrad`` are custom ops with fake implementations; their bodies call
:mod:`maskar.nn.cublaslt` where the operands suit it (CUDA sm80 or later, fp16 / bf16, 256-byte
aligned) and otherwise run the same math in torch (the CPU reference the tests compare against; on
CUDA each such call is counted in :data:`FALLBACKS`). The autograd.Function around them casts its inputs to
the linear's compute dtype as autocast would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from maskar import env
from maskar.nn import cublaslt
from maskar.nn.precision import compute_dtype

ENABLED = bool(env.switch("MASKAR_FFN_EPILOGUE"))
CPU_REFERENCE = False  # tests: CPU calls take this path through the ops' torch bodies
FALLBACKS = 0  # CUDA calls whose operands did not suit cuBLASLt (the torch body ran instead)
# fc1's bias gradient, each way with its weight gradient (H100, HMAR-d16 1024 px B 2,
# scripts/gpu/ffn_epilogue_check.py, 2026-12-07): "sum", torch's d pre.sum(0) after DGELU (0.195 ms
# weight gradient + 0.066 sum, the fastest); "wgrad", in fc1's weight-gradient matmul (BGRADB: 0.286);
# "wgrad_t", in the transposed weight gradient's matmul (BGRADA, 0.287, then a transposing copy:
# 0.313); "ones", as one more column of that matmul, d pre.T @ [x | 1] (0.333 with x's copy);
# "dgelu", in the DGELU matmul (DGELU_BGRAD: 0.91 against 0.29 without)
BIAS_GRAD = "sum"


def load() -> None:
    """Find cuBLASLt (layers call this when built, never inside a torch.compile trace)."""
    if not cublaslt.LOADED:
        cublaslt.load()


def _torch_fc1_gelu(x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    pre = F.linear(x, w, b)
    acc = torch.promote_types(x.dtype, torch.float32)
    return F.gelu(pre.to(acc), approximate="tanh").to(x.dtype), pre


def _torch_fc2_dgelu(dy: Tensor, w: Tensor, pre: Tensor) -> tuple[Tensor, Tensor]:
    acc = torch.promote_types(dy.dtype, torch.float32)
    d_act = (dy @ w).to(acc)
    dpre = torch.ops.aten.gelu_backward(d_act, pre.to(acc), approximate="tanh")
    return dpre.to(dy.dtype), dpre.sum(0).to(dy.dtype)


def _count_fallback(x: Tensor) -> None:
    global FALLBACKS
    if x.is_cuda:
        FALLBACKS += 1


@torch.library.custom_op("maskar::ffn_fc1_gelu", mutates_args=())
def fc1_gelu_op(x: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(gelu_tanh(x @ w.T + b), x @ w.T + b) for x (M, K), w (N, K), b (N,)."""
    if x.is_cuda and b.data_ptr() % 256:
        b = b.clone()  # a bias viewed out of a larger buffer: 2 N bytes to copy
    if cublaslt.usable(x, w, b):
        return cublaslt.linear_gelu_aux(x, w, b)
    _count_fallback(x)
    return _torch_fc1_gelu(x, w, b)


@fc1_gelu_op.register_fake
def _(x, w, b):
    return x.new_empty((x.shape[0], w.shape[0])), x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("maskar::ffn_fc2_dgelu", mutates_args=())
def fc2_dgelu_op(dy: Tensor, w: Tensor, pre: Tensor, with_sum: bool) -> tuple[Tensor, Tensor]:
    """((dy @ w) * gelu_tanh'(pre), and where ``with_sum`` its column sums (N,), else empty) for
    dy (M, K), w (K, N), pre (M, N)."""
    if cublaslt.usable(dy, w, pre):
        dpre, dbias = cublaslt.matmul_dgelu_bgrad(dy, w, pre, with_sum and BIAS_GRAD == "dgelu")
        if dbias is None:
            dbias = dpre.sum(0) if with_sum else dpre.new_empty(0)
        return dpre, dbias
    _count_fallback(dy)
    dpre, dbias = _torch_fc2_dgelu(dy, w, pre)
    return dpre, dbias if with_sum else dpre.new_empty(0)


@fc2_dgelu_op.register_fake
def _(dy, w, pre, with_sum):
    return torch.empty_like(pre), pre.new_empty(pre.shape[1] if with_sum else 0)


@torch.library.custom_op("maskar::ffn_fc1_wgrad", mutates_args=())
def fc1_wgrad_op(dpre: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(dpre.T @ x, dpre's column sums): fc1's weight and bias gradients."""
    if cublaslt.usable(dpre, x):
        if BIAS_GRAD == "wgrad_t":
            dw_t, db = cublaslt.weight_grad_t_bgrad(dpre, x)
            return dw_t.t().contiguous(), db
        if BIAS_GRAD == "wgrad":
            return cublaslt.weight_grad_bgrad(dpre, x)
    if BIAS_GRAD == "ones":
        return _weight_grad_ones(dpre, x)
    if BIAS_GRAD in ("wgrad", "wgrad_t"):  # "sum" / "dgelu" compute it here by design
        _count_fallback(dpre)
    acc = torch.promote_types(dpre.dtype, torch.float32)
    return dpre.t() @ x, dpre.to(acc).sum(0).to(dpre.dtype)


def _weight_grad_ones(dpre: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(dpre.T @ x, dpre's column sums) as one matmul, dpre.T @ [x | 1 | 0 ...]: the sum is the
    matmul's own fp32 accumulation, the ones column padded to 8 for 16-byte rows."""
    m, k = x.shape
    x_aug = x.new_zeros((m, k + 8))
    x_aug[:, :k] = x
    x_aug[:, k] = 1
    dw_aug = dpre.t() @ x_aug
    return dw_aug[:, :k].contiguous(), dw_aug[:, k].contiguous()


@fc1_wgrad_op.register_fake
def _(dpre, x):
    return dpre.new_empty((dpre.shape[1], x.shape[1])), dpre.new_empty(dpre.shape[1])


class _FFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
        w1c, w2c = w1.to(dtype).contiguous(), w2.to(dtype).contiguous()
        act, pre = fc1_gelu_op(x2, w1c, b1.to(dtype).contiguous())
        y = F.linear(act, w2c, None if b2 is None else b2.to(dtype))
        ctx.save_for_backward(x2, w1c, act, pre, w2c)
        ctx.x_shape, ctx.x_dtype, ctx.dtype = x.shape, x.dtype, dtype
        ctx.param_dtypes = (w1.dtype, b1.dtype, w2.dtype, None if b2 is None else b2.dtype)
        return y.reshape(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w1c, act, pre, w2c = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(ctx.dtype).contiguous()
        # fc1's bias gradient from its weight-gradient matmul where that runs (BIAS_GRAD "wgrad",
        # "wgrad_t", "ones"), else beside d pre
        in_wgrad = BIAS_GRAD in ("wgrad", "wgrad_t", "ones") and need[1] and need[2]
        dpre, db1 = fc2_dgelu_op(dy2, w2c, pre, need[2] and not in_wgrad)
        t1, tb1, t2, tb2 = ctx.param_dtypes
        dx = (dpre @ w1c).reshape(ctx.x_shape).to(ctx.x_dtype) if need[0] else None
        dw1 = None
        if in_wgrad:
            dw1, db1 = fc1_wgrad_op(dpre, x2)
        elif need[1]:
            dw1 = dpre.t() @ x2
        dw2 = (dy2.t() @ act).to(t2) if need[3] else None
        db2 = dy2.sum(0).to(tb2) if need[4] else None
        return (dx, None if dw1 is None else dw1.to(t1), db1.to(tb1) if need[2] else None, dw2, db2, None)


def ffn(x: Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, detach_out_bias: bool = False) -> Tensor:
    """``fc2(gelu_tanh(fc1(x)))`` through the epilogues (caller checks :func:`supports`);
    ``detach_out_bias``: fc2's bias is added but takes no gradient here (a kernel sums it)."""
    b2 = fc2.bias
    if b2 is not None and detach_out_bias:
        b2 = b2.detach()
    dtype = compute_dtype(x)
    return _FFN.apply(x, fc1.weight, fc1.bias, fc2.weight, b2, dtype)


def supports(x: Tensor, fc1: torch.nn.Linear, fc2: torch.nn.Linear, approximate: str) -> bool:
    """Whether the FFN of ``fc1``, tanh GELU, ``fc2`` takes this path for input ``x``: switched on,
    training (autograd on), fc1 with a bias, widths divisible by 8; on CUDA in fp16 / bf16 with
    cuBLASLt found, or on the CPU where :data:`CPU_REFERENCE` (tests) in any float dtype."""
    if not ENABLED or not torch.is_grad_enabled() or approximate != "tanh" or fc1.bias is None:
        return False
    if fc1.in_features % 8 or fc1.out_features % 8 or fc2.out_features % 8:
        return False
    if x.is_cuda:
        return compute_dtype(x) in (torch.float16, torch.bfloat16) and cublaslt.available(x.device)
    return x.is_cpu and CPU_REFERENCE and x.is_floating_point()


__all__ = ["ffn", "supports", "load", "fc1_gelu_op", "fc2_dgelu_op", "fc1_wgrad_op"]
