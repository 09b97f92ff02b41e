"""Row softmax of scaled float32 scores, written once in a narrower dtype (Triton).

The tokenizers' wide-head attention (``maskar.tokenizers.wide_attention``) materialises its
float32 score matrix S (positions^2 per image: 67 MB at VAR's 1024 px, 64 x 64 positions) and
needs ``P = softmax(S * scale)`` rounded once to the operands' dtype. In torch that is three
passes over S after the matmul wrote it (``mul_``, ``softmax`` writing float32, ``.to``): five
float32-sized reads and writes and a bf16 write, ≈ 370 MB an image where one read of S and one
write of P (100 MB) are all the result needs. Here one program per row reads it once (rows up
to ``ONE_PASS_MAX`` long sit in registers; longer rows take a second read), in float32:

    x = s * scale;  m = max(x);  p = exp(x - m) / sum(exp(x - m)),  then p rounded once.

torch's CUDA softmax computes the same expression; the two differ by the rounding of ``exp``
and of the sum's order (a few float32 ulps), which the rounding to bf16 / fp16 almost always
absorbs (tests/test_softmax_rows.py). The CPU runs the torch code; under ``TRITON_INTERPRET=1``
the kernel runs on CPU tensors (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.block_sparse import _INTERPRET, _launch, next_power_of_2

ONE_PASS_MAX = 8192  # longest row held in registers (32 KB of float32 over 8 warps)
LOOP_BLOCK = 4096  # columns a step for longer rows
_FLOOR = tl.constexpr(-3.0e38)  # a finite "minus infinity": masked lanes never make exp(nan)


@triton.jit(do_not_specialize=["scale"])
def _softmax_rows(S, P, L, scale, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    """P[r, :] = softmax(S[r, :] * scale) in P's dtype, for rows of L float32 values."""
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * L
    p_row = P + row * L
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        ok = cols < L
        x = tl.load(s_row + cols, mask=ok, other=_FLOOR) * scale
        e = tl.where(ok, tl.exp(x - tl.max(x, 0)), 0.0)
        tl.store(p_row + cols, (e / tl.sum(e, 0)).to(P.dtype.element_ty), mask=ok)
    else:
        # per lane a running max and a sum of exp relative to it, merged across lanes once
        m = tl.full([BLOCK], _FLOOR, dtype=tl.float32)
        d = tl.zeros([BLOCK], dtype=tl.float32)
        for c0 in range(0, L, BLOCK):
            ok = c0 + cols < L
            x = tl.load(s_row + c0 + cols, mask=ok, other=_FLOOR) * scale
            m_new = tl.maximum(m, x)
            d = d * tl.exp(m - m_new) + tl.where(ok, tl.exp(x - m_new), 0.0)
            m = m_new
        top = tl.max(m, 0)
        total = tl.sum(d * tl.exp(m - top), 0)
        for c0 in range(0, L, BLOCK):
            ok = c0 + cols < L
            x = tl.load(s_row + c0 + cols, mask=ok, other=_FLOOR) * scale
            tl.store(p_row + c0 + cols, (tl.exp(x - top) / total).to(P.dtype.element_ty), mask=ok)


def reference(s: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """The torch code: softmax of ``s * scale`` along the last dim in s's precision, rounded to ``dtype``."""
    return torch.softmax(s * scale, dim=-1).to(dtype)


def applies(s: Tensor) -> bool:
    """Whether :func:`softmax_rows` runs the kernel for s: float32, contiguous, on CUDA (sm80+)
    or under the interpreter, not empty."""
    on_device = s.is_cuda or (_INTERPRET and s.is_cpu)
    return on_device and s.dtype == torch.float32 and s.is_contiguous() and s.numel() > 0 and s.dim() >= 1


def softmax_rows(s: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``softmax(s * scale, dim=-1)`` computed in float32 and rounded once to ``dtype``: one kernel
    where :func:`applies`, the torch code (:func:`reference`) elsewhere."""
    if not applies(s):
        return reference(s, scale, dtype)
    L = s.shape[-1]
    p = torch.empty(s.shape, dtype=dtype, device=s.device)
    one_pass = next_power_of_2(L) <= ONE_PASS_MAX
    block = next_power_of_2(L) if one_pass else LOOP_BLOCK
    if _INTERPRET:
        block = next_power_of_2(L) if one_pass else 8  # small steps: the loop and its tail run
    warps = max(1, min(8, block // 512))
    _launch(_softmax_rows, (s.numel() // L,), (s, p, L, float(scale)), dict(BLOCK=block, ONE_PASS=one_pass),
            warps, 1)  # fmt: skip
    return p


__all__ = ["softmax_rows", "reference", "applies"]
