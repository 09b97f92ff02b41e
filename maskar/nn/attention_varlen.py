"""``varlen`` attention backend: block-diagonal attention as packed variable-length attention.

Block-diagonal attention over scales equals FlashAttention's variable-length attention
with every (sample, scale) as its own sequence: cu_seqlens = cumsum of the scale lengths
repeated B times. torch >= 2.10 ships this as ``torch.nn.attention.varlen.varlen_attn``
(FA2 kernels, CUDA sm80+, fp16 / bf16, forward and backward). Block-causal attention
cannot be expressed this way, so this backend only supports ``block_diagonal``.

q, k, v (B, H, L, D) views of a (B, L, ., H, D) buffer pack to (B*L, H, D) as views;
the output (B*L, H, D) is returned as a (B, H, L, D) view of (B, L, H, D) memory.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from maskar.nn.attention import ScalePattern, register_backend

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError as e:  # torch < 2.10: leave the backend unregistered
    raise ImportError("maskar varlen backend needs torch.nn.attention.varlen (torch >= 2.10)") from e


@functools.lru_cache(maxsize=64)
def _cu_seqlens(pattern: ScalePattern, batch: int, device: str) -> Tensor:
    """(B * n_scales + 1,) int32 cumulative sequence starts, one sequence per (sample, scale)."""
    lengths = torch.tensor(pattern.lengths, dtype=torch.int32).repeat(batch)
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).to(device)


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern, scale: float | None = None
) -> Tensor:
    """Block-diagonal attention via packed varlen. q, k, v: (B, H, L, D) -> (B, H, L, D)."""
    if pattern is None or pattern.kind != "block_diagonal":
        raise ValueError("varlen attention: only pattern kind block_diagonal is supported")
    B, H, L, D = q.shape
    if L != pattern.total:
        raise ValueError(f"varlen attention: pattern covers {pattern.total} tokens but q has {L}")
    # (B, H, L, D) -> (B*L, H, D): a view when the memory is (B, L, ..., H, D)
    qp, kp, vp = (x.transpose(1, 2).reshape(B * L, H, D) for x in (q, k, v))
    cu = _cu_seqlens(pattern, B, str(q.device))
    n = max(pattern.lengths)
    out = varlen_attn(qp, kp, vp, cu, cu, n, n, scale=scale)  # (B*L, H, D)
    return out.view(B, L, H, D).transpose(1, 2)


def _device_ok_uncached(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_properties(device).major >= 8


_device_ok_cached = functools.lru_cache(maxsize=16)(_device_ok_uncached)


def _device_ok(device: torch.device) -> bool:
    # under torch.compile the plain function (Dynamo folds get_device_properties to a constant)
    return _device_ok_uncached(device) if torch.compiler.is_compiling() else _device_ok_cached(device)


def supports(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> bool:
    return (
        pattern is not None
        and pattern.kind == "block_diagonal"
        and _device_ok(q.device)
        and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.dim() == 4
        and q.shape == k.shape == v.shape
        and q.shape[-2] == pattern.total
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


# priority 20: after the fused triton kernel (10), before flex (30) and SDPA (100)
register_backend("varlen", varlen_attention, supports, priority=20)
