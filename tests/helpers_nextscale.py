"""Helpers shared by the next-scale model tests (test_var.py, test_hmar.py)."""

from __future__ import annotations

import json

import torch
from reference_tables import REFERENCE as REF


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial weights everywhere but the tokenizer (the official init makes gammas ~0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("tokenizer."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def random_indices(model, B: int, seed: int = 0) -> list[torch.Tensor]:
    """One (B, pn*pn) int64 tensor of random token ids per scale of ``model``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.vocab_size, (B, pn * pn), generator=g) for pn in model.patch_nums]


def meta_official(table: str) -> dict[str, torch.Tensor]:
    """An official state dict of meta tensors, shaped as the reference table ``REF / table`` lists."""
    shapes = json.loads((REF / table).read_text())["state_dict_shapes"]
    dtype = {"lvl_1L": torch.int64}
    return {k: torch.empty(s, device="meta", dtype=dtype.get(k, torch.float32)) for k, s in shapes.items()}
