"""Pre-LN ViT block whose state-dict keys match timm's ``vision_transformer.Block``.

Keys: ``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2`` (no LayerScale, no
DropPath), as used by MAR's encoder and decoder.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from maskar.nn import linear_gelu
from maskar.nn.attention import attention


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_backend = "auto"

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh) views, last dim contiguous
        if self.training and self.attn_drop > 0:
            # Attention-probability dropout is a training-only path; the attention API has
            # no dropout, so it goes straight to SDPA (as timm's fused path does).
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop)
        else:
            out = attention(q, k, v, None, backend=self.attn_backend)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)
        # cuBLASLt's tanh-GELU epilogue by default (CUDA inference)? A model sets it where measured
        # faster; MASKAR_FUSED_GELU=0 / 1 overrides every layer (maskar.nn.linear_gelu)
        self.gelu_epilogue = False
        linear_gelu.load_kernel()

    def hidden(self, x: Tensor) -> Tensor:
        """act(fc1(x)), before dropout and fc2."""
        if isinstance(self.act, nn.GELU):  # fused into fc1's matmul where linear_gelu can (inference)
            return linear_gelu.linear_gelu(self.fc1, x, self.act.approximate, self.gelu_epilogue)
        return self.act(self.fc1(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.hidden(x))))


class Block(nn.Module):
    """x + Attn(LN(x)); x + MLP(LN(x)). LayerNorm eps 1e-6."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: Tensor, pending: Tensor | None = None, defer: bool = False):
        """``defer``: return (x, mlp output) and leave the last residual add to the next block,
        which takes it as ``pending`` (see ``MaskedGenerator._run_blocks``)."""
        if pending is not None:
            x = x + pending
        x = x + self.attn(self.norm1(x))
        h = self.mlp(self.norm2(x))
        return (x, h) if defer else x + h

    @staticmethod
    def finish(x: Tensor, pending: Tensor) -> Tensor:
        """The residual add a deferring block left pending."""
        return x + pending
