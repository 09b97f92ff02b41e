"""``gelu(fc(x))`` with the GELU in the matmul's epilogue on CUDA (inference only).

Two fused paths: the Triton one off by default, the cuBLASLt one per layer (below). The Triton
one (``MASKAR_LINEAR_ACT=1`` or :func:`enable_triton`) takes the exact GELU as well as the tanh
one and picks, per shape, the fastest of its own tile configs, cuBLASLt's tanh epilogue and the
unfused pair (``maskar.kernels.linear_act``); it comes first where both are on. The cuBLASLt one below is
tanh-only.

A transformer MLP's first linear writes a (rows, 4 W) activation that a separate elementwise
kernel then reads and writes again for the GELU. cuBLASLt can apply GELU (the tanh
approximation) to the accumulator before storing, which ``torch._addmm_activation(bias, x, w.T,
use_gelu=True)`` exposes on CUDA (Inductor keeps it as one op). That saves the activation's
round trip: about 0.5 ms of a 6 ms CASMAR-B DiT step at B 64, a smaller share of VAR / HMAR
sampling. The result equals ``F.gelu(fc(x), approximate="tanh")`` to rounding: the epilogue
applies the GELU to the float32 accumulator, the two-kernel path to its bf16 rounding.

Only where the layer's activation *is* the tanh GELU (CASMAR's DiT head, VAR / HMAR blocks; not
MAR's exact-GELU ViT blocks), only on CUDA (``_addmm_activation`` applies the exact GELU on the
CPU), only without autograd (it has no fused backward), and only in fp16 / bf16
(tests/test_linear_gelu.py has the GPU check).

Where it is on: a layer passes its own default (``epilogue``). CASMAR's DiT head says yes: on an
H200 its sampling ran 8.69 -> 9.11 images/s with it, 2026-12-05. VAR / HMAR's FFN says yes since
2026-12-06: HMAR-d16's compiled sampler at 1024 px B 8 416.7 -> 403.1 ms on an H100, each side in
its own process (1.5-2.6% slower a session apart on 2026-12-04, before the compiled sampler's
later changes). MAR's exact-GELU ViT MLPs cannot take it. ``MASKAR_FUSED_GELU=1`` / ``=0`` (or
:data:`ENABLED` True / False) turns it on / off for every layer; unset (None), each layer's default
holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskar import env

ENABLED: bool | None = env.switch("MASKAR_FUSED_GELU")
# Off by default: its GPU tests pass, but on an H200 (2026-12-05) MAR-B at num_iter 256 was not
# faster with it (docs/benchmarks.md, *The 2026-12-05 switches*).
TRITON = bool(env.switch("MASKAR_LINEAR_ACT"))
_kernel = None  # maskar.kernels.linear_act once loaded (stays None without Triton)


def load_kernel() -> None:
    """Import the Triton op if :data:`TRITON` is on (layers call this when built, never inside a
    torch.compile trace)."""
    global _kernel
    if TRITON and _kernel is None:
        try:
            from maskar.kernels import linear_act
        except ImportError:  # no Triton on this install: the unfused path runs
            return
        _kernel = linear_act


def enable_triton(on: bool = True) -> None:
    """Switch the Triton path on or off for layers run from now on (compiled code re-traces)."""
    global TRITON
    TRITON = on
    load_kernel()


def _low_precision(x: Tensor) -> torch.dtype | None:
    """The dtype a linear computes in for input ``x`` (CUDA autocast's, else x's) if fp16 / bf16."""
    dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _triton_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the Triton op computes in for input ``x``, or None where it does not apply."""
    if _kernel is None or not TRITON or torch.is_grad_enabled():
        return None
    return _low_precision(x) if x.is_cuda or _kernel._INTERPRET else None


def epilogue_on(default: bool = False) -> bool:
    """Whether cuBLASLt's epilogue is switched on for a layer whose own default is ``default``."""
    return default if ENABLED is None else ENABLED


def _fused_dtype(x: Tensor, default: bool = False) -> torch.dtype | None:
    """The dtype the fused path computes in for input ``x``, or None where it does not apply."""
    if not (epilogue_on(default) and x.is_cuda) or torch.is_grad_enabled():
        return None
    return _low_precision(x)


def fusable(x: Tensor, default: bool = False) -> bool:
    """Whether :func:`linear_gelu_tanh` may take the fused path for input ``x``."""
    return _fused_dtype(x, default) is not None


def takes(x: Tensor, approximate: str, epilogue: bool = False) -> bool:
    """Whether :func:`linear_gelu` fuses for input ``x`` and this GELU (else it is the plain pair)."""
    return _triton_dtype(x) is not None or (approximate == "tanh" and fusable(x, epilogue))


def _through_op(x: Tensor, weight: Tensor, bias: Tensor | None, act: str, dtype: torch.dtype) -> Tensor:
    """``act(x @ weight.T + bias)`` by the Triton op over x's rows, the operands cast to ``dtype``
    as autocast casts them."""
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    out = _kernel.linear_act_op(x2, weight.to(dtype), bias.to(dtype) if bias is not None else None, act)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)``, through the Triton op (no activation) where it applies: its
    tuner keeps cuBLAS where no tile config is faster. For the diffusion head's batched adaLN
    projection (128 x 20,480 x 1,024 at MAR-B num_iter 256: a weight-streaming shape where the
    tile choice decides how often each weight column is read)."""
    dtype = _triton_dtype(x)
    return F.linear(x, weight, bias) if dtype is None else _through_op(x, weight, bias, "none", dtype)


def linear_gelu(fc: nn.Linear, x: Tensor, approximate: str = "none", epilogue: bool = False) -> Tensor:
    """``F.gelu(fc(x), approximate=approximate)``, through the Triton op where it applies, else
    cuBLASLt's epilogue where :func:`fusable` (tanh; ``epilogue``: the layer's default), else the
    two kernels (bit for bit ``nn.GELU(approximate)(fc(x))``, so layers call this whatever applies)."""
    dtype = _triton_dtype(x)
    if dtype is not None:
        return _through_op(x, fc.weight, fc.bias, "gelu_tanh" if approximate == "tanh" else "gelu", dtype)
    if approximate == "tanh":
        return linear_gelu_tanh(fc, x, epilogue)
    return F.gelu(fc(x), approximate=approximate)


def linear_gelu_tanh(fc: nn.Linear, x: Tensor, epilogue: bool = False) -> Tensor:
    """``F.gelu(fc(x), approximate="tanh")``, fused into the matmul where :func:`fusable`."""
    dtype = _fused_dtype(x, epilogue)
    if dtype is None or fc.bias is None:
        return F.gelu(fc(x), approximate="tanh")
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    with torch.autocast("cuda", enabled=False):
        out = torch._addmm_activation(fc.bias.to(dtype), x2, fc.weight.to(dtype).t(), use_gelu=True)
    return out.reshape(*x.shape[:-1], out.shape[-1])
