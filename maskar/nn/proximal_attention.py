"""Proximal Self-Attention (PSA, CASMAR v1) and Scaffold-Anchored Local Attention (SALA, v2).

PSA lets every token of an H x W grid attend to the k x k (dilated) window around it.
The official module unfolds K and V with *zero padding* and keeps the padded border
slots inside the softmax: each contributes logit 0 and value 0. So a border query's
softmax denominator has ``k*k - n_valid`` extra ``exp(0)`` terms.

Here that is computed exactly without materialising k*k copies of K and V: one SDPA
call over all keys with an additive float bias (0 inside the window, -inf outside),
plus one extra all-zero key/value whose bias is ``log(k*k - n_valid)``. Its logit
``q . 0 * scale + log(m)`` adds ``m * exp(0)`` to the denominator and nothing to the
numerator, which is exactly what the m padded slots do (``-inf`` when m = 0). The key
axis is padded to a multiple of 8 with further ``-inf`` zero keys for kernel alignment.

SALA adds an anchor branch (queries attend densely to the 2x2-average-pooled condition
tokens after a LayerNorm) and a sigmoid gate ``g = sigmoid(gate_proj([x, o_loc, o_anc]))``:
``out = out_proj(o_loc + g * o_anc)``. Parameter names match the official checkpoints
(``na.{q,k,v,out}_proj`` for PSA; ``{q,k,v}_proj_{loc,anc}``, ``gate_proj``,
``out_proj``, ``anchor_norm`` for SALA).

Backends of :func:`proximal_attention`: ``sdpa`` (the exact reference above, everywhere) and
``triton`` (``maskar.kernels.neighborhood``: a fused window kernel that only reads the keys
each tile of queries can see, O(L * k^2) work and O(L * d) extra memory; CUDA sm80+,
fp16 / bf16, head dim 32 / 64 / 128). ``auto`` takes the kernel where it supports the call
and SDPA otherwise. ``border="clamp"`` gives NATTEN's rule instead of CASMAR's: the window
is shifted to lie inside the grid and the softmax runs over its keys only.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskar import env

Pair = tuple[int, int]


def _pair(v: int | tuple[int, int], name: str) -> Pair:
    a, b = (v, v) if isinstance(v, int) else tuple(v)
    if int(a) < 1 or int(b) < 1:
        raise ValueError(f"{name}: expected positive integers, got {v!r}")
    return int(a), int(b)


def _check_kernel(kernel_size: int | tuple[int, int]) -> Pair:
    kh, kw = _pair(kernel_size, "kernel_size")
    if kh % 2 == 0 or kw % 2 == 0:
        # The official "same" padding dil*(k-1)/2 only keeps the grid size for odd k.
        raise ValueError(f"kernel_size: expected odd sizes, got {kernel_size!r}")
    return kh, kw


BORDERS = ("zeros", "clamp")
# The names of maskar.nn.attention.BACKENDS, so that ``set_backend`` / ``attention_backend``
# reach PSA too; PSA has no flex or varlen form, so those two choose as ``auto`` does.
PSA_BACKENDS = ("auto", "sdpa", "flex", "varlen", "triton")


def _check_border(border: str) -> str:
    if border not in BORDERS:
        raise ValueError(f"border: expected one of {BORDERS}, got {border!r}")
    return border


def _axis_windows(n: int, k: int, d: int, border: str, device: torch.device) -> Tensor:
    """(n, n) bool: position j is in the window of position i along one axis.

    The window lives in i's dilation class (positions with i's residue mod d): k steps of
    d centred on i (``zeros``; the steps off the axis are the padded slots), or, for
    ``clamp``, the min(k, m) consecutive class members starting at clamp(s - r, 0, m - k),
    where s is i's index in its class of m members (NATTEN's rule)."""
    pos = torch.arange(n, device=device)
    same = (pos[:, None] - pos[None, :]) % d == 0
    sub = pos // d  # index inside the dilation class
    r = (k - 1) // 2
    if border == "zeros":
        return same & ((sub[None, :] - sub[:, None]).abs() <= r)
    members = (n - pos % d + d - 1) // d  # class sizes, per position
    kk = torch.clamp(members, max=k)
    start = torch.minimum((sub - r).clamp(min=0), members - kk)
    return same & (sub[None, :] >= start[:, None]) & (sub[None, :] < (start + kk)[:, None])


@functools.lru_cache(maxsize=64)
def _psa_bias_cached(
    h: int, w: int, kh: int, kw: int, dh: int, dw: int, border: str, device: str, dtype: torch.dtype
) -> Tensor:
    dev = torch.device(device)
    rows = _axis_windows(h, kh, dh, border, dev)  # (h, h)
    cols = _axis_windows(w, kw, dw, border, dev)  # (w, w)
    # raster order: query (y, x) sees key (y', x') iff rows[y, y'] and cols[x, x']
    inside = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, h * w)
    n = h * w
    n_keys = -(-(n + 1) // 8) * 8  # all keys + one zero key, padded to a multiple of 8
    # float64 so that a float64 call is exact; calls cast it to their dtype
    bias = torch.full((n, n_keys), float("-inf"), device=dev, dtype=torch.float64)
    bias[:, :n].masked_fill_(inside, 0.0)
    if border == "zeros":
        missing = (kh * kw - inside.sum(1)).to(torch.float64)  # padded slots per query
        bias[:, n] = torch.where(missing > 0, missing.clamp(min=1).log(), torch.full_like(missing, -math.inf))
    return bias.to(dtype)


def psa_bias(
    grid: tuple[int, int],
    kernel_size: int | tuple[int, int] = 7,
    dilation: int | tuple[int, int] = 1,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    border: str = "zeros",
) -> Tensor:
    """(L, L_keys) additive bias for :func:`proximal_attention`; L_keys = round_up(L + 1, 8).

    Columns < L are the grid keys (0 inside the window, -inf outside); column L is the
    zero key standing for the padded slots (log of their count, -inf if none or with
    ``border="clamp"``); the rest -inf.
    """
    h, w = _pair(grid, "grid")
    kh, kw = _check_kernel(kernel_size)
    dh, dw = _pair(dilation, "dilation")
    dev = str(torch.device(device) if device is not None else torch.device("cpu"))
    return _psa_bias_cached(h, w, kh, kw, dh, dw, _check_border(border), dev, dtype)


def sdpa_proximal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int],
    kernel_size: int | tuple[int, int] = 7,
    dilation: int | tuple[int, int] = 1,
    scale: float | None = None,
    border: str = "zeros",
) -> Tensor:
    """The reference: one SDPA over all keys plus the zero key, with :func:`psa_bias`."""
    b, nh, n, d = q.shape
    bias = psa_bias(grid, kernel_size, dilation, device=q.device, dtype=q.dtype, border=border)  # (L, L_keys)
    pad = bias.shape[1] - n
    k = torch.cat([k, k.new_zeros(b, nh, pad, d)], dim=2)  # (B, H, L_keys, D)
    v = torch.cat([v, v.new_zeros(b, nh, pad, v.shape[-1])], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


@functools.lru_cache(maxsize=1)
def _kernel_module():
    """maskar.kernels.neighborhood, or None where Triton is missing."""
    try:
        from maskar.kernels import neighborhood
    except ImportError:
        return None
    return neighborhood


_KERNEL = None  # maskar.kernels.neighborhood, set by _load_kernel() when a PSA module is built


def _load_kernel() -> None:
    """Import the kernel module when a model is built, never inside a torch.compile trace
    (which then reads ``_KERNEL``: the opaque op where the kernel exists, SDPA otherwise)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel_module()


def proximal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int],
    kernel_size: int | tuple[int, int] = 7,
    dilation: int | tuple[int, int] = 1,
    scale: float | None = None,
    border: str = "zeros",
    backend: str = "auto",
) -> Tensor:
    """PSA over a (h, w) grid: q, k, v (B, H, L, D), L = h * w -> (B, H, L, D).

    ``border``: ``zeros`` (CASMAR: padded slots in the softmax) or ``clamp`` (NATTEN).
    ``backend``: ``auto`` (the Triton kernel where it supports the call, else SDPA),
    ``sdpa`` (the exact reference) or ``triton`` (the kernel; an error where unsupported);
    ``flex`` and ``varlen`` (a model-wide setting meant for other attention) act as ``auto``.
    """
    n = q.shape[2]
    if n != grid[0] * grid[1] or k.shape[2] != n or v.shape[2] != n:
        raise ValueError(
            f"proximal_attention: {n} queries / {k.shape[2]} keys do not fill grid {tuple(grid)}"
        )
    if backend not in PSA_BACKENDS:
        raise ValueError(f"proximal_attention: backend expected one of {PSA_BACKENDS}, got {backend!r}")
    _check_border(border)
    if backend != "sdpa" and torch.compiler.is_compiling():
        out = None if _KERNEL is None else _KERNEL.compiled_inference(q, k, v, grid, kernel_size, dilation,
                                                                      scale, border)
        if out is not None:
            return out
    if backend != "sdpa":
        kern = _kernel_module()
        if backend == "triton":
            if kern is None:
                raise ValueError("proximal_attention: backend 'triton' needs the triton package")
            return kern.neighborhood_attention(q, k, v, grid, kernel_size, dilation, scale, border)
        out = None if kern is None else kern.attention_if_supported(q, k, v, grid, kernel_size, dilation,
                                                                     scale, border)
        if out is not None:
            return out
    return sdpa_proximal_attention(q, k, v, grid, kernel_size, dilation, scale, border)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, L, C) -> (B, H, L, C/H)."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """(B, H, L, D) -> (B, L, H*D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class ProximalAttention2D(nn.Module):
    """PSA over a square-or-rectangular token grid with separate q/k/v/out projections.

    ``attn_backend`` (attribute, default ``auto``; ``maskar.nn.attention.set_backend`` sets
    it): passed to :func:`proximal_attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | tuple[int, int] = 7,
        dilation: int | tuple[int, int] = 1,
        qkv_bias: bool = True,
        border: str = "zeros",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ProximalAttention2D: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.kernel_size = _check_kernel(kernel_size)
        self.dilation = _pair(dilation, "dilation")
        self.border = _check_border(border)
        self.attn_backend = "auto"
        _load_kernel()
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    # Inference: q, k and v from one matmul on the concatenated weights (each output element the
    # same dot product), read by the kernel as strided views. On CUDA by default: CASMAR-B sampled
    # 0.5-1% faster with it on an H200, beyond the spread of the default's calls (2026-12-05,
    # docs/benchmarks.md). MASKAR_PSA_QKV=1 / 0 turns it on / off everywhere; None: CUDA only
    # (the CPU keeps the three projections and its samples).
    fused_qkv: bool | None = env.switch("MASKAR_PSA_QKV")

    @classmethod
    def uses_fused_qkv(cls, on_cuda: bool) -> bool:
        """Whether inference on a CUDA (or CPU) tensor takes the one matmul (``fused_qkv``)."""
        return on_cuda if cls.fused_qkv is None else cls.fused_qkv

    def local(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Window attention before ``out_proj``: x (B, L, C) -> (B, L, C)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if ProximalAttention2D.uses_fused_qkv(x.is_cuda) and not torch.is_grad_enabled():
            bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projs])
            qkv = F.linear(x, torch.cat([p.weight for p in projs]), bias).chunk(3, -1)
        else:
            qkv = tuple(p(x) for p in projs)
        q, k, v = (_heads(t, self.num_heads) for t in qkv)
        return _merge(proximal_attention(q, k, v, grid, self.kernel_size, self.dilation,
                                         border=self.border, backend=self.attn_backend))

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.out_proj(self.local(x, grid))


class ProximalSelfAttention(nn.Module):
    """The DiT block's attention in CASMAR v1: PSA under the official ``na.`` prefix."""

    def __init__(
        self, dim: int, num_heads: int, kernel_size: int = 7, dilation: int = 1, border: str = "zeros"
    ):
        super().__init__()
        self.na = ProximalAttention2D(dim, num_heads, kernel_size, dilation, border=border)

    def forward(self, x: Tensor, grid: tuple[int, int], cond: Tensor | None = None) -> Tensor:
        return self.na(x, grid)


class SALAAttention2D(nn.Module):
    """SALA: PSA local branch + anchor branch over pooled condition tokens, gated.

    x (B, L, C) tokens on ``grid``; cond (B, L, C) condition tokens on the same grid
    (the DiT's embedded per-token condition), pooled ``anchor_pool`` x ``anchor_pool``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        anchor_pool: int = 2,
        border: str = "zeros",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SALAAttention2D: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.kernel_size = _check_kernel(kernel_size)
        self.dilation = _pair(dilation, "dilation")
        self.border = _check_border(border)
        self.attn_backend = "auto"  # of the local branch, as ProximalAttention2D.attn_backend
        _load_kernel()
        self.anchor_pool = anchor_pool
        self.q_proj_loc = nn.Linear(dim, dim)
        self.k_proj_loc = nn.Linear(dim, dim)
        self.v_proj_loc = nn.Linear(dim, dim)
        self.q_proj_anc = nn.Linear(dim, dim)
        self.k_proj_anc = nn.Linear(dim, dim)
        self.v_proj_anc = nn.Linear(dim, dim)
        self.gate_proj = nn.Linear(3 * dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.anchor_norm = nn.LayerNorm(dim)
        self.reset_gate()

    def reset_gate(self) -> None:
        """Zero gate weights, bias -2: the anchor branch starts at sigmoid(-2) ~ 0.12."""
        nn.init.zeros_(self.gate_proj.weight)
        nn.init.constant_(self.gate_proj.bias, -2.0)

    def anchors(self, cond: Tensor, grid: tuple[int, int]) -> Tensor:
        """(B, L, C) -> (B, L / pool^2, C): average-pooled condition tokens, LayerNorm'ed."""
        b, n, c = cond.shape
        g = cond.transpose(1, 2).reshape(b, c, grid[0], grid[1])
        pooled = F.avg_pool2d(g, self.anchor_pool)  # (B, C, h/p, w/p)
        return self.anchor_norm(pooled.flatten(2).transpose(1, 2))

    def forward(self, x: Tensor, grid: tuple[int, int], cond: Tensor | None = None) -> Tensor:
        if cond is None:
            raise ValueError("SALAAttention2D: needs the condition tokens (cond) for its anchors")
        heads = self.num_heads
        q, k, v = (_heads(p(x), heads) for p in (self.q_proj_loc, self.k_proj_loc, self.v_proj_loc))
        o_loc = _merge(proximal_attention(q, k, v, grid, self.kernel_size, self.dilation,
                                          border=self.border, backend=self.attn_backend))
        anc = self.anchors(cond, grid)
        qa = _heads(self.q_proj_anc(x), heads)
        ka, va = _heads(self.k_proj_anc(anc), heads), _heads(self.v_proj_anc(anc), heads)
        o_anc = _merge(F.scaled_dot_product_attention(qa, ka, va))
        gate = torch.sigmoid(self.gate_proj(torch.cat([x, o_loc, o_anc], dim=-1)))
        return self.out_proj(o_loc + gate * o_anc)
