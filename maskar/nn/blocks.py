"""Transformer pieces shared by the next-scale generators (VAR, HMAR).

Parameter names follow the official VAR layout (``attn.mat_qkv``, ``attn.q_bias``,
``ada_lin.1`` ...) so official checkpoints load by name. The math:

* AdaLN block: ``ada_lin(cond)`` -> 6 chunks in the order
  gamma1, gamma2, scale1, scale2, shift1, shift2;
  ``x += drop_path(attn(LN(x)(1+scale1)+shift1) * gamma1)``, same for the FFN.
* LayerNorm without affine parameters, eps 1e-6.
* L2-normalised q and k, q multiplied by ``exp(min(scale_mul_1H11, ln 100))``
  (learned per head, init ln 4), softmax scale 1. Without L2 norm: scale 0.25/sqrt(d).
* GELU with the tanh approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskar.nn.attention import ScalePattern, attention

_MAX_LOG_SCALE = math.log(100.0)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class KVCache:
    """Keys/values of the scales seen so far, (B, H, L_seen, D); grows by concatenation."""

    k: Tensor | None = None
    v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: width {dim} is not divisible by heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        self.attn_backend = "auto"
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        # Keys carry no bias; derived, so never saved (official files hold zeros here).
        self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, pattern: ScalePattern | None = None, cache: KVCache | None = None) -> Tensor:
        B, L, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        # (B, H, L, D) strided views of the fused projection, no copies.
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            gain = self.scale_mul_1H11.clamp(max=_MAX_LOG_SCALE).exp()
            # normalize runs in fp32 under autocast; attention takes the compute dtype (as SDPA's
            # autocast would), which fused kernels need.
            q = F.normalize(q, dim=-1).mul(gain).to(v.dtype)
            k = F.normalize(k, dim=-1).to(v.dtype)
        if cache is not None:
            k, v = cache.append(k, v)  # current scale attends to all cached scales: dense
        out = attention(q, k, v, pattern, backend=self.attn_backend, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class SharedAdaLin(nn.Linear):
    """The one AdaLN projection of ``shared_aln`` models; output (B, 1, 6, C)."""

    def forward(self, cond: Tensor) -> Tensor:
        return super().forward(cond).view(cond.shape[0], 1, 6, -1)


class AdaLNSelfAttnBlock(nn.Module):
    """Pre-norm transformer block modulated by the class condition (AdaLN-Zero style)."""

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dim, self.shared_aln = dim, shared_aln
        self.attn = SelfAttention(dim, num_heads, attn_l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)
        if shared_aln:
            # Per-block offset added to the shared projection's output.
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(
        self, x: Tensor, cond: Tensor, pattern: ScalePattern | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """x (B, L, C); cond (B, D), or (B, 1, 6, C) from the shared projection when shared_aln."""
        if self.shared_aln:
            mod = self.ada_gss + cond
        else:
            mod = self.ada_lin(cond).view(-1, 1, 6, self.dim)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        h = self.ln_wo_grad(x) * (1 + scale1) + shift1
        x = x + self.drop_path(self.attn(h, pattern, cache) * gamma1)
        h = self.ln_wo_grad(x) * (1 + scale2) + shift2
        return x + self.drop_path(self.ffn(h) * gamma2)


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN before the logits head: chunks (scale, shift)."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln_wo_grad(x) * (1 + scale) + shift
