"""CASMAR: cascaded masked autoregression with a scaffold stage and a local DiT head.

"Cascaded Masked Autoregression for Image Generation: Unified Salience Scheduling and Proximal
Self-Attention Synergy"; official code github.com/gcai98/CASMAR (release v1: PSA head; v2: SALA),
built on Hi-MAR and MAR (github.com/LTH14/mar). Read top to bottom:

1. Two latent grids from the same frozen KL VAE: the big grid (B, C, 16, 16) of the
   256 px image and the *scaffold* grid (B, C, 8, 8) of the image bicubic-downsampled to
   128 px (``cond_scale`` = 8). Both are raster token sequences (B, L, C).
2. One MAR-style encoder/decoder serves both stages. Per stage the sequence is
   ``[buffer | scaffold | big]``; each stage has its own rows of the position tables and
   of the per-position mask tokens, and a task id (0 = scaffold, 1 = refine) that
   modulates every block (scale-only adaLN from a shared ``*_blocks_ada`` layer).
3. Stage 1 (scaffold): scaffold tokens are masked by SAMS/AMR (salience-aware masking
   with an adaptive ratio), all big tokens are masked (dropped by the sparse encoder);
   the decoder output at the scaffold positions conditions MAR's per-token MLP
   diffusion head (:class:`maskar.nn.diffloss.DiffLoss`).
4. Stage 2 (refine): the scaffold positions are all visible and carry Pred-Cond
   features: ``cond_z_proj`` of the (detached) stage-1 decoder output where stage 1
   predicted the token, the learned placeholder ``cond_proj(cond_tokens)`` elsewhere
   (and, while training, for the whole scaffold of a random part of the batch). Big
   tokens are masked by SAMS/AMR; the decoder output at the big positions is a spatial
   condition for a DiT head over the whole 16 x 16 latent whose attention is Proximal
   Self-Attention (v1) or SALA (v2), trained with a masked eps-MSE (fixed variance)
   and sampled with 250 respaced steps and RePaint-style known-token replacement.
5. Sampling: stage 1 runs ``4 * cond_scale`` steps with guidance ``re_cfg``; stage 2
   runs ``num_iter`` steps with ``cfg``, each re-drawing every still-masked big token.

State-dict names match the official ``checkpoint-last.pth`` (``maskar.convert.casmar``);
the tokenizer is an extra ``tokenizer.*`` submodule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from maskar import env, registry
from maskar.config import field
from maskar.models.mar import (
    LoopSettings,
    MARConfig,
    MARSampleConfig,
    MaskedGenerator,
    MaskedLoop,
    _check_respacing,
    _gather_rows,
    cache_tokenizer_latents,
    cosine_mask_ratio,
    make_token_diffloss,
    truncated_normal_ratio,
)
from maskar.nn.diffloss import (
    DiffLoss,
    FinalLayer,
    TimestepEmbedder,
    init_adaln_zero,
    init_linears_xavier,
    modulate,
)
from maskar.nn.diffusion import GaussianDiffusion, create_diffusion
from maskar.nn.graphed_chain import GraphedHead
from maskar.nn.proximal_attention import ProximalAttention2D, ProximalSelfAttention, SALAAttention2D
from maskar.nn.sampling import SamplingTrace, make_generator
from maskar.nn.vit import Attention, Mlp
from maskar.tokenizers.klvae import KLVAE

try:  # the opt-in DiT block kernels (DiTBlock.modulate_kernel, residual_kernel) need Triton
    from maskar.kernels import adaln_modulate as _adaln_modulate
    from maskar.kernels import gated_residual as _gated_residual
except ImportError:
    _adaln_modulate = _gated_residual = None

# ----------------------------------------------------------------------------- configs


@dataclass
class CASMARConfig(MARConfig):
    arch: str = "casmar"
    cond_scale: int = field(8, min=2, help="scaffold grid side (official --cond_scale; 8 = latent of 128 px)")
    gdm_d: int = field(6, min=1, help="stage-2 DiT head depth (--gdm_d)")
    gdm_w: int = field(512, min=1, help="stage-2 DiT head width (--gdm_w)")
    gdm_heads: int = field(8, min=1, help="DiT head attention heads (--head)")
    gdm_mlp_ratio: float = field(4.0, min=0.0, help="DiT block MLP ratio (--ratio)")
    head_attention: str = field("psa", choices=("psa", "sala"), help="psa = release v1, sala = v2")
    psa_kernel: int = field(7, min=1, help="PSA window side (odd)")
    psa_dilation: int = field(1, min=1, help="PSA window dilation")
    refine_num_sampling_steps: int | str = field("250", help="DiT head respacing (hard-coded 250 officially)")
    refine_mask_ratio: str = field(
        "cosine", choices=("cosine", "truncnorm"), help="stage-2 training base mask ratio (--cos True/False)"
    )
    refine_mask_ratio_min: float = field(0.38, min=0.0, max=1.0, help="truncnorm lower end (--cos False)")
    mask_ratio_var: float = field(0.10, min=0.0, max=1.0, help="AMR: ratio moves within +- this")
    saliency_delta: float = field(0.5, min=0.0, max=1.0, help="AMR: saliency threshold")
    saliency_noise: float = field(0.5, min=0.0, help="SAMS: U(0, this) noise added to the saliency")
    pred_cond_rate: float = field(0.25, min=0.0, max=1.0, help="final share of Pred-Cond samples")
    pred_cond_warmup_steps: int = field(0, min=0, help="steps over which that share ramps up from 0")
    scaffold_loss_scale: float = field(2.0, min=0.0, help="stage-1 loss factor (then weighted by length)")
    refine_loss_scale: float = field(0.75, min=0.0, help="stage-2 loss factor (then weighted by length)")

    def validate(self) -> None:
        super().validate()
        if self.patch_size != 1:
            raise ValueError(
                f"casmar: patch_size must be 1 (scaffold tokens are single latents), got {self.patch_size}"
            )
        if self.psa_kernel % 2 == 0:
            raise ValueError(f"psa_kernel: expected an odd window side, got {self.psa_kernel}")
        if self.gdm_w % self.gdm_heads:
            raise ValueError(f"gdm_w {self.gdm_w} is not divisible by gdm_heads {self.gdm_heads}")
        if self.gdm_w % 4:
            raise ValueError(f"gdm_w {self.gdm_w}: the 2-D sincos position embedding needs a multiple of 4")
        _check_respacing("refine_num_sampling_steps", self.refine_num_sampling_steps)


@dataclass
class CASMARSampleConfig(MARSampleConfig):
    num_iter: int = field(4, min=1, help="stage-2 (refine) steps: 4 for B/L, 12 for H")
    cfg: float = field(1.0, help="stage-2 guidance scale (1 = off)")
    re_cfg: float = field(1.0, help="stage-1 (scaffold) guidance scale (official --re_cfg)")
    scaffold_num_iter: int = field(0, min=0, help="stage-1 steps; 0 = 4 x cond_scale (official, fixed)")
    num_sampling_steps: int | str = field("100", help="stage-1 MLP head diffusion steps")
    refine_num_sampling_steps: int | str = field("250", help="stage-2 DiT head diffusion steps")

    def validate(self) -> None:
        super().validate()
        _check_respacing("refine_num_sampling_steps", self.refine_num_sampling_steps)
        if self.re_cfg < 0:
            raise ValueError(f"re_cfg: expected a guidance scale >= 0 (1 = off), got {self.re_cfg}")


# ----------------------------------------------------------------------------- SAMS / AMR


def affinity_column_sums(x: Tensor) -> Tensor:
    """(N, L, D) features -> (N, L) float32: the attention mass each token receives under the
    parameter-free self-affinity softmax(x x^T) (rows softmaxed, no 1/sqrt(D)), summed over rows."""
    x = x.float()
    return torch.softmax(x @ x.transpose(1, 2), dim=-1).sum(1)


def saliency_scores(x: Tensor) -> Tensor:
    """(N, L, D) features -> (N, L) saliency in [0, 1].

    Saliency = attention mass a token receives under the parameter-free self-affinity
    softmax(x x^T) (no 1/sqrt(D)), min-max normalised per sample as the official code does:
    (s - min) / (max - min + 1e-6). The 1e-6 matters on low-contrast features: it moves the
    saliency by ~1e-4 there and so decides near-ties, i.e. which tokens are masked.
    """
    return _normalise(affinity_column_sums(x))


def _normalise(received: Tensor) -> Tensor:
    lo, hi = received.amin(1, keepdim=True), received.amax(1, keepdim=True)
    return (received - lo) / (hi - lo + 1e-6)


@dataclass
class SaliencyDetails:
    """Everything :func:`saliency_mask` computed (``return_details=True``); all per row (N, L)
    except ``ratio`` (the AMR mask ratio, one per batch) and the counts."""

    mask: Tensor  # bool, True = masked
    num_masked: int
    saliency: Tensor  # min-max normalised column sums
    column_sums: Tensor  # affinity_column_sums of the features
    ratio: float  # clip(base - var + 2 var * mean_frac(saliency > delta), 0, 1)
    len_keep: int  # tokens left visible per row (known ones included)
    uniform: Tensor  # the U(0, 1) draws of the noise term (noise * uniform)
    ids_shuffle: Tensor  # argsort(saliency + noise * uniform): the first len_keep stay visible
    ids_restore: Tensor  # argsort(ids_shuffle)


def saliency_mask(
    feats: Tensor,
    base_ratio: float,
    *,
    ratio_var: float = 0.10,
    delta: float = 0.5,
    noise: float = 0.5,
    known: Tensor | None = None,
    generator: torch.Generator | None = None,
    uniform: Tensor | None = None,
    return_details: bool = False,
) -> tuple[Tensor, int] | tuple[Tensor, int, SaliencyDetails]:
    """SAMS with AMR: (N, L) bool mask (True = masked) and the masked count (same every row).

    AMR: ratio = clip(base - var + 2 var * mean_fraction(saliency > delta), 0, 1), one ratio
    per batch so every row keeps the same number of tokens. SAMS: keep (leave visible) the
    lowest saliency + U(0, noise) tokens, mask the most salient. ``known`` (N, L) bool marks
    tokens that are always visible (editing); the ratio then applies to the others.
    ``uniform`` (N, L) replaces the U(0, 1) draws (the official ``torch.rand(N, L) / 2`` is
    ``noise=0.5`` times them); ``return_details=True`` adds a :class:`SaliencyDetails`.
    """
    n, length = feats.shape[:2]
    received = affinity_column_sums(feats)
    scores = _normalise(received)
    # One host read per call (the AMR ratio sets the masked count, a shape): on a GPU each read
    # waits for the queue to drain, and sampling calls this at every step.
    if known is None:
        free = torch.ones(n, length, dtype=torch.bool, device=feats.device)
        n_free0 = length
        salient_sum = float((scores > delta).sum(1).float().mean())
    else:
        free = ~known
        n_free = free.sum(1)
        same, n_free0, salient_sum = torch.stack(
            [
                (n_free == n_free[0]).all().float(),
                n_free[0].float(),
                ((scores > delta) & free).sum(1).float().mean(),
            ]
        ).tolist()  # float32 holds the counts exactly (L < 2^24), and the mean is the float32 value
        if not same:
            raise ValueError("saliency_mask: every row needs the same number of unknown tokens")
        n_free0 = int(n_free0)
    salient = salient_sum / max(n_free0, 1)
    ratio = min(1.0, max(0.0, base_ratio - ratio_var + 2.0 * ratio_var * salient))
    keep_free = int(n_free0 * (1.0 - ratio))
    if known is None:
        keep_free = max(1, keep_free)
    if uniform is None:
        uniform = torch.rand(n, length, generator=generator, device=feats.device)
    elif tuple(uniform.shape) != (n, length):
        raise ValueError(f"saliency_mask: uniform must be (N, L) = {(n, length)}, got {tuple(uniform.shape)}")
    order = torch.argsort((scores + noise * uniform).masked_fill(~free, -math.inf), dim=1)
    len_keep = length - n_free0 + keep_free
    mask = torch.ones(n, length, dtype=torch.bool, device=feats.device)
    mask = mask.scatter(1, order[:, :len_keep], False)
    if not return_details:
        return mask, length - len_keep
    details = SaliencyDetails(
        mask,
        length - len_keep,
        scores,
        received,
        ratio,
        len_keep,
        uniform,
        order,
        torch.argsort(order, dim=1),
    )
    return mask, length - len_keep, details


# ----------------------------------------------------------------------------- transformer block


class TaskBlock(nn.Module):
    """Hi-MAR's "scale-aware" ViT block: timm keys plus a per-task scale-only adaLN.

    ``mod = c * adaLN_scale[task] + adaLN_shift[task]`` with c the stack's shared
    projection of the task embedding; chunks (scale_msa, gate_msa, scale_mlp, gate_mlp).
    The shift starts at [0, 1, 0, 1], so at init the block is a plain pre-LN ViT block.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, proj_drop: float, attn_drop: float):
        super().__init__()
        self.adaLN_scale = nn.Parameter(torch.zeros(2, 1, 1, 4 * dim))
        self.adaLN_shift = nn.Parameter(torch.zeros(2, 1, 1, 4 * dim))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def reset_modulation(self) -> None:
        nn.init.zeros_(self.adaLN_scale)
        with torch.no_grad():
            self.adaLN_shift.copy_(_gate_pattern(self.adaLN_shift.shape[-1] // 4, self.adaLN_shift))

    def forward(
        self, x: Tensor, c: Tensor, task: int, pending: tuple[Tensor, Tensor] | None = None,
        defer: bool = False,
    ):  # fmt: skip
        """x (B, L, D); c (4D,) the stack's task projection. ``defer``: return (x, (gate, mlp
        output)) and leave the gated residual add to the next block (``pending``), as vit.Block."""
        if pending is not None:
            x = self.finish(x, pending)
        mod = c * self.adaLN_scale[task] + self.adaLN_shift[task]  # (1, 1, 4D)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.to(x.dtype).chunk(4, dim=-1)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa))
        h = self.mlp(self.norm2(x) * (1 + scale_mlp))
        return (x, (gate_mlp, h)) if defer else x + gate_mlp * h

    @staticmethod
    def finish(x: Tensor, pending: tuple[Tensor, Tensor]) -> Tensor:
        gate, h = pending
        return x + gate * h


def _gate_pattern(dim: int, like: Tensor) -> Tensor:
    """[0, 1, 0, 1] per chunk of ``dim``, broadcast to ``like``'s shape."""
    pat = torch.cat([torch.zeros(dim), torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    return pat.to(like.device, like.dtype).expand_as(like)


# ----------------------------------------------------------------------------- stage-2 DiT head


def sincos_2d(dim: int, h: int, w: int) -> Tensor:
    """(h*w, dim) DiT/MAE 2-D sin-cos embedding: first half encodes the column, second the row."""

    def one_axis(d: int, pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    return torch.cat([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], dim=1).float()


class PointwiseEmbed(nn.Module):
    """1x1 conv embedding (DiT's PatchEmbed with patch 1): (B, C, H, W) -> (B, H*W, W_out)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class LabelEmbedder(nn.Module):
    """Class embedding with a null row (index ``num_classes``) and training label drop (v2)."""

    def __init__(self, num_classes: int, width: int, drop_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.drop_prob = drop_prob
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, labels: Tensor) -> Tensor:
        labels = torch.where((labels < 0) | (labels >= self.num_classes), self.num_classes, labels)
        if self.training and self.drop_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.drop_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block with per-token modulation and local (PSA / SALA) attention."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, attention: str, kernel_size: int, dilation: int
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        if attention == "psa":
            self.attn: nn.Module = ProximalSelfAttention(width, heads, kernel_size, dilation)
        else:
            self.attn = SALAAttention2D(width, heads, kernel_size, dilation)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.mlp.act = nn.GELU(approximate="tanh")
        # the GELU in fc1's cuBLASLt epilogue in CUDA inference: CASMAR-B sampling 8.69 -> 9.11
        # images/s on an H200 (docs/benchmarks.md, *The DiT MLP's GELU, three ways*)
        self.mlp.gelu_epilogue = True
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    # Inference, opt-in (MASKAR_DIT_MODULATE=1): each half of the adaLN projection through
    # maskar.kernels.adaln_modulate, the LayerNorm modulation in the matmul's epilogue, so the
    # (rows, 6 W) projection is never written (only h and the gate, 2 W per row and half).
    modulate_kernel = bool(env.switch("MASKAR_DIT_MODULATE"))
    # With it, opt-in (MASKAR_DIT_RESIDUAL=1; PSA blocks): out_proj and fc2 through
    # maskar.kernels.gated_residual, the gated residual add and the next LayerNorm's statistics in
    # the matmul's epilogue, so neither matmul output is written and no pass re-reads the new x.
    residual_kernel = bool(env.switch("MASKAR_DIT_RESIDUAL"))
    # Inference, opt-in (MASKAR_DIT_LOW_RESIDUAL=1): the residual stream kept in the autocast
    # dtype instead of float32. The elementwise passes between the matmuls (gated residual add,
    # LayerNorm, modulation) read and write x; in bf16 that is 2 of their 9 bytes a feature
    # fewer, at one rounding of x per residual add.
    low_residual = bool(env.switch("MASKAR_DIT_LOW_RESIDUAL"))

    def forward(self, x: Tensor, c: Tensor, grid: tuple[int, int], cond_tokens: Tensor) -> Tensor:
        """x (B, L, W); c (B, L, W) per-token condition; cond_tokens (B, L, W) for SALA anchors."""
        if DiTBlock.modulate_kernel and _modulate_kernel_applies(x):
            return self.forward_kernels(x, c, grid, cond_tokens)[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, -1)
        h = _autocast_input(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_msa * self.attn(h, grid, cond_tokens)
        return x + gate_mlp * self.mlp(_autocast_input(modulate(self.norm2(x), shift_mlp, scale_mlp)))

    def forward_kernels(
        self,
        x: Tensor,
        c: Tensor,
        grid: tuple[int, int],
        cond_tokens: Tensor,
        stats: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """:meth:`forward` with each adaLN half and the modulation it feeds as one kernel (and,
        with ``residual_kernel``, out_proj and fc2 with their gated residual add as one each).
        ``stats``: the LayerNorm (mean, rstd) of x when known; returns the new x and, when the
        residual kernel ran, its rows' statistics (what the next block's first LayerNorm needs:
        every norm here has eps 1e-6)."""
        (b, n, w), dtype, lin = x.shape, _compute_dtype(x), self.adaLN_modulation[1]
        act = self.adaLN_modulation[0](c).to(dtype).reshape(b * n, w)
        weight, bias = lin.weight.to(dtype), lin.bias.to(dtype)
        x2 = x.reshape(b * n, w)
        op, ln = _adaln_modulate.adaln_modulate_op, _adaln_modulate.ln_stats
        h, gate = op(act, weight[: 3 * w], bias[: 3 * w], x2, *(stats or ln(x2, self.norm1.eps)))
        if not (DiTBlock.residual_kernel and _residual_kernel_applies(self, x)):
            x2 = x2 + gate * self.attn(h.view(b, n, w), grid, cond_tokens).reshape(b * n, w)
            h, gate = op(act, weight[3 * w :], bias[3 * w :], x2, *ln(x2, self.norm2.eps))
            return (x2 + gate * self.mlp(h)).view(b, n, w), None
        res, na, mlp = _gated_residual.gated_residual_stats_op, self.attn.na, self.mlp
        att = na.local(h.view(b, n, w), grid).reshape(b * n, w).to(dtype)
        x2, mean, rstd = res(
            att, na.out_proj.weight.to(dtype), na.out_proj.bias.to(dtype), x2, gate, self.norm2.eps
        )
        h, gate = op(act, weight[3 * w :], bias[3 * w :], x2, mean, rstd)
        hidden = mlp.hidden(h).to(dtype)
        x2, mean, rstd = res(
            hidden, mlp.fc2.weight.to(dtype), mlp.fc2.bias.to(dtype), x2, gate, self.norm1.eps
        )
        return x2.view(b, n, w), (mean, rstd)


def _modulate_kernel_applies(x: Tensor) -> bool:
    """Whether :meth:`DiTBlock._forward_modulate_kernel` can run: the kernel importable, no
    autograd, CUDA (or the Triton interpreter), an fp16 / bf16 compute dtype."""
    if _adaln_modulate is None or torch.is_grad_enabled():
        return False
    if _compute_dtype(x) not in (torch.float16, torch.bfloat16):
        return False
    return x.is_cuda or _adaln_modulate._INTERPRET


def _low_residual_applies(x: Tensor) -> bool:
    """Whether :attr:`DiTBlock.low_residual` casts the residual stream: switched on, no autograd,
    an fp16 / bf16 compute dtype (on any device: the CPU tests run it under bf16 autocast)."""
    return DiTBlock.low_residual and not torch.is_grad_enabled() and \
        _compute_dtype(x) in (torch.float16, torch.bfloat16)  # fmt: skip


def _residual_kernel_applies(block: DiTBlock, x: Tensor) -> bool:
    """Whether :meth:`DiTBlock.forward_kernels` can take out_proj and fc2 through the residual
    kernel: importable, PSA attention (its out_proj last), a float32 residual stream."""
    return _gated_residual is not None and isinstance(block.attn, ProximalSelfAttention) and \
        x.dtype == torch.float32  # fmt: skip


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear layer computes in for input ``x``: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _autocast_input(x: Tensor) -> Tensor:
    """x in autocast's low-precision dtype where autocast is on: what every linear layer reading
    x would cast it to, done once (PSA's q, k and v projections read the same input; the values
    are the same, so the block's output is too)."""
    return x.to(_compute_dtype(x))


class LocalDiT(nn.Module):
    """The stage-2 denoiser: x_t (B, C, H, W), t (B,), z (B, D, H, W) -> eps (B, C, H, W).

    c = t_emb + c_embedder(z) [+ c_pos_embed + y_emb in v2], token-wise adaLN.
    """

    def __init__(
        self,
        in_channels: int,
        z_channels: int,
        grid: tuple[int, int],
        depth: int,
        width: int,
        heads: int,
        mlp_ratio: float,
        attention: str,
        kernel_size: int,
        dilation: int,
        num_classes: int,
        label_drop_prob: float,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.grid = grid
        self.attention = attention
        self.grad_checkpointing = grad_checkpointing
        n = grid[0] * grid[1]
        # Fixed sincos tables: in the official state dict, never trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, n, width), requires_grad=False)
        self.c_pos_embed = nn.Parameter(torch.zeros(1, n, width), requires_grad=False)
        self.x_embedder = PointwiseEmbed(in_channels, width)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width, label_drop_prob) if attention == "sala" else None
        self.c_embedder = PointwiseEmbed(z_channels, width)
        self.blocks = nn.ModuleList(
            DiTBlock(width, heads, mlp_ratio, attention, kernel_size, dilation) for _ in range(depth)
        )
        self.final_layer = FinalLayer(width, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linears_xavier(self)
        with torch.no_grad():
            table = sincos_2d(self.pos_embed.shape[-1], *self.grid).to(self.pos_embed.device)[None]
            self.pos_embed.copy_(table)
            if self.attention == "sala":
                self.c_pos_embed.copy_(table)  # v2 adds it to the condition; zeros in v1
        for emb in (self.x_embedder, self.c_embedder):
            w = emb.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(emb.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        init_adaln_zero(self.t_embedder, self.blocks, self.final_layer)
        for block in self.blocks:
            if isinstance(block.attn, SALAAttention2D):
                block.attn.reset_gate()  # constant init: no RNG draws, order-free

    def embed_condition(self, z: Tensor) -> Tensor:
        """(B, D, H, W) decoder features -> condition tokens (B, L, W) (constant over diffusion steps)."""
        c = self.c_embedder(z)
        return c + self.c_pos_embed.to(c.dtype) if self.attention == "sala" else c

    def forward_embedded(self, x: Tensor, t: Tensor, cond_tokens: Tensor, labels: Tensor | None) -> Tensor:
        b, ch, h, w = x.shape
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (B, L, W)
        if _low_residual_applies(tokens):
            tokens = tokens.to(_compute_dtype(tokens))  # one rounding of the float32 sum
        extra = self.t_embedder(t)  # (B, W)
        if self.y_embedder is not None:
            if labels is None:
                raise ValueError("LocalDiT (sala): class labels are required")
            extra = extra + self.y_embedder(labels)
        c = cond_tokens + extra[:, None, :]  # (B, L, W)
        stats = None  # the kernel path's LayerNorm statistics of tokens, handed block to block
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, (h, w), cond_tokens, use_reentrant=False)
            elif DiTBlock.modulate_kernel and _modulate_kernel_applies(tokens):
                tokens, stats = block.forward_kernels(tokens, c, (h, w), cond_tokens, stats)
            else:
                tokens = block(tokens, c, (h, w), cond_tokens)
        out = self.final_layer(tokens, c)  # (B, L, C)
        return out.transpose(1, 2).reshape(b, ch, h, w)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None, z: Tensor) -> Tensor:
        """eps (B, C, H, W) for x_t (B, C, H, W), t (B,) model timesteps, labels y (B,) (read by
        SALA only; the null class is ``num_classes``; None for PSA) and decoder features z
        (B, D, H, W): the official ``DiT.forward(x, t, y, z)`` argument order."""
        return self.forward_embedded(x, t, self.embed_condition(z), y)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor | None, z: Tensor, cfg_scale: float) -> Tensor:
        """The official ``DiT.forward_with_cfg``: the batch is laid out [cond | uncond]; the first
        half of x runs with both halves of (y, z) and eps = uncond + s (cond - uncond) is
        returned for both halves."""
        return self.guided(x, t, self.embed_condition(z), y, cfg_scale)

    def guided(
        self, x: Tensor, t: Tensor, cond_tokens: Tensor, labels: Tensor | None, cfg_scale: float
    ) -> Tensor:
        """:meth:`forward_with_cfg` on embedded condition tokens (constant over diffusion steps);
        float32 (under autocast the guidance arithmetic stays in float32)."""
        half = x[: len(x) // 2]
        eps = self.forward_embedded(torch.cat([half, half]), t, cond_tokens, labels).float()
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)  # official order, in float32
        return torch.cat([guided, guided])


class GlobalDiffLoss(GraphedHead):
    """Stage-2 diffusion over the whole latent grid around :class:`LocalDiT`.

    Training: 1000-step cosine schedule, eps prediction, fixed-large variance, masked MSE
    (mean over C*H*W with unmasked positions zeroed, not renormalised). Sampling: respaced
    (250), RePaint-style replacement of known tokens, CFG on eps; on CUDA the whole chain of
    one call is replayed as a CUDA graph (``cuda_graph``, as MAR's head: same draws as eager).
    """

    bucket_rows = False  # one row count per sampling call (B or 2B): no padding

    def __init__(self, net: LocalDiT, num_sampling_steps: str | int = "250"):
        super().__init__()
        self.net = net
        self.num_sampling_steps = str(num_sampling_steps)
        self.train_diffusion = self._make_diffusion("")
        self._gen_cache: dict[str, GaussianDiffusion] = {}

    def _make_diffusion(self, respacing: str) -> GaussianDiffusion:
        return create_diffusion(respacing, learn_sigma=False)

    gen_diffusion = DiffLoss.gen_diffusion  # cached per respacing, via _make_diffusion

    def forward(self, target: Tensor, z: Tensor, mask: Tensor, labels: Tensor | None = None) -> Tensor:
        """target (N, C, H, W), z (N, D, H, W), mask (N, 1, H, W) 1 = counts -> scalar."""
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        cond = self.net.embed_condition(z)
        terms = self.train_diffusion.training_losses(
            lambda x, ts: self.net.forward_embedded(x, ts, cond, labels), target, t, mask=mask
        )
        return terms["loss"].mean()

    # -- sampling (GraphedHead: eager or CUDA-graph chain, opt-in compile of the step)

    def sample_shape(self, z: Tensor) -> tuple[int, ...]:
        return (self.net.in_channels, *z.shape[2:])

    def embed(self, z: Tensor) -> Tensor:
        return self.net.embed_condition(z)  # constant over the diffusion steps

    def step(self, x: Tensor, t: Tensor, cond: Tensor, labels: Tensor | None) -> Tensor:
        return self.net.forward_embedded(x, t, cond, labels)

    def graph_key(self) -> tuple:
        return (DiTBlock.modulate_kernel, DiTBlock.residual_kernel, ProximalAttention2D.fused_qkv,
                DiTBlock.low_residual)

    def step_cfg(
        self, x: Tensor, t: Tensor, cond: Tensor, labels: Tensor | None, scale: float | Tensor
    ) -> Tensor:
        return self.net.guided(x, t, cond, labels, scale)

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        temperature: float = 1.0,
        cfg: float = 1.0,
        *,
        labels: Tensor | None = None,
        num_sampling_steps: str | int | None = None,
        generator: torch.Generator | None = None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        paste_known: bool = False,
        noise: Tensor | None = None,
        cuda_graph: bool | None = None,
    ) -> Tensor:
        """Sample latents (N, C, H, W) for z (N, D, H, W); with cfg != 1, z / labels / known are
        laid out [cond | uncond] and both halves share the initial noise (use the first half).

        ``known`` / ``known_mask`` (N, 1, H, W) bool: RePaint; at known positions the result is
        the last step's mean as officially, or ``known`` itself with ``paste_known``.
        ``noise`` (N, C, H, W): the initial x_T instead of a draw (the official loop's
        ``noise=``; with CFG pass the same noise in both halves, as the sampler draws it); the
        per-step noise still comes from ``generator``.
        ``cuda_graph`` (None = the ``cuda_graph`` attribute) replays the chain as a CUDA graph
        where :meth:`graph_refusal` allows it."""
        return self.sample_chain(
            z,
            temperature,
            cfg,
            self.gen_diffusion(num_sampling_steps),
            generator,
            known=known,
            known_mask=known_mask,
            paste_known=paste_known,
            labels=labels,
            noise=noise,
            cuda_graph=cuda_graph,
        )


# ----------------------------------------------------------------------------- helpers


def _tokens(latent: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C) raster order."""
    return latent.flatten(2).transpose(1, 2)


def _grid(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


# ----------------------------------------------------------------------------- model


class CASMAR(MaskedGenerator):
    ddp_find_unused_parameters = True  # e.g. cond_z_proj gets no gradient while Pred-Cond is off

    def __init__(self, cfg: CASMARConfig, tokenizer: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        tok = tokenizer if tokenizer is not None else KLVAE(cfg.tokenizer)
        self.token_channels = int(tok.embed_dim)
        stride = int(tok.downsample)
        if cfg.img_size % stride:
            raise ValueError(
                f"model.img_size {cfg.img_size} is not divisible by the tokenizer stride {stride}"
            )
        self.seq_h = self.seq_w = cfg.img_size // stride
        self.seq_len = self.seq_h * self.seq_w  # big tokens (256)
        self.scaffold_side = cfg.cond_scale
        self.scaffold_len = cfg.cond_scale**2  # scaffold tokens (64)
        self.scaffold_image_size = cfg.cond_scale * stride  # 128 px
        if cfg.head_attention == "sala" and (self.seq_h % 2):
            raise ValueError(
                f"head_attention=sala pools 2x2 anchors: the {self.seq_h}x{self.seq_w} grid is odd"
            )
        self._set_common_attributes(cfg, tok)
        self.train_step = 0  # drives the Pred-Cond ramp (set by the trainer hooks)
        d_enc, d_dec = cfg.encoder_embed_dim, cfg.decoder_embed_dim
        n_tok = self.scaffold_len + self.seq_len  # 320 per stage
        n_pos = 2 * (cfg.buffer_size + n_tok)  # 768: stage 1 rows, then stage 2 rows

        def stack(dim: int, depth: int, heads: int) -> nn.ModuleList:
            return nn.ModuleList(
                TaskBlock(dim, heads, cfg.mlp_ratio, cfg.proj_dropout, cfg.attn_dropout) for _ in range(depth)
            )

        self.fake_latent = nn.Parameter(torch.zeros(1, d_enc))
        self.cond_tokens = nn.Parameter(torch.zeros(1, self.scaffold_len, self.token_channels))
        self.mask_token = nn.Parameter(torch.zeros(1, 2 * n_tok, d_dec))  # per position, per stage
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, d_enc))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, d_dec))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, n_tok, d_dec))  # shared by stages
        self.class_emb = nn.Embedding(cfg.class_num, d_enc)
        self.z_proj = nn.Linear(self.token_channels, d_enc)
        self.z_proj_ln = nn.LayerNorm(d_enc, eps=1e-6)
        self.cond_z_proj = nn.Linear(d_dec, d_enc)  # Pred-Cond: stage-1 decoder features
        self.cond_proj = nn.Linear(self.token_channels, d_enc)  # scaffold latents / placeholder
        self.encoder_blocks = stack(d_enc, cfg.encoder_depth, cfg.encoder_num_heads)
        self.encoder_task_emb = nn.Embedding(2, d_enc)
        self.encoder_blocks_ada = nn.Sequential(nn.SiLU(), nn.Linear(d_enc, 4 * d_enc))
        self.encoder_norm = nn.LayerNorm(d_enc, eps=1e-6)
        self.decoder_embed = nn.Linear(d_enc, d_dec)
        self.decoder_blocks = stack(d_dec, cfg.decoder_depth, cfg.decoder_num_heads)
        self.decoder_task_emb = nn.Embedding(2, d_dec)
        self.decoder_blocks_ada = nn.Sequential(nn.SiLU(), nn.Linear(d_dec, 4 * d_dec))
        self.decoder_norm = nn.LayerNorm(d_dec, eps=1e-6)
        self.initialize_weights()
        # heads (their own init) and the frozen tokenizer
        self.diffloss = make_token_diffloss(cfg, self.token_channels)
        self.cond_diffloss = GlobalDiffLoss(
            LocalDiT(
                in_channels=self.token_channels,
                z_channels=d_dec,
                grid=(self.seq_h, self.seq_w),
                depth=cfg.gdm_d,
                width=cfg.gdm_w,
                heads=cfg.gdm_heads,
                mlp_ratio=cfg.gdm_mlp_ratio,
                attention=cfg.head_attention,
                kernel_size=cfg.psa_kernel,
                dilation=cfg.psa_dilation,
                num_classes=cfg.class_num,
                label_drop_prob=cfg.label_drop_prob,
                grad_checkpointing=cfg.grad_checkpointing,
            ),
            num_sampling_steps=cfg.refine_num_sampling_steps,
        )
        self._set_tokenizer(tok)

    def initialize_weights(self) -> None:
        self._init_weights(
            (
                self.class_emb.weight,
                self.fake_latent,
                self.mask_token,
                self.cond_tokens,
                self.encoder_pos_embed_learned,
                self.decoder_pos_embed_learned,
                self.diffusion_pos_embed_learned,
                self.encoder_task_emb.weight,
                self.decoder_task_emb.weight,
            )
        )
        for blk in [*self.encoder_blocks, *self.decoder_blocks]:
            blk.reset_modulation()

    def on_train_start(self, step: int) -> None:
        self.train_step = step

    def on_train_step_end(self, step: int) -> dict[str, float]:
        self.train_step = step
        return {"pred_cond_prob": self.pred_cond_prob()}

    def pred_cond_prob(self) -> float:
        """Share of training samples whose stage 2 sees stage-1 features (ramps up to pred_cond_rate)."""
        warm = self.cfg.pred_cond_warmup_steps
        return self.cfg.pred_cond_rate * (min(1.0, self.train_step / warm) if warm > 0 else 1.0)

    # -- encoder / decoder (shared by both stages)

    def _run_stack(self, blocks: nn.ModuleList, task_emb: nn.Embedding, ada: nn.Module, x: Tensor, task: int):
        return self._run_blocks(blocks, x, ada(task_emb.weight[task]), task)  # c: (4D,)

    def _stage_rows(self, stage: int) -> slice:
        per = self.buffer_size + self.scaffold_len + self.seq_len
        return slice(stage * per, (stage + 1) * per)

    def forward_encoder(
        self,
        scaffold: Tensor,
        tokens: Tensor,
        mask: Tensor,
        class_emb: Tensor,
        stage: int,
        num_masked: int,
    ) -> tuple[Tensor, Tensor]:
        """scaffold (B, S, D) embedded scaffold part; tokens (B, N, C) big tokens; mask (B, S+N)
        bool with ``num_masked`` True per row; class_emb (B, D). Returns encoded visible tokens
        and their positions in [buffer | scaffold | big]."""
        b = tokens.shape[0]
        x_big = self.z_proj(tokens)  # (B, N, D)
        buf = self._buffer_tokens(class_emb, b, tokens.device, x_big.dtype)
        x = torch.cat([buf, scaffold.to(x_big.dtype).expand(b, -1, -1), x_big], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, self._stage_rows(stage)])
        keep = self._visible_positions(mask, num_masked)
        x = _gather_rows(x, keep)
        x = self._run_stack(self.encoder_blocks, self.encoder_task_emb, self.encoder_blocks_ada, x, stage)
        return self.encoder_norm(x), keep

    def forward_decoder(self, x: Tensor, keep: Tensor, stage: int) -> Tensor:
        """-> per-position conditions z (B, S+N, D_dec) (buffer removed, diffusion pos added)."""
        x = self.decoder_embed(x)
        b, _, d = x.shape
        n_tok = self.scaffold_len + self.seq_len
        tokens = self.mask_token[:, stage * n_tok : (stage + 1) * n_tok].to(x.dtype)
        full = torch.cat([tokens.new_zeros(1, self.buffer_size, d), tokens], dim=1).expand(b, -1, -1)
        x = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x)
        x = x + self.decoder_pos_embed_learned[:, self._stage_rows(stage)]
        x = self._run_stack(self.decoder_blocks, self.decoder_task_emb, self.decoder_blocks_ada, x, stage)
        return self._decoder_output(x)

    def refine_scaffold(self, small_z: Tensor, predicted: Tensor) -> Tensor:
        """Stage-2 scaffold part (B, S, D): cond_z_proj(small_z) where stage 1 predicted the
        token, the learned placeholder cond_proj(cond_tokens) elsewhere."""
        placeholder = self.cond_proj(self.cond_tokens)  # (1, S, D)
        return torch.where(predicted[..., None], self.cond_z_proj(small_z), placeholder)

    # -- training

    def scaffold_latents_from_batch(self, batch: dict[str, Tensor], flip: Tensor | None) -> Tensor:
        """Scaled scaffold latents (B, C, s, s): from cached ``small_moments`` or the image
        bicubic-downsampled to ``cond_scale * stride`` pixels."""
        with torch.no_grad():
            if "small_moments" in batch:
                moments = batch["small_moments"]
                if flip is not None and "small_moments_flip" in batch:
                    moments = torch.where(flip[:, None, None, None], batch["small_moments_flip"], moments)
            elif "image" in batch:
                size = self.scaffold_image_size
                small = F.interpolate(batch["image"].float(), size=(size, size), mode="bicubic")
                moments = self.tokenizer.encode_moments(small)
            else:
                raise KeyError(
                    f"CASMAR.loss: batch needs 'image' or 'small_moments', got keys {sorted(batch)}"
                )
            return self.tokenizer.sample_latent(moments.float())

    def _stage2_base_ratio(self) -> float:
        if self.cfg.refine_mask_ratio == "cosine":
            return math.cos(math.pi / 2.0 * float(torch.rand(())))
        return float(truncated_normal_ratio(1, self.cfg.refine_mask_ratio_min, self.cfg.mask_ratio_std)[0])

    def _sams(self, feats: Tensor, base: float, **kw: Any) -> tuple[Tensor, int]:
        c = self.cfg
        return saliency_mask(
            feats, base, ratio_var=c.mask_ratio_var, delta=c.saliency_delta, noise=c.saliency_noise, **kw
        )

    def forward_train(self, latent: Tensor, small_latent: Tensor, labels: Tensor) -> dict[str, Tensor]:
        big = _tokens(latent)  # (B, N, C)
        small = _tokens(small_latent)  # (B, S, C)
        b, n, _ = big.shape
        s = small.shape[1]
        if s != self.scaffold_len or n != self.seq_len:
            raise ValueError(
                f"CASMAR: latents give {s} scaffold / {n} big tokens, "
                f"expected {self.scaffold_len} / {self.seq_len}"
            )
        class_emb = self.class_embedding(labels)
        mul = self.diffusion_batch_mul

        # stage 1: scaffold tokens masked by SAMS on their (GT) embeddings, big tokens all masked
        scaffold_emb = self.cond_proj(small)  # (B, S, D)
        with torch.no_grad():
            base1 = float(truncated_normal_ratio(1, self.cfg.mask_ratio_min, self.cfg.mask_ratio_std)[0])
            mask1, masked1 = self._sams(scaffold_emb.detach(), base1)
        big_masked = torch.ones(b, n, dtype=torch.bool, device=big.device)
        x, keep = self.forward_encoder(
            scaffold_emb, big, torch.cat([mask1, big_masked], 1), class_emb, 0, masked1 + n
        )
        z1 = self.forward_decoder(x, keep, 0)  # (B, S+N, D)
        small_z = z1[:, :s]
        target1, cond1 = small[mask1], small_z[mask1]  # (B * masked1, C), (B * masked1, D)
        loss1 = self.diffloss(target1.repeat(mul, 1), cond1.repeat(mul, 1))

        # stage 2: scaffold visible with Pred-Cond features, big tokens masked by SAMS
        scaffold2 = self.refine_scaffold(small_z.detach(), mask1)
        use_pred = torch.rand(b, device=big.device) < self.pred_cond_prob()
        placeholder = self.cond_proj(self.cond_tokens).expand(b, -1, -1)
        scaffold2 = torch.where(use_pred[:, None, None], scaffold2, placeholder)
        with torch.no_grad():
            mask2, masked2 = self._sams(self.z_proj(big).detach(), self._stage2_base_ratio())
        scaffold_visible = torch.zeros(b, s, dtype=torch.bool, device=big.device)
        x, keep = self.forward_encoder(
            scaffold2, big, torch.cat([scaffold_visible, mask2], 1), class_emb, 1, masked2
        )
        z2 = self.forward_decoder(x, keep, 1)[:, s:]  # (B, N, D)
        z2 = _grid(z2, self.seq_h, self.seq_w)  # (B, D, h, w)
        loss_mask = mask2.float().reshape(b, 1, self.seq_h, self.seq_w)
        loss2 = self.cond_diffloss(
            latent.float().repeat(mul, 1, 1, 1),
            z2.repeat(mul, 1, 1, 1),
            loss_mask.repeat(mul, 1, 1, 1),
            labels.repeat(mul),
        )
        w1 = self.cfg.scaffold_loss_scale * s / (s + n)
        w2 = self.cfg.refine_loss_scale * n / (s + n)
        loss = w1 * loss1 + w2 * loss2
        return {
            "loss": loss,
            "loss_scaffold": loss1.detach(),
            "loss_refine": loss2.detach(),
            "mask_ratio_scaffold": torch.tensor(masked1 / s),
            "mask_ratio_refine": torch.tensor(masked2 / n),
        }

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        flip = None
        if "moments" in batch and "moments_flip" in batch:
            # one flip decision per sample for both grids (the official SmallCachedFolder)
            flip = torch.rand(batch["moments"].shape[0], device=batch["moments"].device) < 0.5
            batch = {
                **batch,
                "moments": torch.where(flip[:, None, None, None], batch["moments_flip"], batch["moments"]),
            }
            batch.pop("moments_flip")
        latent = self.latents_from_batch(batch)
        small_latent = self.scaffold_latents_from_batch(batch, flip)
        return self.forward_train(latent, small_latent, batch["label"].long())

    def forward(self, latent: Tensor, small_latent: Tensor, labels: Tensor) -> Tensor:
        return self.forward_train(latent, small_latent, labels)["loss"]

    # -- sampling

    @torch.no_grad()
    def sample_scaffold(
        self,
        labels: Tensor,
        *,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        **settings: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Stage 1. Returns scaffold tokens (B, S, C), the decoder features each token was
        sampled with (B, S, D) and which tokens were sampled (B, S) bool. ``settings``: the
        :class:`~maskar.models.mar.LoopSettings` keywords (``num_iter`` 32 by default, ``cfg``,
        ``cfg_schedule``, ``temperature``, ``num_sampling_steps``, ``generator``, ``trace``);
        ``known`` (B, S, C) / ``known_mask`` (B, S): given scaffold tokens. ``trace``, if given,
        receives one ``scaffold`` step per iteration: the tokens after it, ``mask`` = the
        positions drawn, ``info``: the input mask, the next mask, the guidance scale and the
        SAMS/AMR details of the next mask (:class:`SaliencyDetails`, None after the last step)."""
        s = LoopSettings(**{"num_iter": 32, **settings})
        loop = _ScaffoldLoop(self, labels, s, known, known_mask)
        self.run_masked_loop(loop, s, labels.shape[0])
        return loop.small, loop.small_z, loop.predicted

    @torch.no_grad()
    def sample_refine(
        self,
        labels: Tensor,
        small_z: Tensor,
        predicted: Tensor,
        **kw: Any,
    ) -> Tensor:
        """Stage 2 with Pred-Cond (the sampler's path). Returns big tokens (B, N, C).

        ``small_z`` (B, S, D) stage-1 decoder features, ``predicted`` (B, S) bool; the scaffold
        positions carry ``cond_z_proj(small_z)`` where predicted, the placeholder elsewhere.
        Keywords as :meth:`refine_from_scaffold_embedding`.
        """
        return self.refine_from_scaffold_embedding(labels, self.refine_scaffold(small_z, predicted), **kw)

    @torch.no_grad()
    def sample_refine_from_latents(self, labels: Tensor, scaffold_latents: Tensor, **kw: Any) -> Tensor:
        """Stage 2 conditioned on given scaffold latents (the official ``small_z=None`` branch:
        ``cond_proj`` of the ground-truth scaffold at every scaffold position, both CFG halves).

        ``scaffold_latents``: scaled latents (B, C, s, s) of the image bicubic-downsampled to
        ``cond_scale * stride`` px, or tokens (B, S, C). Keywords as
        :meth:`refine_from_scaffold_embedding`. Returns big tokens (B, N, C).
        """
        x = scaffold_latents
        if x.ndim == 4:
            x = _tokens(x)
        want = (labels.shape[0], self.scaffold_len, self.token_channels)
        if tuple(x.shape) != want:
            raise ValueError(
                f"scaffold_latents: expected tokens {want} (or a latent grid), got {tuple(x.shape)}"
            )
        return self.refine_from_scaffold_embedding(labels, self.cond_proj(x.float()), **kw)

    @torch.no_grad()
    def refine_from_scaffold_embedding(
        self,
        labels: Tensor,
        scaffold: Tensor,
        *,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        **settings: Any,
    ) -> Tensor:
        """Stage 2 from an embedded scaffold part ``scaffold`` (B, S, D_enc). Returns big tokens
        (B, N, C). ``settings``: the :class:`~maskar.models.mar.LoopSettings` keywords
        (``num_iter`` 4 by default); ``known`` (B, N, C) / ``known_mask`` (B, N): given big
        tokens. Every step re-draws all still-masked tokens with the DiT head (known = visible
        tokens, RePaint); SAMS picks the next mask. ``trace``, if given, receives one
        ``refine`` step per iteration: the tokens after it, ``mask`` = the positions re-drawn,
        ``info``: the next mask, the guidance scale and the SAMS/AMR details."""
        s = LoopSettings(**{"num_iter": 4, **settings})
        loop = _RefineLoop(self, labels, scaffold, s, known, known_mask)
        self.run_masked_loop(loop, s, labels.shape[0])
        return loop.tokens

    def _next_mask(
        self,
        z: Tensor,
        mask: Tensor,
        step: int,
        num_iter: int,
        known_mask: Tensor,
        generator: torch.Generator | None,
        trace: SamplingTrace | None = None,
    ) -> tuple[Tensor, int, SaliencyDetails | None]:
        """Mask after ``step`` and its masked count per row (known on the host: no GPU read):
        none after the last step, else SAMS/AMR on the conditional decoder features z (B, L, D)
        at the cosine base ratio, with its details (the saliency the scaffold's fallback reads)."""
        if step >= num_iter - 1:
            return torch.zeros_like(mask), 0, None
        base = cosine_mask_ratio(step, num_iter)
        mask_next, masked, details = self._sams(
            z, base, known=known_mask, generator=generator, return_details=True
        )
        return mask_next, masked, details

    def _check_sampling(self, cfg_schedule: str, num_iter: int, scaffold_num_iter: int) -> int:
        self._check_cfg_schedule_and_steps(cfg_schedule, num_iter)
        if scaffold_num_iter < 0:
            raise ValueError(
                f"scaffold_num_iter: expected >= 0 (0 = 4 x cond_scale), got {scaffold_num_iter}"
            )
        return scaffold_num_iter or 4 * self.cfg.cond_scale

    @torch.no_grad()
    def sample_tokens(
        self,
        labels: Tensor,
        *,
        num_iter: int = 4,
        cfg: float = 1.0,
        re_cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        num_sampling_steps: int | str | None = None,
        refine_num_sampling_steps: int | str | None = None,
        scaffold_num_iter: int = 0,
        generator: torch.Generator | None = None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        known_small: Tensor | None = None,
        known_small_mask: Tensor | None = None,
        trace: SamplingTrace | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Both stages: (big tokens (B, N, C), scaffold tokens (B, S, C)); ``trace`` gets the
        ``scaffold`` steps, then the ``refine`` steps."""
        steps1 = self._check_sampling(cfg_schedule, num_iter, scaffold_num_iter)
        small, small_z, predicted = self.sample_scaffold(
            labels,
            num_iter=steps1,
            cfg=re_cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            num_sampling_steps=num_sampling_steps,
            generator=generator,
            known=known_small,
            known_mask=known_small_mask,
            trace=trace,
        )
        big = self.sample_refine(
            labels,
            small_z,
            predicted,
            num_iter=num_iter,
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            num_sampling_steps=refine_num_sampling_steps,
            generator=generator,
            known=known,
            known_mask=known_mask,
            trace=trace,
        )
        return big, small

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        seed: int | None = 0,
        num_iter: int = 4,
        cfg: float = 1.0,
        re_cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        num_sampling_steps: int | str = "100",
        refine_num_sampling_steps: int | str = "250",
        scaffold_num_iter: int = 0,
        return_scaffold: bool = False,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        known_small: Tensor | None = None,
        known_small_mask: Tensor | None = None,
        return_trace: bool = False,
        compile: bool | str = "auto",
    ) -> Tensor | tuple:
        """Images (B, C, H, W) in [-1, 1]; label == class_num is unconditional.

        ``return_scaffold`` adds the decoded scaffold images (``cond_scale * stride`` px) and
        ``return_trace`` a :class:`~maskar.nn.sampling.SamplingTrace` (see
        :meth:`sample_scaffold`, :meth:`refine_from_scaffold_embedding`), in that order after
        the images. ``known`` (B, N, C) / ``known_mask`` (B, N) and ``known_small`` (B, S, C) /
        ``known_small_mask`` (B, S): given big / scaffold tokens (scaled latents); rows with
        different unknown counts run as separate groups, as in :meth:`edit`. ``compile``:
        :meth:`compile_sampler` first (once).
        """
        self._compile_once(compile)
        g = make_generator(seed, labels.device)
        trace = SamplingTrace() if return_trace else None
        kw = dict(
            num_iter=num_iter,
            cfg=cfg,
            re_cfg=re_cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            num_sampling_steps=num_sampling_steps,
            refine_num_sampling_steps=refine_num_sampling_steps,
            scaffold_num_iter=scaffold_num_iter,
        )
        if known is None and known_small is None:
            if known_mask is not None or known_small_mask is not None:
                raise ValueError("generate: a known mask needs its known tokens")
            big, small = self.sample_tokens(labels, generator=g, trace=trace, **kw)
        else:
            b = labels.shape[0]
            known, known_mask = self._given(known, known_mask, b, self.seq_len, "known / known_mask")
            known_small, known_small_mask = self._given(
                known_small, known_small_mask, b, self.scaffold_len, "known_small / known_small_mask"
            )
            big, small = self._sample_known(
                labels, known, known_mask, known_small, known_small_mask, g, trace, kw
            )
        out = [self.tokenizer.decode(_grid(big, self.seq_h, self.seq_w))]
        if return_scaffold:
            side = self.scaffold_side
            out.append(self.tokenizer.decode(_grid(small, side, side)))
        if return_trace:
            out.append(trace)
        return out[0] if len(out) == 1 else tuple(out)

    def _given(
        self, tokens: Tensor | None, mask: Tensor | None, b: int, n: int, what: str
    ) -> tuple[Tensor, Tensor]:
        """Given tokens and their mask, checked; none given = nothing known (zeros, all False)."""
        if (tokens is None) != (mask is None):
            raise ValueError(f"{what}: pass both or neither")
        if tokens is None:
            device = self.fake_latent.device
            return torch.zeros(b, n, self.token_channels, device=device), torch.zeros(
                b, n, dtype=torch.bool, device=device
            )
        self._check_known_tokens(tokens, mask, b, n, what)
        return tokens.float(), mask

    def _sample_known(
        self,
        labels: Tensor,
        known: Tensor,
        known_mask: Tensor,
        known_small: Tensor,
        known_small_mask: Tensor,
        generator: torch.Generator | None,
        trace: SamplingTrace | None,
        kw: dict[str, Any],
    ) -> tuple[Tensor, Tensor]:
        big, small = known.clone(), known_small.clone()

        def rows_fn(rows: Tensor, sub: SamplingTrace | None) -> tuple[Tensor, Tensor]:
            return self.sample_tokens(
                labels[rows],
                generator=generator,
                known=known[rows],
                known_mask=known_mask[rows],
                known_small=known_small[rows],
                known_small_mask=known_small_mask[rows],
                trace=sub,
                **kw,
            )

        for rows, (b_rows, s_rows) in self._per_group((known_mask, known_small_mask), trace, rows_fn):
            big[rows], small[rows] = b_rows, s_rows
        return big, small

    def scaffold_keep_mask(self, keep_mask: Tensor) -> Tensor:
        """(B, 1, H, W) bool -> (B, S) bool: scaffold token known iff all its pixels are kept."""
        k = self.image_size // self.scaffold_side
        return (F.avg_pool2d(keep_mask.float(), kernel_size=k, stride=k) >= 1.0).flatten(1)

    @torch.no_grad()
    def edit(
        self,
        images: Tensor,
        keep_mask: Tensor,
        labels: Tensor,
        seed: int | None = 0,
        num_iter: int = 4,
        cfg: float = 1.0,
        re_cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        num_sampling_steps: int | str = "100",
        refine_num_sampling_steps: int | str = "250",
        scaffold_num_iter: int = 0,
        return_tokens: bool = False,
        compile: bool | str = "auto",
    ) -> Tensor:
        """In-/out-painting: scaffold and big tokens fully inside ``keep_mask`` stay fixed
        (scaffold from the downsampled image); the rest are generated by both stages."""
        if not bool(torch.isfinite(images).all()) or float(images.abs().max()) > 1.0 + 1e-4:
            raise ValueError("edit: images must be finite and in [-1, 1]")
        self._compile_once(compile)
        keep_mask = keep_mask.to(images.device)
        known = _tokens(self.tokenizer.encode_mean(images).float())  # (B, N, C)
        size = self.scaffold_image_size
        small_img = F.interpolate(images.float(), size=(size, size), mode="bicubic")
        known_small = _tokens(self.tokenizer.encode_mean(small_img).float())  # (B, S, C)
        known_mask = self.token_keep_mask(keep_mask)
        known_small_mask = self.scaffold_keep_mask(keep_mask)
        g = make_generator(seed, images.device)
        kw = dict(
            num_iter=num_iter,
            cfg=cfg,
            re_cfg=re_cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            num_sampling_steps=num_sampling_steps,
            refine_num_sampling_steps=refine_num_sampling_steps,
            scaffold_num_iter=scaffold_num_iter,
        )
        out, _ = self._sample_known(labels, known, known_mask, known_small, known_small_mask, g, None, kw)
        if return_tokens:
            return out
        return self.tokenizer.decode(_grid(out, self.seq_h, self.seq_w))


# ----------------------------------------------------------------------------- the two sampling loops


class _SamsLoop(MaskedLoop):
    """What both CASMAR stages share: the masked count per sample kept on the host. SAMS returns
    the next mask's count with the mask, so no step reads it back from the GPU; only given tokens
    (editing) make the first step read it."""

    mask: Tensor
    masked: int | None  # tokens masked per sample now; None: not known on the host yet
    mask_next: Tensor
    masked_next: int

    def num_masked(self) -> int:
        if self.masked is None:
            self.masked = int(self.mask[0].sum())
        return self.masked

    def advance(self) -> None:
        self.mask, self.masked = self.mask_next, self.masked_next


class _ScaffoldLoop(_SamsLoop):
    """Stage 1: the scaffold tokens (big tokens all masked), next mask by SAMS/AMR on the
    decoder features; the MLP head draws the tokens masked now and visible next (or, for a
    sample that would draw none, its most salient masked token: the official fallback)."""

    name = "scaffold"

    def __init__(
        self, model: CASMAR, labels: Tensor, s: LoopSettings, known: Tensor | None, known_mask: Tensor | None
    ):
        b, n_s, device = labels.shape[0], model.scaffold_len, labels.device
        self.model, self.s, self.b, self.length = model, s, b, n_s
        self.small, self.known_mask = model._start_tokens(b, n_s, known, known_mask, device)  # (B, S, C)
        self.small_z = torch.zeros(b, n_s, model.cfg.decoder_embed_dim, device=device)  # (B, S, D)
        self.mask = ~self.known_mask
        self.predicted = torch.zeros_like(self.mask)
        self.big = torch.zeros(b, model.seq_len, model.token_channels, device=device)  # never visible here
        self.big_masked = torch.ones(b, model.seq_len, dtype=torch.bool, device=device)
        self.class_emb = model._class_emb_cfg(labels, s.cfg)
        self.masked = n_s if known_mask is None else None  # all masked unless tokens are given

    def transformer_pass(self) -> Tensor:
        m, s = self.model, self.s
        full_mask = torch.cat([self.mask, self.big_masked], 1)
        scaffold = m.cond_proj(self.small)
        x, keep = m.forward_encoder(
            s.halves(scaffold),
            s.halves(self.big),
            s.halves(full_mask),
            self.class_emb,
            0,
            self.masked + m.seq_len,
        )
        return m.forward_decoder(x, keep, 0)[:, : self.length]  # (B or 2B, S, D)

    def plan(self, z: Tensor, step: int) -> int:
        mask, s = self.mask, self.s
        self.mask_next, self.masked_next, self.sams = self.model._next_mask(
            z, mask, step, s.num_iter, self.known_mask, s.generator, s.trace
        )
        to_pred = mask & ~self.mask_next
        if self.sams is not None:
            # The official fallback: a sample that would draw nothing predicts its most salient
            # still-masked token. Applied on the GPU (a no-op where no row is stuck) rather than
            # after reading whether any row is; the saliency is SAMS's own, of the same z.
            # After the last step nothing stays masked, so no row is stuck there.
            stuck = mask.any(1) & ~to_pred.any(1)
            scores = self.sams.saliency.masked_fill(~mask, -math.inf)
            # one_hot would read the indices' range back: compare with the positions instead
            pick = torch.arange(self.length, device=mask.device) == scores.argmax(1, keepdim=True)
            to_pred = to_pred | (pick & stuck[:, None])
        self.to_pred = to_pred
        return self.length - self.masked_next

    def draw(self, z: Tensor, cfg_scale: float) -> None:
        b, s, to_pred = self.b, self.s, self.to_pred
        # The drawn positions as flat indices in row-major order, what boolean indexing would
        # select, from one read of their count (boolean indexing reads it once per use).
        count = int(to_pred.sum())
        flat = torch.sort((~to_pred).flatten().to(torch.uint8), stable=True).indices[:count]
        rows, cols = flat // self.length, flat % self.length
        z_cond = z[rows, cols]  # (K, D)
        z_sel = torch.cat([z_cond, z[rows + b, cols]]) if s.guided else z_cond
        new = self.model.diffloss.sample(
            z_sel, s.temperature, cfg_scale, num_sampling_steps=s.num_sampling_steps, generator=s.generator
        )
        self.small[rows, cols] = new[:count].float()
        self.small_z[rows, cols] = z_cond.float()
        self.predicted |= to_pred

    def record(self, trace: SamplingTrace, step: int, cfg_scale: float) -> None:
        trace.add(
            "scaffold", step, self.small.clone(), self.to_pred,
            input_mask=self.mask, next_mask=self.mask_next, cfg=cfg_scale, sams=self.sams,
        )  # fmt: skip


class _RefineLoop(_SamsLoop):
    """Stage 2: the big tokens after the (visible, Pred-Cond) scaffold part, next mask by
    SAMS/AMR; every step the DiT head re-draws all still-masked tokens over the whole grid,
    the visible ones entering as RePaint's known tokens."""

    name = "refine"

    def __init__(
        self,
        model: CASMAR,
        labels: Tensor,
        scaffold: Tensor,
        s: LoopSettings,
        known: Tensor | None,
        known_mask: Tensor | None,
    ):
        b, n, device = labels.shape[0], model.seq_len, labels.device
        self.model, self.s, self.b, self.length = model, s, b, n
        self.tokens, self.known_mask = model._start_tokens(b, n, known, known_mask, device)  # (B, N, C)
        self.mask = ~self.known_mask
        self.scaffold_mask = torch.zeros(b, model.scaffold_len, dtype=torch.bool, device=device)
        self.class_emb = model._class_emb_cfg(labels, s.cfg)
        # the unconditional half sees the conditional half's scaffold features; its DiT label
        # is the null class (read by SALA only)
        self.scaffold = s.halves(scaffold)
        null = torch.full_like(labels, model.num_classes)
        self.head_labels = torch.cat([labels, null]) if s.guided else labels
        self.masked = n if known_mask is None else None  # all masked unless tokens are given

    def transformer_pass(self) -> Tensor:
        m, s = self.model, self.s
        full_mask = torch.cat([self.scaffold_mask, self.mask], 1)
        x, keep = m.forward_encoder(
            self.scaffold, s.halves(self.tokens), s.halves(full_mask), self.class_emb, 1, self.masked
        )
        return m.forward_decoder(x, keep, 1)[:, m.scaffold_len :]  # (B or 2B, N, D)

    def plan(self, z: Tensor, step: int) -> int:
        s = self.s
        self.mask_next, self.masked_next, self.sams = self.model._next_mask(
            z, self.mask, step, s.num_iter, self.known_mask, s.generator, s.trace
        )
        return self.length - self.masked_next

    def draw(self, z: Tensor, cfg_scale: float) -> None:
        m, s = self.model, self.s
        h, w = m.seq_h, m.seq_w
        visible = _grid((~self.mask).float()[..., None], h, w).bool()  # (B, 1, h, w)
        new = m.cond_diffloss.sample(
            _grid(z, h, w),
            s.temperature,
            cfg_scale,
            labels=self.head_labels,
            num_sampling_steps=s.num_sampling_steps,
            generator=s.generator,
            known=s.halves(_grid(self.tokens, h, w)),
            known_mask=s.halves(visible),
        )
        self.tokens = torch.where(self.mask[..., None], _tokens(new[: self.b]).float(), self.tokens)

    def record(self, trace: SamplingTrace, step: int, cfg_scale: float) -> None:
        trace.add(
            "refine", step, self.tokens, self.mask, next_mask=self.mask_next, cfg=cfg_scale, sams=self.sams
        )


# ----------------------------------------------------------------------------- latent cache


def cache_latents_for(
    cfg: CASMARConfig,
    dataset: Any,
    out_dir: str,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Cache posterior moments of every image (``moments``) and of its bicubic downsample to
    ``cond_scale * stride`` px (``small_moments``), each also mirrored (``*_flip``)."""

    def make_encode(tok: nn.Module) -> Callable[[Tensor], dict[str, Tensor]]:
        size = cfg.cond_scale * int(tok.downsample)

        def encode(images: Tensor) -> dict[str, Tensor]:
            small = F.interpolate(images.float(), size=(size, size), mode="bicubic")
            return {"moments": tok.encode_moments(images), "small_moments": tok.encode_moments(small)}

        return encode

    return cache_tokenizer_latents(cfg, "casmar", make_encode, dataset, out_dir, batch_size, device, **kwargs)


registry.register(
    "casmar",
    kind="generator",
    config_cls=CASMARConfig,
    sample_cls=CASMARSampleConfig,
    build=CASMAR.from_config,
    description="CASMAR: scaffold-then-refine masked autoregression with a local-attention DiT head",
)
