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

from maskar import env
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
    """Return a copy with entries outside the top-k / nucleus set to -inf (the reference filter).

    top-k keeps values >= the k-th largest (all of a tie at the k-th value); top-p sorts
    ascending, drops entries whose cumulative softmax mass is <= 1 - top_p, always keeping the
    largest (VAR's rule). The sort is stable, so among equal logits at the top-p boundary the
    lower vocabulary ids are dropped first (an unstable sort leaves that to the implementation).
    """
    V = logits.shape[-1]
    out = logits
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        out = out.masked_fill(out < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = out.sort(dim=-1, descending=False, stable=True)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - top_p)
        drop_sorted[..., -1:] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def exponential_noise(
    rows: int, vocab: int, generator: torch.Generator | None, device: torch.device | str
) -> Tensor:
    """(rows, vocab) float32 Exp(1) draws: the randomness of one categorical draw per row.

    ``torch.multinomial(probs, 1)`` draws exactly this tensor (``empty_like(probs).exponential_``)
    and returns ``argmax(probs / noise)``; drawing it apart lets a draw run without the host sync
    that ``multinomial``'s input check costs (so it can sit in a CUDA graph) and lets the fused
    sampler use the same randomness as the reference.
    """
    return torch.empty(rows, vocab, device=device).exponential_(generator=generator)


def draw_from_probs(probs: Tensor, noise: Tensor) -> Tensor:
    """(R, V) probabilities, (R, V) Exp(1) noise -> (R,) ids: argmax(probs / noise).

    The exponential race: P(i wins) = probs_i / sum(probs). Bitwise what ``torch.multinomial(probs,
    1, generator=g)`` returns when ``noise = exponential_noise(R, V, g, ...)`` (tests).
    """
    return (probs / noise).argmax(dim=-1)


SAMPLERS = ("fused", "reference", "triton")


def sample_from_logits(
    logits: Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
    method: str = "fused",
) -> Tensor:
    """logits (..., V) -> int64 token ids (...,), one draw per position.

    ``noise`` (N, V) with N the number of positions: pre-drawn :func:`exponential_noise`
    (otherwise drawn here from ``generator``). ``method``: ``reference`` filters with
    :func:`filter_logits` (a full sort of the vocabulary); ``fused`` (default) gives the same
    filtered distribution through :func:`topk_topp_probs` without sorting the whole vocabulary
    when top_k is on. Both draw with the same randomness, so they agree token for token up to
    floating-point rounding of the nucleus boundary (tests). ``triton``: the whole draw as one
    kernel (:mod:`maskar.kernels.categorical`: the same distribution, the same noise, tree-summed
    masses) where it runs (CUDA, the Triton interpreter; vocabularies up to 8192), else ``fused``.
    """
    shape = logits.shape[:-1]
    if method == "triton":
        categorical = _categorical()
        flat = logits.reshape(-1, logits.shape[-1])
        if noise is None:
            noise = exponential_noise(flat.shape[0], flat.shape[1], generator, flat.device)
        if categorical is not None and categorical.supports(flat, noise):
            return categorical.draw(flat, noise, top_k, top_p, temperature).view(shape)
        method = "fused"
    x = logits.float().reshape(-1, logits.shape[-1])
    if temperature != 1.0:
        x = x / temperature
    if noise is None:
        noise = exponential_noise(x.shape[0], x.shape[1], generator, x.device)
    if method == "reference":
        probs = filter_logits(x, top_k, top_p).softmax(dim=-1)
    elif method == "fused":
        probs = topk_topp_probs(x, top_k, top_p)
    else:
        raise ConfigError(f"sampler: expected one of {list(SAMPLERS)}, got {method!r}")
    return draw_from_probs(probs, noise).view(shape)


# sample_guided: the guidance inside the one-kernel draw (MASKAR_DRAW_GUIDANCE, read at import;
# 0: the float32 guided logits written first, as before 2026-12-06's tenth session)
GUIDANCE_IN_DRAW = bool(env.switch("MASKAR_DRAW_GUIDANCE"))


def sample_guided(
    logits2: Tensor,
    batch: int,
    t: float,
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    *,
    noise: Tensor,
    method: str = "fused",
) -> Tensor:
    """``sample_from_logits(guided_logits(logits2.float(), batch, t), ...)`` for a doubled batch
    [cond; uncond] of logits (2 batch, ..., V) in any float dtype -> ids (batch, ...).

    With ``method="triton"`` where the kernel runs, the guidance is made inside the draw: the
    kernel reads the cond and null-class rows as they are (bf16 straight from the head) and
    computes the same float32 guided logits, which are never written; the float32 copy and
    the guidance's three passes over the doubled batch (≈ 40 bytes an entry) are saved.
    Elsewhere, and for every other method, the two steps as written above."""
    cond, uncond = logits2[:batch], logits2[batch:]
    if method == "triton" and GUIDANCE_IN_DRAW:
        categorical = _categorical()
        flat = cond.reshape(-1, cond.shape[-1])
        flat_u = None if t == 0.0 else uncond.reshape(-1, uncond.shape[-1])
        if categorical is not None and categorical.supports(flat, noise, flat_u):
            return categorical.draw(
                flat, noise, top_k, top_p, temperature, uncond=flat_u, guidance=t
            ).view(cond.shape[:-1])
    guided = guided_logits(logits2.float(), batch, t)
    return sample_from_logits(guided, top_k, top_p, temperature, noise=noise, method=method)


def _categorical():
    """maskar.kernels.categorical, or None on an install without Triton (the torch path runs)."""
    try:
        from maskar.kernels import categorical
    except ImportError:
        return None
    return categorical


def topk_topp_probs(x: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """softmax(filter_logits(x, top_k, top_p)) for x (R, V) float32, sorting only the top k.

    The kept set of the reference is, per row, the top M entries in (value descending, id
    descending) order: top-k keeps every entry >= the k-th largest value (count n_ge, ties
    included) and top-p then drops an ascending prefix. So it suffices to find M and the value
    v at rank M; the set is {x > v} plus the highest-id ties at v. M comes from the ascending
    cumulative mass of the k sorted top values (``torch.topk``) plus the ``n_ge - k`` ties at
    the k-th value that topk left out (each of probability p_kth, lowest in ascending order).
    Everything else is element-wise over the vocabulary; the final softmax runs on exactly the
    tensor the reference builds, so the probabilities are bitwise equal whenever the kept sets
    are (they can differ only where a cumulative mass rounds across 1 - top_p).
    """
    R, V = x.shape
    k_on, p_on = 0 < top_k < V, 0.0 < top_p < 1.0
    if not p_on:
        if not k_on:
            return x.softmax(dim=-1)
        kth = x.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        return x.masked_fill(x < kth, float("-inf")).softmax(dim=-1)
    k = top_k if k_on else V
    vals = x.topk(k, dim=-1, sorted=True).values if k_on else x.sort(dim=-1, descending=True).values
    top, kth = vals[:, :1], vals[:, -1:]  # (R, 1) each
    extra = (x >= kth).sum(dim=-1, keepdim=True) - k  # (R, 1) ties at the k-th value left out
    e = (vals - top).exp()  # (R, k), descending
    e_kth = (kth - top).exp()
    z = e.sum(dim=-1, keepdim=True) + extra * e_kth
    p, p_kth = e / z, e_kth / z
    thr = 1.0 - top_p
    # Ascending cumulative mass at each sorted position: the left-out ties first, then from the
    # smallest top value up (the reference's order of summation).
    asc = p.flip(-1)
    asc = torch.cat([asc[:, :1] + extra * p_kth, asc[:, 1:]], dim=-1).cumsum(dim=-1).flip(-1)
    keep_sorted = asc > thr
    keep_sorted[:, 0] = True  # the largest is always kept
    m = keep_sorted.sum(dim=-1, keepdim=True)  # (R, 1) a prefix of the descending order
    # Left-out ties kept only if every top value is: the u-th lowest has mass u * p_kth.
    dropped_ties = torch.minimum((thr / p_kth).floor(), extra.to(p_kth.dtype)).to(extra.dtype)
    m = m + torch.where(m == k, extra - dropped_ties, torch.zeros_like(m))
    v = torch.where(m <= k, vals.gather(-1, (m - 1).clamp(max=k - 1)), kth)  # value at rank m
    above = x > v
    tie = x == v
    # Among the ties at v keep the highest ids: rank from the top end = ties at ids >= i.
    tie_i = tie.to(torch.int32)
    rank_from_top = tie_i.sum(dim=-1, keepdim=True) - tie_i.cumsum(dim=-1) + tie_i
    n_at = m - above.sum(dim=-1, keepdim=True)
    kept = above | (tie & (rank_from_top <= n_at))
    return x.masked_fill(~kept, float("-inf")).softmax(dim=-1)


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
