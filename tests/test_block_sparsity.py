"""Tile maps of the block-causal pattern (maskar.nn.block_sparsity) against its dense mask."""

from __future__ import annotations

import pytest
import torch

from maskar.nn.attention import ScalePattern
from maskar.nn.block_sparsity import block_causal_maps, classify_tiles, packed, padded_ends, token_ends

SIDES_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
SIDES_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def _tile_counts(mask: torch.Tensor, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible pairs, pairs inside the sequence) per (bm x bn) tile of an (L, L) mask."""
    L = mask.shape[0]
    n_m, n_n = -(-L // bm), -(-L // bn)
    pad = torch.zeros(n_m * bm, n_n * bn, dtype=torch.int32)
    inside = pad.clone()
    pad[:L, :L] = mask.int()
    inside[:L, :L] = 1
    tiles = (n_m, bm, n_n, bn)
    return pad.view(tiles).sum((1, 3)), inside.view(tiles).sum((1, 3))


@pytest.mark.parametrize("sides", [SIDES_256, SIDES_512])
@pytest.mark.parametrize("block", [(128, 128), (192, 128), (64, 128), (128, 64)])
def test_tiles_classified_as_the_dense_mask_says(sides, block):
    p = ScalePattern.from_sides("block_causal", sides)
    mask = p.dense_mask(torch.device("cpu"))
    full, partial = classify_tiles(token_ends(p), *block)
    seen, inside = _tile_counts(mask, *block)
    # full: every key of the tile inside the sequence and seen by every query row of it that is
    # (rows past the end are the kernel's padding, never written); skipped: no pair visible
    keys_inside = (torch.arange(full.shape[1]) + 1) * block[1] <= p.total
    assert torch.equal(full, (seen == inside) & keys_inside[None, :] & (seen > 0))
    assert torch.equal(full | partial, seen > 0)
    assert not (full & partial).any()


def test_token_ends():
    p = ScalePattern("block_causal", (1, 4, 9))
    assert token_ends(p).tolist() == [1] + [5] * 4 + [14] * 9
    assert token_ends(p).dtype == torch.int32
    padded = padded_ends(p, 8)
    assert padded.tolist() == token_ends(p).tolist() + [0] * 8 and padded.dtype == torch.int32


def test_packed_puts_each_rows_columns_first_ascending():
    sel = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, False]])
    cnt, idx = packed(sel)
    assert cnt.tolist() == [2, 0, 3]
    assert idx[0, :2].tolist() == [1, 3] and idx[2, :3].tolist() == [0, 1, 2]
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32


def test_backward_maps_are_the_forward_ones_transposed():
    p = ScalePattern.from_sides("block_causal", SIDES_256)
    fwd = block_causal_maps(p, 64, 128)
    bwd = block_causal_maps(p, 64, 128, q_direction=True)

    def dense(cnt, idx, cols):
        out = torch.zeros(cnt.numel(), cols, dtype=torch.bool)
        for r in range(cnt.numel()):
            out[r, idx[r, : int(cnt[r])].long()] = True
        return out

    n_m, n_n = fwd[1].shape[0], fwd[1].shape[1]
    assert torch.equal(dense(fwd[0], fwd[1], n_n), dense(bwd[0], bwd[1], n_m).t())  # partial tiles
    assert torch.equal(dense(fwd[2], fwd[3], n_n), dense(bwd[2], bwd[3], n_m).t())  # full tiles


@pytest.mark.parametrize("q_direction", [False, True])
def test_maps_are_row_major(q_direction):
    """FA4 reads the maps as row-major tensors and refuses others ("Expected strides[leading_dim]
    == 1"; the backward's maps, sorted from a transposed selection, were column-major once)."""
    p = ScalePattern.from_sides("block_causal", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    for t in block_causal_maps(p, 128, 128, q_direction=q_direction):
        assert t.is_contiguous() and t.stride()[-1] == 1
