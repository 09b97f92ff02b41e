"""Triton kernels. Nothing here imports Triton: the models import each module lazily through
:func:`optional_kernel`, so an install without Triton runs the torch code everywhere."""

from __future__ import annotations

import importlib
from types import ModuleType


def optional_kernel(name: str) -> ModuleType | None:
    """``maskar.kernels.<name>``, or None where it cannot be imported (no Triton on this install).
    Callers import it when a model is built, never inside a torch.compile trace."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None
