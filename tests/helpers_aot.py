"""Ahead-of-time Triton compiles in the CPU tests: what the interpreter cannot catch (the real
compiler's rejections, shared-memory sizes, which instructions the dots become)."""

from __future__ import annotations

import os

import pytest


def require_aot_compiler():
    """Triton, if its AOT compile API can run in this process (not under TRITON_INTERPRET); else skip."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled in this process")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip(f"triton {triton.__version__}: no AOT compile API")
    return triton
