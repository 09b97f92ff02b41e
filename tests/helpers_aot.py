"""Ahead-of-time Triton compiles in the CPU tests: what the interpreter cannot catch (the real
compiler's rejections, shared-memory sizes, which instructions the dots become)."""

from __future__ import annotations

import contextlib
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


def tensor_core_ops(compiled) -> dict[str, int]:
    """Tensor-core instructions in a compiled kernel's PTX: ``wgmma`` (Hopper's warpgroup MMA,
    ``wgmma.mma_async``), of which ``wgmma_reg_a`` take their A operand from registers (a register
    list after the accumulators, instead of a shared-memory descriptor: what a prologue that
    transforms A in registers leads to), and ``mma`` (warp-level ``mma.sync``, the pre-Hopper path)."""
    ptx = compiled.asm.get("ptx", "") if hasattr(compiled.asm, "get") else ""
    wgmma = [line.split("},", 1)[-1].lstrip() for line in ptx.splitlines() if "wgmma.mma_async" in line]
    return {
        "wgmma": len(wgmma),
        "wgmma_reg_a": sum(operands.startswith("{") for operands in wgmma),
        "mma": ptx.count("mma.sync"),
    }


def compile_source(src, arch: int, num_warps: int, num_stages: int):
    """``triton.compile`` of an ``ASTSource`` for ``cuda:arch`` with the options maskar's launches
    give (their stated FMA contraction, ``block_sparse.FP_FUSION``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from maskar.kernels.block_sparse import FP_FUSION

    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": FP_FUSION}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


# ----------------------------------------------------------------------------- per-kernel recipes
# One place for how each Triton kernel's signature is spelled for an AOT compile: the tests and
# scripts/aot_resource_usage.py (every tuner candidate's registers and spills, for a Triton version
# other than this environment's too) use them.

def compile_for_target(kernel, types: dict, consts: dict, num_warps: int, num_stages: int,
                       arch: int = 90, attrs: dict | None = None):
    """``triton.compile`` of ``kernel`` for ``cuda:arch`` with argument types ``types`` (name ->
    Triton type string) and constexprs ``consts`` (name -> value)."""
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in consts else types[n] for n in names}
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs or {},
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return compile_source(src, arch, num_warps, num_stages)


def compile_attention_kernel(kernel, arch: int, dtype: str, consts: dict, num_warps: int = 4,
                             num_stages: int = 3):
    """A kernel of ``maskar.kernels.block_sparse`` or ``neighborhood`` (they share argument names)."""
    fp = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dtype]

    def kind(n: str) -> str:
        if n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            return fp
        if n in ("LSE", "DELTA", "DQ_ACC"):
            return "*fp32"
        if n in ("BND", "ITEMS"):
            return "*i32"
        return "fp32" if n in ("qk_scale", "sm_scale") else "i32"

    types = {n: kind(n) for n in kernel.arg_names if n not in consts}
    return compile_for_target(kernel, types, consts, num_warps, num_stages, arch)


def compile_psa(phase: str, cfg, head_dim: int = 64, dtype: str = "bf16", clamp: bool = False,
                arch: int = 90):
    """The neighbourhood-attention forward or backward kernel of an NaConfig."""
    import maskar.kernels.neighborhood as nb

    kernel = nb._na_fwd if phase == "fwd" else nb._na_bwd_whole if cfg.whole else nb._na_bwd
    consts = dict(TH=cfg.th, TW=cfg.tw, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, CLAMP=clamp)
    if phase == "bwd":
        consts["FUSED_DELTA"] = cfg.fused_delta
    consts |= dict(UPCAST=False, IEEE=dtype == "fp32")
    return compile_attention_kernel(kernel, arch, dtype, consts, cfg.num_warps, cfg.num_stages)


@contextlib.contextmanager
def compiles_as_launched(arch: int = 90):
    """Inside the block every JIT launch (``kernel[grid](...)``) is compiled for ``cuda:arch`` with
    the argument specialisation Triton's own launch path would give those arguments (16-byte
    aligned pointers, ints divisible by 16, ints equal to 1) and recorded instead of run: yields
    the list of (kernel name, compiled kernel). Host code runs on CPU tensors of the real shapes,
    so a compile here is the one the GPU would run, which the bare signatures of the recipes above
    are not (they assume no alignment: scalar loads, more registers). A launch that does not ask
    for ``enable_fp_fusion=True`` fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    found: list = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        # every maskar launch states its FMA contraction (block_sparse.FP_FUSION): Triton 3.10
        # turns the unstated default off
        if kwargs.get("enable_fp_fusion") is not True:
            raise AssertionError(f"{self.__name__} launched without enable_fp_fusion=True")
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization,
                                                                options)
        src = ASTSource(self, signature, constexprs, attrs)
        found.append((self.__name__, triton.compile(src, target=target, options=options.__dict__)))
        return None

    JITFunction.run = run
    try:
        yield found
    finally:
        JITFunction.run = original
