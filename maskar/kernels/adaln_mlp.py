"""The diffusion MLP head's residual block as two Triton kernels (inference).

MAR's head (``SimpleMLPAdaLN``) runs 100 steps per AR iteration on a few hundred rows: MAR-B at
num_iter 256 makes 25,600 steps a call, 134 us each on an H200, about 31 kernels a step inside a
CUDA graph, most of them a few microseconds of launch and latency rather than work (the step's
weights stream in ~16 us). Each residual block is

    h = SiLU(Linear1(modulate(LN(x), shift, scale)));  x = x + gate * Linear2(h)

which compiled code runs as four kernels (LayerNorm + modulate, matmul, SiLU, matmul; the
gated residual folds into the next block's norm). Here it is two:

- :func:`modulated_linear`: the LayerNorm statistics of the program's rows and the modulation
  are computed while loading the matmul's A operand (the prologue), the bias and the activation
  applied to the accumulator (the epilogue);
- :func:`gated_residual_linear`: ``x + gate * (h @ w.T + b)`` in the epilogue.

The head's final layer is a :func:`modulated_linear` without activation. Rounding follows the
eager bf16 path step by step (the LayerNorm in fp32, ``1 + scale`` rounded to the modulation's
dtype, the linear's output rounded before SiLU / the gate, the gate product rounded, the sum
rounded to x's dtype), so results differ from it only by the order of the matmul's and the
norm's fp32 sums. Tile configs are timed once per shape class (nothing is timed inside a CUDA
graph capture). Off by default (``DiffLoss.fused_blocks``): on an H200 (2026-12-05) MAR-B at
num_iter 256 took 12.77 s with it against 10.60 s without.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.block_sparse import _INTERPRET, FP_FUSION
from maskar.kernels.linear_act import _rows_class, _tile_origin, _tile_product
from maskar.kernels.tuning import pick_fastest
from maskar.kernels.tuning import time_ms as _time_ms

ACTS = ("none", "silu")


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["M"])  # MAR's row count changes every iteration
def _modulated_linear(
    X, MOD, LNW, LNB, W, BIAS, Y, M, N, K, stride_xm, stride_mm, stride_wn, stride_ym,
    SHIFT_COL, SCALE_COL, eps,
    LN_AFFINE: tl.constexpr, ACT: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = act(modulate(LN(X), MOD[:, SHIFT_COL:], MOD[:, SCALE_COL:]) @ W.T + BIAS); K % BLOCK_K == 0."""
    row0, col0 = _tile_origin(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_rows = X + (rows % M)[:, None] * stride_xm + ks[None, :]  # past-the-end rows wrap (never stored)
    m_rows = MOD + (rows % M)[:, None] * stride_mm + ks[None, :]
    w_ptrs = W + (cols % N)[:, None] * stride_wn + ks[None, :]
    # LayerNorm statistics of the program's rows, two passes (mean, then the centred squares)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        total += tl.sum(tl.load(x_rows + k).to(tl.float32), axis=1)
    mean = total / K
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        d = tl.load(x_rows + k).to(tl.float32) - mean[:, None]
        sq += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(sq / K + eps)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = (tl.load(x_rows + k).to(tl.float32) - mean[:, None]) * rstd[:, None]
        if LN_AFFINE:
            lnw = tl.load(LNW + k + ks).to(tl.float32)
            a = a * lnw[None, :] + tl.load(LNB + k + ks).to(tl.float32)[None, :]
        shift = tl.load(m_rows + SHIFT_COL + k).to(tl.float32)
        # eager: 1 + scale in the modulation's dtype, then shift + ln * (1 + scale) in fp32
        one_p = 1.0 + tl.load(m_rows + SCALE_COL + k).to(tl.float32)
        one_p = one_p.to(MOD.dtype.element_ty).to(tl.float32)
        a = (shift + a * one_p).to(W.dtype.element_ty)
        w = tl.load(w_ptrs + k)
        if DOT_F32:  # TRITON_INTERPRET with bf16: the CPU interpreter multiplies bf16 as integers
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)))
        else:
            acc = tl.dot(a, tl.trans(w), acc)

    # eager: the linear's output rounded, then the activation on it, rounded again
    t = (acc + tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :])
    t = t.to(Y.dtype.element_ty).to(tl.float32)
    if ACT == 1:
        t = t / (1.0 + tl.exp(-t))
    y_ptrs = Y + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, t.to(Y.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit(do_not_specialize=["M"])
def _gated_residual_linear(
    H, W, BIAS, X, MOD, Y, M, N, K, stride_hm, stride_wn, stride_xm, stride_mm, stride_ym, GATE_COL,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = X + MOD[:, GATE_COL:] * (H @ W.T + BIAS); K % BLOCK_K == 0."""
    row0, col0 = _tile_origin(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    acc = _tile_product(H, W, rows, cols, M, N, K, stride_hm, stride_wn, True, DOT_F32,
                        BLOCK_M, BLOCK_N, BLOCK_K)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    # eager: the linear's output rounded, gate * it rounded, x + that rounded to x's dtype
    t = acc + tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    t = t.to(H.dtype.element_ty).to(tl.float32)
    gate = tl.load(MOD + rows[:, None] * stride_mm + GATE_COL + cols[None, :], mask=ok, other=0.0)
    p = (gate.to(tl.float32) * t).to(H.dtype.element_ty).to(tl.float32)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], (x + p).to(Y.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class BlockConfig:
    block_m: int = 32
    block_n: int = 64
    block_k: int = 64
    group_m: int = 4
    num_warps: int = 4
    num_stages: int = 3


# Few rows (128 at MAR-B num_iter 256, a few hundred at 64) and 1024-wide layers: narrow tiles
# so that 64-256 programs share the weights' columns. The first one is used without timing.
CANDIDATES = [
    BlockConfig(32, 64, 64, 4, 4, 3),
    BlockConfig(64, 64, 64, 4, 4, 3),
    BlockConfig(16, 64, 64, 8, 4, 4),
    BlockConfig(32, 32, 64, 4, 2, 4),
    BlockConfig(64, 128, 64, 4, 8, 3),
    BlockConfig(128, 64, 64, 1, 4, 3),
    BlockConfig(32, 64, 128, 4, 4, 2),
]
_INTERPRET_CONFIG = BlockConfig(16, 32, 32, 2, 4, 1)
FORCE_CONFIG: BlockConfig | None = None  # tests pin one

_tuned: dict[tuple, BlockConfig] = {}
_tune_log: dict[tuple, dict] = {}


def _config(kind: str, x: Tensor, n: int, k: int, launch_with) -> BlockConfig:
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG
    if _INTERPRET:
        return _INTERPRET_CONFIG
    key = (kind, x.get_device(), x.dtype, n, k, _rows_class(x.shape[0]))
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    usable = [c for c in CANDIDATES if k % c.block_k == 0]
    if torch.cuda.is_current_stream_capturing():
        return usable[0]
    return pick_fastest(key, usable, launch_with, _tuned, _tune_log, "adaln_mlp", _time_ms)


def tuned_configs() -> dict[tuple, BlockConfig]:
    return dict(_tuned)


def tuning_log() -> dict[tuple, dict]:
    return {k: dict(v) for k, v in _tune_log.items()}


# ----------------------------------------------------------------------------- host side


K_MULTIPLE = 64  # every config's (and the interpreter's) K step divides it; the loops are unmasked


def _check(x: Tensor, mod: Tensor, weight: Tensor, cols: tuple[int, ...], what: str) -> None:
    if weight.dim() == 2 and weight.shape[1] % K_MULTIPLE:
        raise ValueError(f"{what}: the input features ({weight.shape[1]}) must be a multiple of {K_MULTIPLE}")
    if x.dim() != 2 or mod.dim() != 2 or weight.dim() != 2 or mod.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: expected 2-D x / mod with equal rows and a 2-D weight, got "
                         f"{tuple(x.shape)}, {tuple(mod.shape)}, {tuple(weight.shape)}")
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{what}: expected an fp16 / bf16 weight, got {weight.dtype}")
    if x.stride(1) != 1 or mod.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"{what}: expected x, mod and weight contiguous along their last dim")
    for c in cols:
        if c < 0 or c + (weight.shape[1] if what == "modulated_linear" else weight.shape[0]) > mod.shape[1]:
            raise ValueError(f"{what}: modulation column {c} out of range for mod {tuple(mod.shape)}")


def modulated_linear(
    x: Tensor, mod: Tensor, shift_col: int, scale_col: int, ln_weight: Tensor | None, ln_bias: Tensor | None,
    eps: float, weight: Tensor, bias: Tensor, act: str = "none",
) -> Tensor:  # fmt: skip
    """``act(modulate(layer_norm(x), shift, scale) @ weight.T + bias)`` with shift / scale the
    columns ``[shift_col, shift_col + K)`` / ``[scale_col, ...)`` of ``mod``; output in weight's dtype."""
    _check(x, mod, weight, (shift_col, scale_col), "modulated_linear")
    if act not in ACTS:
        raise ValueError(f"modulated_linear: act: expected one of {ACTS}, got {act!r}")
    if x.shape[1] != weight.shape[1] or (ln_weight is None) != (ln_bias is None):
        raise ValueError(f"modulated_linear: expected x (M, K) for weight (N, K) and LN weight and bias "
                         f"together, got {tuple(x.shape)}, {tuple(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]

    def launch(cfg: BlockConfig) -> Tensor:
        out = x.new_empty(m, n, dtype=weight.dtype)
        grid = (-(-m // cfg.block_m) * -(-n // cfg.block_n),)
        _modulated_linear[grid](
            x, mod, ln_weight if ln_weight is not None else x, ln_bias if ln_bias is not None else x,
            weight, bias, out, m, n, k, x.stride(0), mod.stride(0), weight.stride(0), out.stride(0),
            shift_col, scale_col, eps,
            LN_AFFINE=ln_weight is not None, ACT=ACTS.index(act),
            DOT_F32=_INTERPRET and weight.dtype == torch.bfloat16,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
        )
        return out

    return launch(_config("modulated", x, n, k, launch))


def gated_residual_linear(
    h: Tensor, weight: Tensor, bias: Tensor, x: Tensor, mod: Tensor, gate_col: int
) -> Tensor:
    """``x + gate * (h @ weight.T + bias)`` with gate the columns ``[gate_col, gate_col + N)`` of
    ``mod``; output in x's dtype."""
    _check(h, mod, weight, (gate_col,), "gated_residual_linear")
    if h.shape[1] != weight.shape[1] or tuple(x.shape) != (h.shape[0], weight.shape[0]) or x.stride(1) != 1:
        raise ValueError(f"gated_residual_linear: expected h (M, K), weight (N, K), x (M, N), got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(x.shape)}")
    if h.dtype != weight.dtype:
        raise ValueError(f"gated_residual_linear: h {h.dtype} and weight {weight.dtype}: expected one dtype")
    m, k = h.shape
    n = weight.shape[0]

    def launch(cfg: BlockConfig) -> Tensor:
        out = torch.empty_like(x)
        grid = (-(-m // cfg.block_m) * -(-n // cfg.block_n),)
        _gated_residual_linear[grid](
            h, weight, bias, x, mod, out, m, n, k,
            h.stride(0), weight.stride(0), x.stride(0), mod.stride(0), out.stride(0), gate_col,
            DOT_F32=_INTERPRET and h.dtype == torch.bfloat16,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
        )
        return out

    return launch(_config("gated", h, n, k, launch))


# Opaque ops, so a compiled head step stays one graph around them.


@torch.library.custom_op("maskar::modulated_linear", mutates_args=())
def modulated_linear_op(
    x: Tensor, mod: Tensor, shift_col: int, scale_col: int, ln_weight: Tensor | None, ln_bias: Tensor | None,
    eps: float, weight: Tensor, bias: Tensor, act: str,
) -> Tensor:  # fmt: skip
    return modulated_linear(x, mod, shift_col, scale_col, ln_weight, ln_bias, eps, weight, bias, act)


@modulated_linear_op.register_fake
def _(x, mod, shift_col, scale_col, ln_weight, ln_bias, eps, weight, bias, act):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=weight.dtype)


@torch.library.custom_op("maskar::gated_residual_linear", mutates_args=())
def gated_residual_linear_op(
    h: Tensor, weight: Tensor, bias: Tensor, x: Tensor, mod: Tensor, gate_col: int
) -> Tensor:
    return gated_residual_linear(h, weight, bias, x, mod, gate_col)


@gated_residual_linear_op.register_fake
def _(h, weight, bias, x, mod, gate_col):
    return torch.empty_like(x)


__all__ = ["modulated_linear", "gated_residual_linear", "modulated_linear_op", "gated_residual_linear_op",
           "tuned_configs", "tuning_log", "BlockConfig", "CANDIDATES"]
