"""``gelu_tanh(fc(x))`` with the GELU in the matmul's epilogue on CUDA (opt-in, inference only).

A transformer MLP's first linear writes a (rows, 4 W) activation that a separate elementwise
kernel then reads and writes again for the GELU. cuBLASLt can apply GELU (the tanh
approximation) to the accumulator before storing, which ``torch._addmm_activation(bias, x, w.T,
use_gelu=True)`` exposes on CUDA (Inductor keeps it as one op). That saves the activation's
round trip: about 0.5 ms of a 6 ms CASMAR-B DiT step at B 64, a smaller share of VAR / HMAR
sampling. The result equals ``F.gelu(fc(x), approximate="tanh")`` to rounding: the epilogue
applies the GELU to the float32 accumulator, the two-kernel path to its bf16 rounding.

Only where the layer's activation *is* the tanh GELU (CASMAR's DiT head, VAR / HMAR blocks; not
MAR's exact-GELU ViT blocks), only on CUDA (``_addmm_activation`` applies the exact GELU on the
CPU), only without autograd (it has no fused backward), and only in fp16 / bf16. Off until
measured on a GPU: set ``maskar.nn.linear_gelu.ENABLED = True`` or the environment variable
``MASKAR_FUSED_GELU=1`` (tests/test_linear_gelu.py has the GPU check).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENABLED = os.environ.get("MASKAR_FUSED_GELU", "0") == "1"


def _fused_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the fused path computes in for input ``x``, or None where it does not apply."""
    if not (ENABLED and x.is_cuda) or torch.is_grad_enabled():
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def fusable(x: Tensor) -> bool:
    """Whether :func:`linear_gelu_tanh` may take the fused path for input ``x``."""
    return _fused_dtype(x) is not None


def linear_gelu_tanh(fc: nn.Linear, x: Tensor) -> Tensor:
    """``F.gelu(fc(x), approximate="tanh")``, fused into the matmul where :func:`fusable`."""
    dtype = _fused_dtype(x)
    if dtype is None or fc.bias is None:
        return F.gelu(fc(x), approximate="tanh")
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    with torch.autocast("cuda", enabled=False):
        out = torch._addmm_activation(fc.bias.to(dtype), x2, fc.weight.to(dtype).t(), use_gelu=True)
    return out.reshape(*x.shape[:-1], out.shape[-1])
