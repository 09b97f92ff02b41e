"""One attention API, several backends.

``attention(q, k, v, pattern=..., backend=...)`` computes softmax attention for
q, k, v of shape (B, H, L, D). They may be strided views (e.g. of a fused qkv
projection laid out (B, L, 3, H, D)); the last dimension must be contiguous.

The mask is described, not materialised: a :class:`ScalePattern` gives the token
count of every scale and whether a scale sees itself only (``block_diagonal``,
HMAR) or itself and all earlier scales (``block_causal``, VAR). Backends that need
a dense mask build it from the pattern (and cache it); fused kernels read the
scale boundaries directly.

The SDPA + boolean-mask backend is the reference every other backend is tested
against. Other backends register themselves with :func:`register_backend`;
``auto`` asks each registered backend, fastest first, whether it supports the
call, and falls back to SDPA.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "flex", "varlen", "triton", "scales", "cudnn", "fa4")
PatternKind = Literal["block_diagonal", "block_causal"]


@dataclass(frozen=True)
class ScalePattern:
    """Scale-structured attention mask over a sequence of concatenated scales."""

    kind: PatternKind
    lengths: tuple[int, ...]  # tokens per scale, e.g. (1, 4, 9, ..., 256)

    def __post_init__(self) -> None:
        if self.kind not in ("block_diagonal", "block_causal"):
            raise ValueError(f"ScalePattern.kind: expected block_diagonal or block_causal, got {self.kind!r}")
        if not self.lengths or any(int(n) <= 0 for n in self.lengths):
            raise ValueError(f"ScalePattern.lengths: expected positive token counts, got {self.lengths!r}")
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))

    @classmethod
    def from_sides(cls, kind: PatternKind, sides: tuple[int, ...] | list[int]) -> ScalePattern:
        """Pattern for square scales given their side lengths (VAR's ``patch_nums``)."""
        return cls(kind, tuple(int(s) * int(s) for s in sides))

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def scale_ids(self, device: torch.device | str | None = None) -> Tensor:
        """(L,) int64 scale index of every token."""
        # bucketize, not repeat_interleave: every shape is static, so torch.compile traces it
        ends = torch.tensor(list(itertools.accumulate(self.lengths)), device=device)
        return torch.bucketize(torch.arange(self.total, device=device), ends, right=True)

    def dense_mask(self, device: torch.device | str | None = None) -> Tensor:
        """(L, L) bool, True where query i may attend to key j."""
        if torch.compiler.is_compiling():  # built inside the graph (a constant there), not cached
            return _build_dense_mask(self, device)
        return _dense_mask(self, str(torch.device(device) if device is not None else "cpu"))

    def density(self) -> float:
        n = torch.tensor(self.lengths, dtype=torch.float64)
        if self.kind == "block_diagonal":
            allowed = (n * n).sum()
        else:
            allowed = (n * n.cumsum(0)).sum()
        return float(allowed / (self.total**2))


def _build_dense_mask(pattern: ScalePattern, device) -> Tensor:
    d = pattern.scale_ids(device)
    if pattern.kind == "block_diagonal":
        return d[:, None] == d[None, :]
    return d[:, None] >= d[None, :]


@functools.lru_cache(maxsize=32)
def _dense_mask(pattern: ScalePattern, device: str) -> Tensor:
    return _build_dense_mask(pattern, device)


# ----------------------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str
    fn: Callable[..., Tensor]  # fn(q, k, v, pattern, scale) -> (B, H, L, D)
    supports: Callable[[Tensor, Tensor, Tensor, ScalePattern | None], bool]
    priority: int  # lower is tried first by ``auto``
    auto: bool = True  # False: only used when asked for by name
    # where ``auto`` may pick it (besides ``supports``); None: wherever it supports the call
    auto_when: Callable[[Tensor, Tensor, Tensor, ScalePattern | None], bool] | None = None


_BACKENDS: dict[str, Backend] = {}
_BY_PRIORITY: list[Backend] = []  # what ``auto`` tries, in order


def register_backend(
    name: str,
    fn: Callable[..., Tensor],
    supports: Callable[[Tensor, Tensor, Tensor, ScalePattern | None], bool],
    priority: int,
    auto: bool = True,
    auto_when: Callable[[Tensor, Tensor, Tensor, ScalePattern | None], bool] | None = None,
) -> None:
    """Add a backend. ``supports`` must be cheap: it is called on every ``auto`` dispatch.

    ``auto=False``: never chosen by ``backend="auto"``, only by name. ``auto_when``: ``auto``
    picks it only for calls it also accepts (a backend faster only for some calls), while by
    name it takes every call ``supports`` accepts.
    """
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"backend name must be one of {BACKENDS[1:]}, got {name!r}")
    _BACKENDS[name] = Backend(name, fn, supports, priority, auto, auto_when)
    _BY_PRIORITY[:] = sorted((b for b in _BACKENDS.values() if b.auto), key=lambda b: b.priority)


def available_backends() -> list[str]:
    _load_optional_backends()
    return sorted(_BACKENDS, key=lambda n: _BACKENDS[n].priority)


_optional_loaded = False


def load_backends() -> None:
    """Import the optional backends (each registers itself if its dependencies are present).

    Called on first use; models call it when built, so that torch.compile never traces the imports.
    """
    if not _optional_loaded:
        _load_optional_backends()


def _load_optional_backends() -> None:
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    import importlib

    for mod in (
        "maskar.nn.attention_flex", "maskar.nn.attention_varlen", "maskar.kernels.block_sparse",
        "maskar.nn.attention_scales", "maskar.nn.attention_cudnn", "maskar.nn.attention_fa4",
    ):  # fmt: skip
        try:
            importlib.import_module(mod)
        except ImportError:
            # triton / flex may be missing on this install: the backend just stays unregistered
            pass


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None = None, scale: float | None = None
) -> Tensor:
    """Reference: torch SDPA with the dense boolean mask of ``pattern``."""
    mask = None
    if pattern is not None:
        if q.shape[-2] != pattern.total or k.shape[-2] != pattern.total:
            raise ValueError(
                f"attention: pattern covers {pattern.total} tokens "
                f"but q has {q.shape[-2]}, k has {k.shape[-2]}"
            )
        mask = pattern.dense_mask(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


register_backend("sdpa", sdpa_attention, lambda q, k, v, p: True, priority=100)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: ScalePattern | None = None,
    *,
    backend: str = "auto",
    scale: float | None = None,
) -> Tensor:
    """Softmax attention. q: (B, H, Lq, D), k/v: (B, H, Lk, D) -> (B, H, Lq, D).

    ``pattern=None`` is dense attention (Lq may differ from Lk, e.g. with a KV cache).
    ``scale`` defaults to D**-0.5.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if not _optional_loaded and not torch.compiler.is_compiling():
        _load_optional_backends()
    if backend == "auto":
        b = _auto_backend(q, k, v, pattern)
        return sdpa_attention(q, k, v, pattern, scale) if b is None else b.fn(q, k, v, pattern, scale)
    if backend not in _BACKENDS:
        raise RuntimeError(
            f"attention backend {backend!r} is not available here (registered: {available_backends()})"
        )
    b = _BACKENDS[backend]
    if not b.supports(q, k, v, pattern):
        raise RuntimeError(
            f"attention backend {backend!r} does not support this call "
            f"(device {q.device}, dtype {q.dtype}, pattern {pattern.kind if pattern else None}); "
            "use backend=auto or sdpa"
        )
    return b.fn(q, k, v, pattern, scale)


def _auto_backend(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> Backend | None:
    for b in _BY_PRIORITY:
        if b.supports(q, k, v, pattern) and (b.auto_when is None or b.auto_when(q, k, v, pattern)):
            return b
    return None


def auto_backend_name(q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None = None) -> str:
    """The backend ``backend="auto"`` runs for this call (grad mode, device and dtype included)."""
    if not _optional_loaded:
        _load_optional_backends()
    b = _auto_backend(q, k, v, pattern)
    return "sdpa" if b is None else b.name


def naive_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None = None, scale: float | None = None
) -> Tensor:
    """Explicit softmax(QK^T)V in (at least) fp32 -- for tests only."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if pattern is not None:
        s = s.masked_fill(~pattern.dense_mask(q.device), float("-inf"))
    return (s.softmax(-1) @ v.to(acc)).to(q.dtype)


# How to get a backend that is not registered here
_INSTALL_HINTS = {
    "fa4": "; it needs FlashAttention-4 on an sm90 GPU: pip install 'maskar[fa4]'",
    "triton": "; it needs Triton (pip install triton) and a CUDA GPU",
    "varlen": "; it needs torch >= 2.10 with CUDA",
}


def check_backend(name: str, device: torch.device | str) -> None:
    """Refuse, before any work, an ``attention_backend`` that is not installed here or that
    cannot run on ``device`` (checked with a small CPU call; CUDA calls are checked per call)."""
    from maskar.config_base import ConfigError

    if name not in BACKENDS:
        raise ConfigError(f"attention_backend: expected one of {list(BACKENDS)}, got {name!r}")
    if name == "auto":
        return
    _load_optional_backends()
    if name not in _BACKENDS:
        raise ConfigError(
            f"attention_backend: {name!r} is not available here (available: {available_backends()})"
            + _INSTALL_HINTS.get(name, "")
        )
    if torch.device(device).type == "cpu":
        q = torch.zeros(1, 1, 4, 64)
        if not _BACKENDS[name].supports(q, q, q, ScalePattern("block_diagonal", (1, 3))):
            raise ConfigError(f"attention_backend: {name!r} does not run on the CPU; use auto or sdpa")


def set_backend(module: torch.nn.Module, name: str) -> None:
    """Set ``attn_backend`` on every submodule that calls :func:`attention`."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend: expected one of {list(BACKENDS)}, got {name!r}")
    for m in module.modules():
        if hasattr(m, "attn_backend"):
            m.attn_backend = name
