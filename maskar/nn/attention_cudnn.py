"""``cudnn`` attention backend: dense attention with cuDNN's fused kernel first, for Hopper inference.

SDPA tries its kernels in a fixed order (torch 2.11: FlashAttention-2, memory-efficient, math,
cuDNN; ``torch._C._get_sdp_priority_order()``), so a dense fp16 / bf16 call on an H100 / H200 runs
FlashAttention-2, although cuDNN's Hopper kernels are the faster ones there (reported 1.7-2.3x
for training shapes; slower than FlashAttention-2 on Ampere and Blackwell). This backend runs the
same ``F.scaled_dot_product_attention`` call with cuDNN first in SDPA's priority order
(``sdpa_kernel(..., set_priority=True)``): where cuDNN cannot take a call, SDPA's own checks fall
back to the usual order, so nothing it supports changes.

It takes dense calls only (``pattern=None``: VAR's KV-cached and HMAR's per-scale sampling passes,
whose attention is 26-60 TFLOP of a 1024 px B 8 call), on Hopper, without autograd. Opt-in
(``MASKAR_SDPA_CUDNN=1`` or ``ENABLED = True``) until a GPU run shows it faster end to end.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskar import env
from maskar.nn.attention import ScalePattern, register_backend

ENABLED = bool(env.switch("MASKAR_SDPA_CUDNN"))

_CUDNN_FIRST = [
    SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
]  # fmt: skip


@functools.lru_cache(maxsize=16)
def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def _device_ok(device: torch.device) -> bool:
    return device.type == "cuda" and _hopper(device)


def supports(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> bool:
    return (
        ENABLED
        and pattern is None
        and q.dtype in (torch.float16, torch.bfloat16)
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        and not torch.compiler.is_compiling()
        and _device_ok(q.device)
    )


def cudnn_first_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None = None, scale: float | None = None
) -> Tensor:
    """Dense SDPA with cuDNN first in the backend order. q (B, H, Lq, D), k / v (B, H, Lk, D)."""
    if pattern is not None:
        raise ValueError("cudnn attention backend: dense calls only (pattern=None)")
    with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


# priority 5: dense calls never reach the pattern backends (they need a pattern); ahead of SDPA (100)
register_backend("cudnn", cudnn_first_attention, supports, priority=5)
