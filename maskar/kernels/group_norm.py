"""GroupNorm (+ SiLU) of the conv tokenizers' decoder for inference (Triton), NCHW or channels-last.

The LDM-style encoder/decoder (``maskar.tokenizers.common``) normalises every activation
with ``GroupNorm(32, C, eps=1e-6)`` and, in all but the attention block, applies SiLU right
after. For x of one sample and group g (its C/G channels over all H x W pixels), with
mean and biased variance over that group,

    y = (x - mean) * rsqrt(var + eps) * gamma_c + beta_c,     then optionally y * sigmoid(y),

statistics, scale and SiLU in fp32, y rounded once to x's dtype (torch rounds the norm's
output and then SiLU's: at most one bf16 ulp apart).

Why a kernel: PyTorch's CUDA group norm reduces each (sample, group) in ONE thread block
(``RowwiseMomentsCUDAKernel<<<N * G, 512>>>``, a Welford update with a division per
element, scalar loads). The sampling path decodes at 1024 px one image per chunk, so that
is 32 blocks on a 132-SM GPU: 331 of the decoder's 637 ms at HMAR-d16 1024 px B8 were
that kernel, ~20x its byte floor (docs/kernels.md). SiLU was one more pass on top.

Three launches, each parallel over the whole tensor, no atomics (deterministic):
  1. ``_gn_stats``: a program reads a chunk of pixels of BLOCK_C channels, tile by tile,
     and writes per-channel (mean, M2) of its chunk: each tile's exact two-pass moments
     in registers, merged into the running ones with Chan's formula;
  2. ``_gn_finalize``: one program per (sample, group) merges its C/G channels' chunk
     moments (Chan again, as a two-pass over the partials) into mean and rstd;
  3. ``_gn_apply``: normalise, affine, SiLU, one read and one write.
Memory traffic: x read twice, y written once (the partials are ~1/1000 of that).

Layout: x (N, C, H, W) contiguous or channels-last; the pixel index p = h * W + w is
contiguous (NCHW) or strided by C (channels-last), chosen at compile time (CHANNELS_LAST),
so both read coalesced with no copy. The output has x's layout.

Inference only: the decoder is frozen when sampling; anything that needs gradients, and
autocast regions (torch runs group norm in fp32 there), takes the torch code.
``maskar::group_norm_act`` is a torch.library custom op with a fake implementation (torch
.compile traces it) and a CPU body that is the torch code, as ``maskar::qk_norm``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from maskar import env

# Shared with the block-sparse kernel: its launch path (direct launcher calls, little host
# time), its GPU capability check, and its interpreter / CPU-reference switch.
from maskar.kernels.block_sparse import _INTERPRET, _device_ok, _launch, _on_reference, cdiv, next_power_of_2

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_offsets(n, c, p, C, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of the (BLOCK_C, BLOCK_P) tile of channels c and pixels p of sample n."""
    base = n.to(tl.int64) * C * HW
    if CHANNELS_LAST:
        return base + p[None, :] * C + c[:, None]
    else:
        return base + c[:, None] * HW + p[None, :]


# C, HW and chunk_p stay specialisable: Triton then knows them 16-divisible (every decoder shape
# is), which is what lets the loads vectorise; ints in that class share one binary.
@triton.jit
def _gn_stats(
    X,
    XB,
    R,
    S,
    PART,
    C,
    HW,
    chunk_p,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    HAS_XB: tl.constexpr,
    SUMS: tl.constexpr = False,
    CB_FAST: tl.constexpr = False,
    HAS_RES: tl.constexpr = False,
):
    """PART[0 | 1, n, chunk, c] = mean | M2 of channel c (plus XB[c] if HAS_XB) over pixels
    [chunk * chunk_p, + chunk_p).

    HAS_RES: the normalised tensor is s = x (+ XB[c]) + R, rounded once to x's dtype, which this
    kernel also writes to S (R and S laid out as X): a residual block's sum, made in the same pass
    as its statistics instead of a pass of its own before them.

    Default: each tile's exact moments (two reductions across the tile's pixel axis) merged into
    the running ones (Chan). SUMS: every element position of the tile sums x - shift and its
    square (shift: the channel's value at the chunk's first pixel, so the sums stay of the
    order of the spread, not of the mean), reduced across the pixel axis once at the end. In
    channels-last the pixel axis is the strided one, and its two reductions a tile go through
    shared memory (12 barriers a tile in the sm90 code against 4 in NCHW); SUMS has none inside
    the loop and no division either (the per-lane Welford scheme measured on 2026-12-06 had one
    an element, and no gain: docs/kernels.md). CB_FAST: the grid's first axis runs over the channel
    blocks, so the programs reading one chunk's pixels (all its channels) are launched together."""
    pc = tl.program_id(1) if CB_FAST else tl.program_id(0)
    c = (tl.program_id(0) if CB_FAST else tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2)
    c_ok = c < C
    if HAS_XB:
        xb = tl.load(XB + c, mask=c_ok, other=0.0).to(tl.float32)
    p_lo = pc * chunk_p
    p_hi = tl.minimum(p_lo + chunk_p, HW)
    if SUMS:
        first = n.to(tl.int64) * C * HW + (p_lo * C + c if CHANNELS_LAST else c * HW + p_lo)
        shift = tl.load(X + first, mask=c_ok, other=0.0).to(tl.float32)
        if HAS_XB:
            shift += xb
        if HAS_RES:  # any shift near the data will do: the sum's unrounded value
            shift += tl.load(R + first, mask=c_ok, other=0.0).to(tl.float32)
        sum_d = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        sum_dd = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    else:
        cnt = 0.0
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = c_ok[:, None] & (p < p_hi)[None, :]
        off = _tile_offsets(n, c, p, C, HW, CHANNELS_LAST)
        x = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
        if HAS_XB:  # the masked-off elements must stay 0: the tile mean sums them
            x = tl.where(ok, x + xb[:, None], 0.0)
        if HAS_RES:  # the statistics of s as stored, so the apply pass normalises what it reads
            s_t = (x + tl.load(R + off, mask=ok, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + off, s_t, mask=ok)
            x = tl.where(ok, s_t.to(tl.float32), 0.0)
        if SUMS:
            d = tl.where(ok, x - shift[:, None], 0.0)
            sum_d += d
            sum_dd += d * d
        else:
            nb = tl.minimum(p_hi - p0, BLOCK_P).to(tl.float32)
            t_mean = tl.sum(x, 1) / nb
            d = tl.where(ok, x - t_mean[:, None], 0.0)
            t_m2 = tl.sum(d * d, 1)
            tot = cnt + nb  # Chan et al.: merge (cnt, mean, m2) with the tile's (nb, t_mean, t_m2)
            delta = t_mean - mean
            mean += delta * (nb / tot)
            m2 += t_m2 + delta * delta * (cnt * nb / tot)
            cnt = tot
    if SUMS:  # across the pixel axis, once
        count = (p_hi - p_lo).to(tl.float32)
        s1 = tl.sum(sum_d, 1)
        mean = shift + s1 / count
        m2 = tl.maximum(tl.sum(sum_dd, 1) - s1 * (s1 / count), 0.0)
    n_chunks = tl.num_programs(1) if CB_FAST else tl.num_programs(0)
    dst = PART + (n * n_chunks + pc).to(tl.int64) * C + c
    half = tl.num_programs(2).to(tl.int64) * n_chunks * C  # PART[1] follows PART[0]
    tl.store(dst, mean, mask=c_ok)
    tl.store(dst + half, m2, mask=c_ok)


@triton.jit(do_not_specialize=["C", "HW", "G", "chunk_p", "n_chunks", "N"])
def _gn_finalize(PART, STATS, C, HW, G, chunk_p, n_chunks, N, eps, BLOCK_F: tl.constexpr):
    """STATS[n, g] = (mean, rstd) of group g of sample n from its channels' chunk moments."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid - n * G
    D = C // G
    total = D * n_chunks  # partials of this group: entry j = (chunk j // D, channel g * D + j % D)
    half = N.to(tl.int64) * n_chunks * C
    row = PART + n.to(tl.int64) * n_chunks * C + g * D
    count = (D * HW).to(tl.float32)
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for j0 in range(0, total, BLOCK_F):  # pass 1: the group mean
        j = j0 + tl.arange(0, BLOCK_F)
        pc = j // D
        ok = j < total
        cnt = tl.minimum(chunk_p, HW - pc * chunk_p).to(tl.float32)
        m = tl.load(row + pc * C + (j - pc * D), mask=ok, other=0.0)
        acc += tl.where(ok, cnt * m, 0.0)
    mean = tl.sum(acc, 0) / count
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for j0 in range(0, total, BLOCK_F):  # pass 2: M2 = sum_j M2_j + cnt_j (mean_j - mean)^2
        j = j0 + tl.arange(0, BLOCK_F)
        pc = j // D
        ok = j < total
        cnt = tl.minimum(chunk_p, HW - pc * chunk_p).to(tl.float32)
        off = row + pc * C + (j - pc * D)
        m = tl.load(off, mask=ok, other=0.0)
        q = tl.load(off + half, mask=ok, other=0.0)
        acc += tl.where(ok, q + cnt * (m - mean) * (m - mean), 0.0)
    var = tl.sum(acc, 0) / count
    tl.store(STATS + pid * 2, mean)
    tl.store(STATS + pid * 2 + 1, 1.0 / tl.sqrt_rn(var + eps))


@triton.jit(do_not_specialize=["G"])
def _gn_apply(
    X,
    XB,
    Y,
    W,
    B,
    STATS,
    C,
    HW,
    G,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    SILU: tl.constexpr,
    HAS_XB: tl.constexpr,
    Y_CHANNELS_LAST: tl.constexpr,
    CB_FAST: tl.constexpr = False,
):
    """Y = x * (rstd * gamma) + (beta - mean * rstd * gamma), then SiLU, over one tile; with
    HAS_XB, x + XB[c] in place of x (its term folded into the shift: no more work per element).
    Y's layout may differ from X's (channels-last x, NCHW y: the tile is transposed on chip).
    CB_FAST: the grid's first axis runs over the channel blocks (as in ``_gn_stats``)."""
    p = (tl.program_id(1) if CB_FAST else tl.program_id(0)) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = (tl.program_id(0) if CB_FAST else tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2)
    c_ok = c < C
    ok = c_ok[:, None] & (p < HW)[None, :]
    ng = n * G + c // (C // G)
    mean = tl.load(STATS + ng * 2, mask=c_ok, other=0.0)
    rstd = tl.load(STATS + ng * 2 + 1, mask=c_ok, other=0.0)
    scale = rstd * tl.load(W + c, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32) - mean * scale
    if HAS_XB:
        shift += tl.load(XB + c, mask=c_ok, other=0.0).to(tl.float32) * scale
    off = _tile_offsets(n, c, p, C, HW, CHANNELS_LAST)
    x = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
    y = x * scale[:, None] + shift[:, None]
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    if Y_CHANNELS_LAST != CHANNELS_LAST:
        off = _tile_offsets(n, c, p, C, HW, Y_CHANNELS_LAST)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class GNConfig:
    block_c: int  # channels per tile
    block_p: int  # pixels per tile
    chunk_tiles: int  # tiles per statistics program
    num_warps: int
    sums: bool = False  # the statistics kernel's per-lane shifted sums (``_gn_stats``)
    cb_fast: bool = False  # channel blocks on the grid's fastest axis (a chunk's channels launched together)
    stages: int = 1  # software-pipelining stages of the statistics loop (Triton's num_stages)


TILE = 4096  # elements per tile: 8 KB of bf16, 32 per thread at 4 warps (16-byte vectors)
# Channels-last images of at least this many elements take the shifted sums: measured faster at
# the decoder's 160 x 256^2 calls (0.274 -> 0.248 ms, 0.284 -> 0.225 with the conv bias, H100,
# 2026-12-06), not at its smaller ones (docs/kernels.md).
SUMS_MIN_ELEMENTS = 1 << 23
# Channels-last images of at least CB_FAST_MIN_ELEMENTS take 128-channel x 32-pixel tiles, 16 a
# statistics program, the shifted sums, and the channel blocks on the grid's first axis, so the
# programs that read one chunk's pixels (every channel of them) run together. Swept at the ten
# calls of a 1024 px decode of at least 4M elements, it is within 0.042 ms of each call's best
# config (H100, 2026-12-06: the norm's GPU time in a compiled 1024 px B 8 decode 41.8 -> 38.0 ms;
# docs/benchmarks.md, *The wide attention's softmax and the norm's grid*).
# MASKAR_GN_CB_FAST=0 (read at import) restores the rule before.
CB_FAST_MIN_ELEMENTS = 1 << 22
CB_FAST = bool(env.switch("MASKAR_GN_CB_FAST"))
# Among those, the largest maps (the 160 x 1024^2 ones of a 1024 px decode, >= 2^27 elements)
# take narrower tiles: 64 channels x 64 pixels where the norm adds a conv's bias (0.411 against
# 0.453 ms a call in two sweeps on two H100s), 32 x 128 at 8 warps where it does not (0.404
# against 0.445, one sweep). The compiled 1024 px B 8 decode with them: 184.4 against 186.2 ms,
# the norm's GPU time 35.3 against 37.6 (H100, 2026-12-06; docs/benchmarks.md, *The largest
# maps' tiles, the draw's digits, ...*). MASKAR_GN_WIDE_MAPS=0 (read at import) turns them off;
# WIDE_MAPS_TRIAL is the threshold scripts/gpu/gn_cl_sweep.py sets to compare.
WIDE_MAPS_TRIAL = 1 << 27
WIDE_MAPS_MIN_ELEMENTS: int | None = WIDE_MAPS_TRIAL if env.switch("MASKAR_GN_WIDE_MAPS") else None
FORCE_CONFIG: GNConfig | None = None  # tests / sweeps pin a config
_INTERPRET_CONFIG = GNConfig(2, 8, 2, 1)  # tiny tiles: tail, multi-tile and multi-chunk paths


def _config(C: int, HW: int, channels_last: bool, x_bias: bool = False) -> GNConfig:
    # Memory-bound: the tile runs along the contiguous axis (pixels in NCHW, channels in
    # channels-last); a statistics program reads 8 tiles (64 KB of bf16), which keeps ~5k
    # programs in flight for one 160 x 1024^2 image. Channels-last tiles: 64 channels x 64 pixels,
    # the best of the sweeps at the decoder's large calls (docs/benchmarks.md).
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG
    if _INTERPRET:
        return _INTERPRET_CONFIG
    if channels_last:
        if CB_FAST and C * HW >= CB_FAST_MIN_ELEMENTS:
            if WIDE_MAPS_MIN_ELEMENTS is not None and C * HW >= WIDE_MAPS_MIN_ELEMENTS:
                bc, warps = (64, 4) if x_bias else (32, 8)
                return GNConfig(bc, TILE // bc, 16, warps, sums=True, cb_fast=True)
            bc = min(next_power_of_2(C), 128)
            return GNConfig(bc, TILE // bc, 16, 4, sums=True, cb_fast=True)
        bc = min(next_power_of_2(C), 64)
        return GNConfig(bc, TILE // bc, 8, 4, sums=C * HW >= SUMS_MIN_ELEMENTS)
    bp = min(next_power_of_2(HW), 2048)
    return GNConfig(TILE // bp, bp, 8, 4)


def _is_channels_last(x: Tensor) -> bool:
    """Channels-last memory that is not also plain contiguous (C == 1 or H == W == 1 are both)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    groups: int,
    eps: float,
    silu: bool,
    x_bias: Tensor | None = None,
    nchw_out: bool = False,
) -> Tensor:
    """Kernel launches: y in x's dtype and layout (x contiguous or channels-last), or contiguous
    (NCHW) with ``nchw_out``; ``x_bias`` (C values) is added to x per channel first."""
    if x.numel() == 0:
        return _like(x, nchw_out)
    x_bias = None if x_bias is None else x_bias.contiguous()
    stats, _ = _stats(x, x_bias, None, groups, eps)
    return _apply(x, stats, weight, bias, silu, x_bias, nchw_out)


def _launch_config(x: Tensor, x_bias: bool) -> tuple[GNConfig, bool, int, int, int]:
    """(config, channels-last, chunk length, statistics chunks, pixel blocks) of a call on x."""
    N, C, H, W = x.shape
    HW = H * W
    cl = _is_channels_last(x)
    cfg = _config(C, HW, cl, x_bias)
    chunk_p = cfg.block_p * cfg.chunk_tiles
    n_chunks, n_pb = cdiv(HW, chunk_p), cdiv(HW, cfg.block_p)
    if cfg.cb_fast and max(n_chunks, n_pb) > 65535:  # CUDA's limit on a grid's second axis
        cfg = dataclasses.replace(cfg, cb_fast=False)
    return cfg, cl, chunk_p, n_chunks, n_pb


def _stats(
    x: Tensor, x_bias: Tensor | None, residual: Tensor | None, groups: int, eps: float
) -> tuple[Tensor, Tensor | None]:
    """(N, groups, 2) float32 (mean, rstd) of x (+ x_bias per channel) (+ residual), and with a
    residual the sum s it normalised (x's dtype and layout; rounded once)."""
    N, C, H, W = x.shape
    HW = H * W
    cfg, cl, chunk_p, n_chunks, _ = _launch_config(x, x_bias is not None)
    n_cb = cdiv(C, cfg.block_c)
    part = torch.empty((2, N, n_chunks, C), dtype=torch.float32, device=x.device)
    stats = torch.empty((N, groups, 2), dtype=torch.float32, device=x.device)
    s = None if residual is None else torch.empty_like(x)
    # pointers the kernel never reads without HAS_XB / HAS_RES
    xb = x if x_bias is None else x_bias
    r, s_ptr = (x, x) if residual is None else (residual, s)
    _launch(
        _gn_stats,
        (n_cb, n_chunks, N) if cfg.cb_fast else (n_chunks, n_cb, N),
        (x, xb, r, s_ptr, part, C, HW, chunk_p),
        dict(
            BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, CHANNELS_LAST=cl, HAS_XB=x_bias is not None,
            SUMS=cfg.sums, CB_FAST=cfg.cb_fast, HAS_RES=residual is not None,
        ),  # fmt: skip
        cfg.num_warps,
        cfg.stages,
    )
    block_f = min(next_power_of_2(C // groups * n_chunks), 1024)
    _launch(
        _gn_finalize,
        (N * groups,),
        (part, stats, C, HW, groups, chunk_p, n_chunks, N, eps),
        dict(BLOCK_F=block_f),
        4 if block_f >= 512 else 1,
        1,
    )
    return stats, s


def _apply(
    x: Tensor, stats: Tensor, weight: Tensor, bias: Tensor, silu: bool, x_bias: Tensor | None, nchw_out: bool
) -> Tensor:
    """y = the norm of x (+ x_bias) with ``stats`` from :func:`_stats`, affine, SiLU if ``silu``."""
    N, C, H, W = x.shape
    weight, bias = weight.contiguous(), bias.contiguous()
    cfg, cl, _, _, n_pb = _launch_config(x, x_bias is not None)
    n_cb = cdiv(C, cfg.block_c)
    y = _like(x, nchw_out)
    _launch(
        _gn_apply,
        (n_cb, n_pb, N) if cfg.cb_fast else (n_pb, n_cb, N),
        (x, bias if x_bias is None else x_bias, y, weight, bias, stats, C, H * W, stats.shape[1]),
        dict(
            BLOCK_C=cfg.block_c,
            BLOCK_P=cfg.block_p,
            CHANNELS_LAST=cl,
            SILU=silu,
            HAS_XB=x_bias is not None,
            Y_CHANNELS_LAST=cl and not nchw_out,
            CB_FAST=cfg.cb_fast,
        ),  # fmt: skip
        cfg.num_warps,
        1,
    )
    return y


def reference(
    x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool, x_bias: Tensor | None = None
) -> Tensor:
    """The torch code the decoder ran before: F.group_norm, then F.silu. With ``x_bias`` (what the
    kernels add to x per channel, unrounded) the sum and the norm in float32 (at least), rounded
    once to x's dtype."""
    if x_bias is not None:
        acc = torch.promote_types(x.dtype, torch.float32)
        xs = x.to(acc) + x_bias.to(acc).view(1, -1, 1, 1)
        return reference(xs, weight.to(acc), bias.to(acc), groups, eps, silu).to(x.dtype)
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


# ----------------------------------------------------------------------------- custom op


# Inductor hands a custom op the strides it was traced with (torch's default layout constraint for
# custom ops, ``needs_exact_strides``), while its layout optimisation gives cuDNN channels-last
# tensors. The op takes either layout, so it may declare ``flexible_layout`` and read whatever
# Inductor has: MASKAR_GN_FLEXIBLE_LAYOUT=1 (read at import). Off: the compiled decode has no
# separate layout copies to save, and was no faster with it (H100, 2026-12-06: 134.9 against
# 136.2 ms at 256 px B 64; docs/benchmarks.md, *Where the compiled decoder's time goes*).
FLEXIBLE_LAYOUT = bool(env.switch("MASKAR_GN_FLEXIBLE_LAYOUT"))


@torch.library.custom_op(
    "maskar::group_norm_act", mutates_args=(), tags=(torch.Tag.flexible_layout,) if FLEXIBLE_LAYOUT else ()
)
def group_norm_act_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    groups: int,
    eps: float,
    silu: bool,
    x_bias: Tensor | None = None,
    nchw_out: bool = False,
) -> Tensor:
    """GroupNorm(groups, eps, affine) of (N, C, H, W) x (plus ``x_bias`` per channel, if given),
    then SiLU if ``silu``; x's dtype and layout (``torch.empty_like(x)``'s strides, as the fake
    promises, whatever strides x has), or contiguous with ``nchw_out``."""
    if _on_reference(x):
        return _like(x, nchw_out).copy_(reference(x, weight, bias, groups, eps, silu, x_bias))
    dense = _dense(x)
    y = _forward(dense, weight, bias, groups, eps, silu, x_bias, nchw_out)
    # a non-dense x (a flexible layout may hand one) ran on a contiguous copy: lay y out as promised
    return y if dense is x or nchw_out else torch.empty_like(x).copy_(y)


@group_norm_act_op.register_fake
def _(x, weight, bias, groups, eps, silu, x_bias=None, nchw_out=False):
    return _like(x, nchw_out)


# A residual block's output summed in the statistics pass of the norm that reads it next: two ops,
# so that under Inductor (and eagerly) the block's two terms are freed before the apply pass, and
# the decode's peak stays at three full-size tensors.
@torch.library.custom_op("maskar::group_norm_sum_stats", mutates_args=())
def group_norm_sum_stats_op(
    x: Tensor, x_bias: Tensor | None, residual: Tensor, groups: int, eps: float
) -> tuple[Tensor, Tensor]:
    """(s, stats): s = x (+ x_bias per channel) + residual, computed in float32 and rounded once to
    x's dtype, in x's layout; stats (N, groups, 2) float32 = (mean, rstd) of s's groups."""
    if _on_reference(x) or x.numel() == 0:
        return _sum_stats_reference(x, x_bias, residual, groups, eps)
    x = _dense(x)
    residual = residual if residual.stride() == x.stride() else torch.empty_like(x).copy_(residual)
    stats, s = _stats(x, None if x_bias is None else x_bias.contiguous(), residual, groups, eps)
    return s, stats


@group_norm_sum_stats_op.register_fake
def _(x, x_bias, residual, groups, eps):
    return torch.empty_like(x), x.new_empty((x.shape[0], groups, 2), dtype=torch.float32)


@torch.library.custom_op("maskar::group_norm_apply", mutates_args=())
def group_norm_apply_op(
    s: Tensor, stats: Tensor, weight: Tensor, bias: Tensor, silu: bool, nchw_out: bool = False
) -> Tensor:
    """The norm of s with ``stats`` from ``maskar::group_norm_sum_stats``: affine, SiLU if ``silu``,
    in s's dtype and layout (contiguous with ``nchw_out``)."""
    if _on_reference(s) or s.numel() == 0:
        return _like(s, nchw_out).copy_(_apply_reference(s, stats, weight, bias, silu))
    return _apply(_dense(s), stats, weight, bias, silu, None, nchw_out)


@group_norm_apply_op.register_fake
def _(s, stats, weight, bias, silu, nchw_out=False):
    return _like(s, nchw_out)


def _sum_stats_reference(
    x: Tensor, x_bias: Tensor | None, residual: Tensor, groups: int, eps: float
) -> tuple[Tensor, Tensor]:
    """The sum and its statistics in torch, float32 at least (the CPU body of the op, and the tests')."""
    acc = torch.promote_types(x.dtype, torch.float32)
    v = x.to(acc) if x_bias is None else x.to(acc) + x_bias.to(acc).view(1, -1, 1, 1)
    s = (v + residual.to(acc)).to(x.dtype)
    sg = s.to(acc).reshape(s.shape[0], groups, (s.shape[1] // groups) * s.shape[2] * s.shape[3])
    mean = sg.mean(-1)
    rstd = (sg.var(-1, unbiased=False) + eps).rsqrt()
    return torch.empty_like(x).copy_(s), torch.stack([mean, rstd], -1).float()


def _apply_reference(s: Tensor, stats: Tensor, weight: Tensor, bias: Tensor, silu: bool) -> Tensor:
    acc = torch.promote_types(s.dtype, torch.float32)
    N, C = s.shape[:2]
    G = stats.shape[1]
    sg = s.to(acc).reshape(N, G, (C // G) * s.shape[2] * s.shape[3])
    y = ((sg - stats[..., 0:1].to(acc)) * stats[..., 1:2].to(acc)).reshape(s.shape)
    y = y * weight.to(acc).view(1, C, 1, 1) + bias.to(acc).view(1, C, 1, 1)
    return (F.silu(y) if silu else y).to(s.dtype)


def sum_norm_act(
    x: Tensor,
    x_bias: Tensor | None,
    residual: Tensor,
    weight: Tensor,
    bias: Tensor,
    groups: int,
    eps: float,
    silu: bool,
    nchw_out: bool = False,
) -> tuple[Tensor, Tensor]:
    """(s, y): s = x (+ ``x_bias`` per channel) + ``residual`` rounded once to x's dtype (a residual
    block's output: a convolution run without its bias, the bias, the shortcut), and y = GroupNorm
    (groups, eps, affine) of s then SiLU if ``silu``, as :func:`group_norm_act` of s would give up
    to the rounding of the statistics' summation order. The sum is made in the statistics pass:
    one read of s fewer than summing first (check :func:`supports` first; inference only)."""
    _check_args("sum_norm_act", x, weight, bias, groups, x_bias, residual)
    s, stats = group_norm_sum_stats_op(x, x_bias, residual, groups, float(eps))
    return s, group_norm_apply_op(s, stats, weight, bias, silu, nchw_out)


def _check_args(
    name: str, x: Tensor, weight: Tensor, bias: Tensor, groups: int, x_bias: Tensor | None,
    residual: Tensor | None = None,
) -> None:  # fmt: skip
    """ValueError naming every shape unless x is (N, C, H, W) with C divisible by ``groups``, the
    weight, bias (and x_bias) hold C values, and a ``residual`` has x's shape."""
    C = x.shape[1] if x.dim() == 4 else -1
    if (
        C < 0 or C % groups or weight.numel() != C or bias.numel() != C
        or (x_bias is not None and x_bias.numel() != C)
        or (residual is not None and residual.shape != x.shape)
    ):  # fmt: skip
        xb = "none" if x_bias is None else tuple(x_bias.shape)
        res = "" if residual is None else f", residual {tuple(residual.shape)} (x's shape)"
        raise ValueError(
            f"{name}: expected x (N, C, H, W) with C divisible by groups={groups} and a weight, "
            f"bias (and x_bias) of C values; got x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"bias {tuple(bias.shape)}, x_bias {xb}{res}"
        )


def _like(x: Tensor, nchw_out: bool) -> Tensor:
    """The output of a norm of x: x's layout (``empty_like``), or contiguous with ``nchw_out``."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device) if nchw_out else torch.empty_like(x)


def _dense(x: Tensor) -> Tensor:
    return x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


# ----------------------------------------------------------------------------- model entry


def group_norm_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    groups: int,
    eps: float,
    silu: bool,
    x_bias: Tensor | None = None,
    nchw_out: bool = False,
) -> Tensor:
    """GroupNorm then (``silu``) SiLU in one fused pass; check :func:`supports` first (inference only).

    ``x_bias``: C values added to x per channel before the norm, in float32 inside the kernels
    (a convolution's bias: the decoder then runs that convolution without it, and no pass over
    its output adds it). ``nchw_out``: y contiguous (NCHW) whatever x's layout, written so by
    the kernel (the channels-last decoder's last norm feeds its NCHW output convolution)."""
    _check_args("group_norm_act", x, weight, bias, groups, x_bias)
    if torch.compiler.is_compiling() or _on_reference(x):
        return group_norm_act_op(x, weight, bias, groups, float(eps), silu, x_bias, nchw_out)
    return _forward(_dense(x), weight, bias, groups, float(eps), silu, x_bias, nchw_out)


# ----------------------------------------------------------------------------- support

_DTYPES = (torch.float16, torch.bfloat16)  # CUDA: fp32 decoding stays on the torch code (the reference)
_INTERPRET_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tests set this to send CPU calls of the decoder's norms to the custom op's reference body
# (so a CPU-compiled decoder traces the op a GPU run would); off, the CPU runs the torch code.
CPU_REFERENCE = False
# False: the decoder runs its torch code on every device (A/B timing, or ruling the kernel out).
ENABLED = True


# Where PyTorch's kernel beats the fused op on the GPU (H200, 2026-12-03: docs/benchmarks.md,
# *The fused GroupNorm in the decoder*): calls of at most TORCH_BELOW elements at any batch (1 x
# 640 x 64^2: 0.054 against 0.065 ms), and up to TORCH_BELOW_MANY where images x groups give
# PyTorch's one-block-per-group reduction >= 256 blocks (8 x 640 x 32^2: 0.042 against 0.065
# ms; with 32 blocks, 1 x 320 x 128^2 takes it 0.104 ms against the fused 0.064).
TORCH_BELOW = 2_700_000
TORCH_BELOW_MANY = 5_300_000


def torch_is_faster(shape: tuple[int, ...], groups: int, channels_last: bool = False) -> bool:
    """Whether a CUDA call of this (N, C, H, W) shape and group count is faster in PyTorch. Never
    for channels-last x: PyTorch's CUDA group norm returns NCHW whatever its input
    (pytorch/pytorch#111824), so one small norm would turn the rest of a channels-last decode
    NCHW (eagerly: cuDNN transposing around every convolution after it; compiled: a traced NCHW
    layout that Inductor converts to and from channels-last around every convolution), which
    is what happened to ``MASKAR_DECODE_CHANNELS_LAST=1`` until 2026-12-06."""
    if channels_last:
        return False
    n = 1
    for d in shape:
        n *= int(d)
    return n <= TORCH_BELOW or (n <= TORCH_BELOW_MANY and int(shape[0]) * groups >= 256)


def supports(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    groups: int | None = None,
    shape: tuple[int, ...] | None = None,
) -> bool:
    """Whether the decoder takes the fused op for this call: CUDA sm80+ with fp16 / bf16 x (or the
    interpreter / the CPU reference in tests), an affine norm, no gradient wanted, no autocast;
    given ``groups``, on CUDA not where PyTorch's own kernel is faster (:func:`torch_is_faster`).
    ``shape``: the norm's input shape where x is not that input yet (a convolution's input, whose
    output the norm will take: same device, dtype and gradient state)."""
    if not ENABLED or weight is None or bias is None or x.dim() != 4:
        return False
    shape = tuple(x.shape) if shape is None else tuple(shape)
    if x.is_cuda:
        if groups is not None and torch_is_faster(shape, groups, _is_channels_last(x)):
            return False
        device_ok = x.dtype in _DTYPES and _device_ok(x.device)
    elif x.is_cpu:
        device_ok = (CPU_REFERENCE and not _INTERPRET and x.dtype in _REFERENCE_DTYPES) or (
            _INTERPRET and x.dtype in _INTERPRET_DTYPES
        )
    else:  # meta, mps, ...: the torch code
        return False
    if not device_ok or weight.device != x.device or bias.device != x.device:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return False  # training: torch's norm has the backward
    if torch.is_autocast_enabled(x.device.type):
        return False  # autocast runs group norm in fp32: keep its result dtype
    per_sample = 1  # a plain loop: Dynamo traces this (the decoder's compiled calls)
    for d in shape[1:]:
        per_sample *= int(d)
    return per_sample < 2**31  # one sample's offsets in int32


__all__ = [
    "group_norm_act", "group_norm_act_op", "sum_norm_act", "group_norm_sum_stats_op", "group_norm_apply_op",
    "reference", "supports", "torch_is_faster", "GNConfig",
]  # fmt: skip
