"""The dtype a linear layer computes in, for code that casts its operands itself (custom ops and
autograd functions, which autocast does not reach)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear of input ``x`` computes in: autocast's where it is on for x's device (CUDA,
    CPU), else x's own (a meta tensor has no autocast to ask)."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype
