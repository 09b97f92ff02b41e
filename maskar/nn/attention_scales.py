"""``scales`` attention backend: a scale pattern as one dense attention per scale.

Block-diagonal attention is exactly one dense attention per scale (queries and keys of the
scale); block-causal attention is one dense rectangular attention per scale (the scale's
queries against every key up to the end of that scale). Each is a plain SDPA call without a
mask, so the fastest dense kernel of the GPU runs it: cuDNN's (called as its aten op, so that
torch.compile traces it) for fp16 / bf16 on CUDA, SDPA's default choice elsewhere. The
leading scales with fewer than ``SMALL`` tokens each are one masked SDPA call together (their
calls would cost more in launches than in work).

``auto`` picks it only where it was measured to win: training (autograd on) in fp16 / bf16 on
CUDA over at least ``AUTO_MIN_TOKENS`` tokens, where the large scales dominate and cuDNN's
dense kernels beat the fused block-sparse kernel on them. On an H200 (2026-12-05, the step as
one CUDA graph, 1024 px B 2, L 9451): HMAR-d16 90.2 ms against 93.3 with the fused kernel, VAR-d16
130.2 against 138.6 (docs/benchmarks.md). Elsewhere (256 / 512 px, inference) it is taken only by
name (``attention_backend=scales``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from maskar.nn.attention import ScalePattern, register_backend

SMALL = 64  # scales below this many tokens (the first few) are attended together, masked
AUTO_MIN_TOKENS = 8192  # 1024 px (9451 tokens) is in, 512 px (2240) is not: only 1024 px was measured


def _dense(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, grad, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class _Prefixes(torch.autograd.Function):
    """Views x[:, :, :end] for each end (B, H, L, D); the backward adds every view's gradient into
    one zero-filled buffer in place, where indexing would give each its own full-size zero
    tensor for autograd to sum (block-causal keys and values are such overlapping prefixes).

    The buffer is fp32 for fp16 / bf16 inputs: the first scale's keys take a gradient from every
    call, and summing a dozen of them in bf16 made dk / dv three times less accurate than one
    masked SDPA call, which accumulates in fp32 (tests/test_attention_fa4_gpu.py)."""

    @staticmethod
    def forward(x: Tensor, ends: tuple[int, ...]) -> tuple[Tensor, ...]:
        return tuple(x[:, :, :end] for end in ends)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ends = inputs
        ctx.ends = ends
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device

    @staticmethod
    def backward(ctx, *grads: Tensor):
        acc = torch.float32 if ctx.dtype in (torch.float16, torch.bfloat16) else ctx.dtype
        out = torch.zeros(ctx.shape, dtype=acc, device=ctx.device)
        for end, g in zip(ctx.ends, grads, strict=True):
            if g is not None:
                out[:, :, :end] += g
        return out.to(ctx.dtype), None


def scales_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern, scale: float | None = None,
    dense: Callable[[Tensor, Tensor, Tensor, float | None], Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """Attention under ``pattern`` scale by scale. q, k, v: (B, H, L, D) -> (B, H, L, D).

    ``dense(q, k, v, scale)`` runs each scale's unmasked call (cuDNN's by default; the ``fa4``
    backend passes FlashAttention-4's)."""
    dense = _dense if dense is None else dense
    if pattern is None:  # dense (e.g. a KV-cached sampling step)
        return dense(q, k, v, scale)
    if q.shape[-2] != pattern.total or k.shape[-2] != pattern.total:
        raise ValueError(f"scales attention: pattern covers {pattern.total} tokens, q has {q.shape[-2]}")
    n_small = next((i for i, n in enumerate(pattern.lengths) if n >= SMALL), len(pattern.lengths))
    # The query rows of the calls are disjoint: take them with one split (its backward is one
    # concatenation of the calls' gradients). Indexing each range instead gives every call's
    # gradient its own full-size zero tensor, summed by autograd: at 1024 px that is ~4 GB of
    # traffic a block per backward, more than the attention saved. Block-diagonal keys and
    # values split the same way; block-causal ones are overlapping prefixes (_Prefixes).
    sizes = ([sum(pattern.lengths[:n_small])] if n_small else []) + list(pattern.lengths[n_small:])
    qs = q.split(sizes, dim=2)
    if pattern.kind == "block_diagonal":
        ks, vs = k.split(sizes, dim=2), v.split(sizes, dim=2)
    else:  # each call's keys are every key up to the end of its scale
        call_ends = tuple(itertools.accumulate(sizes))
        ks, vs = _Prefixes.apply(k, call_ends), _Prefixes.apply(v, call_ends)
    outs = []
    for i in range(len(sizes)):
        if i == 0 and n_small:  # the small leading scales: one call with their (diagonal / causal) mask
            mask = ScalePattern(pattern.kind, pattern.lengths[:n_small]).dense_mask(q.device)
            outs.append(F.scaled_dot_product_attention(qs[0], ks[0], vs[0], attn_mask=mask, scale=scale))
        else:
            outs.append(dense(qs[i], ks[i], vs[i], scale))
    return torch.cat(outs, dim=2)


def supports(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> bool:
    if q.dim() != 4 or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    return pattern is None or (q.shape == k.shape and q.shape == v.shape and q.shape[-2] == pattern.total)


def picked_by_auto(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> bool:
    """Where ``auto`` takes this backend: long-sequence training in fp16 / bf16 on CUDA."""
    return (
        pattern is not None and pattern.total >= AUTO_MIN_TOKENS and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16) and torch.is_grad_enabled()
    )  # fmt: skip


# ahead of the fused kernel (10) and cuDNN-first (5), but only where picked_by_auto holds (module docstring)
register_backend("scales", scales_attention, supports, priority=4, auto_when=picked_by_auto)
