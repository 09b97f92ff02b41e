"""A DiT block's adaLN projection with the LayerNorm modulation in its epilogue.

In CASMAR's DiT head every token has its own condition, so each block's adaLN projection is a
(rows, W) x (W, 6 W) matmul whose output, 6 W per row, is written once and read back by the
kernels that modulate the normalised residual stream: at B 64 with CFG that is 32,768 x 3,072
bf16 values (0.2 GB) written and read per block per diffusion step, the largest tensor of the
step. This kernel computes one half of the projection (the attention's shift / scale / gate,
or the MLP's) and, in the epilogue, the modulated input of the next matmul:

    shift, scale, gate = act @ w3.T + b3          (w3 = the half's 3 W rows, act = SiLU(c))
    h = LayerNorm(x) * (1 + scale) + shift        (LayerNorm without affine, from mean / rstd)

so only h and gate (2 W per row) are written and the shift / scale columns never reach memory.
Each program keeps three accumulators (the shift, scale and gate columns of the same features)
over one tile of rows; the LayerNorm statistics come from the caller (:func:`ln_stats`: under
torch.compile they fuse into the residual add before).

Numerics: as the compiled module path: the projection accumulates in fp32 and is rounded to the
output dtype (what the separate matmul stores), the modulation is computed in fp32 from those
rounded values and rounded once. Speed is not assumed: per shape the first call times every
candidate against the unfused path (``F.linear``, then the modulation in PyTorch) and keeps the
fastest (:mod:`maskar.kernels.tuning`). Inference only: no backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.block_sparse import _INTERPRET, FP_FUSION
from maskar.kernels.linear_act import MMConfig, _descriptors, _programs, _rows_class, _tile_origin
from maskar.kernels.tuning import Tuner

# ----------------------------------------------------------------------------- kernel


@triton.jit
def _three_dots(a, w0, w1, w2, acc0, acc1, acc2, DOT_F32: tl.constexpr):
    """The shift, scale and gate products of one K step, sharing the A tile."""
    if DOT_F32:  # TRITON_INTERPRET with bf16: the CPU interpreter multiplies bf16 as integers
        a = a.to(tl.float32)
        acc0 += tl.dot(a, tl.trans(w0.to(tl.float32)))
        acc1 += tl.dot(a, tl.trans(w1.to(tl.float32)))
        acc2 += tl.dot(a, tl.trans(w2.to(tl.float32)))
    else:
        acc0 = tl.dot(a, tl.trans(w0), acc0)
        acc1 = tl.dot(a, tl.trans(w1), acc1)
        acc2 = tl.dot(a, tl.trans(w2), acc2)
    return acc0, acc1, acc2


@triton.jit
def _modulate_tile(
    tile, A, W, BIAS, X, MEAN, RSTD, H, G, M, C, K, stride_am, stride_wn, stride_xm, stride_hm, stride_gm,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    row0, col0 = _tile_origin(tile, M, C, BLOCK_M, BLOCK_N, GROUP_M)
    rows, cols = row0 + tl.arange(0, BLOCK_M), col0 + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # rows / columns past the end wrap around (never stored), so the main loop's loads are unmasked
    a_ptrs = A + (rows % M)[:, None] * stride_am + ks[None, :]
    w_ptrs = W + (cols % C)[:, None] * stride_wn + ks[None, :]
    w_step = C * stride_wn  # shift rows, then scale rows, then gate rows
    acc_shift = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w0 = tl.load(w_ptrs)
            w1 = tl.load(w_ptrs + w_step)
            w2 = tl.load(w_ptrs + 2 * w_step)
        else:
            k_ok = ks[None, :] < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok, other=0.0)
            w0 = tl.load(w_ptrs, mask=k_ok, other=0.0)
            w1 = tl.load(w_ptrs + w_step, mask=k_ok, other=0.0)
            w2 = tl.load(w_ptrs + 2 * w_step, mask=k_ok, other=0.0)
        acc_shift, acc_scale, acc_gate = _three_dots(a, w0, w1, w2, acc_shift, acc_scale, acc_gate, DOT_F32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _modulate_store(acc_shift, acc_scale, acc_gate, rows, cols, BIAS, X, MEAN, RSTD, H, G, M, C,
                    stride_xm, stride_hm, stride_gm)


@triton.jit
def _modulate_store(
    acc_shift, acc_scale, acc_gate, rows, cols, BIAS, X, MEAN, RSTD, H, G, M, C, stride_xm, stride_hm,
    stride_gm,
):  # fmt: skip
    """The epilogue: bias, the projection rounded as stored, then h and the gate."""
    col_ok = cols < C
    ok = (rows[:, None] < M) & col_ok[None, :]
    out_ty = H.dtype.element_ty
    # the projection as its matmul would store it (bias added in fp32, rounded once)
    shift = (acc_shift + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]).to(out_ty)
    scale = (acc_scale + tl.load(BIAS + C + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]).to(out_ty)
    gate = acc_gate + tl.load(BIAS + 2 * C + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + rows, mask=rows < M, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
    h = (x - mean[:, None]) * rstd[:, None] * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(H + rows[:, None] * stride_hm + cols[None, :], h.to(out_ty), mask=ok)
    tl.store(G + rows[:, None] * stride_gm + cols[None, :], gate.to(out_ty), mask=ok)


@triton.jit(do_not_specialize=["M"])
def _adaln_modulate(
    A, W, BIAS, X, MEAN, RSTD, H, G, M, C, K, stride_am, stride_wn, stride_xm, stride_hm, stride_gm,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One (rows, features) tile per program."""
    _modulate_tile(tl.program_id(0), A, W, BIAS, X, MEAN, RSTD, H, G, M, C, K, stride_am, stride_wn,
                   stride_xm, stride_hm, stride_gm, EVEN_K, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit(do_not_specialize=["M"])
def _adaln_modulate_persistent(
    A, W, BIAS, X, MEAN, RSTD, H, G, M, C, K, stride_am, stride_wn, stride_xm, stride_hm, stride_gm,
    NUM_PROGS, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One program per SM walking tiles NUM_PROGS apart (K is short: 512, 8 steps of 64)."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(C, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGS, flatten=True):
        _modulate_tile(tile, A, W, BIAS, X, MEAN, RSTD, H, G, M, C, K, stride_am, stride_wn, stride_xm,
                       stride_hm, stride_gm, EVEN_K, DOT_F32, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit(do_not_specialize=["M"])
def _adaln_modulate_tma(
    a_desc, w_desc, BIAS, X, MEAN, RSTD, H, G, M, C, K, stride_xm, stride_hm, stride_gm, NUM_PROGS,
    DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """The operands through tensor descriptors (TMA on Hopper: the copy engine fills shared memory,
    zero-padded past the edges); tiles NUM_PROGS apart per program."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(C, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGS, flatten=True):
        row0, col0 = _tile_origin(tile, M, C, BLOCK_M, BLOCK_N, GROUP_M)
        acc_shift = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([row0, k * BLOCK_K])
            w0 = w_desc.load([col0, k * BLOCK_K])
            w1 = w_desc.load([C + col0, k * BLOCK_K])
            w2 = w_desc.load([2 * C + col0, k * BLOCK_K])
            acc_shift, acc_scale, acc_gate = _three_dots(a, w0, w1, w2, acc_shift, acc_scale, acc_gate,
                                                         DOT_F32)
        rows, cols = row0 + tl.arange(0, BLOCK_M), col0 + tl.arange(0, BLOCK_N)
        _modulate_store(acc_shift, acc_scale, acc_gate, rows, cols, BIAS, X, MEAN, RSTD, H, G, M, C,
                        stride_xm, stride_hm, stride_gm)


# ----------------------------------------------------------------------------- configs

UNFUSED = MMConfig(path="unfused")

# block_n features per program, three accumulators each (shift, scale, gate): a 128 x 64 tile does
# the work of a 128 x 192 matmul tile. Compiled for sm90 as launched, none of these spills (with 4
# warps 128 x 64 needs 255 registers and spills, as does 256 x 64 with 8).
CANDIDATES = [
    MMConfig(128, 64, 64, 8, 8, 3),
    MMConfig(128, 64, 64, 8, 8, 4),
    MMConfig(64, 64, 64, 8, 4, 4),
    MMConfig(64, 64, 64, 8, 4, 3),
    MMConfig(128, 32, 64, 8, 8, 4),
    MMConfig(64, 128, 64, 8, 8, 3),
    MMConfig(128, 64, 32, 8, 8, 4),
    MMConfig(128, 64, 64, 8, 8, 3, persistent=True),
    MMConfig(128, 64, 64, 8, 8, 4, persistent=True),
    # the operands through TMA descriptors, as linear_act's fastest forms for its large shapes
    MMConfig(128, 64, 64, 8, 8, 3, path="tma"),
    MMConfig(128, 64, 64, 8, 8, 3, path="tma", persistent=True),
    MMConfig(128, 64, 64, 8, 8, 4, path="tma", persistent=True),
]
_INTERPRET_CONFIG = MMConfig(32, 16, 32, 2, 4, 1)
FORCE_CONFIG: MMConfig | None = None  # tests pin one

_tuner = Tuner("adaln_modulate")
tuned_configs, tuning_log = _tuner.configs, _tuner.history


def _config(act: Tensor, c: int, launch_with) -> MMConfig:
    key = (act.get_device(), act.dtype, c, act.shape[1], _rows_class(act.shape[0]))
    interpret = _INTERPRET_CONFIG if _INTERPRET else None
    return _tuner.choose(key, CANDIDATES, launch_with, UNFUSED, FORCE_CONFIG, interpret)


# ----------------------------------------------------------------------------- host side


def ln_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """float32 (mean, rstd) over the last dimension, as ``F.layer_norm`` computes them."""
    var, mean = torch.var_mean(x.float(), dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


def _unfused(
    act: Tensor, w3: Tensor, b3: Tensor, x: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    shift, scale, gate = F.linear(act, w3, b3).chunk(3, dim=-1)
    normed = (x.float() - mean[:, None]) * rstd[:, None]
    h = torch.addcmul(shift.float(), normed, 1.0 + scale.float())
    return h.to(act.dtype), gate.contiguous()


def _launch(act: Tensor, w3: Tensor, b3: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, cfg: MMConfig):
    if cfg.path == "unfused":
        return _unfused(act, w3, b3, x, mean, rstd)
    m, k = act.shape
    c = x.shape[1]
    h, g = act.new_empty(m, c), act.new_empty(m, c)
    tiles = -(-m // cfg.block_m) * -(-c // cfg.block_n)
    args = (act, w3, b3, x, mean, rstd, h, g, m, c, k, act.stride(0), w3.stride(0), x.stride(0),
            h.stride(0), g.stride(0))  # fmt: skip
    consts = dict(EVEN_K=k % cfg.block_k == 0, DOT_F32=_INTERPRET and act.dtype == torch.bfloat16,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION)  # fmt: skip
    progs = min(tiles, _programs(act.device)) if cfg.persistent else tiles
    if cfg.path == "tma":
        a_desc, w_desc = _descriptors(act, w3, cfg)
        del consts["EVEN_K"]
        _adaln_modulate_tma[(progs,)](a_desc, w_desc, b3, x, mean, rstd, h, g, m, c, k, x.stride(0),
                                      h.stride(0), g.stride(0), progs, **consts)
    elif cfg.persistent:
        _adaln_modulate_persistent[(progs,)](*args, progs, **consts)
    else:
        _adaln_modulate[(tiles,)](*args, **consts)
    return h, g


def _check(act: Tensor, w3: Tensor, b3: Tensor, x: Tensor, mean: Tensor, rstd: Tensor) -> str:
    """Why the kernel cannot take this call ('' if it can)."""
    if act.dim() != 2 or w3.dim() != 2 or x.dim() != 2 or act.shape[1] != w3.shape[1]:
        return f"expected act (M, K), w3 (3 C, K), x (M, C); got {tuple(act.shape)}, {tuple(w3.shape)}, " \
               f"{tuple(x.shape)}"  # fmt: skip
    m, c = x.shape
    if w3.shape[0] != 3 * c or act.shape[0] != m or tuple(b3.shape) != (3 * c,):
        return f"expected w3 ({3 * c}, K), b3 ({3 * c},) and {m} rows of act for x {tuple(x.shape)}"
    if tuple(mean.shape) != (m,) or tuple(rstd.shape) != (m,) or mean.dtype != torch.float32 or \
            rstd.dtype != torch.float32:  # fmt: skip
        return f"expected float32 mean / rstd of shape ({m},)"
    if act.dtype not in (torch.float16, torch.bfloat16) or w3.dtype != act.dtype or b3.dtype != act.dtype:
        return f"expected fp16 / bf16 act, w3 and b3 of one dtype, got {act.dtype}, {w3.dtype}, {b3.dtype}"
    if any(t.stride(-1) != 1 for t in (act, w3, b3, x, mean, rstd)):
        return "expected unit stride along the last dimension"
    if m == 0 or c == 0:
        return "expected at least one row and one feature"
    return ""


def adaln_modulate(
    act: Tensor, w3: Tensor, b3: Tensor, x: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """(h, gate), both (M, C) in act's dtype: ``shift, scale, gate = act @ w3.T + b3`` (w3's rows:
    C shift, C scale, C gate) and ``h = (x - mean) * rstd * (1 + scale) + shift``."""
    problem = _check(act, w3, b3, x, mean, rstd)
    if problem:
        raise ValueError(f"adaln_modulate: {problem}")
    if max(act.shape[0] * act.stride(0), x.shape[0] * x.stride(0), w3.numel()) >= 2**31:
        return _unfused(act, w3, b3, x, mean, rstd)  # the kernels index with 32-bit offsets
    cfg = _config(act, x.shape[1], lambda c: _launch(act, w3, b3, x, mean, rstd, c))
    return _launch(act, w3, b3, x, mean, rstd, cfg)


@torch.library.custom_op("maskar::adaln_modulate", mutates_args=())
def adaln_modulate_op(
    act: Tensor, w3: Tensor, b3: Tensor, x: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`adaln_modulate` as an opaque op, so a compiled graph calls it without a break."""
    return adaln_modulate(act, w3, b3, x, mean, rstd)


@adaln_modulate_op.register_fake
def _(act, w3, b3, x, mean, rstd):
    return act.new_empty(x.shape), act.new_empty(x.shape)


__all__ = ["adaln_modulate", "adaln_modulate_op", "ln_stats", "tuned_configs", "tuning_log", "CANDIDATES"]
