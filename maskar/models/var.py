"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al., 2024).

The image is a pyramid of token maps r_1..r_K from the multi-scale residual VQ-VAE
(``maskar.tokenizers.vqvae``). The transformer predicts all tokens of scale k at once:

* inputs: token 0 is the class embedding (+ ``pos_start``); the tokens of scale k >= 1
  are ``word_embed(area_down(f_hat_{<k}, pn_k))``, the running VAE reconstruction of
  the earlier scales resampled to scale k; every token gets ``lvl_embed + pos_1LC``;
* AdaLN blocks conditioned on the class, then an AdaLN head giving logits over the codebook;
* training: teacher forcing on the whole sequence with a **block-causal** mask
  (a scale sees itself and every earlier scale), cross-entropy on every token;
* sampling: one scale at a time with a KV cache over earlier scales, classifier-free
  guidance growing linearly with the scale index, top-k / top-p / temperature.

:class:`NextScaleModel` holds everything VAR and HMAR share (embeddings, blocks, head,
loss weighting, the sampling loop, editing); ``maskar.models.hmar`` changes the
attention pattern, drops the cache and adds masked refinement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskar import env, registry
from maskar.config import ConfigError, ModelConfig, SampleConfig, field
from maskar.models.scale_graphs import GraphCache, NoiseSource, graphs_usable, mark
from maskar.nn.attention import ScalePattern
from maskar.nn.blocks import AdaLNBeforeHead, AdaLNSelfAttnBlock, SharedAdaLin, StaticKVCache
from maskar.nn.inference import cast_linears_, refuse_training_if_cast
from maskar.nn.losses import linear_cross_entropy
from maskar.nn.sampling import (
    SAMPLERS,
    SamplingTrace,
    check_sampling_args,
    guided_logits,
    make_generator,
    sample_from_logits,
    sample_guided,
)
from maskar.tokenizers.vqvae import VQVAEConfig

LOSS_WEIGHTINGS = ("uniform", "lognorm", "linear", "equal")

# Parameter-name substrings the official recipe exempts from weight decay.
NO_WEIGHT_DECAY = {
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
    "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
}  # fmt: skip


# Decoding dominates sampling memory: at 256 px the VQ-VAE decoder holds about five
# (B, 160, 256, 256) activations at once (3200 B per output pixel in fp32, 1600 in bf16) after
# the tokens are done. The batch is decoded in chunks of at most this many output pixels;
# per-image results do not depend on the chunking (to rounding). fp32: 32 x 256^2 (6.7 GB;
# measured on an H100, docs/benchmarks.md: 16 x 256^2 cut the peak 2.5-4.4x but cost up to 25%
# time at 1024 px). bf16: 8 x 256^2 (0.84 GB, below the token phase of a d16 model at 256 px
# B 64; at 1024 px one image, 1.7 GB, is the smallest chunk).
DECODE_PIXELS = 32 * 256 * 256
DECODE_PIXELS_BF16 = 8 * 256 * 256


def decode_in_chunks(tokenizer, f_hat: Tensor, image_size: int, precision: str = "fp32") -> Tensor:
    """``tokenizer.fhat_to_img`` over (B, Cz, h, w) in chunks of at most DECODE_PIXELS(_BF16) pixels."""
    budget = DECODE_PIXELS if precision == "fp32" else DECODE_PIXELS_BF16
    chunk = max(1, budget // (image_size * image_size))
    if f_hat.shape[0] <= chunk:
        return tokenizer.fhat_to_img(f_hat, precision)
    return torch.cat([tokenizer.fhat_to_img(part, precision) for part in f_hat.split(chunk)])


def _warn_if_compiled_before(model: nn.Module, decoder: bool) -> None:
    """Warn when Dynamo already holds sampling code compiled for another model of this process:
    ``compile_sampler`` would reuse it (same structure, no recompile), and such a model has sampled
    as slowly as uncompiled (docs/var_hmar.md, *Compiled blocks*)."""
    codes = [
        getattr(AdaLNSelfAttnBlock, name).__code__
        for name in ("_pre_attention", "_post_attention", "_pre_attention_after", "_post_attention_deferred")
    ]
    if decoder:
        codes.append(type(model.tokenizer).fhat_to_img.__code__)
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        held = any(_debug_get_cache_entry_list(code) for code in codes)
    except (ImportError, AttributeError, TypeError):  # a private API: never fail sampling over it
        return
    if held:
        warnings.warn(
            "compile_sampler: this process already holds sampling code compiled for another model, "
            "which this model will reuse; a model compiled that way has sampled as slowly as "
            "uncompiled. Call torch._dynamo.reset() before compile_sampler() to compile it afresh.",
            stacklevel=3,
        )


class CompiledDecoder:
    """A tokenizer's ``fhat_to_img`` through ``torch.compile`` with static shapes (a decode chunk's;
    a ragged last chunk compiles once more): what :func:`decode_in_chunks` calls in its place."""

    def __init__(self, tokenizer, **compile_kwargs) -> None:
        self.fhat_to_img = torch.compile(tokenizer.fhat_to_img, **{**compile_kwargs, "dynamic": False})


# ----------------------------------------------------------------------------- configs


@dataclass
class NextScaleConfig(ModelConfig):
    """Fields shared by VAR and HMAR. Width / heads / drop path default to the official rule."""

    arch: str = "var"
    tokenizer: VQVAEConfig = dataclasses.field(default_factory=VQVAEConfig)
    tokenizer_ckpt: str | None = field(None, help="maskar tokenizer checkpoint dir loaded at a fresh start")
    depth: int = field(16, min=1, help="number of transformer blocks")
    width: int | None = field(None, min=1, help="model width C (default 64*depth)")
    heads: int | None = field(None, min=1, help="attention heads (default depth)")
    mlp_ratio: float = field(4.0, min=0.0)
    drop_path_rate: float | None = field(None, min=0.0, max=1.0, help="default 0.1*depth/24")
    cond_drop_rate: float = field(0.1, min=0.0, max=1.0, help="label -> null class probability (CFG)")
    num_classes: int = field(1000, min=1, help="class count; index num_classes is the null class")
    shared_aln: bool = field(False, help="one shared AdaLN projection + per-block ada_gss (VAR d36-s)")
    attn_l2_norm: bool = field(True, help="L2-normalised q/k with a learned per-head scale")
    norm_eps: float = field(1e-6, min=0.0)
    init_std: float = field(-1.0, help="trunc-normal std of linears/embeddings; -1: sqrt(1/(3C))")
    init_head: float = field(0.02, min=0.0, help="head weight multiplier")
    init_adaln: float = field(0.5, min=0.0, help="AdaLN scale/shift weight multiplier")
    init_adaln_gamma: float = field(1e-5, min=0.0, help="AdaLN gamma weight multiplier (official alng)")
    loss_weighting: str = field("uniform", choices=LOSS_WEIGHTINGS, help="per-scale CE weighting")
    label_smoothing: float = field(0.0, min=0.0, max=1.0)

    @property
    def C(self) -> int:
        return self.width if self.width is not None else 64 * self.depth

    @property
    def num_heads(self) -> int:
        return self.heads if self.heads is not None else self.depth

    @property
    def dpr(self) -> float:
        return self.drop_path_rate if self.drop_path_rate is not None else 0.1 * self.depth / 24

    def validate(self) -> None:
        if self.C % self.num_heads:
            raise ValueError(f"width {self.C} must be divisible by heads {self.num_heads}")
        if getattr(self.tokenizer, "arch", "vqvae") != "vqvae":
            raise ValueError(f"tokenizer.arch: expected 'vqvae', got {self.tokenizer.arch!r}")
        if tuple(self.tokenizer.patch_nums)[0] != 1:
            pn = list(self.tokenizer.patch_nums)
            raise ValueError(f"tokenizer.patch_nums: the first scale must be 1x1, got {pn}")


@dataclass
class VARConfig(NextScaleConfig):
    arch: str = "var"


@dataclass
class VARSampleConfig(SampleConfig):
    """Official FID defaults (VAR README): cfg 1.5, top_k 900, top_p 0.96."""

    cfg: float = field(1.5, min=0.0, help="classifier-free guidance scale at the last scale")
    cfg_schedule: str = field("linear", choices=("linear", "constant"), help="t = cfg*si/(K-1) or cfg")
    temperature: float = field(1.0, min=1e-6, help="softmax temperature")
    top_k: int = field(900, min=0, help="keep the k most likely tokens (0: off)")
    top_p: float = field(0.96, min=0.0, max=1.0, help="nucleus mass (0 or 1: off)")
    compile: bool | str = field(
        "auto",
        choices=("auto", True, False),
        help="torch.compile the blocks' work around attention and the VQ-VAE decode, inside the "
        "per-scale CUDA graphs (the first call compiles, ~20 s; H200, HMAR-d16 256 px B 64: 229.5 ms "
        "a batch, 281.4 uncompiled); auto = false: a run of a few batches does not earn it back",
    )


# ----------------------------------------------------------------------------- helpers


def scale_loss_weights(patch_nums: tuple[int, ...], kind: str) -> Tensor:
    """Per-scale total loss mass (K,), summing to 1.

    ``uniform``: VAR, 1/L per token (mass proportional to pn^2). ``lognorm``: HMAR's
    normal-pdf weighting of the *reversed* side ratios (reference §4.6). ``linear``:
    mass proportional to the scale index + 1. ``equal``: 1/K per scale.
    """
    n = torch.tensor(patch_nums, dtype=torch.float64, device="cpu")
    K = len(patch_nums)
    if kind == "uniform":
        w = n * n
    elif kind == "lognorm":
        r = n / n[-1]
        if K < 2:
            w = torch.ones(1, dtype=torch.float64, device="cpu")
        else:
            z = (r.flip(0) - r.mean()) / r.std(unbiased=True)
            w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    elif kind == "linear":
        w = torch.arange(1, K + 1, dtype=torch.float64, device="cpu")
    elif kind == "equal":
        w = torch.ones(K, dtype=torch.float64, device="cpu")
    else:
        raise ValueError(f"loss_weighting: expected one of {list(LOSS_WEIGHTINGS)}, got {kind!r}")
    return w / w.sum()


def token_loss_weights(patch_nums: tuple[int, ...], kind: str) -> Tensor:
    """(L,) float32 weight of every token: scale mass / tokens in the scale."""
    mass = scale_loss_weights(patch_nums, kind)
    per_tok = [mass[i] / (pn * pn) for i, pn in enumerate(patch_nums)]
    return torch.cat([p.repeat(pn * pn) for p, pn in zip(per_tok, patch_nums)]).float()


def token_linears_of(blocks) -> list[nn.Linear]:
    """The per-token linears of AdaLN blocks (q/k/v, output projection, FFN)."""
    return [m for b in blocks for m in (b.attn.mat_qkv, b.attn.proj, b.ffn.fc1, b.ffn.fc2)]


def load_model_weights(ckpt_dir: str, what: str) -> dict[str, Tensor]:
    """Weights of a maskar checkpoint directory (or a run dir: its latest checkpoint)."""
    from maskar import checkpoint

    try:
        directory = checkpoint.resolve_checkpoint_dir(ckpt_dir)
        return checkpoint.load_tensors(Path(directory) / checkpoint.MODEL_FILE)
    except (checkpoint.CheckpointError, OSError) as e:
        raise ConfigError(f"{what}={ckpt_dir!r}: expected a maskar checkpoint directory ({e})") from None


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The frozen tokenizer always runs in fp32 (token ids must not depend on precision)."""
    return torch.autocast(device.type, enabled=False)


# The next-scale head and the sampler run on at most this many (sample, token) rows at once:
# (rows, 4096) float32 temporaries of 134 MB instead of the whole last scale's (0.5-1 GB at
# 256 px B 64 / 1024 px B 8). Rows are independent, so the chunking changes no token.
SAMPLE_ROWS = 8192
# The top-k / top-p draw of new models (``model.sampler``; maskar.nn.sampling.SAMPLERS): the
# one-kernel draw (maskar.kernels.categorical), which is the torch path wherever the kernel does
# not run (CPU, no Triton). On an H200 (2026-12-05) it took 14 ms off HMAR-d16's 256 px B 64 call
# and 16 ms off HMAR / VAR-d16 at 1024 px B 8 (docs/benchmarks.md). MASKAR_SAMPLER_KERNEL=0 keeps
# the torch path ("fused") everywhere. Read at import.
DEFAULT_SAMPLER = "triton" if env.switch("MASKAR_SAMPLER_KERNEL") else "fused"

# Without a KV cache (HMAR) rows never interact across samples, so the transformer runs the
# big scales in chunks of at most this many (sample, token) rows: at 1024 px B 8 the last
# scale's FFN would otherwise hold 2 x 0.54 GB of activations (16 x 4096 rows x 4096 wide, bf16).
BLOCK_ROWS = 32768


@dataclass
class SamplingArgs:
    cfg: float
    cfg_schedule: str
    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    sampler: str = "fused"  # maskar.nn.sampling.SAMPLERS


@dataclass
class ScaleState:
    """What the scale loop carries from one scale to the next (static buffers under CUDA graphs)."""

    cond: Tensor  # (2B, C) class embeddings of [labels; null class]
    lvl_pos: Tensor  # (1, L, C) level + position embedding
    x: Tensor | None  # (2B, pn^2, C) transformer input of the current scale
    ctx_in: Tensor | None  # (B, pn^2, Cz) VAE-space input of the current scale (None at scale 0)
    f_hat: Tensor  # (B, Cz, h, w) float32 running reconstruction
    caches: list[StaticKVCache] | None  # VAR: one per block; HMAR: None
    tokens: list[Tensor]  # (B, pn^2) int64 final ids of the scales done


# ----------------------------------------------------------------------------- model


class NextScaleModel(nn.Module):
    """Embeddings + AdaLN transformer + head over the token pyramid; VAR's training and sampling."""

    pattern_kind = "block_causal"
    uses_kv_cache = True
    takes_host_labels = True  # generate() checks CPU labels on the CPU, then moves them

    def __init__(self, cfg: NextScaleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = registry.build_model(cfg.tokenizer)
        self.tokenizer.requires_grad_(False).eval()
        self.patch_nums = tuple(int(p) for p in self.tokenizer.patch_nums)
        self.num_classes = cfg.num_classes
        self.image_size = int(self.tokenizer.downsample) * self.patch_nums[-1]
        self.image_channels = int(getattr(self.tokenizer, "image_channels", 3))
        self.vocab_size = int(self.tokenizer.vocab_size)
        self.z_channels = int(self.tokenizer.z_channels)
        C, K = cfg.C, len(self.patch_nums)
        self.C, self.depth = C, cfg.depth
        self.lengths = tuple(p * p for p in self.patch_nums)
        self.L = sum(self.lengths)
        ends = list(itertools.accumulate(self.lengths))
        self.begin_ends = [(e - n, e) for e, n in zip(ends, self.lengths)]  # token span of each scale
        self.pattern = ScalePattern(self.pattern_kind, self.lengths)

        # Inputs: class token, VAE-space inputs of scales 1..K-1, level + absolute position.
        self.word_embed = nn.Linear(self.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: null class
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(K, C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C))
        dpr = [cfg.dpr * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear over depth
        self.blocks = nn.ModuleList(self._make_block(dpr[i]) for i in range(cfg.depth))
        for block in self.blocks:  # block 0's rate is 0 but it runs the same code: one compiled graph
            block.drop_path.active = cfg.dpr > 0
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, self.vocab_size)

        # Derived buffers: recomputed, never saved.
        self.register_buffer("lvl_1L", self.pattern.scale_ids("cpu").view(1, self.L), persistent=False)
        self.register_buffer(
            "loss_weight", token_loss_weights(self.patch_nums, cfg.loss_weighting), persistent=False
        )
        self.init_weights()

        # Sampling switches (plain attributes, not config: the defaults are the fast paths; the
        # alternatives exist for tests and maskar.bench.sample's comparisons).
        self.sampler = DEFAULT_SAMPLER  # maskar.nn.sampling.SAMPLERS: fused, triton, or the reference filter
        self.decode_precision = "auto"  # auto (bf16 under bf16/fp16 autocast, else fp32) | fp32 | bf16
        self.cuda_graphs = True  # replay per-scale CUDA graphs for plain generation on a GPU
        self.profile_marks: list | None = None  # a list: sampling appends (region name, timestamp)
        self._decoder: CompiledDecoder | None = None  # compile_sampler(decoder=True)
        self._graphs = GraphCache()

    def compile_sampler(self, decoder: bool = False, **compile_kwargs) -> None:
        """Opt-in ``torch.compile`` of sampling: in every block the work around the attention
        (:meth:`AdaLNSelfAttnBlock.compile_sampling_parts`); with ``decoder`` also the VQ-VAE
        decode (:class:`CompiledDecoder`: Inductor fuses its norms, residual adds and upsampling
        and, under ``mode="max-autotune-no-cudagraphs"``, times its convolution templates against
        cuDNN). The per-scale CUDA graphs then capture the compiled kernels. The first calls pay
        the compile time."""
        if not getattr(self, "_sampler_compiled", False):
            _warn_if_compiled_before(self, decoder)
        for blk in self.repeated_blocks():
            blk.compile_sampling_parts(**compile_kwargs)
        if decoder:
            self._decoder = CompiledDecoder(self.tokenizer, **compile_kwargs)
        self._graphs.clear()
        self._sampler_compiled = True

    def _compile_once(self, compile: bool | str) -> None:
        """``generate(compile=...)``: True runs :meth:`compile_sampler` with the decoder, once;
        ``auto`` and False leave sampling uncompiled (the sample config's help says why)."""
        if compile not in ("auto", True, False):
            raise ConfigError(f"compile: expected auto, true or false, got {compile!r}")
        if compile is True and not getattr(self, "_sampler_compiled", False):
            self.compile_sampler(decoder=True)

    def cast_linears_(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Inference only: the generator's linears (not its tokenizer's) stored in ``dtype``
        (:func:`maskar.nn.inference.cast_linears_`: the same outputs under autocast to it, bit
        for bit, without the per-pass weight casts the per-scale CUDA graphs and compiled blocks
        would repeat, in 0.6 GB less at d16). The sampling CLI calls it on CUDA under bf16 / fp16;
        ``train()`` is refused afterwards."""
        return cast_linears_(self, dtype)

    def _make_block(self, drop_path: float) -> AdaLNSelfAttnBlock:
        cfg = self.cfg
        return AdaLNSelfAttnBlock(
            cfg.C, cfg.C, cfg.num_heads, cfg.mlp_ratio, drop_path,
            shared_aln=cfg.shared_aln, attn_l2_norm=cfg.attn_l2_norm, norm_eps=cfg.norm_eps,
        )  # fmt: skip

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official VAR init: trunc-normal everywhere, small head, scaled residual outputs."""
        cfg, C = self.cfg, self.C
        std = cfg.init_std if cfg.init_std >= 0 else math.sqrt(1 / C / 3)
        for name, m in self.named_modules():
            if name.startswith("tokenizer"):
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self._init_head(self.head, self.head_nm)
        for block in self.blocks:
            self._init_block(block)

    @torch.no_grad()
    def _init_head(self, head: nn.Linear, head_nm: AdaLNBeforeHead) -> None:
        cfg = self.cfg
        head.weight.mul_(cfg.init_head)
        head.bias.zero_()
        head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        head_nm.ada_lin[-1].bias.zero_()

    @torch.no_grad()
    def _init_block(self, block: AdaLNSelfAttnBlock) -> None:
        cfg, C = self.cfg, self.C
        depth_scale = math.sqrt(2 * cfg.depth)
        block.attn.proj.weight.div_(depth_scale)
        block.ffn.fc2.weight.div_(depth_scale)
        if cfg.shared_aln:
            block.ada_gss[:, :, 2:].mul_(cfg.init_adaln)
            block.ada_gss[:, :, :2].mul_(cfg.init_adaln_gamma)
        else:
            lin = block.ada_lin[-1]
            lin.weight[2 * C :].mul_(cfg.init_adaln)
            lin.weight[: 2 * C].mul_(cfg.init_adaln_gamma)
            lin.bias.zero_()

    def init_pretrained(self) -> None:
        """Called once at the start of a fresh training run: load the tokenizer weights."""
        if self.cfg.tokenizer_ckpt is None:
            if not getattr(self, "_tokenizer_from_stage1", False):
                warnings.warn(
                    "model.tokenizer_ckpt is not set: the frozen tokenizer keeps its random initialisation "
                    "(fine for smoke tests, useless for real training)",
                    stacklevel=2,
                )
            return
        sd = load_model_weights(self.cfg.tokenizer_ckpt, "model.tokenizer_ckpt")
        if any(k.startswith("tokenizer.") for k in sd):  # a generator checkpoint: take its tokenizer
            sd = {k[len("tokenizer.") :]: v for k, v in sd.items() if k.startswith("tokenizer.")}
        missing, unexpected = self.tokenizer.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"model.tokenizer_ckpt={self.cfg.tokenizer_ckpt!r} does not match model.tokenizer: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )

    def train(self, mode: bool = True) -> NextScaleModel:
        refuse_training_if_cast(self, mode)
        super().train(mode)
        self.tokenizer.eval()  # frozen, always in inference mode
        return self

    # ------------------------------------------------------------------ trainer hooks

    def named_trainable_parameters(self):
        for n, p in self.named_parameters():
            if p.requires_grad and not n.startswith("tokenizer."):
                yield n, p

    def no_weight_decay_keywords(self) -> set[str]:
        return set(NO_WEIGHT_DECAY)

    def fp32_gradient_linears(self) -> set[str]:
        """The heads, whose weight and bias gradients the fused cross-entropy sums in fp32
        (:mod:`maskar.nn.losses`): bf16 working copies (:mod:`maskar.train.master_weights`)
        would round those sums, so the heads keep their fp32 weights there."""
        return {n for n in ("head", "mask_head") if isinstance(getattr(self, n, None), nn.Linear)}

    # ------------------------------------------------------------------ transformer

    def ada_cond(self, cond: Tensor) -> Tensor:
        """What the blocks receive: the class embedding, or the shared projection of it."""
        return self.shared_ada_lin(cond) if self.cfg.shared_aln else cond

    def lvl_pos(self) -> Tensor:
        """(1, L, C) level + absolute position embedding."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def embed(self, labels: Tensor, token_emb: Tensor) -> tuple[Tensor, Tensor]:
        """labels (B,), token_emb (B, L-1, C) -> sequence (B, L, C), class embedding (B, C)."""
        cond = self.class_emb(labels)
        sos = cond.unsqueeze(1) + self.pos_start
        return torch.cat([sos, token_emb], dim=1) + self.lvl_pos(), cond

    # Compiled sampling: each block's FFN residual add made in the next block's compiled graph,
    # where Inductor fuses it with that block's first LayerNorm (one pass over the fp32 stream
    # instead of a write and a read back; MAR's blocks do the same). Same operations on the same
    # values; MASKAR_DEFER_RESIDUAL, read at import.
    defer_residual_adds: bool = bool(env.switch("MASKAR_DEFER_RESIDUAL"))

    def run_blocks(
        self,
        h: Tensor,
        cond: Tensor,
        blocks,
        pattern: ScalePattern | None,
        caches: list[StaticKVCache] | None = None,
    ) -> Tensor:
        ada = self.ada_cond(cond)
        deferring = (
            self.defer_residual_adds
            and not self.training
            and not torch.is_grad_enabled()
            and all(getattr(b, "_compiled_parts", None) is not None for b in blocks)
        )
        if deferring:
            carry = [h, None]  # AdaLNSelfAttnBlock.deferred_step: x and the pending add
            del h
            for i, block in enumerate(blocks):
                cache = None if caches is None else caches[i]
                block.deferred_step(carry, ada, pattern, cache, defer=i < len(blocks) - 1)
            return carry[0]
        for i, block in enumerate(blocks):
            h = block(h, ada, pattern, None if caches is None else caches[i])
        return h

    def logits(
        self, h: Tensor, cond: Tensor, head: nn.Linear | None = None, head_nm=None, to_float: bool = True
    ) -> Tensor:
        """The head's logits (B, L, V), float32 unless ``to_float`` is False (then the head's dtype)."""
        head = self.head if head is None else head
        head_nm = self.head_nm if head_nm is None else head_nm
        out = head(head_nm(h, cond))
        return out.float() if to_float else out

    def hidden(self, labels: Tensor, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing up to the head: hidden states (B, L, C) and the class embedding (B, C)."""
        h, cond = self.embed(labels, self.word_embed(x_in))
        return self.run_blocks(h, cond, self.blocks, self.pattern), cond

    def forward(self, labels: Tensor, x_in: Tensor) -> Tensor:
        """Teacher forcing. labels (B,), x_in (B, L-1, Cz) -> logits (B, L, V) float32."""
        h, cond = self.hidden(labels, x_in)
        return self.logits(h, cond)

    def head_loss(
        self,
        h: Tensor,
        cond: Tensor,
        target: Tensor,
        weight: Tensor,
        head: nn.Linear | None = None,
        head_nm: AdaLNBeforeHead | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``sum(weight * CE(logits, target))`` of the AdaLN head without materialising the logits.

        h (B, L, C), target (B, L), weight (B, L) -> (loss, per-token CE (B, L), arg-max == target
        (B, L)); the last two carry no gradient. See :mod:`maskar.nn.losses`.
        """
        head = self.head if head is None else head
        head_nm = self.head_nm if head_nm is None else head_nm
        x = head_nm(h, cond)
        B, L, C = x.shape
        loss, ce, correct = linear_cross_entropy(
            x.reshape(B * L, C), head.weight, head.bias, target.reshape(B * L), weight.reshape(B * L),
            self.cfg.label_smoothing,
        )  # fmt: skip
        return loss, ce.view(B, L), correct.view(B, L)

    # ------------------------------------------------------------------ training

    def batch_indices(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """Token pyramid of a batch: cached ``indices`` (B, L) / ``indices_{si}`` or the tokenizer."""
        if "indices" in batch:
            return list(batch["indices"].long().split(list(self.lengths), dim=1))
        if all(f"indices_{si}" in batch for si in range(len(self.patch_nums))):
            return [batch[f"indices_{si}"].long().flatten(1) for si in range(len(self.patch_nums))]
        if "image" not in batch:
            raise KeyError(f"{type(self).__name__}.loss: needs 'image' or 'indices', got {sorted(batch)}")
        img = batch["image"]
        with torch.no_grad(), no_autocast(img.device):
            return [i.long() for i in self.tokenizer.img_to_indices(img.float())]

    def drop_labels(self, labels: Tensor) -> Tensor:
        """Replace labels by the null class with probability cond_drop_rate (training only)."""
        if not self.training or self.cfg.cond_drop_rate <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.cond_drop_rate
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        indices = self.batch_indices(batch)
        with torch.no_grad(), no_autocast(indices[0].device):
            x_in = self.tokenizer.teacher_forcing_input(indices).float()  # (B, L-1, Cz)
        labels = self.drop_labels(batch["label"].long())
        return self.next_scale_loss(labels, x_in, torch.cat(indices, dim=1))

    def prepare_graph_step(self) -> str | None:
        """Make the training step fit one CUDA graph (``train.cuda_graph``): None, or why it
        cannot. Every random draw (label dropout, drop path) is on the GPU and nothing syncs
        with the host, so there is nothing to change."""
        return None

    def next_scale_loss(self, labels: Tensor, x_in: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The differentiable part of a training step (``train.compile=full`` compiles it whole).

        labels (B,), x_in (B, L-1, Cz), target (B, L). Loss: the batch mean of
        ``sum_l loss_weight_l * CE_l`` (per-token weights summing to 1 per sample).
        """
        h, cond = self.hidden(labels, x_in)
        B = target.shape[0]
        loss, ce, correct = self.head_loss(h, cond, target, (self.loss_weight / B).expand(B, -1))
        last = slice(*self.begin_ends[-1])
        return {"loss": loss, "ce": ce.mean(), "acc_last": correct[:, last].float().mean()}

    # ------------------------------------------------------------------ hooks of maskar.train.parallelize

    def repeated_blocks(self) -> list[nn.Module]:
        """The transformer blocks: compiled once each (train.compile=blocks), checkpointed per block."""
        return list(self.blocks)

    def compiled_methods(self, mode: str) -> tuple[str, ...]:
        """``full``: the method holding the whole differentiable step; ``blocks``: the head + loss."""
        return ("next_scale_loss",) if mode == "full" else ("head_loss",)

    def token_linears(self) -> list[nn.Linear]:
        """Linears applied to every token of a training step (the FLOP count of MFU)."""
        return [self.word_embed, self.head] + token_linears_of(self.blocks)

    def train_flops_per_sample(self) -> float:
        """Matmul FLOPs of one sample's forward + backward: 6 * token-path weights * L.

        The AdaLN projections act on one row per sample and attention is not counted (the
        convention of docs/benchmarks.md: MFU = 6 N B L / step time / peak).
        """
        return 6.0 * sum(m.weight.numel() for m in self.token_linears()) * self.L

    # ------------------------------------------------------------------ sampling

    def _sampling_args(self, cfg, cfg_schedule, temperature, top_k, top_p, seed, device) -> SamplingArgs:
        if cfg_schedule not in ("linear", "constant"):
            raise ConfigError(f"cfg_schedule: expected 'linear' or 'constant', got {cfg_schedule!r}")
        check_sampling_args(cfg, temperature, top_k, top_p)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: expected one of {list(SAMPLERS)}, got {self.sampler!r}")
        return SamplingArgs(
            cfg, cfg_schedule, temperature, top_k, top_p, make_generator(seed, device), self.sampler
        )

    def guidance(self, scale: float, si: int, schedule: str) -> float:
        """CFG weight at scale si: linear in the scale index (0 at the first scale) or constant."""
        K = len(self.patch_nums)
        if schedule == "constant" or K == 1:
            return float(scale)
        return float(scale) * si / (K - 1)

    def _check_labels(self, labels: Tensor) -> Tensor:
        """Validated int64 labels on the model's device. Checked where they are: labels given on
        the CPU are checked there, so a sampling loop never waits for the GPU here."""
        labels = labels.long()
        if labels.ndim != 1:
            raise ConfigError(f"labels: expected a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ConfigError(
                f"labels: expected ids in [0, {self.num_classes}] ({self.num_classes} = null class), "
                f"got {labels.tolist()}"
            )
        return labels.to(self.lvl_1L.device, non_blocking=True)

    def _new_caches(self) -> list[StaticKVCache] | None:
        return [StaticKVCache(self.L) for _ in self.blocks] if self.uses_kv_cache else None

    def _scale_logits(self, x: Tensor, cond: Tensor, caches: list[StaticKVCache] | None) -> Tensor:
        """One next-scale pass over the current scale's tokens (dense attention)."""
        h = self.run_blocks(x, cond, self.blocks, None, caches)
        return self.logits(h, cond)

    def _refine(self, si: int, idx: Tensor, guided: Tensor, ctx: dict, known: Tensor | None) -> Tensor:
        """Hook for HMAR's masked refinement; VAR keeps the next-scale tokens."""
        return idx

    def _needs_guided_logits(self, si: int, ctx: dict, known: Tensor | None) -> bool:
        """Whether ``_refine`` reads the whole guided logits of scale si (VAR: never)."""
        return False

    @contextlib.contextmanager
    def _region(self, name: str):
        """A named profiling region of sampling (``profile_marks``: see maskar.bench.sample)."""
        marks = self.profile_marks
        if marks is None:
            yield
            return
        with torch.profiler.record_function(name):
            yield
        marks.append((name, mark(self.lvl_1L.device)))

    def _start(self, labels: Tensor) -> ScaleState:
        """The state before the first scale: class embeddings, the first input, empty f_hat."""
        B = labels.shape[0]
        labels2 = torch.cat([labels, torch.full_like(labels, self.num_classes)])  # [cond; null]
        cond = self.class_emb(labels2)  # (2B, C)
        lvl_pos = self.lvl_pos()
        x = cond.unsqueeze(1) + self.pos_start + lvl_pos[:, :1]  # (2B, 1, C)
        side = self.patch_nums[-1]
        f_hat = torch.zeros(B, self.z_channels, side, side, device=labels.device)
        return ScaleState(cond, lvl_pos, x, None, f_hat, self._new_caches(), [])

    def _head_and_draw(self, si: int, h: Tensor, cond: Tensor, t: float, args: SamplingArgs, noise) -> Tensor:
        """Logits of the next-scale head, CFG, top-k / top-p and the draw, in row chunks.

        h (2B, n, C) -> ids (B, n). Each chunk of samples runs the head on its conditional and
        null-class rows and samples them, so neither the (2B, n, V) logits nor the sampler's
        temporaries exist for the whole batch at once (1 GB each at 1024 px, B 8). Each chunk draws
        its own noise, so neither does the noise (0.54 GB for a whole scale at 1024 px B 8; under
        CUDA graphs each draw is a transient block of their pool). Rows are independent, and a CPU
        generator gives the same numbers split into chunks or not, so on the CPU chunking changes
        nothing; a CUDA generator's numbers depend on the calls' sizes (Philox offsets per call),
        so there a seed's samples at scales over SAMPLE_ROWS rows depend on SAMPLE_ROWS.
        """
        B, n = h.shape[0] // 2, h.shape[1]
        per = max(1, SAMPLE_ROWS // n)  # samples per chunk
        out = []
        for b0 in range(0, B, per):
            b1 = min(B, b0 + per)
            with self._region(f"s{si:02d} head"):
                rows = torch.cat([h[b0:b1], h[B + b0 : B + b1]]) if per < B else h  # [cond; null]
                crow = torch.cat([cond[b0:b1], cond[B + b0 : B + b1]]) if per < B else cond
                logits2 = self.logits(rows, crow, to_float=False)  # the head's dtype: the draw reads it
            with self._region(f"s{si:02d} sample"):
                out.append(
                    sample_guided(
                        logits2, b1 - b0, t, args.top_k, args.top_p, args.temperature,
                        noise=noise((b1 - b0) * n), method=args.sampler,  # (rows, V) Exp(1)
                    )  # fmt: skip
                )
        return out[0] if len(out) == 1 else torch.cat(out)

    def _scale_step(
        self,
        si: int,
        st: ScaleState,
        args: SamplingArgs,
        noise,
        known: list[Tensor] | None = None,
        keep: list[Tensor] | None = None,
        collect: list[Tensor] | None = None,
        trace: SamplingTrace | None = None,
        **refine_kw,
    ) -> None:
        """Scale si: next-scale pass, draw, (HMAR) refinement, then f_hat and the next input.

        ``noise(rows)`` returns the (rows, V) Exp(1) draws of each categorical draw, in call
        order (:class:`NoiseSource`; under CUDA graphs the runner's own generator's, through
        :class:`~maskar.models.scale_graphs.PlannedNoise`).
        """
        B = st.f_hat.shape[0]
        t = self.guidance(args.cfg, si, args.cfg_schedule)
        k_si = keep[si] if known is not None else None
        ctx = {
            "cond": st.cond, "ctx_in": st.ctx_in, "lvl_pos": st.lvl_pos, "args": args, "noise": noise,
            "trace": trace, **refine_kw,
        }  # fmt: skip
        with self._region(f"s{si:02d} blocks"):
            h = self._next_scale_hidden(st)  # (2B, pn^2, C)
        guided = None
        whole = collect is not None or trace is not None or self._needs_guided_logits(si, ctx, k_si)
        if whole:
            with self._region(f"s{si:02d} head"):
                logits2 = self.logits(h, st.cond)  # (2B, pn^2, V)
                if collect is not None:
                    collect.append(logits2[:B].float())
                guided = guided_logits(logits2.float(), B, t)
            with self._region(f"s{si:02d} sample"):
                idx = sample_from_logits(
                    guided, args.top_k, args.top_p, args.temperature,
                    noise=noise(guided.shape[0] * guided.shape[1]), method=args.sampler,
                )  # fmt: skip
        else:
            idx = self._head_and_draw(si, h, st.cond, t, args, noise)
        del h
        if known is not None:
            idx = torch.where(k_si, known[si], idx)
        step = None
        if trace is not None:
            drawn = torch.ones_like(idx, dtype=torch.bool) if k_si is None else ~k_si
            step = trace.add("next_scale", si, idx, drawn, guided, cfg=t)
        idx = self._refine(si, idx, guided, ctx, k_si)
        del guided
        with self._region(f"s{si:02d} update"):
            self._advance(si, st, idx)
        if step is not None:
            step.info.update(final_tokens=idx, f_hat=st.f_hat)  # the scale's final ids; f_hat after it

    def _next_scale_hidden(self, st: ScaleState) -> Tensor:
        """The next-scale transformer pass over the current scale; without a KV cache in chunks of
        samples of at most BLOCK_ROWS rows (the rows are independent, so nothing changes)."""
        x, cond = st.x, st.cond
        per = max(1, BLOCK_ROWS // x.shape[1])
        if st.caches is not None or per >= x.shape[0]:
            return self.run_blocks(x, cond, self.blocks, None, st.caches)
        parts = [
            self.run_blocks(x[r : r + per], cond[r : r + per], self.blocks, None, None)
            for r in range(0, x.shape[0], per)
        ]
        return torch.cat(parts)

    def _advance(self, si: int, st: ScaleState, idx: Tensor) -> None:
        """Add scale si's codes to f_hat; set the next scale's inputs (none after the last)."""
        B, pn, device = idx.shape[0], self.patch_nums[si], idx.device
        st.tokens.append(idx)
        with no_autocast(device):
            h_map = self.tokenizer.lookup(idx).float().transpose(1, 2).reshape(B, self.z_channels, pn, pn)
            st.f_hat, nxt = self.tokenizer.next_input(si, st.f_hat, h_map)
        if si == len(self.patch_nums) - 1:
            st.x = st.ctx_in = None
            return
        st.ctx_in = nxt.float().flatten(2).transpose(1, 2)  # (B, pn'^2, Cz)
        b, e = self.begin_ends[si + 1]
        x = self.word_embed(st.ctx_in) + st.lvl_pos[:, b:e]
        st.x = torch.cat([x, x])

    def decode_precision_for(self, device: torch.device) -> str:
        """The VQ-VAE decode precision of a sampling call made now (``decode_precision``)."""
        if self.decode_precision != "auto":
            return self.decode_precision
        low = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) in (
            torch.bfloat16,
            torch.float16,
        )
        return "bf16" if low else "fp32"

    def decode(self, f_hat: Tensor, precision: str = "fp32") -> Tensor:
        """f_hat (B, Cz, h, w) -> images (B, C, H, W) float32 in [-1, 1], in DECODE_PIXELS chunks."""
        with self._region("decode"), no_autocast(f_hat.device):
            decoder = self._decoder or self.tokenizer
            return decode_in_chunks(decoder, f_hat, self.image_size, precision).float()

    @torch.no_grad()
    def _autoregress(
        self,
        labels: Tensor,
        args: SamplingArgs,
        known: list[Tensor] | None = None,
        keep: list[Tensor] | None = None,
        collect: list[Tensor] | None = None,
        out_indices: list[Tensor] | None = None,
        trace: SamplingTrace | None = None,
        **refine_kw,
    ) -> Tensor:
        """Sample the pyramid scale by scale; return images (B, C, H, W) in [-1, 1].

        ``known``/``keep``: per-scale (B, pn^2) ids and bool masks of tokens forced to the
        given ids (editing). ``collect`` / ``out_indices`` receive the conditional logits and
        the final token ids of each scale (benchmarks); ``trace`` records every step. Plain
        generation on a GPU replays per-scale CUDA graphs (:mod:`maskar.models.scale_graphs`);
        the eager loop below is the reference it is tested against, and what everything else
        (editing, given tokens, traces, the CPU) runs.
        """
        precision = self.decode_precision_for(labels.device)
        plain = known is None and collect is None and trace is None
        if plain and graphs_usable(self, labels.device):
            runner = self._graphs.runner(self, labels.shape[0], args, refine_kw, precision)
            if runner is not None:
                return runner.generate(self, labels, args.generator, out_indices)
        if self.profile_marks is not None:
            self.profile_marks.append(("prep", mark(labels.device)))
        st = self._start(labels)
        noise = NoiseSource(self.vocab_size, args.generator, labels.device)
        for si in range(len(self.patch_nums)):
            self._scale_step(si, st, args, noise, known, keep, collect, trace, **refine_kw)
        if out_indices is not None:
            out_indices.extend(st.tokens)
        st.caches = None  # the KV cache is not needed to decode: free it before the decoder's activations
        return self.decode(st.f_hat, precision)

    def generate(
        self,
        labels: Tensor,
        *,
        cfg: float = 1.5,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        top_k: int = 900,
        top_p: float = 0.96,
        seed: int | None = 0,
        known: list[Tensor] | None = None,
        keep: list[Tensor] | None = None,
        return_trace: bool = False,
        trace_logits: bool = False,
        **extra,
    ) -> Tensor | tuple[Tensor, SamplingTrace]:
        """Class-conditional samples (B, C, H, W) in [-1, 1]; labels may be the null class.

        ``labels`` may live on the CPU (checked there, then moved without waiting) or on the
        model's device. ``known`` / ``keep``: one (B, pn^2) int64 id tensor and one (B, pn^2)
        bool tensor per scale; where ``keep`` is True the token is forced to ``known``
        (generation from given tokens, as editing does; all True = teacher forcing).
        ``return_trace=True`` returns ``(images, trace)``: per scale a ``next_scale`` step (drawn
        ids, guidance weight, the scale's final ids and f_hat after it) and, for HMAR, one
        ``refine`` step per pass; ``trace_logits=True`` also keeps the guided logits of every draw.
        ``compile=True`` compiles sampling first, once (:meth:`compile_sampler` with the decoder);
        ``auto`` / False leave it as it is.
        """
        self._compile_once(extra.pop("compile", "auto"))
        labels = self._check_labels(labels)
        args = self._sampling_args(cfg, cfg_schedule, temperature, top_k, top_p, seed, labels.device)
        if (known is None) != (keep is None):
            raise ConfigError("generate: pass known and keep together (one tensor per scale each)")
        if known is not None:
            known, keep = self._check_known(known, keep, labels.shape[0])
        trace = SamplingTrace(keep_logits=trace_logits) if return_trace else None
        images = self._autoregress(
            labels, args, known, keep, trace=trace, **self._refine_options(extra, editing=known is not None)
        )
        return (images, trace) if return_trace else images

    def _check_known(self, known, keep, batch: int) -> tuple[list[Tensor], list[Tensor]]:
        """Per-scale ids (B, pn^2) int64 and masks (B, pn^2) bool; else a ConfigError naming the scale."""
        K = len(self.patch_nums)
        if len(known) != K or len(keep) != K:
            raise ConfigError(
                f"known / keep: expected {K} tensors each (one per scale), got {len(known)}, {len(keep)}"
            )
        ids, masks = [], []
        for si, (k, m, pn) in enumerate(zip(known, keep, self.patch_nums)):
            want = (batch, pn * pn)
            if tuple(k.shape) != want or tuple(m.shape) != want:
                raise ConfigError(
                    f"known[{si}] / keep[{si}]: expected {want}, got {tuple(k.shape)} / {tuple(m.shape)}"
                )
            k = k.long()
            if k.numel() and (k.min() < 0 or k.max() >= self.vocab_size):
                raise ConfigError(f"known[{si}]: expected token ids in [0, {self.vocab_size - 1}]")
            ids.append(k.to(self.lvl_1L.device))  # labels are on the model's device too
            masks.append(m.bool().to(self.lvl_1L.device))
        return ids, masks

    def _refine_options(self, extra: dict, editing: bool) -> dict:
        if extra:
            raise TypeError(f"{type(self).__name__}.generate: unknown sampling arguments {sorted(extra)}")
        return {}

    def keep_masks(self, keep_mask: Tensor) -> list[Tensor]:
        """(B, 1, H, W) bool -> per scale (B, pn^2) bool: bilinear resize, > 0.5; pn^2 <= 3 fully kept."""
        if keep_mask.ndim != 4 or keep_mask.shape[1] != 1:
            raise ValueError(f"keep_mask: expected shape (B, 1, H, W), got {tuple(keep_mask.shape)}")
        m = keep_mask.float()
        out = []
        for pn in self.patch_nums:
            if pn * pn <= 3:
                out.append(torch.ones(m.shape[0], pn * pn, dtype=torch.bool, device=m.device))
            else:
                small = F.interpolate(m, size=(pn, pn), mode="bilinear", align_corners=False)
                out.append((small > 0.5).flatten(1))
        return out

    @torch.no_grad()
    def edit(
        self,
        images: Tensor,
        keep_mask: Tensor,
        labels: Tensor,
        *,
        cfg: float = 1.5,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        top_k: int = 900,
        top_p: float = 0.96,
        seed: int | None = 0,
        **extra,
    ) -> Tensor:
        """Zero-shot editing: the tokens of the kept region are forced at every scale.

        images (B, C, H, W) in [-1, 1]; keep_mask (B, 1, H, W) bool, True = keep; labels (B,)
        (the null class gives in/out-painting, a class id class-conditional editing).
        ``compile``: as in :meth:`generate`.
        """
        self._compile_once(extra.pop("compile", "auto"))
        labels = self._check_labels(labels)
        if images.shape[0] != labels.shape[0] or keep_mask.shape[0] != labels.shape[0]:
            raise ValueError(
                f"edit: images {tuple(images.shape)}, keep_mask {tuple(keep_mask.shape)} and labels "
                f"{tuple(labels.shape)} must have the same batch size"
            )
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(
                f"edit: expected {self.image_size}x{self.image_size} images, got {tuple(images.shape)}"
            )
        if not bool(torch.isfinite(images).all()) or float(images.abs().max()) > 1.0 + 1e-4:
            raise ValueError("edit: images must be finite and in [-1, 1]")
        args = self._sampling_args(cfg, cfg_schedule, temperature, top_k, top_p, seed, labels.device)
        with no_autocast(images.device):
            known = [i.long() for i in self.tokenizer.img_to_indices(images.float())]
        keep = self.keep_masks(keep_mask.to(images.device))
        return self._autoregress(labels, args, known, keep, **self._refine_options(extra, editing=True))

    @classmethod
    def from_config(cls, cfg: NextScaleConfig) -> NextScaleModel:
        return cls(cfg)


class VAR(NextScaleModel):
    """Next-scale prediction with block-causal training attention and a KV cache at inference."""

    pattern_kind = "block_causal"
    uses_kv_cache = True


registry.register(
    "var",
    kind="generator",
    config_cls=VARConfig,
    sample_cls=VARSampleConfig,
    build=VAR.from_config,
    description="VAR next-scale prediction (block-causal, KV-cache sampling)",
)
