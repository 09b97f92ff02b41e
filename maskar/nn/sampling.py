"""Token sampling: temperature, top-k, top-p, classifier-free guidance, confidence ranking.

Nothing here modifies the caller's logits in place (the official VAR helper does). The
official HMAR sampler therefore reads its token confidences from the *filtered* logits;
:func:`token_confidence` reproduces that (``rule="official"``) or reads the unfiltered
softmax (``rule="unfiltered"``, maskar's rule before that was found).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from maskar.config import ConfigError

CONFIDENCE_RULES = ("official", "unfiltered")


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


def token_confidence(
    logits: Tensor,
    idx: Tensor,
    *,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    rule: str = "official",
) -> Tensor:
    """Confidence (..., ) of the drawn tokens ``idx`` (...,) under ``logits`` (..., V), float32.

    ``official``: the probability of the token under the distribution it was drawn from by
    :func:`sample_from_logits` (temperature, then top-k / top-p filtered and renormalised), as
    the official HMAR sampler reads it from its in-place filtered logits; a drawn token is never
    filtered out, so it is never 0. ``unfiltered``: the plain softmax of ``logits``.
    """
    if rule not in CONFIDENCE_RULES:
        raise ConfigError(f"confidence: expected one of {list(CONFIDENCE_RULES)}, got {rule!r}")
    x = logits.float()
    if rule == "official":
        if temperature != 1.0:
            x = x / temperature
        x = filter_logits(x, top_k, top_p)
    return x.softmax(dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def lowest_confidence(conf: Tensor, count: int, among: Tensor | None = None) -> Tensor:
    """Positions (B, count) of the ``count`` lowest confidences per row, lowest first.

    conf (B, n). With ``among`` (B, m) int64 positions, rank only those, in that order. The sort
    is stable: ties keep the order of ``among`` (default: position order), so with equal
    confidences (top_k=1 gives 1.0 everywhere) the first positions are chosen, as in the
    official ascending argsort.
    """
    if among is not None:
        conf = conf.gather(1, among)
    order = torch.sort(conf, dim=1, stable=True).indices[:, :count]
    return order if among is None else among.gather(1, order)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


# ----------------------------------------------------------------------------- sampling traces


@dataclass
class TraceStep:
    """One step of a sampling loop, recorded by ``generate(..., return_trace=True)``.

    ``stage`` names the loop (VAR/HMAR: ``next_scale`` / ``refine``; MAR: ``mar``; CASMAR:
    ``scaffold`` / ``refine``), ``index`` the scale (VAR/HMAR) or step number. ``tokens`` is
    the token state after the step: (B, n) ids for VAR/HMAR (the scale's tokens), (B, L, C)
    latents for MAR/CASMAR. ``mask`` (B, n) bool is True where this step drew tokens.
    ``logits`` (B, n, V) are the guided logits the draw used (VAR/HMAR with
    ``trace_logits=True``). ``info`` holds the rest (guidance weight, f_hat, masks, ...).
    """

    stage: str
    index: int
    tokens: Tensor
    mask: Tensor | None = None
    logits: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SamplingTrace:
    """The steps of one sampling call, in order (see :class:`TraceStep`)."""

    steps: list[TraceStep] = field(default_factory=list)
    keep_logits: bool = False

    def add(
        self,
        stage: str,
        index: int,
        tokens: Tensor,
        mask: Tensor | None = None,
        logits: Tensor | None = None,
        **info: Any,
    ) -> TraceStep:
        """Record a step (logits are kept only with ``keep_logits``); returns it."""
        step = TraceStep(stage, index, tokens, mask, logits if self.keep_logits else None, info)
        self.steps.append(step)
        return step

    def select(self, stage: str | None = None, index: int | None = None) -> list[TraceStep]:
        """The steps of one stage and/or index, in order."""
        return [
            s
            for s in self.steps
            if (stage is None or s.stage == stage) and (index is None or s.index == index)
        ]

    def __iter__(self) -> Iterator[TraceStep]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)
