"""``x + gate * (h @ w.T + b)`` with the LayerNorm statistics of the result, in one Triton kernel.

In CASMAR's DiT head each block ends its attention and its MLP with a gated residual add on a
float32 residual stream: the matmul (out_proj, fc2) writes its (rows, W) output, then a kernel
reads it back with x and the per-token gate, writes the new x and, for the next adaLN-modulated
LayerNorm (:mod:`maskar.kernels.adaln_modulate`), its mean and rstd. Here one program owns whole
rows: it walks the row's columns in chunks, each a matmul tile whose epilogue adds the gated
output to x and stores it, and combines the chunks' statistics (Chan's parallel mean / M2), so
the matmul output never reaches memory and no second pass reads the new x.

Numerics: as the compiled module path: the matmul output rounded to the compute dtype (what the
separate matmul stores), the gate product and the sum in fp32, mean and variance of the fp32
result (two-pass within a chunk, Chan's combination across chunks; ``F.layer_norm`` uses
Welford). Per shape the first call times every candidate against the unfused path (``F.linear``,
then the add and ``torch.var_mean``) and keeps the fastest. Inference only: no backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.block_sparse import _INTERPRET, FP_FUSION
from maskar.kernels.linear_act import MMConfig, _rows_class, _tile_product
from maskar.kernels.tuning import Tuner

# ----------------------------------------------------------------------------- kernel


@triton.jit(do_not_specialize=["M"])
def _gated_residual_stats(
    A, W, BIAS, X, GATE, OUT, MEAN, RSTD, M, C, K, eps, stride_am, stride_wn, stride_xm, stride_gm,
    stride_om, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_M rows, all C columns in chunks of BLOCK_N (C a multiple of it)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    out_ty = GATE.dtype.element_ty
    for chunk in range(0, tl.cdiv(C, BLOCK_N)):
        cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _tile_product(A, W, rows, cols, M, C, K, stride_am, stride_wn, EVEN_K, DOT_F32,
                            BLOCK_M, BLOCK_N, BLOCK_K)
        ok = row_ok[:, None]
        y = (acc + tl.load(BIAS + cols).to(tl.float32)[None, :]).to(out_ty).to(tl.float32)
        g = tl.load(GATE + rows[:, None] * stride_gm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        xn = x + g * y
        tl.store(OUT + rows[:, None] * stride_om + cols[None, :], xn, mask=ok)
        # this chunk's mean and M2, then Chan's combination with the chunks before
        c_mean = tl.sum(xn, axis=1) / BLOCK_N
        d = xn - c_mean[:, None]
        c_m2 = tl.sum(d * d, axis=1)
        n_a = chunk * BLOCK_N
        n = n_a + BLOCK_N
        delta = c_mean - mean
        mean = mean + delta * (BLOCK_N / n)
        m2 = m2 + c_m2 + delta * delta * (n_a * BLOCK_N / n)
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


# ----------------------------------------------------------------------------- configs

UNFUSED = MMConfig(path="unfused")

# (block_m, block_n = the column chunk, block_k, -, warps, stages); a program owns whole rows. The
# epilogue keeps x, the gate and the output tile live beside the accumulator: with 4 warps every
# 64-row form spills on sm90 (Triton 3.6 and 3.9 compiled as launched), so all of these have 8.
CANDIDATES = [
    MMConfig(64, 128, 64, 1, 8, 3),
    MMConfig(64, 128, 64, 1, 8, 4),
    MMConfig(64, 128, 32, 1, 8, 4),
    MMConfig(128, 64, 64, 1, 8, 3),
    MMConfig(128, 64, 64, 1, 8, 4),
    MMConfig(64, 64, 64, 1, 8, 4),
    MMConfig(32, 256, 64, 1, 8, 3),
    MMConfig(32, 128, 64, 1, 8, 4),
]
_INTERPRET_CONFIG = MMConfig(16, 16, 16, 1, 4, 1)
FORCE_CONFIG: MMConfig | None = None  # tests pin one

_tuner = Tuner("gated_residual")
tuned_configs, tuning_log = _tuner.configs, _tuner.history


def _config(h: Tensor, c: int, launch_with) -> MMConfig:
    key = (h.get_device(), h.dtype, c, h.shape[1], _rows_class(h.shape[0]))
    fitting = [cfg for cfg in CANDIDATES if c % cfg.block_n == 0]  # whole chunks only
    interpret = _INTERPRET_CONFIG if _INTERPRET else None
    return _tuner.choose(key, fitting, launch_with, UNFUSED, FORCE_CONFIG, interpret)


# ----------------------------------------------------------------------------- host side


def _unfused(h: Tensor, w: Tensor, b: Tensor, x: Tensor, gate: Tensor, eps: float):
    out = x.float() + gate.float() * F.linear(h, w, b).float()
    var, mean = torch.var_mean(out, dim=-1, correction=0)
    return out, mean, torch.rsqrt(var + eps)


def _launch(h: Tensor, w: Tensor, b: Tensor, x: Tensor, gate: Tensor, eps: float, cfg: MMConfig):
    if cfg.path == "unfused" or x.shape[1] % cfg.block_n:
        return _unfused(h, w, b, x, gate, eps)
    m, k = h.shape
    c = x.shape[1]
    out = torch.empty(m, c, dtype=torch.float32, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    _gated_residual_stats[(-(-m // cfg.block_m),)](
        h, w, b, x, gate, out, mean, rstd, m, c, k, float(eps), h.stride(0), w.stride(0), x.stride(0),
        gate.stride(0), out.stride(0), EVEN_K=k % cfg.block_k == 0,
        DOT_F32=_INTERPRET and h.dtype == torch.bfloat16, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
    )  # fmt: skip
    return out, mean, rstd


def _check(h: Tensor, w: Tensor, b: Tensor, x: Tensor, gate: Tensor) -> str:
    """Why the kernel cannot take this call ('' if it can)."""
    if h.dim() != 2 or w.dim() != 2 or x.dim() != 2 or h.shape[1] != w.shape[1]:
        shapes = ", ".join(str(tuple(t.shape)) for t in (h, w, x))
        return f"expected h (M, K), w (C, K), x (M, C); got {shapes}"
    m, c = x.shape
    if w.shape[0] != c or h.shape[0] != m or tuple(b.shape) != (c,) or tuple(gate.shape) != (m, c):
        return f"expected w ({c}, K), b ({c},), gate ({m}, {c}) and {m} rows of h for x {tuple(x.shape)}"
    if x.dtype != torch.float32:
        return f"expected a float32 residual stream x, got {x.dtype}"
    if h.dtype not in (torch.float16, torch.bfloat16) or any(t.dtype != h.dtype for t in (w, b, gate)):
        return f"expected fp16 / bf16 h, w, b and gate of one dtype, got {h.dtype}, {w.dtype}, {b.dtype}, " \
               f"{gate.dtype}"  # fmt: skip
    if any(t.stride(-1) != 1 for t in (h, w, b, x, gate)):
        return "expected unit stride along the last dimension"
    if m == 0 or c == 0:
        return "expected at least one row and one feature"
    return ""


def gated_residual_stats(
    h: Tensor, w: Tensor, b: Tensor, x: Tensor, gate: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, rstd): ``out = x + gate * (h @ w.T + b)`` (float32, (M, C)) and the float32
    LayerNorm statistics of its rows (``rstd = 1 / sqrt(var + eps)``)."""
    problem = _check(h, w, b, x, gate)
    if problem:
        raise ValueError(f"gated_residual_stats: {problem}")
    if max(h.shape[0] * h.stride(0), x.shape[0] * x.stride(0), w.numel()) >= 2**31:
        return _unfused(h, w, b, x, gate, eps)  # the kernel indexes with 32-bit offsets
    cfg = _config(h, x.shape[1], lambda c: _launch(h, w, b, x, gate, eps, c))
    return _launch(h, w, b, x, gate, eps, cfg)


@torch.library.custom_op("maskar::gated_residual_stats", mutates_args=())
def gated_residual_stats_op(
    h: Tensor, w: Tensor, b: Tensor, x: Tensor, gate: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gated_residual_stats` as an opaque op, so a compiled graph calls it without a break."""
    return gated_residual_stats(h, w, b, x, gate, eps)


@gated_residual_stats_op.register_fake
def _(h, w, b, x, gate, eps):
    m = x.shape[0]
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(m, dtype=torch.float32), \
        x.new_empty(m, dtype=torch.float32)  # fmt: skip


__all__ = ["gated_residual_stats", "gated_residual_stats_op", "tuned_configs", "tuning_log", "CANDIDATES"]
