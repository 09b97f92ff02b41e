"""``act(x @ w.T + b)`` in one Triton kernel: the activation in the matmul's epilogue.

A transformer MLP's first linear writes a (rows, 4 W) activation that a separate elementwise
kernel then reads and writes again for the GELU: MAR-B's exact-GELU kernel takes 0.87 s of an
11.2 s num_iter-256 sampling call on an H200 (docs/benchmarks.md, *Where MAR-B's num_iter 256
call goes*). cuBLASLt's epilogue offers only the tanh GELU, and Inductor's max-autotune matmul
templates that could take the exact one were slower than cuBLAS plus the separate kernel. This
kernel applies the GELU (exact, erf-based, or the tanh form) to the float32 accumulator before
the one store, so the activation's round trip through memory is gone.

Numerics: fp16 / bf16 operands, fp32 accumulation, the bias added and the GELU applied in fp32,
one rounding to the output dtype. The two-kernel path rounds the pre-activation to the output
dtype first; the two agree to that rounding. The exact GELU's Phi comes from an erfc fit
(:func:`_gelu_erf`), as accurate as erff where both are and more so on the negative tail.

Speed is not assumed: per (device, dtype, N, K, activation, bias, rows class) the first call
times every candidate tile config *and* the unfused path (``F.linear`` and the separate GELU,
what runs without this module) and keeps the fastest, so where no config beats cuBLAS the op
runs the unfused path and costs nothing. Nothing is timed inside a CUDA-graph capture (there
the unfused path runs unless the key was tuned before). Inference only: no backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.block_sparse import _INTERPRET, FP_FUSION
from maskar.kernels.tuning import Tuner

ACTS = ("none", "gelu", "gelu_tanh")  # F.gelu's approximate="none" / "tanh"
_ACT_CODE = {name: i for i, name in enumerate(ACTS)}


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _gelu_erf(x):
    """x Phi(x), Phi through erfc(|x| / sqrt 2) from the Chebyshev fit of Numerical Recipes' erfcc
    (relative error < 1.2e-7 for every argument, so the tail x Phi(x) of negative x keeps full
    relative precision too). libdevice's erff over a 128 x 256 accumulator needs more registers
    than the tile leaves and spills (sm90, compiled as launched: 160 bytes of stack per thread on the
    128 x 256 tile with Triton 3.6); this does not."""
    z = tl.abs(x) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * z)
    p = -0.82215223 + t * 0.17087277
    p = 1.48851587 + t * p
    p = -1.13520398 + t * p
    p = 0.27886807 + t * p
    p = -0.18628806 + t * p
    p = 0.09678418 + t * p
    p = 0.37409196 + t * p
    p = 1.00002368 + t * p
    half_erfc = 0.5 * t * tl.exp(-z * z - 1.26551223 + t * p)
    return x * tl.where(x < 0, half_erfc, 1.0 - half_erfc)


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) = x sigmoid(2u): one exp instead of a tanh
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _tile_origin(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """First row and column of output tile ``tile``. Grouped order: GROUP_M row tiles share
    each column tile of W while it sits in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _tile_product(
    X, W, rows, cols, M, N, K, stride_xm, stride_wn,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    ks = tl.arange(0, BLOCK_K)
    # rows / cols past the end wrap around instead of being masked in the main loop (the
    # results of those lanes are never stored), so the loads stay unmasked and pipelined
    x_ptrs = X + (rows % M)[:, None] * stride_xm + ks[None, :]
    w_ptrs = W + (cols % N)[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = ks[None, :] < K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=k_ok, other=0.0)
        if DOT_F32:  # TRITON_INTERPRET with bf16: the CPU interpreter multiplies bf16 as integers
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _bias_act_store(acc, BIAS, Y, rows, cols, M, N, stride_ym, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = _gelu_erf(acc)
    elif ACT == 2:
        acc = _gelu_tanh(acc)
    y_ptrs = Y + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit(do_not_specialize=["M"])  # every row count reuses the binary (MAR's encoder varies it)
def _linear_act(
    X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One output tile per program."""
    row0, col0 = _tile_origin(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows, cols = row0 + tl.arange(0, BLOCK_M), col0 + tl.arange(0, BLOCK_N)
    acc = _tile_product(X, W, rows, cols, M, N, K, stride_xm, stride_wn, EVEN_K, DOT_F32,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    _bias_act_store(acc, BIAS, Y, rows, cols, M, N, stride_ym, HAS_BIAS, ACT)


@triton.jit(do_not_specialize=["M"])
def _linear_act_persistent(
    X, W, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym, NUM_PROGS,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program per SM walking tiles NUM_PROGS apart. MAR's K is short (768: 12 steps of 64),
    so a tile's pipeline fill and its epilogue are a large part of it; flattening the tile and K
    loops into one lets the pipeliner load the next tile's operands during this tile's epilogue."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGS, flatten=True):
        row0, col0 = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows, cols = row0 + tl.arange(0, BLOCK_M), col0 + tl.arange(0, BLOCK_N)
        acc = _tile_product(X, W, rows, cols, M, N, K, stride_xm, stride_wn, EVEN_K, DOT_F32,
                            BLOCK_M, BLOCK_N, BLOCK_K)
        _bias_act_store(acc, BIAS, Y, rows, cols, M, N, stride_ym, HAS_BIAS, ACT)


@triton.jit(do_not_specialize=["M"])
def _linear_act_tma(
    x_desc, w_desc, BIAS, Y, M, N, K, stride_ym, NUM_PROGS,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The operands through tensor descriptors (TMA on Hopper: the copy engine fills shared
    memory, zero-padded past the edges, so no address arithmetic or masks in the loop); tiles
    NUM_PROGS apart per program (NUM_PROGS = the tile count: one tile each)."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGS, flatten=True):
        row0, col0 = _tile_origin(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            x = x_desc.load([row0, k * BLOCK_K])
            w = w_desc.load([col0, k * BLOCK_K])
            if DOT_F32:  # TRITON_INTERPRET with bf16 (see _tile_product)
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        rows, cols = row0 + tl.arange(0, BLOCK_M), col0 + tl.arange(0, BLOCK_N)
        _bias_act_store(acc, BIAS, Y, rows, cols, M, N, stride_ym, HAS_BIAS, ACT)


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class MMConfig:
    """How one call runs. ``path``: "triton" (this module's kernel with the tile block_m x
    block_n, block_k deep, grouping and launch shape below; one program per SM walking tiles
    where ``persistent``), "tma" (the same through tensor descriptors), "unfused" (``F.linear``
    then the activation as its own kernel: what runs without this module) or "cublaslt" (the
    tanh GELU in cuBLASLt's epilogue, ``torch._addmm_activation``; CUDA, gelu_tanh with a bias)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    path: str = "triton"
    persistent: bool = False


UNFUSED = MMConfig(path="unfused")
CUBLASLT = MMConfig(path="cublaslt")

# Hopper wgmma shapes: one warpgroup per 64 rows; 128 x 256 tiles with 4 stages of 64-deep
# operands take 192 KB of the 227 KB shared memory (the store's layout conversion needs the rest).
# The first one is what the GPU tests pin.
CANDIDATES = [
    MMConfig(128, 256, 64, 8, 8, 3),
    MMConfig(128, 256, 64, 8, 8, 4),
    MMConfig(128, 128, 64, 8, 8, 4),
    MMConfig(128, 128, 64, 8, 4, 4),
    MMConfig(256, 128, 64, 8, 8, 3),
    MMConfig(64, 256, 64, 8, 4, 4),
    MMConfig(128, 128, 128, 8, 8, 3),
    MMConfig(128, 128, 64, 8, 4, 3),  # 96 KB: two programs per SM, one's epilogue under the other's loop
    MMConfig(128, 256, 64, 8, 8, 3, persistent=True),
    MMConfig(128, 128, 64, 8, 8, 4, persistent=True),
    MMConfig(128, 128, 64, 8, 4, 3, persistent=True),
    MMConfig(128, 256, 64, 8, 8, 3, path="tma"),
    MMConfig(128, 256, 64, 8, 8, 3, path="tma", persistent=True),
    MMConfig(128, 128, 64, 8, 8, 4, path="tma", persistent=True),
    MMConfig(128, 128, 64, 8, 4, 3, path="tma"),
    # few rows, many columns (the diffusion head's batched adaLN projection: 128 x 20,480 x 1,024):
    # every weight column read once, by enough programs to fill the GPU
    MMConfig(128, 64, 64, 8, 4, 4),
    MMConfig(128, 64, 64, 8, 4, 4, persistent=True),
]
_INTERPRET_CONFIG = MMConfig(32, 32, 32, 2, 4, 1)

# Tests set this to pin a config (the CPU interpreter has nothing to time).
FORCE_CONFIG: MMConfig | None = None

_tuner = Tuner("linear_act")
tuned_configs, tuning_log = _tuner.configs, _tuner.history


def _rows_class(m: int) -> int:
    """Rows rounded up to a power of two (at least 64): one tuning per class of row counts. Small
    classes matter: the diffusion head runs 128 rows at MAR num_iter 256 and ~500 at 64, where the
    best tile differs; a class's timing costs milliseconds once its configs are compiled."""
    return max(64, 1 << max(0, (m - 1).bit_length()))


def _config(x: Tensor, n: int, act: str, has_bias: bool, launch_with) -> MMConfig:
    key = (x.get_device(), x.dtype, n, x.shape[1], act, has_bias, _rows_class(x.shape[0]))
    extra = [CUBLASLT] if act == "gelu_tanh" and has_bias else []  # timed after UNFUSED, before the tiles
    interpret = _INTERPRET_CONFIG if _INTERPRET else None
    return _tuner.choose(key, [*extra, *CANDIDATES], launch_with, UNFUSED, FORCE_CONFIG, interpret)


# ----------------------------------------------------------------------------- host side


def _unfused(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    y = F.linear(x, weight, bias)
    return y if act == "none" else F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")


@functools.lru_cache(maxsize=16)
def _programs(device: torch.device) -> int:
    """A persistent launch's program count: one per SM (two under the interpreter, to walk tiles)."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(x: Tensor, weight: Tensor, bias: Tensor | None, act: str, cfg: MMConfig) -> Tensor:
    if cfg.path == "unfused":
        return _unfused(x, weight, bias, act)
    if cfg.path == "cublaslt":  # the tanh GELU on the float32 accumulator, as this kernel's
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    m, k = x.shape
    n = weight.shape[0]
    out = x.new_empty(m, n)
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)  # not triton.cdiv: 3 us a host call
    progs = min(tiles, _programs(x.device)) if cfg.persistent else tiles
    b = bias if bias is not None else x
    consts = dict(HAS_BIAS=bias is not None, ACT=_ACT_CODE[act],
                  DOT_F32=_INTERPRET and x.dtype == torch.bfloat16,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)
    if cfg.path == "tma":
        x_desc, w_desc = _descriptors(x, weight, cfg)
        _linear_act_tma[(progs,)](x_desc, w_desc, b, out, m, n, k, out.stride(0), progs, **consts)
        return out
    args = (x, weight, b, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0))
    consts["EVEN_K"] = k % cfg.block_k == 0
    if cfg.persistent:
        _linear_act_persistent[(progs,)](*args, progs, **consts)
    else:
        _linear_act[(tiles,)](*args, **consts)
    return out


def _descriptors(x: Tensor, weight: Tensor, cfg: MMConfig):
    """Host-side tensor descriptors of x and w (TMA needs 16-byte aligned bases and row strides)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    for t in (x, weight):
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            raise ValueError("linear_act: the TMA path needs 16-byte aligned rows")
    return (TensorDescriptor(x, list(x.shape), list(x.stride()), [cfg.block_m, cfg.block_k]),
            TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [cfg.block_n, cfg.block_k]))


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> str:
    """Why the kernel cannot take this call ('' if it can)."""
    if act not in ACTS:
        return f"act: expected one of {ACTS}, got {act!r}"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return f"expected x (M, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}"
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return f"expected bias ({weight.shape[0]},), got {tuple(bias.shape)}"
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        return f"expected fp16 / bf16 x and weight of one dtype, got {x.dtype} and {weight.dtype}"
    if x.stride(1) != 1 or weight.stride(1) != 1:
        return "expected x and weight contiguous along K"
    if x.shape[0] == 0 or x.shape[1] == 0:
        return "expected at least one row and one input feature"
    return ""


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: str = "gelu") -> Tensor:
    """``act(x @ weight.T + bias)`` for 2-D ``x`` (fp16 / bf16, CUDA or the interpreter), with the
    activation in the matmul's epilogue where that is faster (see the module docstring)."""
    problem = _check(x, weight, bias, act)
    if problem:
        raise ValueError(f"linear_act: {problem}")
    if max(x.shape[0] * x.stride(0), x.shape[0] * weight.shape[0], weight.numel()) >= 2**31:
        return _unfused(x, weight, bias, act)  # the kernels index with 32-bit offsets
    cfg = _config(x, weight.shape[0], act, bias is not None, lambda c: _launch(x, weight, bias, act, c))
    return _launch(x, weight, bias, act, cfg)


@torch.library.custom_op("maskar::linear_act", mutates_args=())
def linear_act_op(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    """:func:`linear_act` as an opaque op, so a compiled graph calls it without a break."""
    return linear_act(x, weight, bias, act)


@linear_act_op.register_fake
def _(x, weight, bias, act):
    return x.new_empty(x.shape[0], weight.shape[0])


__all__ = ["linear_act", "linear_act_op", "tuned_configs", "tuning_log", "MMConfig", "CANDIDATES", "ACTS"]
