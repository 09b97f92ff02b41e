"""Gradient-norm clipping folded into fused AdamW's one pass over the gradients.

``clip_grad_norm_`` then ``step()`` reads every gradient three times: once for the norm, once to
scale it in place (a read and a write of all fp32 gradients), once in the optimizer. Fused
Adam / AdamW take a ``grad_scale`` tensor (what ``GradScaler`` passes them): the kernel divides
each gradient by it as it loads it and writes the divided gradient back. Passing the clip
factor's reciprocal there gives the same update without the separate scaling pass: on an H100
the pass is 0.94 ms of HMAR-d16's 86 ms 1024 px B 2 step and the kernel's write-back costs 0.52
of it back, 0.43 ms saved (docs/benchmarks.md, *Run 11*).

The gradients after the step are the clipped ones in both paths, as ``clip_grad_norm_`` leaves
them. They differ from its in rounding only: the kernel divides by the fp32 reciprocal of the
factor where ``clip_grad_norm_`` multiplies by the factor (equal where the norm is below the
limit, the factor 1). Optimizers without the fused kernel (foreach, single-tensor, the GradScaler
path, sharded gradients) keep ``clip_grad_norm_``.
"""

from __future__ import annotations

import torch
from torch import Tensor

ENABLED = True  # False: clip_grad_norm_ then step() everywhere (A/B timing)


def folds_clipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step applies a ``grad_scale``: fused Adam / AdamW in every group."""
    return (
        ENABLED
        and isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)
        and all(g.get("fused") for g in optimizer.param_groups)
    )


def total_norm(params: list[Tensor], device: torch.device) -> Tensor:
    """The 2-norm of every gradient of ``params`` together (0 without gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)


def clip_divisor(norm: Tensor, max_norm: float) -> Tensor:
    """``clip_grad_norm_``'s factor for total norm ``norm``, inverted: what a fused pass divides
    the gradients by (1 where the norm is below ``max_norm``)."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0).reciprocal()


@torch.no_grad()
def clip_and_step(optimizer: torch.optim.Optimizer, params: list[Tensor], max_norm: float) -> Tensor:
    """Clip the gradients of ``params`` to total norm ``max_norm`` (``<= 0``: no clipping) and take
    one optimizer step, as ``clip_grad_norm_(params, max_norm)`` then ``optimizer.step()``; the
    clipping inside fused AdamW's step where :func:`folds_clipping`. Returns the norm before
    clipping (a device tensor, no host sync)."""
    device = params[0].device if params else torch.device("cpu")
    norm = total_norm(params, device)
    if max_norm > 0 and folds_clipping(optimizer):
        optimizer.grad_scale = clip_divisor(norm, max_norm)  # the kernel divides by its grad_scale
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
        return norm
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    optimizer.step()
    return norm
