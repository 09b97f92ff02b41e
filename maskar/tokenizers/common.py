"""Convolutional encoder/decoder shared by the VQ and KL tokenizers (LDM/taming layout).

Module names follow the official checkpoints so state dicts load without renaming:
``conv_in``, ``down.{level}.block.{i}`` / ``.attn.{i}`` / ``.downsample.conv``,
``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``, ``up.{level}.block.{i}`` /
``.attn.{i}`` / ``.upsample.conv``, ``norm_out``, ``conv_out``. ``up`` is indexed by
level, so ``up[-1]`` (the lowest resolution) runs first.

Two attention layouts exist: VAR's VQ-VAE uses one fused 1x1 ``qkv`` conv, MAR's
KL-16 uses separate ``q``, ``k``, ``v`` convs. Both are single-head with scale C^-0.5.

:class:`ConvAutoencoderConfig` holds the encoder/decoder fields both tokenizer configs share.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from maskar import env
from maskar.config import ModelConfig, field
from maskar.kernels import optional_kernel
from maskar.tokenizers import wide_attention
from maskar.tokenizers.losses import TokenizerLossConfig


@dataclass
class ConvAutoencoderConfig(TokenizerLossConfig, ModelConfig):
    """Conv encoder/decoder fields of the VQ and KL tokenizer configs (plus the loss fields).

    Subclasses override the defaults their official checkpoint differs in (VQ: ``ch``;
    KL: ``dec_attn_levels``) and call :meth:`validate_conv_layout` from ``validate``.
    """

    resolution: int = field(256, min=1, help="image side in pixels (a multiple of the downsample factor)")
    image_channels: int = field(3, choices=(1, 3), help="image channels in and out")
    ch: int = field(128, min=1, help="base width of the conv encoder/decoder")
    ch_mult: tuple[int, ...] = field((1, 1, 2, 2, 4), min=1, help="width multiplier per level")
    enc_res_blocks: int = field(2, min=1, help="ResnetBlocks per encoder level")
    dec_res_blocks: int = field(3, min=1, help="ResnetBlocks per decoder level")
    enc_attn_levels: tuple[int, ...] = field((-1,), help="encoder levels with attention (-1 = lowest res)")
    dec_attn_levels: tuple[int, ...] = field((-1,), help="decoder levels with attention (-1 = lowest res)")
    mid_attn: bool = field(True, help="attention in the middle blocks")
    norm_groups: int = field(32, min=1, help="GroupNorm groups (must divide every width)")
    dropout: float = field(0.0, min=0.0, max=1.0)

    @property
    def downsample(self) -> int:
        """Image side / latent side: 2^(levels - 1)."""
        return 2 ** (len(self.ch_mult) - 1)

    def validate_conv_layout(self) -> None:
        """Attention levels in range and ``norm_groups`` dividing every width."""
        n = len(self.ch_mult)
        for name in ("enc_attn_levels", "dec_attn_levels"):
            for lv in getattr(self, name):
                if not -n <= lv < n:
                    raise ValueError(f"{name}: level {lv} out of range for {n} levels")
        for m in self.ch_mult:
            if (self.ch * m) % self.norm_groups:
                raise ValueError(
                    f"norm_groups={self.norm_groups} must divide every width ch*ch_mult, got {self.ch * m}"
                )


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm(eps 1e-6, affine) as in every LDM-style autoencoder."""
    if channels % groups:
        raise ValueError(f"norm_groups={groups} must divide every channel count, got {channels} channels")
    _load_group_norm_kernel()
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


_group_norm_kernel = None  # maskar.kernels.group_norm once loaded (stays None without Triton)


def _load_group_norm_kernel() -> None:
    """Import the fused GroupNorm(+SiLU) op (when a model is built, never inside a torch.compile trace)."""
    global _group_norm_kernel
    if _group_norm_kernel is None:  # without Triton the torch code runs everywhere
        _group_norm_kernel = optional_kernel("group_norm")


_conv_out_kernel = None  # maskar.kernels.conv3x3_narrow once loaded, if MASKAR_CONV_OUT_KERNEL is on


def _load_conv_out_kernel() -> None:
    """Import the few-output-channel 3x3 conv kernel where it is switched on (when a decoder is built)."""
    global _conv_out_kernel
    if _conv_out_kernel is None and env.switch("MASKAR_CONV_OUT_KERNEL"):
        _conv_out_kernel = optional_kernel("conv3x3_narrow")


@torch.library.custom_op("maskar::conv2d_nchw", mutates_args=())
def conv2d_nchw(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv2d`` (stride 1) of NCHW x, opaque to Inductor. Inductor's layout optimisation turns
    every convolution's input channels-last, and for the decoder's 3-channel output conv cuDNN's
    channels-last kernel is 6x slower than its NCHW one (an H100, bf16, 256 px B 64: 24.6 of a
    compiled decode's 125 ms, docs/benchmarks.md). A custom op keeps the layout it was traced
    with (torch's default constraint for custom ops), so Inductor hands it NCHW."""
    return F.conv2d(x.contiguous(), weight.contiguous(), bias, 1, padding)


@conv2d_nchw.register_fake
def _(x, weight, bias, padding):
    return F.conv2d(x.contiguous(), weight, bias, 1, padding).contiguous()


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True, nchw_out: bool = False) -> torch.Tensor:
    """``norm(x)`` then, if ``silu``, SiLU; contiguous (NCHW) whatever x's layout with ``nchw_out``
    (written so by the fused op, else a copy).

    CUDA inference in fp16 / bf16 (the frozen decoder when sampling) takes one fused Triton op
    (``maskar.kernels.group_norm``: PyTorch's group norm reduced each (sample, group) in one
    thread block, ~20x its byte floor at 1024 px); everything else runs the torch code, the
    reference. ``norm.weight`` is read here, so ``functional_call``'s cast weights apply.
    """
    fused = _group_norm_kernel
    if fused is not None and fused.supports(x, norm.weight, norm.bias, norm.num_groups):
        return fused.group_norm_act(
            x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, nchw_out=nchw_out
        )
    h = norm(x)
    h = F.silu(h) if silu else h
    return h.contiguous() if nchw_out else h


# Where the fused GroupNorm runs (CUDA bf16 / fp16 inference), each ResnetBlock's conv1 runs without
# its bias and the norm after it adds the bias inside its kernels (float32, unrounded): one pass
# over the conv's output fewer, eagerly (PyTorch adds a cuDNN convolution's bias as a pass of its
# own) and compiled (Inductor's bias kernel before the opaque norm). MASKAR_GN_CONV_BIAS (read at
# import; on by default since measured: the eager 256 px B 64 decode 153.6 -> 144.7 ms NCHW on an
# H100, 122.4 with the channels-last decode; docs/benchmarks.md).
NORM_TAKES_CONV_BIAS = bool(env.switch("MASKAR_GN_CONV_BIAS"))


def conv_norm_act(conv: nn.Conv2d, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm_act(norm, conv(x))``; with :data:`NORM_TAKES_CONV_BIAS`, where the fused norm runs,
    the convolution's bias added by the norm's kernels instead of a pass of its own. Decided
    before the convolution runs (from its input and output shape), so every other path computes
    exactly ``conv(x)`` as before."""
    fused = _group_norm_kernel
    plain = conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)  # not padding="same"
    if NORM_TAKES_CONV_BIAS and fused is not None and conv.bias is not None and plain and x.dim() == 4:
        out_shape = (x.shape[0], conv.out_channels, *_conv_out_hw(conv, x))
        if fused.supports(x, norm.weight, norm.bias, norm.num_groups, shape=out_shape):
            h = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            del x  # the caller's temporary: freed before the norm runs (the decode's memory peak)
            g = norm.num_groups
            return fused.group_norm_act(h, norm.weight, norm.bias, g, norm.eps, True, x_bias=conv.bias)
    h = conv(x)
    del x
    return norm_act(norm, h)


def _conv_out_hw(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    (ph, pw), (dh, dw), (kh, kw), (sh, sw) = conv.padding, conv.dilation, conv.kernel_size, conv.stride
    h, w = x.shape[2], x.shape[3]
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


# Where the fused GroupNorm runs, a ResnetBlock whose output goes straight into another norm (the
# next block's first, or the decoder's last) leaves its sum to that norm: conv2 runs without its
# bias, and the norm's statistics pass adds the bias and the shortcut, writes the sum, and takes
# its statistics (``maskar.kernels.group_norm.sum_norm_act``), one read of the block's output
# fewer than a separate sum. MASKAR_GN_RESIDUAL (read at import), opt-in: on an H100 it took
# HMAR-d16's 256 px B 64 call 203.8 -> 201.6 ms but its 1024 px B 8 call 400.7 -> 406.1
# (docs/benchmarks.md, *The wide attention's softmax and the norm's grid*).
NORM_TAKES_RESIDUAL = bool(env.switch("MASKAR_GN_RESIDUAL"))


def _norm_takes_sum(block: nn.Module, nxt: nn.Module | None, x: torch.Tensor) -> bool:
    """Whether ``block`` (a ResnetBlock taking x) leaves its sum to the norm ``nxt`` reads it with:
    the switch on, ``nxt`` a ResnetBlock's first norm or a GroupNorm with SiLU after it, and the
    fused op taking that norm's call (CUDA bf16 / fp16 inference, as :func:`norm_act`)."""
    fused = _group_norm_kernel
    if not NORM_TAKES_RESIDUAL or fused is None or not isinstance(block, ResnetBlock) or x.dim() != 4:
        return False
    norm = nxt.norm1 if isinstance(nxt, ResnetBlock) else nxt
    if not isinstance(norm, nn.GroupNorm):
        return False
    out_shape = (x.shape[0], block.conv2.out_channels, *_conv_out_hw(block.conv2, x))
    return fused.supports(x, norm.weight, norm.bias, norm.num_groups, shape=out_shape)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3 -> GN -> SiLU -> dropout -> conv3, plus a 1x1 shortcut if widths differ."""

    def __init__(self, in_ch: int, out_ch: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Only present when the width changes, exactly like the official key tables.
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One name for the running tensor, so each intermediate is freed as soon as the next one
        # exists: at most x and two more full-size tensors live at once (the 1024 px decode's
        # peak, 335 MB each at 160 x 1024^2 bf16), not x and three.
        h = conv_norm_act(self.conv1, self.norm2, norm_act(self.norm1, x))
        h = self.conv2(self.dropout(h))
        if torch.is_grad_enabled():
            return self.nin_shortcut(x) + h
        return h.add_(self.nin_shortcut(x))  # inference: the sum in conv2's output (the same bits)

    def forward_unsummed(self, x: torch.Tensor | None, pending: list) -> tuple:
        """The block for a caller that sums through the fused norm (:data:`NORM_TAKES_RESIDUAL`):
        its input is x, or the previous block's parts still to be summed (by this block's first
        norm), handed over in ``pending`` (a list this call empties, so that the parts are freed
        once summed); it returns its own output as parts (conv2's output without the bias, the
        bias, the shortcut), for the norm that reads it next."""
        if not pending:
            h = norm_act(self.norm1, x)
        else:
            x, h = self._sum_norm(self.norm1, pending)
        h = conv_norm_act(self.conv1, self.norm2, h)
        c = self.conv2
        h = F.conv2d(self.dropout(h), c.weight, None, c.stride, c.padding, c.dilation, c.groups)
        return h, c.bias, self.nin_shortcut(x)

    @staticmethod
    def _sum_norm(norm: nn.GroupNorm, pending: list, nchw_out: bool = False) -> tuple:
        """(sum, SiLU(norm(sum))) of the block parts popped from ``pending``, through the fused ops
        (``maskar.kernels.group_norm.sum_norm_act``'s two steps), the parts freed between them."""
        gn = _group_norm_kernel
        h, b, r = pending.pop()
        s, stats = gn.group_norm_sum_stats_op(h, b, r, norm.num_groups, float(norm.eps))
        del h, r  # before the apply pass allocates its output: three full-size tensors at most
        return s, gn.group_norm_apply_op(s, stats, norm.weight, norm.bias, True, nchw_out)

    @staticmethod
    def _sum(pending: list) -> torch.Tensor:
        """The block parts popped from ``pending`` summed (inference: into conv2's output), where
        the next module is not a norm that can take them."""
        h, b, r = pending.pop()
        return h.add_(b.view(1, -1, 1, 1)).add_(r)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over the H*W positions, residual.

    ``fused=True`` holds q, k, v in one conv ``qkv`` (output channels ordered q | k | v,
    VAR's layout); ``fused=False`` holds separate ``q``, ``k``, ``v`` convs (LDM / MAR).
    """

    def __init__(self, ch: int, groups: int = 32, fused: bool = True):
        super().__init__()
        self.fused = fused
        self.norm = group_norm(ch, groups)
        if fused:
            self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        else:
            self.q = nn.Conv2d(ch, ch, 1)
            self.k = nn.Conv2d(ch, ch, 1)
            self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = norm_act(self.norm, x, silu=False)
        if self.fused:
            q, k, v = self.qkv(h).view(B, 3, C, H * W).unbind(1)
        else:
            q, k, v = (m(h).view(B, C, H * W) for m in (self.q, self.k, self.v))
        # (B, 1, HW, C): one head of width C; SDPA's default scale is C^-0.5.
        q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        if wide_attention.applies(q):  # a head wider than SDPA's fused kernels take (CUDA inference)
            out = wide_attention.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Asymmetric pad (0, 1, 0, 1) then a stride-2 3x3 conv without padding."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# Opt-in until measured on a GPU (``maskar bench decode variants=bf16,bf16-subpixel``): the
# low-precision decode computes each Upsample as :func:`upsample_conv_subpixel`.
SUBPIXEL_UPSAMPLE = False

# _PHASE_TAPS[a, r, k]: output rows of phase a (2i + a) read input row i - 1 + a + r through tap
# r in {0, 1}; kernel row k of the 3x3 conv over the upsampled image lands on tap r.
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def upsample_conv_subpixel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(nearest_upsample_x2(x))`` (padding 1) as one 2x2 convolution of ``x`` with four
    times the output channels, one group per output phase (row parity a, column parity b), whose
    results are interleaved.

    Nearest upsampling repeats each input pixel over a 2x2 block, so the 3x3 window of an output
    pixel covers only 2x2 input pixels; their weights are sums of the 3x3 kernel's taps
    (``_PHASE_TAPS``). The same function in 16 instead of 36 multiply-adds per output channel,
    input channel and input pixel, without the upsampled tensor. The merged weights are summed
    in float32 (float64 for float64 input) and rounded once to the input dtype, so the result
    differs from the two-step form by that rounding alone."""
    c_out = weight.shape[0]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    taps = torch.tensor(_PHASE_TAPS, dtype=acc, device=weight.device)  # (a, r, k)
    w = torch.einsum("ark,bcl,oikl->aboirc", taps, taps, weight.to(acc))  # (a, b, out, in, r, c)
    w = w.reshape(4 * c_out, weight.shape[1], 2, 2).to(x.dtype)
    b = None if bias is None else bias.to(x.dtype).repeat(4)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), w, b)  # (B, 4 C_out, H + 1, W + 1)
    n, _, h1, w1 = y.shape
    h, wd = h1 - 1, w1 - 1
    y = y.view(n, 2, 2, c_out, h1, w1)
    out = y.new_empty(n, c_out, h, 2, wd, 2)
    for a in range(2):
        for bb in range(2):  # phase (a, b) of output (2i + a, 2j + b) reads conv position (i + a, j + b)
            out[:, :, :, a, :, bb] = y[:, a, bb, :, a : a + h, bb : bb + wd]
    return out.view(n, c_out, 2 * h, 2 * wd)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (low-precision inference with ``SUBPIXEL_UPSAMPLE``: the same
    function as one 2x2 convolution, :func:`upsample_conv_subpixel`)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if SUBPIXEL_UPSAMPLE and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled():
            return upsample_conv_subpixel(x, self.conv.weight, self.conv.bias)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int, dropout: float, attn: bool, fused: bool):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups, dropout)
        self.attn_1 = AttnBlock(ch, groups, fused) if attn else nn.Identity()
        self.block_2 = ResnetBlock(ch, ch, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: res blocks, each optionally followed by attention, then resampling."""

    def __init__(
        self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)  # empty, or one per block
        if resample is not None:
            self.add_module(name, resample)
        self._resample_name = name if resample is not None else None

    def steps(self) -> Iterator[nn.Module]:
        """The level's modules in the order they apply (block, attention, ..., resampling)."""
        for i, blk in enumerate(self.block):
            yield blk
            if len(self.attn):
                yield self.attn[i]
        if self._resample_name is not None:
            yield getattr(self, self._resample_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps():
            x = step(x)
        return x


def _res_blocks(
    c_in: int, c_out: int, num_res_blocks: int, attn: bool, groups: int, dropout: float, fused_attn: bool
) -> tuple[list[nn.Module], list[nn.Module]]:
    """One level's ResnetBlocks (the first maps c_in -> c_out) and, if ``attn``, one AttnBlock after each.

    Created in forward order (block, attn, block, ...) so seeded initialisations stay the same.
    """
    blocks, attns = [], []
    for i in range(num_res_blocks):
        blocks.append(ResnetBlock(c_in if i == 0 else c_out, c_out, groups, dropout))
        if attn:
            attns.append(AttnBlock(c_out, groups, fused_attn))
    return blocks, attns


def _check_levels(levels: Sequence[int], n: int, what: str) -> None:
    for lv in levels:
        if not 0 <= lv < n:
            raise ValueError(f"{what}: level {lv} out of range for {n} levels (ch_mult)")


class Encoder(nn.Module):
    """Image (B, in_ch, H, W) -> features (B, out_ch, H/2^(L-1), W/2^(L-1))."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        in_channels: int,
        out_channels: int,
        attn_levels: Sequence[int] = (),
        mid_attn: bool = True,
        fused_attn: bool = True,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        n = len(ch_mult)
        _check_levels(attn_levels, n, "encoder attn_levels")
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for lv, m in enumerate(ch_mult):
            c_out = ch * m
            blocks, attns = _res_blocks(
                c_in, c_out, num_res_blocks, lv in attn_levels, norm_groups, dropout, fused_attn
            )
            down = Downsample(c_out) if lv != n - 1 else None
            self.down.append(_Level(blocks, attns, down, "downsample"))
            c_in = c_out
        self.mid = _Mid(c_in, norm_groups, dropout, mid_attn, fused_attn)
        self.norm_out = group_norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(norm_act(self.norm_out, h))


class Decoder(nn.Module):
    """Latent (B, in_ch, h, w) -> image (B, out_ch, h*2^(L-1), w*2^(L-1)); not clamped."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        in_channels: int,
        out_channels: int,
        attn_levels: Sequence[int] = (),
        mid_attn: bool = True,
        fused_attn: bool = True,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        n = len(ch_mult)
        _check_levels(attn_levels, n, "decoder attn_levels")
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, norm_groups, dropout, mid_attn, fused_attn)
        levels: list[nn.Module] = []
        for lv in reversed(range(n)):
            c_out = ch * ch_mult[lv]
            blocks, attns = _res_blocks(
                c_in, c_out, num_res_blocks, lv in attn_levels, norm_groups, dropout, fused_attn
            )
            up = Upsample(c_out) if lv != 0 else None
            levels.append(_Level(blocks, attns, up, "upsample"))
            c_in = c_out
        # Indexed by level (up[0] = full resolution) although applied from the last one.
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = group_norm(c_in, norm_groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)
        _load_conv_out_kernel()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        # The levels' steps one by one rather than ``h = level(h)``: a level call would keep its
        # input alive (as this frame's h) until the level returns, one full-size tensor more at
        # the decode's memory peak (335 MB per 1024 px image in bf16).
        steps = [step for level in reversed(self.up) for step in level.steps()]
        parts = None  # the last ResnetBlock's output, not yet summed (NORM_TAKES_RESIDUAL)
        for i, step in enumerate(steps):
            nxt = steps[i + 1] if i + 1 < len(steps) else self.norm_out
            defer = _norm_takes_sum(step, nxt, h if parts is None else parts[0])
            if parts is None and not defer:
                h = step(h)
                continue
            # a ResnetBlock (only one leaves parts, only for a ResnetBlock or norm_out after it)
            pending, parts = ([] if parts is None else [parts]), None
            parts, h = step.forward_unsummed(h, pending), None
            if not defer:  # its output goes elsewhere first (attention, upsampling): summed now
                pending, parts = [parts], None
                h = ResnetBlock._sum(pending)
        # The output conv's NCHW input (below) written by the norm itself: no copy of the
        # channels-last decode's top-level activation (5.2 ms of a compiled 256 px B 64 decode on an H100).
        # The Triton kernel (MASKAR_CONV_OUT_KERNEL) takes either layout.
        conv = self.conv_out
        kernel = _conv_out_kernel
        narrow = (
            kernel is not None and conv.out_channels < 8 and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1
            and kernel.applies(h if parts is None else parts[0], conv.weight, conv.bias)
        )  # fmt: skip
        nchw_out = conv.out_channels < 8 and not narrow
        if parts is not None:
            pending, parts = [parts], None
            _, h = ResnetBlock._sum_norm(self.norm_out, pending, nchw_out)
        else:
            h = norm_act(self.norm_out, h, nchw_out=nchw_out)
        if narrow:
            return kernel.conv3x3_narrow_op(h, conv.weight, conv.bias)
        if conv.out_channels < 8:
            # In channels-last memory cuDNN runs this conv (3 output channels) 6x slower than in
            # NCHW (H200, bf16: 3.1 against 0.5 ms per 8 x 256^2 chunk), more than the rest of the
            # decoder gains from the layout; the copy to NCHW costs one pass over h. No-op on NCHW.
            # Compiled, Inductor would make it channels-last again: the opaque op keeps NCHW.
            if torch.compiler.is_compiling() and not torch.is_grad_enabled():
                return conv2d_nchw(h, conv.weight, conv.bias, int(conv.padding[0]))
            h = h.contiguous()
        return conv(h)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """Weight used by the adaptive GAN weight (gradient-norm ratio)."""
        return self.conv_out.weight


def build_encoder_decoder(
    cfg: ConvAutoencoderConfig, *, enc_out_channels: int, dec_in_channels: int, fused_attn: bool
) -> tuple[Encoder, Decoder]:
    """The encoder and decoder a tokenizer config describes (attention levels taken mod levels)."""
    n = len(cfg.ch_mult)
    common = dict(
        ch=cfg.ch,
        ch_mult=cfg.ch_mult,
        mid_attn=cfg.mid_attn,
        fused_attn=fused_attn,
        norm_groups=cfg.norm_groups,
        dropout=cfg.dropout,
    )
    encoder = Encoder(
        num_res_blocks=cfg.enc_res_blocks,
        in_channels=cfg.image_channels,
        out_channels=enc_out_channels,
        attn_levels=tuple(lv % n for lv in cfg.enc_attn_levels),
        **common,
    )
    decoder = Decoder(
        num_res_blocks=cfg.dec_res_blocks,
        in_channels=dec_in_channels,
        out_channels=cfg.image_channels,
        attn_levels=tuple(lv % n for lv in cfg.dec_attn_levels),
        **common,
    )
    return encoder, decoder
