"""Tile maps of VAR's block-causal pattern for block-sparse attention kernels (FlashAttention-4).

A kernel that tiles the (L x L) score matrix into (bm x bn) blocks needs, for each row of
blocks, which blocks it may skip, which it computes without a mask (every query row of the
block sees every key of it) and which need the mask evaluated per element. Under the
block-causal pattern query i sees key j iff j < end(scale(i)), so the three classes follow
from each token's scale end alone. Pure torch, CPU-testable; the tensors are moved to the
kernel's device by the caller.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from maskar.nn.attention import ScalePattern


def token_ends(pattern: ScalePattern) -> Tensor:
    """(L,) int32: for each token, the end (exclusive) of its scale, i.e. the keys it may see."""
    ends = itertools.accumulate(pattern.lengths)
    return torch.tensor([e for n, e in zip(pattern.lengths, ends) for _ in range(n)], dtype=torch.int32)


def padded_ends(pattern: ScalePattern, max_tile: int = 256) -> Tensor:
    """:func:`token_ends` followed by ``max_tile`` zeros: a kernel's last query tile runs past the
    sequence (by less than a tile) and its mask reads the end of every row of it. Padding rows
    see nothing; their output is never written."""
    ends = token_ends(pattern)
    return torch.cat([ends, ends.new_zeros(max_tile)])


def classify_tiles(ends: Tensor, bm: int, bn: int) -> tuple[Tensor, Tensor]:
    """(full, partial), bool (n_m, n_n), of a (bm x bn) tiling of the block-causal scores.

    full: every query row of the block sees every key of it (and the block lies inside the
    sequence); partial: some pair of the block is visible but not all. The rest is skipped."""
    L = ends.numel()
    n_m, n_n = math.ceil(L / bm), math.ceil(L / bn)
    big = torch.iinfo(torch.int64).max
    e = torch.cat([ends.long(), torch.full((n_m * bm - L,), -1, dtype=torch.int64)]).view(n_m, bm)
    e_max = e.max(1).values
    e_min = torch.where(e >= 0, e, big).min(1).values  # padding rows see nothing and bound nothing
    c0 = torch.arange(n_n) * bn
    c1 = c0 + bn
    full = (c1[None, :] <= e_min[:, None]) & (c1[None, :] <= L)
    partial = (c0[None, :] < e_max[:, None]) & ~full
    return full, partial


def packed(sel: Tensor) -> tuple[Tensor, Tensor]:
    """(count (rows,), index (rows, cols)) int32: each row's selected columns first, ascending
    (the rest of the row is padding the kernel never reads)."""
    sel = sel.contiguous()  # a transposed map sorts into transposed strides; kernels want rows
    cnt = sel.sum(1).to(torch.int32)
    idx = torch.argsort((~sel).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return cnt, idx


def block_causal_maps(
    pattern: ScalePattern, bm: int, bn: int, q_direction: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mask_cnt, mask_idx, full_cnt, full_idx) of the block-causal pattern on a (bm x bn) tiling:
    per query block the key blocks to compute (forward), or with ``q_direction`` per key block the
    query blocks (a backward that walks the keys' tiles)."""
    full, partial = classify_tiles(token_ends(pattern), bm, bn)
    if q_direction:
        full, partial = full.t(), partial.t()
    (mc, mi), (fc, fi) = packed(partial), packed(full)
    return mc, mi, fc, fi
