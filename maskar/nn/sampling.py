"""Token sampling: temperature, top-k, top-p, classifier-free guidance.

Nothing here modifies the caller's logits in place (the official VAR helper does),
so confidence scores can be computed from the unfiltered distribution afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskar.config import ConfigError


def check_sampling_args(cfg: float, temperature: float, top_k: int, top_p: float) -> None:
    """Raise one clear ``ConfigError`` (a ValueError) for a bad sampling argument (top_k >= V means off)."""
    if not cfg >= 0:
        raise ConfigError(f"cfg: expected a guidance scale >= 0, got {cfg!r}")
    if not temperature > 0:
        raise ConfigError(f"temperature: expected a value > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k: expected an integer >= 0 (0 disables it), got {top_k!r}")
    if not 0.0 <= top_p <= 1.0:
        raise ConfigError(f"top_p: expected a value in [0, 1] (0 or 1 disables it), got {top_p!r}")


def guided_logits(logits: Tensor, batch: int, t: float) -> Tensor:
    """CFG on a doubled batch [cond; uncond]: (1 + t) * cond - t * uncond -> (batch, ...)."""
    cond, uncond = logits[:batch], logits[batch:]
    if t == 0.0:
        return cond
    return (1.0 + t) * cond - t * uncond


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """Return a copy with entries outside the top-k / nucleus set to -inf.

    top-k keeps values >= the k-th largest; top-p sorts ascending, drops entries whose
    cumulative softmax mass is <= 1 - top_p, always keeping the largest (VAR's rule).
    """
    V = logits.shape[-1]
    out = logits
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        out = out.masked_fill(out < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = out.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - top_p)
        drop_sorted[..., -1:] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_from_logits(
    logits: Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits (..., V) -> int64 token ids (...,), one draw per position."""
    shape = logits.shape[:-1]
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    x = filter_logits(x, top_k, top_p)
    probs = x.softmax(dim=-1).reshape(-1, x.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).view(shape)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
