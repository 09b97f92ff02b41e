"""``flex`` attention backend: torch FlexAttention (compiled) with a cached BlockMask per pattern.

The mask is a ``mask_mod`` over scale ids (``sid[q] == sid[k]`` for block-diagonal,
``sid[q] >= sid[k]`` for block-causal), turned once per (pattern, device, block size)
into a BlockMask that lets the kernel skip fully masked tiles. One compiled
``flex_attention`` is shared by every call, and BlockMasks are reused, because every new
(shape, BlockMask) pair costs a recompilation and past Dynamo's cache limit torch falls
back to a slow unfused path.

FlexAttention has no backward on CPU (torch >= 2.10), so this backend is CUDA only.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from maskar.nn.attention import ScalePattern, register_backend

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError as e:  # torch without FlexAttention: leave the backend unregistered
    raise ImportError("maskar flex backend needs torch.nn.attention.flex_attention") from e

# tile size of the BlockMask; 128 is FlexAttention's default and compiles with the
# default kernel options on every GPU (64 needs matching kernel_options, see the benchmark)
BLOCK_SIZE = 128


def _mask_mod(pattern: ScalePattern, device: str):
    sid = pattern.scale_ids(device)  # (L,) int64
    if pattern.kind == "block_diagonal":

        def mask_mod(b, h, q_idx, kv_idx):
            return sid[q_idx] == sid[kv_idx]

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return sid[q_idx] >= sid[kv_idx]

    return mask_mod


@functools.lru_cache(maxsize=32)
def block_mask(pattern: ScalePattern, device: str, block_size: int = BLOCK_SIZE) -> BlockMask:
    """BlockMask of ``pattern`` (shared over batch and heads), cached."""
    L = pattern.total
    mask_mod = _mask_mod(pattern, device)
    return create_block_mask(mask_mod, None, None, L, L, device=device, BLOCK_SIZE=block_size)


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    """The one compiled flex_attention every call goes through."""
    return torch.compile(flex_attention, dynamic=False)


def flex_attention_backend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: ScalePattern,
    scale: float | None = None,
    *,
    block_size: int = BLOCK_SIZE,
    kernel_options: dict | None = None,
) -> Tensor:
    """Attention under ``pattern`` via compiled FlexAttention. q, k, v: (B, H, L, D) -> (B, H, L, D)."""
    if pattern is None:
        raise ValueError("flex attention backend: needs a ScalePattern (dense attention: use sdpa)")
    if q.shape[-2] != pattern.total:
        raise ValueError(f"flex attention: pattern covers {pattern.total} tokens but q has {q.shape[-2]}")
    bm = block_mask(pattern, str(q.device), block_size)
    return compiled_flex_attention()(q, k, v, block_mask=bm, scale=scale, kernel_options=kernel_options)


def supports(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> bool:
    return (
        pattern is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.dim() == 4
        and q.shape == k.shape == v.shape
        and q.shape[-2] == pattern.total
        and q.shape[-1] in (16, 32, 64, 128)
    )


def _backend_fn(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern, scale: float | None) -> Tensor:
    return flex_attention_backend(q, k, v, pattern, scale)


# priority 30: behind the fused kernel (10) and varlen (20), ahead of SDPA (100)
register_backend("flex", _backend_fn, supports, priority=30)
