"""A 3x3 convolution (stride 1, padding 1) with few output channels, in one Triton kernel.

The tokenizer decoders end with ``conv_out``: 128 or 160 channels in, 3 out, over the full-size
image. cuDNN runs it as an implicit GEMM whose N (the output channels) is 3, padded to its
smallest tile: in NCHW its sm80 kernel took 4.9 ms of an H100's 1024 px B 8 decode (8.4M pixels),
where the input is read once in 0.9 ms at the bandwidth, and in channels-last it is 6x slower
still (docs/benchmarks.md, *The decoder's convolutions, one by one*). Here a program takes a row
segment of ``BLOCK_P`` output pixels and accumulates the nine taps' (pixels, C) x (C, 16) tensor-core
products in float32, the weight zero-padded from CO to 16 columns; the bias is added in float32
and the result rounded once to x's dtype, as cuDNN's fp32-accumulating bf16 / fp16 kernels do. x
may be NCHW or channels-last (any strides): the channels-last decode's last norm need not write
an NCHW copy for it. The output is NCHW.

The CPU runs ``F.conv2d`` (the reference); under ``TRITON_INTERPRET=1`` the kernel runs on CPU
tensors (tests/test_conv3x3_narrow.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.block_sparse import _INTERPRET, _device_ok, _dot, _launch

CO_PAD = 16  # the weight's columns: the smallest N of a tensor-core dot
BLOCK_C = 32  # input channels a dot


@triton.jit
def _conv3x3_narrow(
    X, Wt, B, OUT, C, H, W, CO, sxn, sxc, sxh, sxw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CO_PAD: tl.constexpr, DOT_F32: tl.constexpr,
):
    """OUT[n, :, y, x0:x0+BLOCK_P] for program (x-block, y, n); Wt is (9, C, CO_PAD), tap-major."""
    xb, y, n = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    xs = xb * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.arange(0, BLOCK_C)
    cos = tl.arange(0, CO_PAD)
    acc = tl.zeros([BLOCK_P, CO_PAD], dtype=tl.float32)
    for t in tl.static_range(9):
        yy = y + (t // 3 - 1)
        xx = xs + (t % 3 - 1)
        # (xx * 0 + yy: the interpreter takes no scalar masks)
        ok_p = (xx >= 0) & (xx < W) & (xx * 0 + yy >= 0) & (xx * 0 + yy < H)
        # a clamped row keeps the masked lanes' addresses inside the image
        row = X + n * sxn + tl.minimum(tl.maximum(yy, 0), H - 1).to(tl.int64) * sxh
        for c0 in range(0, C, BLOCK_C):
            c_ok = c0 + cs < C
            xt = tl.load(row + xx[:, None].to(tl.int64) * sxw + (c0 + cs)[None, :].to(tl.int64) * sxc,
                         mask=ok_p[:, None] & c_ok[None, :], other=0.0)
            wt = tl.load(Wt + (t * C + c0 + cs)[:, None] * CO_PAD + cos[None, :], mask=c_ok[:, None],
                         other=0.0)
            acc += _dot(xt, wt, DOT_F32)
    acc += tl.load(B + cos, mask=cos < CO, other=0.0)[None, :]
    out = OUT + (n * CO + cos[None, :].to(tl.int64)) * H * W + y * W + xs[:, None]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=(xs < W)[:, None] & (cos < CO)[None, :])


def applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`conv3x3_narrow` runs the kernel: a 4-D fp16 / bf16 x without autograd on CUDA
    (sm80+) or the CPU under the interpreter, a (CO <= 16, C, 3, 3) weight of x's dtype, a bias."""
    on_device = (x.is_cuda and _device_ok(x.device)) or (_INTERPRET and x.is_cpu)
    return (
        on_device and x.dim() == 4 and x.dtype in (torch.float16, torch.bfloat16) and x.numel() > 0
        and weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and weight.shape[1] == x.shape[1]
        and 0 < weight.shape[0] <= CO_PAD and weight.dtype == x.dtype and bias is not None
        and bias.shape == (weight.shape[0],) and weight.device == x.device == bias.device
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )  # fmt: skip


def _taps(weight: Tensor) -> Tensor:
    """(CO, C, 3, 3) -> (9, C, CO_PAD) contiguous, tap-major, zero columns past CO."""
    CO, C = weight.shape[:2]
    w = torch.zeros(9, C, CO_PAD, dtype=weight.dtype, device=weight.device)
    w[:, :, :CO] = weight.permute(2, 3, 1, 0).reshape(9, C, CO)
    return w


def conv3x3_narrow(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` as NCHW: one kernel where :func:`applies`, else torch."""
    if not applies(x, weight, bias):
        return F.conv2d(x, weight, bias, 1, 1).contiguous()
    return _run(x, weight, bias, 16 if _INTERPRET else 128)


def _run(x: Tensor, weight: Tensor, bias: Tensor, block_p: int) -> Tensor:
    """The kernel's launch (no checks: the sm90 compile test launches it on CPU tensors too)."""
    N, C, H, W = x.shape
    CO = weight.shape[0]
    out = torch.empty(N, CO, H, W, dtype=x.dtype, device=x.device)
    _launch(
        _conv3x3_narrow, (triton.cdiv(W, block_p), H, N),
        (x, _taps(weight), bias.float().contiguous(), out, C, H, W, CO, *x.stride()),
        dict(BLOCK_P=block_p, BLOCK_C=BLOCK_C, CO_PAD=CO_PAD,
             DOT_F32=_INTERPRET and x.dtype == torch.bfloat16),
        4, 1,
    )
    return out


@torch.library.custom_op("maskar::conv3x3_narrow", mutates_args=())
def conv3x3_narrow_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """:func:`conv3x3_narrow` as an op opaque to Inductor, which takes x in whatever layout it has."""
    return conv3x3_narrow(x, weight, bias)


@conv3x3_narrow_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0], x.shape[2], x.shape[3])


__all__ = ["conv3x3_narrow", "conv3x3_narrow_op", "applies"]
