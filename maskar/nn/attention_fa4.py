"""``fa4`` attention backend: FlashAttention-4's Hopper kernels (CuTe DSL), optional.

FlashAttention-4 (``pip install flash-attn-4``, package ``flash_attn.cute``) ships
warp-specialised forward and backward kernels for sm90 written in CUTLASS's Python DSL and
compiled on first use. Where it is installed this backend registers itself; nothing in
maskar needs it, and without it the backend is simply absent (``available_backends()``).

- ``block_diagonal`` (HMAR): one variable-length call with every (sample, scale) as its own
  sequence, as the ``varlen`` backend does with FlashAttention-2.
- ``block_causal`` (VAR): one dense call per scale (the scale's queries against every key up
  to its end), with the ``scales`` backend's split and prefix views, the small leading scales
  as one masked SDPA call.
- no pattern: one dense call.

The kernels are wrapped as custom ops (``maskar::fa4_fwd`` / ``maskar::fa4_bwd``) with fake
implementations, so torch.compile traces through them without a graph break and CUDA graphs
capture them once they are compiled (the first call of a shape compiles).

Only picked by name (``attention_backend=fa4``) until it is measured to win.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskar.nn.attention import ScalePattern, register_backend
from maskar.nn.attention_scales import scales_attention
from maskar.nn.attention_varlen import _cu_seqlens

try:
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
except Exception as e:  # not installed, or its DSL cannot load here: leave the backend unregistered
    raise ImportError(f"maskar fa4 backend needs flash-attn-4 (flash_attn.cute): {e}") from e


def _lse_shape(q: Tensor, cu_q: Tensor | None) -> tuple[int, ...]:
    if cu_q is None:  # (B, Lq, H, D)
        return (q.shape[0], q.shape[2], q.shape[1])
    return (q.shape[1], q.shape[0])  # (total_q, H, D)


@torch.library.custom_op("maskar::fa4_fwd", mutates_args=())
def fa4_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor | None, cu_k: Tensor | None,
    max_q: int, max_k: int, scale: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """out, lse of softmax attention. Batched: q (B, Lq, H, D); packed: q (total, H, D) with cu_q."""
    varlen = cu_q is not None
    out, lse, *_ = _flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=max_q if varlen else None, max_seqlen_k=max_k if varlen else None,
        softmax_scale=scale, return_lse=True,
    )  # fmt: skip
    return out, lse


@fa4_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(_lse_shape(q, cu_q), dtype=torch.float32)


@torch.library.custom_op("maskar::fa4_bwd", mutates_args=())
def fa4_bwd(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
    cu_q: Tensor | None, cu_k: Tensor | None, max_q: int, max_k: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    varlen = cu_q is not None
    dq, dk, dv = _flash_attn_bwd(
        q, k, v, out, dout.contiguous(), lse, scale, False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
        max_seqlen_q=max_q if varlen else None, max_seqlen_k=max_k if varlen else None,
    )[:3]  # fmt: skip
    return dq, dk, dv


@fa4_bwd.register_fake
def _(q, k, v, out, dout, lse, cu_q, cu_k, max_q, max_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale


def _backward(ctx, dout: Tensor, dlse: Tensor | None):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = fa4_bwd(q, k, v, out, dout, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


fa4_fwd.register_autograd(_backward, setup_context=_setup_context)


def _dense(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """Dense attention, (B, H, L, D) in and out, through (B, L, H, D) views."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = fa4_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, 0, 0, scale)
    return out.transpose(1, 2)


def fa4_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None, scale: float | None = None
) -> Tensor:
    """Attention under ``pattern`` with FlashAttention-4's kernels. q, k, v: (B, H, L, D)."""
    if pattern is None:
        return _dense(q, k, v, scale)
    if pattern.kind == "block_causal":
        return scales_attention(q, k, v, pattern, scale, dense=_dense)
    B, H, L, D = q.shape
    if L != pattern.total:
        raise ValueError(f"fa4 attention: pattern covers {pattern.total} tokens but q has {L}")
    # (B, H, L, D) -> (B*L, H, D): a view when the memory is (B, L, ..., H, D)
    qp, kp, vp = (x.transpose(1, 2).reshape(B * L, H, D) for x in (q, k, v))
    cu = _cu_seqlens(pattern, B, str(q.device))
    n = max(pattern.lengths)
    out, _ = fa4_fwd(qp, kp, vp, cu, cu, n, n, D**-0.5 if scale is None else scale)
    return out.view(B, L, H, D).transpose(1, 2)


def supports(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> bool:
    return (
        q.is_cuda and q.dim() == 4 and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == q.dtype and v.dtype == q.dtype
        and torch.cuda.get_device_capability(q.device)[0] == 9
        and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
        and (pattern is None or (q.shape == k.shape == v.shape and q.shape[-2] == pattern.total))
    )  # fmt: skip


register_backend("fa4", fa4_attention, supports, priority=3, auto=False)
