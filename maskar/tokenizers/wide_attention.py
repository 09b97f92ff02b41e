"""Single-head attention over a wide head (the VQ-VAE's spatial attention) as two matmuls.

The tokenizers' ``AttnBlock`` attends over the H*W positions with one head as wide as the
block's channels: 512 (LDM / MAR's KL-16) or 640 (VAR's VQ-VAE) at the lowest resolution. SDPA's
fused kernels on Hopper take heads up to 256 wide (FlashAttention-2 and cuDNN), so a bf16 call of
that width falls to the memory-efficient kernel, an sm80 CUTLASS kernel that runs it at
≈ 91 TFLOP/s on an H100: 15.1 ms of HMAR-d16's 1024 px B 8 decode for 1.37 TFLOP (four calls an
image; docs/benchmarks.md, *Where issue 14's calls go, profiled at 256 and 1024 px*).

Here the same attention is ``S = q k^T`` by cuBLAS with bf16 / fp16 operands and a float32 output
(``torch.bmm(..., out_dtype=torch.float32)``), the softmax of ``S * scale`` in float32 rounded
once to the operands' dtype, and ``P v`` with float32 accumulation: the memory-efficient kernel's
own precision steps (float32 scores and softmax, P in the input dtype for the second product), so
the two agree to the rounding of their summation orders. The score matrix is materialised,
(positions^2) float32 per image: batches are split so it stays under ``MAX_SCORE_BYTES``.

On by default (``MASKAR_DECODE_WIDE_ATTN=0`` turns it off): on an H100 it took HMAR-d16's 1024 px
B 8 call from 419.9 to 416.7 ms, and the GPU test puts it as close to fp32 as SDPA's kernel
(docs/benchmarks.md, *The decoder's wide attention and the FFN's GELU*). CUDA inference only
(no autograd): wrapped as the custom op ``maskar::wide_head_attention`` with a
fake implementation, so the compiled decoder traces through it. Its CPU body computes the same
steps in float32 (the CPU has no mixed-dtype bmm), which the tests compare with SDPA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskar import env

ENABLED = bool(env.switch("MASKAR_DECODE_WIDE_ATTN"))
# The softmax of the float32 scores as one Triton pass that writes P in the operands' dtype
# (maskar.kernels.softmax_rows): one read of the scores instead of torch's scale, softmax and
# cast passes (≈ 370 -> 100 MB an image at 1024 px). MASKAR_WIDE_SOFTMAX_KERNEL, read at import.
SOFTMAX_KERNEL = bool(env.switch("MASKAR_WIDE_SOFTMAX_KERNEL"))
MIN_WIDTH = 257  # SDPA's fused Hopper kernels take heads up to 256 wide
MAX_SCORE_BYTES = 1 << 30  # float32 scores held at once: batches are split above this


def applies(q: Tensor) -> bool:
    """Whether :func:`attention` replaces SDPA for q (B, 1, L, D): switched on, CUDA, fp16 / bf16,
    a head wider than SDPA's fused kernels take, no autograd."""
    return (
        ENABLED and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] >= MIN_WIDTH and not torch.is_grad_enabled()
    )  # fmt: skip


def _scores(q: Tensor, k: Tensor) -> Tensor:
    if q.is_cuda:
        return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q.float(), k.float().transpose(1, 2))  # bf16 x bf16 products are exact in fp32


def _values(p: Tensor, v: Tensor) -> Tensor:
    if p.is_cuda:
        return torch.bmm(p, v, out_dtype=torch.float32).to(v.dtype)
    return torch.bmm(p.float(), v.float()).to(v.dtype)


def _probabilities(s: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """softmax(s * scale) over the last dim in float32, rounded once to ``dtype`` (s is consumed)."""
    if SOFTMAX_KERNEL:
        try:
            from maskar.kernels import softmax_rows
        except ImportError:  # no Triton on this install
            softmax_rows = None
        if softmax_rows is not None and softmax_rows.applies(s):
            return softmax_rows.softmax_rows(s, scale, dtype)
    return torch.softmax(s.mul_(scale), dim=-1).to(dtype)


@torch.library.custom_op("maskar::wide_head_attention", mutates_args=())
def wide_head_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v for q, k, v (B, L, D) in one dtype, in batch chunks."""
    b, n = q.shape[:2]
    per_image = n * k.shape[1] * 4
    step = max(1, min(b, MAX_SCORE_BYTES // max(per_image, 1)))
    outs = []
    for i in range(0, b, step):
        s = _scores(q[i : i + step], k[i : i + step])
        p = _probabilities(s, scale, q.dtype)
        del s
        outs.append(_values(p, v[i : i + step]))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@wide_head_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA's ``scaled_dot_product_attention(q, k, v)`` for q, k, v (B, 1, L, D) (one head), through
    :func:`wide_head_attention`; its default scale D^-0.5."""
    out = wide_head_attention(q.squeeze(1), k.squeeze(1), v.squeeze(1), q.shape[-1] ** -0.5)
    return out.unsqueeze(1)
