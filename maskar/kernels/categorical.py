"""One categorical draw per row under top-k / top-p, in one Triton kernel (VAR / HMAR sampling).

What it computes is :func:`maskar.nn.sampling.sample_from_logits`: with x a row of logits
(divided by the temperature), the reference filter keeps every entry >= the k-th largest value
(ties included), then sorts the survivors' softmax ascending (stably) and drops each entry whose
cumulative mass is <= 1 - top_p, always keeping the last (largest); the draw is
``argmax(softmax(kept) / noise)`` with the caller's Exp(1) noise (the exponential race that
``torch.multinomial`` runs). The torch path needs ``torch.topk`` plus about fifteen passes over
the (rows, V) logits; at 1024 px B 8 that is 75.6k rows x 4,096 per call, and the sampling ops
were 34-74 ms of the token phase on an H200 (docs/benchmarks.md). Here one program holds a row
in registers and reads it and its noise once.

No sort. Values map to order-preserving unsigned keys (the float's bits, sign-folded), so
"the k-th largest value" is the largest key T with count(key >= T) >= k, built bit by bit from
the top (32 block-wide counts). The top-p rule is a threshold too: in the reference's ascending
order an entry's cumulative mass is the mass of every entry below it plus itself; the kept set
is everything above the largest key T2 whose mass at or below it, G(T2), is <= 1 - top_p, except
at the first key above T2, whose ties are kept from the highest id down while their running mass
stays above 1 - top_p (the stable sort puts lower ids lower). Again 32 block-wide sums.

Rounding. Every comparison is the reference's, but the masses are summed in a tree instead of
the reference's cumulative sum, and ``tl.exp`` is the GPU's fast exponential: the kept set can
differ from the reference only where a cumulative mass lies within float32 rounding of
1 - top_p, and the kept probabilities agree to a few ulp, so a draw differs from the torch
path's with the same noise only at such rounding boundaries (tests measure it; the probabilities
are exactly the reference's distribution up to that rounding).

Where it runs: :func:`maskar.nn.sampling.sample_from_logits` with ``method="triton"`` on CUDA
(sm80+) or under the Triton interpreter; elsewhere that method is ``fused``. Nothing syncs with
the host, so it runs inside the per-scale CUDA graphs of :mod:`maskar.models.scale_graphs`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from maskar.kernels.block_sparse import _INTERPRET, _device_ok, _launch, next_power_of_2

MAX_VOCAB = 8192  # one row in one program's registers; larger vocabularies take the torch path


@triton.jit
def _keys(x):
    """Order-preserving uint32 keys of float32 values: a < b (floats) iff key(a) < key(b), and
    a == b iff the keys are equal (-0.0 and +0.0 share one key)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _mul_rn(x, c):
    """x * c rounded once, never fused with a later add (PTX mul.rn.f32: an explicit rounding
    mode, which ptxas does not contract; inline, so LLVM cannot either). Denormals are kept, as
    torch keeps them (libdevice's mul_rn compiles to the flush-to-zero form here)."""
    return tl.inline_asm_elementwise(
        "mul.rn.f32 $0, $1, $2;", "=f,f,f", [x, tl.zeros_like(x) + c], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit(do_not_specialize=["R", "top_k"])
def _categorical(
    X, U, NOISE, OUT, PROBS, R, V, sx, su, sn, top_k, temp, thr, cfg_a, cfg_b,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, K_ON: tl.constexpr, P_ON: tl.constexpr,
    TEMP: tl.constexpr, WRITE_PROBS: tl.constexpr, CFG: tl.constexpr, MUL_RN: tl.constexpr,
):
    """OUT[r] = argmax(probs / noise) with probs the softmax of row r's top-k / top-p kept set,
    for ROWS rows per program (one for a GPU-sized vocabulary; more for small ones and tests).

    ``temp`` is the temperature (the reference divides by it); ``thr`` is float32(1 - top_p).
    PROBS (R, V) contiguous gets the probabilities where WRITE_PROBS (tests). CFG: row r's logits
    are ``cfg_a * X[r] - cfg_b * U[r]`` (float32(1 + t), float32(t)), as torch computes them.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_V)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < V)[None, :]
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
    if CFG:
        u = tl.load(U + rows[:, None] * su + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        # each product rounded before the difference, as torch's three passes round them: LLVM
        # would fuse a plain product and the difference into one FMA (one rounding fewer), so
        # the compiled kernel multiplies with PTX's mul.rn.f32 (the interpreter's numpy does not
        # fuse, and runs no PTX)
        if MUL_RN:
            a = _mul_rn(x, cfg_a)
            b = _mul_rn(u, cfg_b)
        else:
            a = x * cfg_a
            b = u * cfg_b
        x = tl.where(ok, a - b, float("-inf"))
    if TEMP:
        x = tl.div_rn(x, temp)
    key = tl.where(ok, _keys(x), 0)  # the padding: below every real value (-inf has key 0x007FFFFF)
    one = tl.full([ROWS], 1, tl.uint32)

    keep = ok
    if K_ON:
        # the k-th largest key: the largest T with count(key >= T) >= k (monotone in T)
        t = tl.zeros([ROWS], tl.uint32)
        for b in tl.static_range(32):
            cand = t | (one << (31 - b))
            n_ge = tl.sum((key >= cand[:, None]).to(tl.int32), 1)
            t = tl.where(n_ge >= top_k, cand, t)
        keep = key >= t[:, None]

    # the largest value is always kept, so it is the filtered max as well (padding rows: 0, so
    # that nothing there computes a NaN)
    m = tl.where(row_ok, tl.max(x, 1), 0.0)
    e = tl.where(keep, tl.exp(x - m[:, None]), 0.0)
    if P_ON:
        p = tl.div_rn(e, tl.where(row_ok, tl.sum(e, 1), 1.0)[:, None])
        # the largest T2 with G(T2) = mass of keys <= T2 still <= thr (G grows with T2)
        t2 = tl.zeros([ROWS], tl.uint32)
        for b in tl.static_range(32):
            cand = t2 | (one << (31 - b))
            g = tl.sum(tl.where(key <= cand[:, None], p, 0.0), 1)
            t2 = tl.where(g <= thr, cand, t2)
        below = tl.sum(tl.where(key <= t2[:, None], p, 0.0), 1)
        # the first key above T2: its ties are kept from the highest id down while the running
        # ascending mass (below, then the lower-id ties, then the entry itself) stays above thr
        k_first = tl.min(tl.where(key > t2[:, None], key, 0xFFFFFFFF), 1)
        tie = key == k_first[:, None]
        run = below[:, None] + tl.cumsum(tl.where(tie, p, 0.0), 1)
        keep_p = (key > k_first[:, None]) | (tie & (run > thr))
        # the reference never drops its last (largest value, highest id) entry
        k_max = tl.max(key, 1)
        last = tl.max(tl.where(key == k_max[:, None], cols[None, :], -1), 1)
        keep = keep & (keep_p | (cols[None, :] == last[:, None]))
        e = tl.where(keep, e, 0.0)
    probs = tl.div_rn(e, tl.where(row_ok, tl.sum(e, 1), 1.0)[:, None])
    if WRITE_PROBS:
        tl.store(PROBS + rows[:, None] * V + cols[None, :], probs, mask=ok)
    noise = tl.load(NOISE + rows[:, None] * sn + cols[None, :], mask=ok, other=1.0)
    race = tl.where(ok, tl.div_rn(probs, noise), -1.0)
    tl.store(OUT + rows, tl.argmax(race, 1, tie_break_left=True).to(tl.int64), mask=row_ok)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class CatConfig:
    rows: int  # rows per program
    num_warps: int


FORCE_CONFIG: CatConfig | None = None  # tests / sweeps pin a config


def _config(block_v: int) -> CatConfig:
    # A row per program, its 32 + 32 block-wide reductions on registers: enough warps to spread
    # the row (16-32 values a thread), few enough that each reduction's barrier stays cheap. On the
    # H200 (scripts/gpu/sampler_speed.py, 2026-12-05) 8 warps at V 4096 beat 2 / 4 / 16 by 1.5x;
    # at 128 rows 4-16 warps tie.
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG
    if _INTERPRET:  # the interpreter's cost is per program, not per element
        return CatConfig(max(1, min(64, 8192 // block_v)), 1)
    return CatConfig(max(1, 2048 // block_v), 8 if block_v >= 4096 else 4)


def supports(x: Tensor, noise: Tensor, uncond: Tensor | None = None) -> bool:
    """Whether :func:`draw` takes these (rows, V) logits and (rows, V) float32 noise (and
    null-class logits ``uncond`` of x's shape and dtype)."""
    return (
        x.dim() == 2 and noise.shape == x.shape and 0 < x.shape[1] <= MAX_VOCAB and x.shape[0] > 0
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and noise.dtype == torch.float32
        and x.device == noise.device and x.stride(1) == 1 and noise.stride(1) == 1
        and not x.requires_grad and (_device_ok(x.device) if x.is_cuda else _INTERPRET)
        and (uncond is None or (uncond.shape == x.shape and uncond.dtype == x.dtype
                                and uncond.device == x.device and uncond.stride(1) == 1
                                and not uncond.requires_grad))
    )  # fmt: skip


def _f32(v: float) -> float:
    """v rounded to float32, as torch rounds a Python scalar compared with / dividing a float32 tensor."""
    return struct.unpack("f", struct.pack("f", v))[0]


def draw(
    x: Tensor, noise: Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
    probs: Tensor | None = None, uncond: Tensor | None = None, guidance: float = 0.0,
) -> Tensor:
    """(R, V) logits (any float dtype, read as float32), (R, V) Exp(1) noise -> (R,) int64 ids.

    The same draw as ``sample_from_logits(x, top_k, top_p, temperature, noise=noise)`` up to the
    rounding described in the module docstring. ``probs`` (R, V) float32 contiguous, if given,
    receives the kept distribution (tests). ``uncond`` (R, V), the null-class rows: the draw is
    from the guided logits ``(1 + guidance) * x - guidance * uncond`` (:func:`maskar.nn.sampling.
    guided_logits` of the float32 logits, the same values), which are never written.
    """
    R, V = x.shape
    cfg_on = uncond is not None
    k_on, p_on = 0 < top_k < V, 0.0 < top_p < 1.0
    out = torch.empty(R, dtype=torch.int64, device=x.device)
    block_v = max(16, next_power_of_2(V))
    cfg = _config(block_v)
    # float32(1 - top_p): the reference compares its float32 cumulative sum with the Python
    # float, which torch rounds to the tensor's dtype
    thr = _f32(1.0 - top_p) if p_on else 0.0
    temp = _f32(temperature)
    _launch(
        _categorical, (-(-R // cfg.rows),),
        (x, uncond if cfg_on else x, noise, out, probs if probs is not None else out, R, V, x.stride(0),
         uncond.stride(0) if cfg_on else 0, noise.stride(0), top_k if k_on else 0, temp, thr,
         _f32(1.0 + guidance) if cfg_on else 1.0, _f32(guidance) if cfg_on else 0.0),
        dict(ROWS=cfg.rows, BLOCK_V=block_v, K_ON=k_on, P_ON=p_on, TEMP=temperature != 1.0,
             WRITE_PROBS=probs is not None, CFG=cfg_on, MUL_RN=cfg_on and not _INTERPRET),
        cfg.num_warps, 1,
    )
    return out
