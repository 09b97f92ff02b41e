"""Transformer pieces shared by the next-scale generators (VAR, HMAR).

Parameter names follow the official VAR layout (``attn.mat_qkv``, ``attn.q_bias``,
``ada_lin.1`` ...) so official checkpoints load by name. The math:

* AdaLN block: ``ada_lin(cond)`` -> 6 chunks in the order
  gamma1, gamma2, scale1, scale2, shift1, shift2;
  ``x += drop_path(attn(LN(x)(1+scale1)+shift1) * gamma1)``, same for the FFN (written as
  one ``addcmul`` per update, the per-sample drop-path factor folded into gamma).
* LayerNorm without affine parameters, eps 1e-6.
* L2-normalised q and k, q multiplied by ``exp(min(scale_mul_1H11, ln 100))``
  (learned per head, init ln 4), softmax scale 1. Without L2 norm: scale 0.25/sqrt(d).
  On CUDA in fp16 / bf16 one fused Triton op computes it (``maskar.kernels.qk_norm``);
  :func:`l2_norm_qk` is the torch code it is tested against and what runs elsewhere.
* GELU with the tanh approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from maskar.kernels import optional_kernel
from maskar.nn import ffn_epilogue, linear_gelu
from maskar.nn.attention import ScalePattern, attention, load_backends

_MAX_LOG_SCALE = math.log(100.0)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample.

    The rate is a (non-persistent) buffer, not a Python float: torch.compile treats buffers as
    graph inputs, so blocks with different rates share one compiled graph instead of each
    guarding its own constant (which recompiled per block). ``active`` (rate > 0 at
    construction) is the only Python-level switch.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.active = float(p) > 0.0
        self.register_buffer("rate", torch.tensor(float(p)), persistent=False)

    @property
    def p(self) -> float:
        return float(self.rate)

    def keep_scale(self, batch: int, device: torch.device) -> Tensor | None:
        """(batch, 1, 1) fp32 per-sample factor (0 or 1/keep), or None when nothing is dropped."""
        if not self.active or not self.training:
            return None
        keep = 1.0 - self.rate
        return (torch.rand((batch, 1, 1), device=device) < keep).float() / keep

    def forward(self, x: Tensor) -> Tensor:
        s = self.keep_scale(x.shape[0], x.device)
        return x if s is None else x * s.view((x.shape[0],) + (1,) * (x.ndim - 1)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p:.4g}"


_gelu_bias_kernel = None  # maskar.kernels.gelu_bias once loaded (stays None without Triton)


def _load_gelu_bias_kernel() -> None:
    """Import the training GELU op (without Triton F.gelu runs everywhere)."""
    global _gelu_bias_kernel
    if _gelu_bias_kernel is None:
        _gelu_bias_kernel = optional_kernel("gelu_bias")


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        # the GELU in fc1's cuBLASLt epilogue in CUDA inference: HMAR-d16 1024 px B 8 416.7 ->
        # 403.1 ms, 256 px B 64 with it and the decoder's wide attention 208.3 -> 203.0 (H100,
        # 2026-12-06; docs/benchmarks.md, *The decoder's wide attention and the FFN's GELU*)
        self.gelu_epilogue = True
        linear_gelu.load_kernel()
        _load_gelu_bias_kernel()
        ffn_epilogue.load()

    def forward(self, x: Tensor, detach_out_bias: bool = False) -> Tensor:
        """``detach_out_bias``: fc2 adds a detached bias, for a caller whose kernel sums fc2's
        bias gradient itself (maskar.kernels.adaln_norm.gated_add)."""
        if ffn_epilogue.supports(x, self.fc1, self.fc2, self.act.approximate):
            # training with MASKAR_FFN_EPILOGUE: the GELU inside fc1's and fc2's cuBLASLt
            # epilogues, d act never stored (maskar.nn.ffn_epilogue)
            return ffn_epilogue.ffn(x, self.fc1, self.fc2, detach_out_bias)
        gb = _gelu_bias_kernel
        tanh = self.act.approximate == "tanh"
        if gb is not None and tanh and self.fc1.bias is not None and gb.supports_linear(x):
            # training on CUDA: the GELU's backward launch also sums fc1's bias gradient
            # (maskar.kernels.gelu_bias), so fc1 takes a detached bias
            pre = F.linear(x, self.fc1.weight, self.fc1.bias.detach())
            return _linear(self.fc2, gb.gelu_with_bias_grad(pre, self.fc1.bias), detach_out_bias)
        # the GELU in fc1's epilogue where linear_gelu can (inference on CUDA)
        y = linear_gelu.linear_gelu(self.fc1, x, self.act.approximate, self.gelu_epilogue)
        return _linear(self.fc2, y, detach_out_bias)


def _trained(p: Tensor | None) -> Tensor | None:
    """``p`` where it takes a gradient (a frozen block's bias: no sum to make)."""
    return p if p is not None and p.requires_grad else None


def _linear(layer: nn.Linear, x: Tensor, detach_bias: bool) -> Tensor:
    """``layer(x)``, its bias detached where asked (its gradient then comes from elsewhere)."""
    if detach_bias and layer.bias is not None:
        return F.linear(x, layer.weight, layer.bias.detach())
    return layer(x)


@dataclass
class KVCache:
    """Keys/values of the scales seen so far, (B, H, L_seen, D); grows by concatenation."""

    k: Tensor | None = None
    v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class StaticKVCache:
    """A KV cache of fixed capacity ``length`` for sampling: each append writes the next slots of
    one (B, H, length, D) buffer, allocated at the first append, and returns views of what is
    written so far. Unlike :class:`KVCache` it never re-copies earlier scales, and its addresses
    never change, which CUDA graphs need. Same keys/values, so attention gives the same result."""

    def __init__(self, length: int) -> None:
        self.length = int(length)
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.end = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.k is None or self.v is None:
            B, H, _, D = k.shape
            self.k = k.new_empty(B, H, self.length, D)
            self.v = v.new_empty(B, H, self.length, D)
        start, end = self.end, self.end + k.shape[2]
        if end > self.length:
            raise ValueError(f"StaticKVCache: {end} tokens exceed the capacity {self.length}")
        self.k[:, :, start:end].copy_(k)
        self.v[:, :, start:end].copy_(v)
        self.end = end
        return self.k[:, :, :end], self.v[:, :, :end]


def l2_norm_qk(q: Tensor, k: Tensor, scale_mul_1H11: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The official q/k norm in torch (the reference, and the path off CUDA): q, k (B, H, L, D)
    L2-normalised per head (F.normalize, eps 1e-12), q times exp(min(scale_mul, ln 100))."""
    gain = scale_mul_1H11.clamp(max=_MAX_LOG_SCALE).exp()
    # normalize runs in fp32 under autocast; attention takes the compute dtype (as SDPA's
    # autocast would), which fused kernels need.
    return F.normalize(q, dim=-1).mul(gain).to(dtype), F.normalize(k, dim=-1).to(dtype)


_qk_norm_kernel = None  # maskar.kernels.qk_norm once loaded (stays None without Triton)
_adaln_norm_kernel = None  # maskar.kernels.adaln_norm once loaded (stays None without Triton)


def _load_adaln_norm_kernel() -> None:
    """Import the training LayerNorm + modulate op (without Triton the torch code runs everywhere)."""
    global _adaln_norm_kernel
    if _adaln_norm_kernel is None:
        _adaln_norm_kernel = optional_kernel("adaln_norm")


def _load_qk_norm_kernel() -> None:
    """Import the fused q/k-norm op (without Triton the torch code runs everywhere)."""
    global _qk_norm_kernel
    if _qk_norm_kernel is None:
        _qk_norm_kernel = optional_kernel("qk_norm")


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: width {dim} is not divisible by heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        self.attn_backend = "auto"
        load_backends()  # now, not inside a torch.compile trace of the first call
        if attn_l2_norm:
            _load_qk_norm_kernel()
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

    def forward(self, x: Tensor, pattern: ScalePattern | None = None, cache: KVCache | None = None,
                detach_out_bias: bool = False) -> Tensor:
        """``detach_out_bias``: the output projection adds a detached bias (as FFN's)."""
        q, k, v = self.qkv(x)
        if cache is not None:
            k, v = cache.append(k, v)  # current scale attends to all cached scales: dense
        return self.project(self.attend(q, k, v, pattern), detach_out_bias)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, pattern: ScalePattern | None) -> Tensor:
        return attention(q, k, v, pattern, backend=self.attn_backend, scale=self.scale)

    def project(self, out: Tensor, detach_bias: bool = False) -> Tensor:
        """(B, H, L, D) attention output -> (B, L, C) after the output projection."""
        B, H, L, D = out.shape
        return _linear(self.proj, out.transpose(1, 2).reshape(B, L, H * D), detach_bias)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, C) -> q, k, v (B, H, L, D), q/k normalised where the model does."""
        B, L, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        fused = _qk_norm_kernel
        w = self.mat_qkv.weight
        H, D, gain = self.num_heads, self.head_dim, getattr(self, "scale_mul_1H11", None)
        if self.attn_l2_norm and fused is not None and fused.supports_projection(x, w, H, gain):
            # CUDA fp16 / bf16: one kernel each way (the same math; maskar.kernels.qk_norm). Its
            # backward also sums d qkv's columns, so the linear takes a detached bias and the
            # bias gradient comes from that launch instead of one more pass over d qkv.
            if not fused.BIAS_GRAD:
                return fused.qk_norm(F.linear(x, w, bias).view(B, L, 3, H, D), gain)
            qkv = F.linear(x, w, bias.detach()).view(B, L, 3, H, D)
            return fused.qk_norm(qkv, gain, bias)
        # (B, H, L, D) strided views of the fused projection, no copies.
        q, k, v = F.linear(x, w, bias).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_l2_norm:
            q, k = l2_norm_qk(q, k, self.scale_mul_1H11, v.dtype)
        return q, k, v


def _dynamic_rows_and_tokens(x: Tensor, *others: Tensor) -> None:
    """Mark the row and token dims of a compiled part's inputs dynamic from the first call on:
    a batch or scale size seen first would otherwise be specialised and cost a recompile at its
    first change, and the graphs of every block, scale and model in a process count against
    Dynamo's recompile limit of the one function they share (past it, calls run eagerly).
    Sizes of 1 stay specialised (Dynamo's rule)."""
    for t in (x, *others):
        if t.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    if x.shape[1] > 1:
        torch._dynamo.maybe_mark_dynamic(x, 1)


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
        self.checkpoint = False  # activation checkpointing (set by maskar.train.parallelize)
        self._compiled_parts: tuple | None = None  # compile_sampling_parts()
        _load_adaln_norm_kernel()

    def compile_sampling_parts(self, **compile_kwargs) -> None:
        """Sampling under ``torch.compile`` around the attention: the work before it (AdaLN,
        norm, modulate, qkv, q/k norm) and after it (projection, residuals, norm, FFN) each one
        compiled graph (dynamic shapes: every scale and chunk reuses it), the attention and the
        KV cache eager in between, so VAR's cache and HMAR's patterns need no tracing. Used
        in eval mode without autograd; outputs equal the eager block's to rounding. Two more
        parts serve :meth:`deferred_step`: the work before the attention with the previous
        block's pending FFN residual add in front, and the work after it without its own."""
        kw = {"dynamic": True, **compile_kwargs}
        self._compiled_parts = (
            torch.compile(self._pre_attention, **kw),
            torch.compile(self._post_attention, **kw),
            torch.compile(self._pre_attention_after, **kw),
            torch.compile(self._post_attention_deferred, **kw),
        )

    def deferred_step(
        self,
        carry: list,
        cond: Tensor,
        pattern: ScalePattern | None = None,
        cache: KVCache | None = None,
        defer: bool = False,
    ) -> None:
        """Compiled sampling (:meth:`compile_sampling_parts`): this block on ``carry = [x, pending]``,
        in place. ``pending`` is None or the previous block's FFN output and modulation, whose
        residual add this block makes in the graph of its own first LayerNorm; with ``defer``
        this block leaves its own add pending in turn (``NextScaleModel.run_blocks``).

        The carry is a list the step empties, so that no caller's reference keeps the block's
        input, the pending FFN output or q / k / v alive through the FFN, where the pass's memory
        peaks (each is a (rows, tokens, C) tensor, 134 MB at 1024 px B 8's last scale)."""
        pre, post, pre_after, post_deferred = self._compiled_parts
        x, pending = carry
        carry.clear()
        if pending is None:
            _dynamic_rows_and_tokens(x, cond)
            q, k, v, mod = pre(x, cond)
        else:
            _dynamic_rows_and_tokens(x, pending[0], cond, pending[1])
            x, q, k, v, mod = pre_after(x, *pending, cond)
            del pending
        if cache is not None:
            k, v = cache.append(k, v)
        out = self.attn.attend(q, k, v, pattern)
        del q, k, v
        _dynamic_rows_and_tokens(x, out, mod)
        if defer:
            x, f = post_deferred(x, out, mod)
            carry.extend((x, (f, mod)))
        else:
            carry.extend((post(x, out, mod), None))

    def _pre_attention(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mod = self._modulation(cond)
        _, _, scale1, _, shift1, _ = mod.unbind(2)
        q, k, v = self.attn.qkv(torch.addcmul(shift1, self.ln_wo_grad(x), 1 + scale1))
        return q, k, v, mod

    def _post_attention(self, x: Tensor, out: Tensor, mod: Tensor) -> Tensor:
        x, f = self._post_attention_deferred(x, out, mod)
        return self.finish(x, (f, mod))

    def _post_attention_deferred(self, x: Tensor, out: Tensor, mod: Tensor) -> tuple[Tensor, Tensor]:
        """The work after the attention up to the FFN's output, its residual add left pending."""
        gamma1, _, _, scale2, _, shift2 = mod.unbind(2)
        x = torch.addcmul(x, self.attn.project(out), gamma1)
        h = torch.addcmul(shift2, self.ln_wo_grad(x), 1 + scale2)
        return x, self.ffn(h)

    def _pre_attention_after(
        self, x: Tensor, f: Tensor, pending_mod: Tensor, cond: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The previous block's pending FFN residual add, then :meth:`_pre_attention`: in one
        graph, so Inductor makes the sum and this block's LayerNorm in one pass over x."""
        x = self.finish(x, (f, pending_mod))
        return (x, *self._pre_attention(x, cond))

    @staticmethod
    def finish(x: Tensor, pending: tuple[Tensor, Tensor]) -> Tensor:
        """The FFN residual add a deferring block left pending: x + f * gamma2."""
        f, mod = pending
        return torch.addcmul(x, f, mod[:, :, 1])

    def _modulation(self, cond: Tensor) -> Tensor:
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.dim)

    def forward(
        self, x: Tensor, cond: Tensor, pattern: ScalePattern | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """x (B, L, C); cond (B, D), or (B, 1, 6, C) from the shared projection when shared_aln."""
        if self._compiled_parts is not None and not self.training and not torch.is_grad_enabled():
            carry = [x, None]
            del x
            self.deferred_step(carry, cond, pattern, cache, defer=False)
            return carry[0]
        if self.checkpoint and self.training and torch.is_grad_enabled() and cache is None:
            # recompute this block's activations in the backward pass (train.activation_checkpointing)
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, cond, pattern, None, use_reentrant=False
            )
        return self._forward(x, cond, pattern, cache)

    def _forward(
        self, x: Tensor, cond: Tensor, pattern: ScalePattern | None, cache: KVCache | None
    ) -> Tensor:
        mod = self._modulation(cond)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        # Drop path folds into the (B, 1, C) gamma, so each residual update is one multiply-add
        # over (B, L, C): x + attn(h) * gamma1 * keep (the same product, fewer passes in eager).
        # Each branch draws its own per-sample mask, as two calls of the official drop_path do.
        keep1 = self.drop_path.keep_scale(x.shape[0], x.device)
        if keep1 is not None:
            gamma1 = gamma1 * keep1
            gamma2 = gamma2 * self.drop_path.keep_scale(x.shape[0], x.device)
        an = _adaln_norm_kernel
        if an is not None and cache is None and an.supports(x):
            # training on CUDA: each norm + modulate (the attention's residual add in front of the
            # second) one launch each way, the modulation's sums inside the backward launch
            # (maskar.kernels.adaln_norm); the same math
            eps = self.ln_wo_grad.eps
            h, x = an.adaln_norm(x, None, None, scale1, shift1, eps)
            if not an.SUMS:
                h, x = an.adaln_norm(x, self.attn(h, pattern), gamma1, scale2, shift2, eps)
                return torch.addcmul(x, self.ffn(h), gamma2)
            # MASKAR_ADALN_SUMS: the FFN residual's backward in one launch too, and the proj / fc2
            # bias gradients summed in the launches that make d o and d f (the linears add
            # detached biases), instead of three more passes over the fp32 stream's gradient
            o = self.attn(h, pattern, detach_out_bias=True)
            h, x = an.adaln_norm(x, o, gamma1, scale2, shift2, eps, _trained(self.attn.proj.bias))
            return an.gated_add(x, self.ffn(h, detach_out_bias=True), gamma2, _trained(self.ffn.fc2.bias))
        h = torch.addcmul(shift1, self.ln_wo_grad(x), 1 + scale1)
        x = torch.addcmul(x, self.attn(h, pattern, cache), gamma1)
        h = torch.addcmul(shift2, self.ln_wo_grad(x), 1 + scale2)
        return torch.addcmul(x, self.ffn(h), gamma2)


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN before the logits head: chunks (scale, shift)."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)
        return torch.addcmul(shift, self.ln_wo_grad(x), 1 + scale)
