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


def resource_usage(compiled) -> dict | None:
    """{"REG": registers per thread, "STACK": bytes of stack (spills) per thread, ...} of a compiled
    kernel's cubin, read with the cuobjdump Triton ships; None where it has none."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool) or "cubin" not in compiled.asm:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return None if found is None else {"REG": int(found.group(1)), "STACK": int(found.group(2))}
