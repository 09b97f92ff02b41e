"""MAR: autoregressive image generation without vector quantization (Li et al., 2024).

Read top to bottom:

1. A frozen KL VAE turns an image into a continuous latent grid (B, C, h, w),
   scaled by 0.2325; ``patchify`` makes it a raster sequence of tokens (B, L, C).
2. Training masks a random subset of tokens per sample (one ratio per batch from a
   truncated normal in [0.7, 1]). A fully sparse MAE encoder sees only the 64
   buffer tokens (all holding the class embedding, or the learned ``fake_latent``
   when the label is dropped) and the visible tokens; the decoder re-inserts a
   mask token everywhere else and adds a diffusion position embedding.
3. For each masked token, the decoder output z conditions a small MLP denoiser
   (:class:`maskar.nn.diffloss.DiffLoss`) trained with a diffusion loss.
4. Sampling starts fully masked and reveals tokens in a per-sample random order
   over ``num_iter`` steps; the number still masked after step s follows
   cos(pi/2 (s+1)/num_iter). Each revealed token is drawn by the diffusion head,
   with classifier-free guidance on eps (uncond = ``fake_latent``).

State-dict names match the official ``checkpoint-last.pth`` (see ``maskar.convert.mar``);
the tokenizer is an extra ``tokenizer.*`` submodule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from maskar import registry
from maskar.config import ModelConfig, SampleConfig, field
from maskar.nn.diffloss import DiffLoss
from maskar.nn.diffusion import space_timesteps
from maskar.nn.graphed_chain import GraphedHead
from maskar.nn.inference import cast_linears_, refuse_training_if_cast
from maskar.nn.sampling import SamplingTrace, make_generator
from maskar.nn.vit import Block
from maskar.tokenizers.klvae import KLVAE, KLVAEConfig

# ----------------------------------------------------------------------------- configs


@dataclass
class MARConfig(ModelConfig):
    arch: str = "mar"
    img_size: int = field(256, min=1, help="image side length in pixels")
    patch_size: int = field(1, min=1, help="latent patch size (tokens are p x p latent pixels)")
    class_num: int = field(1000, min=1, help="number of classes (no null row: uncond uses fake_latent)")
    encoder_embed_dim: int = field(768, min=1)
    encoder_depth: int = field(12, min=1)
    encoder_num_heads: int = field(12, min=1)
    decoder_embed_dim: int = field(768, min=1)
    decoder_depth: int = field(12, min=1)
    decoder_num_heads: int = field(12, min=1)
    mlp_ratio: float = field(4.0, min=0.0)
    attn_dropout: float = field(0.1, min=0.0, max=1.0)
    proj_dropout: float = field(0.1, min=0.0, max=1.0)
    buffer_size: int = field(64, min=0, help="buffer tokens holding the class embedding")
    label_drop_prob: float = field(0.1, min=0.0, max=1.0, help="training label drop (for CFG)")
    mask_ratio_min: float = field(0.7, min=0.0, max=1.0, help="lower end of the truncated-normal mask ratio")
    mask_ratio_std: float = field(0.25, min=0.0, help="std of the truncated normal centred at 1")
    diffloss_d: int = field(6, min=1, help="diffusion MLP depth")
    diffloss_w: int = field(1024, min=1, help="diffusion MLP width")
    num_sampling_steps: int | str = field("100", help="default respacing of the sampling diffusion")
    diffusion_batch_mul: int = field(4, min=1, help="independent (t, noise) draws per token in training")
    grad_checkpointing: bool = field(False)
    tokenizer: KLVAEConfig = field(default_factory=KLVAEConfig)
    tokenizer_ckpt: str | None = field(
        None, help="maskar tokenizer dir or official kl16.ckpt, loaded at init"
    )

    def validate(self) -> None:
        for name in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if dim % heads:
                raise ValueError(f"{name}_embed_dim {dim} is not divisible by {name}_num_heads {heads}")
        if self.mask_ratio_std == 0 or self.mask_ratio_min >= 1.0:
            raise ValueError("mask_ratio_min must be < 1 and mask_ratio_std > 0")
        _check_respacing("num_sampling_steps", self.num_sampling_steps)


@dataclass
class MARSampleConfig(SampleConfig):
    num_iter: int = field(64, min=1, help="autoregressive steps (256 in the paper's evaluation)")
    cfg: float = field(1.0, help="classifier-free guidance scale (1 = off)")
    cfg_schedule: str = field("linear", choices=("linear", "constant"))
    temperature: float = field(1.0, min=0.0, help="multiplies the diffusion noise std")
    num_sampling_steps: int | str = field("100", help="diffusion steps: N, 'N1,N2,..' or 'ddimN' (of 1000)")
    compile: bool | str = field(
        "auto",
        choices=("auto", True, False),
        help="torch.compile the transformer blocks and the diffusion heads' steps (the first call "
        "compiles, ~30 s; output equal to eager to rounding); auto = true on CUDA",
    )

    def validate(self) -> None:
        _check_respacing("num_sampling_steps", self.num_sampling_steps)
        if self.cfg < 0:  # a negative scale pushes away from the class: black images, no error
            raise ValueError(f"cfg: expected a guidance scale >= 0 (1 = off), got {self.cfg}")


@dataclass
class MARGraphSampleConfig(MARSampleConfig):
    """MAR's registered sample config: :class:`MARSampleConfig` plus the CUDA-graph switch.

    A subclass, so that CASMAR's sample config (which extends ``MARSampleConfig``) does not
    inherit a keyword its ``generate`` does not take.
    """

    cuda_graph: bool = field(
        True, help="replay the diffusion head's sampling chain as CUDA graphs (GPU only; same draws)"
    )


def _check_respacing(name: str, value: int | str) -> None:
    try:
        space_timesteps(1000, str(value))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


# ----------------------------------------------------------------------------- helpers


def truncated_normal_ratio(
    n: int, low: float, std: float, generator: torch.Generator | None = None
) -> Tensor:
    """(n,) draws of N(1, std) truncated to [low, 1] by inverse-CDF sampling (float64)."""
    a = torch.tensor((low - 1.0) / std, dtype=torch.float64)
    cdf_a, cdf_b = torch.special.ndtr(a), torch.tensor(0.5, dtype=torch.float64)
    u = cdf_a + (cdf_b - cdf_a) * torch.rand(n, dtype=torch.float64, generator=generator)
    return (1.0 + std * torch.special.ndtri(u)).clamp(low, 1.0)


def mask_from_order(orders: Tensor, num_masked: int) -> Tensor:
    """(B, L) bool: the first ``num_masked`` positions of each sample's order are masked."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :num_masked], True)


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, L, D), idx (B, k) -> (B, k, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------- shared base


def make_token_diffloss(cfg: MARConfig, token_channels: int) -> DiffLoss:
    """MAR's per-token MLP diffusion head for ``cfg`` (CASMAR's stage-1 head is the same)."""
    return DiffLoss(
        target_channels=token_channels,
        z_channels=cfg.decoder_embed_dim,
        depth=cfg.diffloss_d,
        width=cfg.diffloss_w,
        num_sampling_steps=cfg.num_sampling_steps,
        grad_checkpointing=cfg.grad_checkpointing,
    )


def cosine_mask_ratio(step: int, num_iter: int) -> float:
    """Share of tokens still masked after sampling step ``step`` of ``num_iter``."""
    return math.cos(math.pi / 2.0 * (step + 1) / num_iter)


# ----------------------------------------------------------------------------- the masked-generation loop


@dataclass
class LoopSettings:
    """What a caller fixes for one masked-generation loop (MAR's, or one CASMAR stage)."""

    num_iter: int
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    num_sampling_steps: int | str | None = None
    generator: torch.Generator | None = None
    trace: SamplingTrace | None = None

    @property
    def guided(self) -> bool:
        return self.cfg != 1.0

    def halves(self, t: Tensor) -> Tensor:
        """``t`` (B, ...) for the encoder's rows: [cond | uncond] copies under CFG, else itself."""
        return torch.cat([t, t]) if self.guided else t


class MaskedLoop:
    """One masked-generation loop's specifics: the state it carries from step to step and the
    four things :meth:`MaskedGenerator.run_masked_loop` asks of it at every step. ``name``
    labels its trace steps; ``length`` is the number of positions it generates (the total of
    the linear CFG schedule)."""

    name: str
    length: int

    def num_masked(self) -> int:
        """Tokens still masked per sample at the start of the step (the same in every row)."""
        raise NotImplementedError

    def transformer_pass(self) -> Tensor:
        """Decoder features (B, or 2B = [cond | uncond] with CFG, length, D) of the positions."""
        raise NotImplementedError

    def plan(self, z: Tensor, step: int) -> int:
        """Choose the next mask (from the conditional features z (B, length, D)); return the
        number of tokens visible after the step, which sets the step's guidance."""
        raise NotImplementedError

    def draw(self, z: Tensor, cfg_scale: float) -> None:
        """Draw this step's tokens with the diffusion head and write them."""
        raise NotImplementedError

    def record(self, trace: SamplingTrace, step: int, cfg_scale: float) -> None:
        raise NotImplementedError

    def advance(self) -> None:
        """The next mask becomes the current one."""
        raise NotImplementedError


class MaskedGenerator(nn.Module):
    """What MAR and CASMAR share: the frozen KL tokenizer, the class / ``fake_latent``
    buffer tokens, the fully sparse encoder's visible-token selection, weight init and the
    sampling-loop arithmetic. Subclasses own their parameters (registration order = the
    official state-dict order) and call the ``_set_*`` / ``_init_*`` helpers from ``__init__``.
    """

    cfg: MARConfig
    tokenizer: nn.Module

    def _set_common_attributes(self, cfg: MARConfig, tok: nn.Module) -> None:
        self.image_size = cfg.img_size
        self.image_channels = int(getattr(tok, "image_channels", 3))
        self.num_classes = cfg.class_num
        self.buffer_size = cfg.buffer_size
        self.label_drop_prob = cfg.label_drop_prob
        self.diffusion_batch_mul = cfg.diffusion_batch_mul
        self.grad_checkpointing = cfg.grad_checkpointing

    def _set_tokenizer(self, tok: nn.Module) -> None:
        self.tokenizer = tok
        self.tokenizer.requires_grad_(False)
        self.tokenizer.eval()

    def _init_weights(self, normal_params: tuple[Tensor, ...]) -> None:
        """N(0, 0.02) for ``normal_params`` (in this order: it fixes the RNG draws), xavier
        Linear weights with zero biases, unit / zero LayerNorm affines."""
        for p in normal_params:
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg: MARConfig) -> MaskedGenerator:
        return cls(cfg)

    def cast_linears_(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Inference only: the generator's linears (transformer, diffusion heads; not the frozen
        tokenizer) stored in ``dtype`` (:func:`maskar.nn.inference.cast_linears_`: the same
        outputs under autocast to it, bit for bit, without the per-iteration weight casts of the
        compiled blocks, and the heads' per-chain weight copies become no-ops). The sampling CLI
        calls it on CUDA under bf16 / fp16; ``train()`` is refused afterwards."""
        return cast_linears_(self, dtype)

    def train(self, mode: bool = True) -> MaskedGenerator:
        refuse_training_if_cast(self, mode)
        super().train(mode)
        self.tokenizer.eval()  # frozen: always in eval mode
        return self

    def no_weight_decay_keywords(self) -> set[str]:
        # As the official optimizer groups: no decay anywhere in the diffusion head(s).
        return {"diffloss"}

    def class_embedding(self, labels: Tensor) -> Tensor:
        """(B, D); label == class_num (or < 0) means unconditional (``fake_latent``)."""
        if labels.dtype != torch.long:
            raise ValueError(f"labels: expected int64, got {labels.dtype}")
        uncond = (labels < 0) | (labels >= self.num_classes)
        emb = self.class_emb(labels.clamp(0, self.num_classes - 1))
        return torch.where(uncond[:, None], self.fake_latent.to(emb.dtype), emb)

    # -- encoder / decoder pieces

    defer_residual_adds = True  # compiled sampling: see _run_blocks (False: each block's own add)

    def _run_blocks(self, blocks: nn.ModuleList, x: Tensor, *args: Any) -> Tensor:
        """``x = blk(x, *args)`` for each block, checkpointed when training with grad_checkpointing.

        Compiled sampling defers each block's last residual add into the next block's compiled
        graph, where Inductor fuses it with that block's first LayerNorm: each block compiled on
        its own otherwise ends in an add kernel of its own (0.41 s of MAR-B's num_iter-256 call
        on the H200), and its sum is read straight back by the next norm. Same operations on the
        same values; only where the add runs changes."""
        deferring = self.defer_residual_adds and getattr(self, "_sampler_compiled", False)
        if deferring and not self.training and not torch.is_grad_enabled():
            pending = None
            for blk in blocks:
                x, pending = blk(x, *args, pending=pending, defer=True)
            return x if pending is None else blocks[-1].finish(x, pending)
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, *args, use_reentrant=False)
            else:
                x = blk(x, *args)
        return x

    def _buffer_tokens(self, class_emb: Tensor, b: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(B, buffer, D) class-embedding buffer, with the training label drop to ``fake_latent``."""
        if self.training and self.label_drop_prob > 0:
            drop = torch.rand(b, device=device) < self.label_drop_prob
            class_emb = torch.where(drop[:, None], self.fake_latent.to(class_emb.dtype), class_emb)
        return class_emb[:, None, :].to(dtype).expand(b, self.buffer_size, -1)

    def _visible_positions(self, mask: Tensor, num_masked: int) -> Tensor:
        """(B, buffer + L - num_masked) positions of the buffer and the visible tokens, in order."""
        mask_with_buffer = torch.cat([mask.new_zeros(mask.shape[0], self.buffer_size), mask], dim=1)
        num_visible = mask_with_buffer.shape[1] - num_masked
        return torch.sort(mask_with_buffer.to(torch.uint8), dim=1, stable=True).indices[:, :num_visible]

    def _decoder_output(self, x: Tensor) -> Tensor:
        """Decoder stack output (B, buffer + L, D) -> conditions z (B, L, D): buffer removed."""
        return self.decoder_norm(x)[:, self.buffer_size :] + self.diffusion_pos_embed_learned

    # -- training data

    @torch.no_grad()
    def latents_from_batch(self, batch: dict[str, Tensor]) -> Tensor:
        """Scaled latents (B, C, h, w): a fresh posterior sample from the image or cached moments."""
        if "moments" in batch:
            moments = batch["moments"]
            if "moments_flip" in batch:
                # Like the official CachedFolder: each sample uses its flip with probability 1/2.
                flip = torch.rand(moments.shape[0], device=moments.device) < 0.5
                moments = torch.where(flip[:, None, None, None], batch["moments_flip"], moments)
        elif "image" in batch:
            moments = self.tokenizer.encode_moments(batch["image"])
        else:
            raise KeyError(f"MAR.loss: batch needs 'image' or 'moments', got keys {sorted(batch)}")
        return self.tokenizer.sample_latent(moments.float())

    # -- sampling pieces

    def run_masked_loop(self, loop: MaskedLoop, s: LoopSettings, batch: int) -> None:
        """Masked generation, MAR's and both CASMAR stages': each step runs the transformer on
        both CFG halves, lets ``loop`` choose the next mask from the conditional half, sets the
        step's guidance (``cfg_schedule``) and lets the head draw this step's tokens."""
        with self._eval_mode():
            for step in range(s.num_iter):
                if loop.num_masked() == 0:
                    break
                z = loop.transformer_pass()
                visible_after = loop.plan(z[:batch], step)
                cfg_scale = self._cfg_scale(s.cfg, s.cfg_schedule, visible_after, loop.length)
                loop.draw(z, cfg_scale)
                if s.trace is not None:
                    loop.record(s.trace, step, cfg_scale)
                loop.advance()

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was = self.training
        self.train(False)
        try:
            yield
        finally:
            self.train(was)

    @staticmethod
    def _check_cfg_schedule_and_steps(cfg_schedule: str, num_iter: int) -> None:
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule: expected 'linear' or 'constant', got {cfg_schedule!r}")
        if num_iter < 1:
            raise ValueError(f"num_iter: expected >= 1, got {num_iter}")

    def _class_emb_cfg(self, labels: Tensor, cfg: float) -> Tensor:
        """(B, D), or (2B, D) laid out [cond | uncond = fake_latent] when guiding."""
        class_emb = self.class_embedding(labels)
        if cfg != 1.0:
            class_emb = torch.cat([class_emb, self.fake_latent.expand(len(labels), -1).to(class_emb.dtype)])
        return class_emb

    def _start_tokens(
        self, b: int, n: int, known: Tensor | None, known_mask: Tensor | None, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Initial tokens (B, n, C): ``known`` where ``known_mask`` (B, n) bool, zeros elsewhere
        (all zeros without ``known``); and the known mask (all False when none is given)."""
        tokens = torch.zeros(b, n, self.token_channels, device=device)
        known_mask = torch.zeros(b, n, dtype=torch.bool, device=device) if known_mask is None else known_mask
        if known is not None:
            tokens = torch.where(known_mask[..., None], known.float(), tokens)
        return tokens, known_mask

    @staticmethod
    def _equal_count_groups(*known_masks: Tensor) -> list[Tensor]:
        """Row indices of the groups of samples with equal unknown counts in every (B, L_i)
        known mask, by ascending counts: the sparse encoder needs equal visible counts."""
        counts = torch.stack([(~m).sum(1) for m in known_masks], 1)  # (B, k)
        return [(counts == key).all(1).nonzero().flatten() for key in torch.unique(counts, dim=0)]

    def _per_group(
        self, known_masks: tuple[Tensor, ...], trace: SamplingTrace | None, sample_rows: Callable
    ) -> list[tuple[Tensor, Any]]:
        """``sample_rows(rows, sub_trace)`` for each group of rows with equal unknown counts
        (:meth:`_equal_count_groups`); each group's trace steps join ``trace`` with
        ``info["rows"]`` naming the batch rows they cover."""
        out = []
        for rows in self._equal_count_groups(*known_masks):
            sub = None if trace is None else SamplingTrace(keep_logits=trace.keep_logits)
            out.append((rows, sample_rows(rows, sub)))
            if sub is not None:
                for step in sub:
                    step.info["rows"] = rows
                    trace.steps.append(step)
        return out

    def _check_known_tokens(self, known: Tensor, known_mask: Tensor, batch: int, n: int, what: str) -> None:
        """known (B, n, C) latents with known_mask (B, n) bool; else a ValueError naming ``what``."""
        want = (batch, n, self.token_channels)
        if (
            tuple(known.shape) != want
            or tuple(known_mask.shape) != want[:2]
            or known_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"{what}: expected tokens {want} and a bool mask {want[:2]}, "
                f"got {tuple(known.shape)} and {tuple(known_mask.shape)} {known_mask.dtype}"
            )

    @staticmethod
    def _cfg_scale(cfg: float, schedule: str, visible_after: int, total: int) -> float:
        """Guidance of a step: linear in the share of tokens visible after it, or constant."""
        if schedule == "linear":
            return 1.0 + (cfg - 1.0) * visible_after / total
        return cfg

    def token_keep_mask(self, keep_mask: Tensor) -> Tensor:
        """(B, 1, H, W) bool (image resolution) -> (B, L) bool: known iff all the token's pixels are kept."""
        if keep_mask.ndim != 4 or keep_mask.shape[1] != 1 or keep_mask.shape[-1] != self.image_size:
            size = self.image_size
            raise ValueError(f"keep_mask: expected (B, 1, {size}, {size}) bool, got {tuple(keep_mask.shape)}")
        k = self.image_size // self.seq_h
        frac = nn.functional.avg_pool2d(keep_mask.float(), kernel_size=k, stride=k)  # (B, 1, h, w)
        return (frac >= 1.0).flatten(1)

    # -- speed

    def compile_sampler(
        self,
        transformer: bool = True,
        block_mode: str = "default",
        head_mode: str = "default",
        **compile_kwargs: Any,
    ) -> None:
        """Opt-in ``torch.compile`` for sampling: every encoder / decoder block (dynamic
        sequence length: the sparse encoder's visible count changes every step) and each
        diffusion head's per-step call (:meth:`GraphedHead.compile_sampler`; the CUDA graphs
        capture the compiled kernels). It fuses the elementwise work between the matmuls;
        outputs equal eager to rounding. The first sampling call pays the compile time.
        ``block_mode``: the blocks' torch.compile mode; ``max-autotune-no-cudagraphs`` lets
        Inductor use Triton matmul templates that take the exact GELU and the residual adds
        into their epilogues (cuBLAS leaves them as kernels of their own), at a long first compile.
        ``head_mode``: the same for the diffusion heads' network steps (CASMAR's DiT head)."""
        if transformer:
            for blk in (*self.encoder_blocks, *self.decoder_blocks):
                blk.compile(**{"dynamic": True, "mode": block_mode, **compile_kwargs})
        for head in self.children():
            if isinstance(head, GraphedHead):
                head.compile_sampler(step_mode=head_mode, **compile_kwargs)
        self._sampler_compiled = True

    def _compile_once(self, compile: bool | str) -> None:
        """``generate`` / ``edit(compile=...)``: :meth:`compile_sampler` unless done already;
        ``auto`` compiles on CUDA (where Inductor's Triton kernels run), not on the CPU."""
        if compile == "auto":
            compile = next(self.parameters()).is_cuda
        elif compile not in (True, False):
            raise ValueError(f"compile: expected auto, true or false, got {compile!r}")
        if compile and not getattr(self, "_sampler_compiled", False):
            self.compile_sampler()

    # -- pretrained parts

    def init_pretrained(self) -> None:
        """Load the tokenizer weights named by ``model.tokenizer_ckpt`` (when training starts)."""
        if self.cfg.tokenizer_ckpt:
            load_tokenizer_weights(self.tokenizer, self.cfg.tokenizer_ckpt)


# ----------------------------------------------------------------------------- model


class MAR(MaskedGenerator):
    def __init__(self, cfg: MARConfig, tokenizer: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        tok = tokenizer if tokenizer is not None else KLVAE(cfg.tokenizer)
        self.token_channels = int(tok.embed_dim) * cfg.patch_size**2
        stride = int(tok.downsample) * cfg.patch_size
        if cfg.img_size % stride:
            raise ValueError(
                f"model.img_size {cfg.img_size} is not divisible by tokenizer stride x patch size = {stride}"
            )
        self.seq_h = self.seq_w = cfg.img_size // stride
        self.seq_len = self.seq_h * self.seq_w
        self._set_common_attributes(cfg, tok)
        d_enc, d_dec, n_pos = cfg.encoder_embed_dim, cfg.decoder_embed_dim, self.seq_len + cfg.buffer_size

        def blocks(dim: int, depth: int, heads: int) -> nn.ModuleList:
            return nn.ModuleList(
                Block(
                    dim,
                    heads,
                    cfg.mlp_ratio,
                    qkv_bias=True,
                    proj_drop=cfg.proj_dropout,
                    attn_drop=cfg.attn_dropout,
                )
                for _ in range(depth)
            )

        # class / CFG embeddings
        self.class_emb = nn.Embedding(cfg.class_num, d_enc)
        self.fake_latent = nn.Parameter(torch.zeros(1, d_enc))
        # encoder
        self.z_proj = nn.Linear(self.token_channels, d_enc)
        self.z_proj_ln = nn.LayerNorm(d_enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, d_enc))
        self.encoder_blocks = blocks(d_enc, cfg.encoder_depth, cfg.encoder_num_heads)
        self.encoder_norm = nn.LayerNorm(d_enc, eps=1e-6)
        # decoder
        self.decoder_embed = nn.Linear(d_enc, d_dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, d_dec))
        self.decoder_blocks = blocks(d_dec, cfg.decoder_depth, cfg.decoder_num_heads)
        self.decoder_norm = nn.LayerNorm(d_dec, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, d_dec))
        self.initialize_weights()
        # diffusion head (its own init: zero adaLN / output) and the frozen tokenizer
        self.diffloss = make_token_diffloss(cfg, self.token_channels)
        self._set_tokenizer(tok)

    def initialize_weights(self) -> None:
        self._init_weights(
            (
                self.class_emb.weight,
                self.fake_latent,
                self.mask_token,
                self.encoder_pos_embed_learned,
                self.decoder_pos_embed_learned,
                self.diffusion_pos_embed_learned,
            )
        )

    # -- tokens

    def patchify(self, latent: Tensor) -> Tensor:
        """(B, C, h*p, w*p) -> (B, h*w, C*p*p), raster order, features ordered (c, p, q)."""
        b, c, hh, ww = latent.shape
        p = self.cfg.patch_size
        x = latent.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (hh // p) * (ww // p), c * p * p)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, h*w, C*p*p) -> (B, C, h*p, w*p)."""
        b = x.shape[0]
        p = self.cfg.patch_size
        c = self.token_channels // (p * p)
        x = x.reshape(b, self.seq_h, self.seq_w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, self.seq_h * p, self.seq_w * p)

    # -- encoder / decoder

    def forward_encoder(
        self, tokens: Tensor, mask: Tensor, class_emb: Tensor, num_masked: int
    ) -> tuple[Tensor, Tensor]:
        """tokens (B, L, C), mask (B, L) bool with ``num_masked`` True per row, class_emb (B, D).

        Returns the encoded visible tokens (B, buffer + L - num_masked, D) and their positions.
        """
        b = tokens.shape[0]
        x = self.z_proj(tokens)  # (B, L, D)
        buf = self._buffer_tokens(class_emb, b, x.device, x.dtype)  # (B, buffer, D)
        x = self.z_proj_ln(torch.cat([buf, x], dim=1) + self.encoder_pos_embed_learned)
        # Fully sparse: keep the buffer and the visible tokens, in position order.
        keep = self._visible_positions(mask, num_masked)
        x = _gather_rows(x, keep)
        x = self._run_blocks(self.encoder_blocks, x)
        return self.encoder_norm(x), keep

    def forward_decoder(self, x: Tensor, keep: Tensor) -> Tensor:
        """Encoded visible tokens -> per-position conditions z (B, L, D_dec)."""
        x = self.decoder_embed(x)
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, self.buffer_size + self.seq_len, d)
        x = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), x)
        return self._decoder_output(self._run_blocks(self.decoder_blocks, x + self.decoder_pos_embed_learned))

    # -- training

    def forward_train(self, latent: Tensor, labels: Tensor) -> dict[str, Tensor]:
        tokens = self.patchify(latent)  # (B, L, C)
        b, n, _ = tokens.shape
        orders = torch.argsort(torch.rand(b, n, device=tokens.device), dim=1)
        ratio = float(truncated_normal_ratio(1, self.cfg.mask_ratio_min, self.cfg.mask_ratio_std)[0])
        num_masked = math.ceil(n * ratio)
        mask = mask_from_order(orders, num_masked)
        x, keep = self.forward_encoder(tokens, mask, self.class_embedding(labels), num_masked)
        z = self.forward_decoder(x, keep)  # (B, L, D)
        # The loss only counts masked tokens: evaluate the head on those rows alone (the
        # official code runs all rows and zero-weights the visible ones; same estimator).
        masked_idx = orders[:, :num_masked]
        target = _gather_rows(tokens, masked_idx).reshape(b * num_masked, -1)
        z = _gather_rows(z, masked_idx).reshape(b * num_masked, -1)
        mul = self.diffusion_batch_mul
        loss = self.diffloss(target.repeat(mul, 1), z.repeat(mul, 1))
        return {"loss": loss, "mask_ratio": torch.tensor(num_masked / n)}

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        latent = self.latents_from_batch(batch)
        return self.forward_train(latent, batch["label"].long())

    def forward(self, latent: Tensor, labels: Tensor) -> Tensor:
        return self.forward_train(latent, labels)["loss"]

    # -- sampling

    @torch.no_grad()
    def sample_tokens(
        self,
        labels: Tensor,
        *,
        num_iter: int = 64,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        num_sampling_steps: int | str | None = None,
        generator: torch.Generator | None = None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        trace: SamplingTrace | None = None,
        cuda_graph: bool | None = None,
    ) -> Tensor:
        """Generate token sequences (B, L, C).

        ``known`` (B, L, C) with ``known_mask`` (B, L) bool fixes tokens (editing); every
        sample must have the same number of unknown tokens. The cosine schedule runs over
        the unknown tokens. ``trace``, if given, receives one ``mar`` step per iteration:
        the tokens after it, ``mask`` = the positions revealed, ``info`` the encoder's input
        mask and the guidance scale. ``cuda_graph`` is passed to :meth:`DiffLoss.sample`
        (None = its default).
        """
        self._check_cfg_schedule_and_steps(cfg_schedule, num_iter)
        b, n = labels.shape[0], self.seq_len
        if known is not None:
            if known_mask is None or known_mask.shape != (b, n):
                raise ValueError(f"known_mask: expected shape {(b, n)}")
            counts = (~known_mask).sum(1)
            if not bool((counts == counts[0]).all()):
                raise ValueError("sample_tokens: every sample needs the same number of unknown tokens")
        s = LoopSettings(num_iter, cfg, cfg_schedule, temperature, num_sampling_steps, generator, trace)
        loop = _MARLoop(self, labels, s, known, known_mask, cuda_graph)
        self.run_masked_loop(loop, s, b)
        return loop.tokens

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        seed: int | None = 0,
        num_iter: int = 64,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        num_sampling_steps: int | str = "100",
        cuda_graph: bool = True,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        return_trace: bool = False,
        compile: bool | str = "auto",
    ) -> Tensor | tuple[Tensor, SamplingTrace]:
        """Class-conditional images (B, 3, H, W) in [-1, 1]; label == class_num is unconditional.

        ``known`` (B, L, C) scaled latent tokens with ``known_mask`` (B, L) bool: those tokens
        are given and the rest generated (rows with different unknown counts run as separate
        groups, as in :meth:`edit`). ``return_trace=True`` returns ``(images, trace)`` (see
        :meth:`sample_tokens`). ``compile``: :meth:`compile_sampler` first (once).
        """
        self._compile_once(compile)
        g = make_generator(seed, labels.device)
        trace = SamplingTrace() if return_trace else None
        kw = dict(
            num_iter=num_iter,
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            num_sampling_steps=num_sampling_steps,
            cuda_graph=cuda_graph,
        )
        if (known is None) != (known_mask is None):
            raise ValueError("generate: pass known and known_mask together")
        if known is None:
            tokens = self.sample_tokens(labels, generator=g, trace=trace, **kw)
        else:
            self._check_known_tokens(known, known_mask, labels.shape[0], self.seq_len, "known / known_mask")
            tokens = self._sample_known(labels, known.float(), known_mask, g, trace, kw)
        images = self.tokenizer.decode(self.unpatchify(tokens).float())
        return (images, trace) if return_trace else images

    def _sample_known(
        self,
        labels: Tensor,
        known: Tensor,
        known_mask: Tensor,
        generator: torch.Generator | None,
        trace: SamplingTrace | None,
        kw: dict[str, Any],
    ) -> Tensor:
        out = known.clone()

        def rows_fn(rows: Tensor, sub: SamplingTrace | None) -> Tensor:
            return self.sample_tokens(
                labels[rows],
                generator=generator,
                known=known[rows],
                known_mask=known_mask[rows],
                trace=sub,
                **kw,
            )

        for rows, tokens in self._per_group((known_mask,), trace, rows_fn):
            out[rows] = tokens
        return out

    @torch.no_grad()
    def edit(
        self,
        images: Tensor,
        keep_mask: Tensor,
        labels: Tensor,
        seed: int | None = 0,
        num_iter: int = 64,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        num_sampling_steps: int | str = "100",
        return_tokens: bool = False,
        cuda_graph: bool = True,
        compile: bool | str = "auto",
    ) -> Tensor:
        """In-/out-painting: tokens fully inside ``keep_mask`` stay fixed, the rest are generated."""
        if not bool(torch.isfinite(images).all()) or float(images.abs().max()) > 1.0 + 1e-4:
            raise ValueError("edit: images must be finite and in [-1, 1]")
        self._compile_once(compile)
        known = self.patchify(self.tokenizer.encode_mean(images).float())  # (B, L, C)
        known_mask = self.token_keep_mask(keep_mask.to(images.device))
        g = make_generator(seed, images.device)
        kw = dict(
            num_iter=num_iter,
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            num_sampling_steps=num_sampling_steps,
            cuda_graph=cuda_graph,
        )
        out = self._sample_known(labels, known, known_mask, g, None, kw)
        if return_tokens:
            return out
        return self.tokenizer.decode(self.unpatchify(out))


class _MARLoop(MaskedLoop):
    """MAR's loop: each sample reveals its tokens in a random order, as many per step as the
    cosine schedule says; the MLP head draws each revealed token."""

    name = "mar"

    def __init__(
        self,
        model: MAR,
        labels: Tensor,
        s: LoopSettings,
        known: Tensor | None,
        known_mask: Tensor | None,
        cuda_graph: bool | None,
    ):
        b, n, device = labels.shape[0], model.seq_len, labels.device
        self.model, self.s, self.b, self.length, self.cuda_graph = model, s, b, n, cuda_graph
        rand = torch.rand(b, n, generator=s.generator, device=device)
        self.n_unknown = n
        if known is not None:
            self.n_unknown = int((~known_mask).sum(1)[0])
            rand = rand + known_mask.float() * 2  # known tokens go last in the order
        self.tokens, _ = model._start_tokens(b, n, known, known_mask, device)  # (B, L, C)
        self.orders = torch.argsort(rand, dim=1)  # (B, L) per-sample random order
        self.class_emb = model._class_emb_cfg(labels, s.cfg)
        self.masked = self.n_unknown

    def num_masked(self) -> int:
        return self.masked

    def transformer_pass(self) -> Tensor:
        self.mask = mask_from_order(self.orders, self.masked)  # (B, L)
        s = self.s
        x, keep = self.model.forward_encoder(
            s.halves(self.tokens), s.halves(self.mask), self.class_emb, self.masked
        )
        return self.model.forward_decoder(x, keep)  # (B or 2B, L, D)

    def plan(self, z: Tensor, step: int) -> int:
        num_iter = self.s.num_iter
        ratio = cosine_mask_ratio(step, num_iter)
        mask_len = max(1, min(self.masked - 1, math.floor(self.n_unknown * ratio)))
        self.next_masked = 0 if step >= num_iter - 1 else mask_len
        self.idx = self.orders[:, self.next_masked : self.masked]  # (B, k) positions revealed now
        return self.length - mask_len  # the last step too uses the clamped mask_len (official)

    def draw(self, z: Tensor, cfg_scale: float) -> None:
        idx, s, k = self.idx, self.s, self.idx.shape[1]
        if k == 0:
            return
        z_sel = _gather_rows(z, s.halves(idx)).reshape(-1, z.shape[-1])  # [cond rows | uncond rows]
        new = self.model.diffloss.sample(
            z_sel,
            s.temperature,
            cfg_scale,
            num_sampling_steps=s.num_sampling_steps,
            generator=s.generator,
            cuda_graph=self.cuda_graph,
        )
        new = new[: self.b * k].reshape(self.b, k, -1)
        self.tokens = self.tokens.scatter(
            1, idx.unsqueeze(-1).expand(-1, -1, self.tokens.shape[-1]), new.float()
        )

    def record(self, trace: SamplingTrace, step: int, cfg_scale: float) -> None:
        revealed = torch.zeros_like(self.mask).scatter(1, self.idx, True)
        trace.add("mar", step, self.tokens, revealed, input_mask=self.mask, cfg=cfg_scale)

    def advance(self) -> None:
        self.masked = self.next_masked


# ----------------------------------------------------------------------------- tokenizer weights, cache

_TRAINING_ONLY_PREFIXES = ("train_losses.", "disc", "loss", "lpips", "perceptual")


def load_tokenizer_weights(tokenizer: nn.Module, path: str) -> None:
    """Load a maskar tokenizer checkpoint dir or an official ``kl16.ckpt`` (its ``model`` entry).

    Training-only parts a tokenizer checkpoint may carry (discriminator, perceptual net)
    are ignored; any other missing, unexpected or mis-shaped key is an error.
    """
    from maskar import checkpoint

    p = Path(path)
    if p.is_dir():
        source, _ = checkpoint.load_model(p, arch="klvae")
        state = source.state_dict()
        # The latent scale is config, not a weight: a silent mismatch would shift every latent.
        want, have = getattr(tokenizer, "scale_factor", None), getattr(source, "scale_factor", None)
        if want is not None and have is not None and abs(float(want) - float(have)) > 1e-9:
            raise ValueError(
                f"model.tokenizer.scale_factor={want} but the tokenizer checkpoint {str(p)!r} uses {have}; "
                f"set model.tokenizer.scale_factor={have}"
            )
    elif p.is_file():
        obj = checkpoint.load_official(p)
        state = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
    else:
        raise FileNotFoundError(f"model.tokenizer_ckpt: {str(p)!r} is neither a checkpoint dir nor a file")
    state = {k: v for k, v in state.items() if not k.startswith(_TRAINING_ONLY_PREFIXES)}
    own = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith(_TRAINING_ONLY_PREFIXES)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad:
        raise ValueError(
            f"model.tokenizer_ckpt {str(p)!r} does not fit model.tokenizer: "
            f"{len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}, {len(bad)} mis-shaped {bad[:4]}"
        )
    tokenizer.load_state_dict(state, strict=False)


def build_tokenizer(cfg: MARConfig) -> nn.Module:
    """The frozen KL tokenizer of a MAR config, with ``tokenizer_ckpt`` loaded if set."""
    tok = KLVAE(cfg.tokenizer)
    if cfg.tokenizer_ckpt:
        load_tokenizer_weights(tok, cfg.tokenizer_ckpt)
    return tok.eval().requires_grad_(False)


def cache_tokenizer_latents(
    cfg: MARConfig,
    arch: str,
    make_encode: Callable[[nn.Module], Callable[[Tensor], Any]],
    dataset: Any,
    out_dir: str,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Cache ``make_encode(tokenizer)(images)`` of every image and of its mirror image."""
    from maskar.data.latent_store import cache_latents

    tok = build_tokenizer(cfg)
    if device is not None:
        tok = tok.to(device)
    source = {"arch": arch, "tokenizer": type(tok).__name__, "tokenizer_ckpt": cfg.tokenizer_ckpt}
    return cache_latents(
        make_encode(tok),
        dataset,
        out_dir,
        batch_size=batch_size,
        hflip_too=True,
        device=device,
        source=source,
        **kwargs,
    )


def cache_latents_for(
    cfg: MARConfig,
    dataset: Any,
    out_dir: str,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Cache posterior moments of every image and of its mirror image (``data.name=latents``)."""
    return cache_tokenizer_latents(
        cfg, "mar", lambda tok: tok.encode_moments, dataset, out_dir, batch_size, device, **kwargs
    )


registry.register(
    "mar",
    kind="generator",
    config_cls=MARConfig,
    sample_cls=MARGraphSampleConfig,
    build=MAR.from_config,
    description="MAR: masked autoregression with a per-token diffusion loss on KL-16 latents",
)
