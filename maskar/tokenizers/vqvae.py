"""VAR's multi-scale residual VQ-VAE (``vae_ch160v4096z32``) and its training loss.

An image is encoded once to f (B, Cz, h, w). Scale k of K (side pn_k) quantises the
residual f_rest area-downsampled to pn_k x pn_k, looks the codes up, bicubic-upsamples
them back to h x w (not at the last scale), applies the residual conv phi_k, and adds the
result to f_hat (subtracting it from f_rest). Decoding is decoder(post_quant_conv(f_hat)).

Generators use the helpers below (teacher-forcing inputs, incremental f_hat update,
HMAR's own-residual input). Module and buffer names match the official checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maskar import env, registry
from maskar.config import field
from maskar.tokenizers import resample
from maskar.tokenizers.common import ConvAutoencoderConfig, build_encoder_decoder
from maskar.tokenizers.losses import TokenizerLosses, TokenizerTrainingHooks

_NEAREST_CHUNK = 16384  # rows of the distance matrix computed at once

PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


@dataclass
class VQVAEConfig(ConvAutoencoderConfig):
    """Defaults = official ``vae_ch160v4096z32`` with the 256 px schedule."""

    arch: str = "vqvae"
    resolution: int | None = field(
        None, min=1, help="image side in pixels; null = patch_nums[-1] * downsample (set: must equal it)"
    )
    ch: int = field(160, min=1, help="base width of the conv encoder/decoder")
    z_channels: int = field(32, min=1, help="latent / codebook width Cz")
    vocab_size: int = field(4096, min=2, help="codebook size")
    beta: float = field(0.25, min=0.0, help="commitment loss weight")
    quant_resi: float = field(0.5, min=0.0, max=1.0, help="phi mix ratio: (1-r)*h + r*conv(h); 0 = identity")
    share_quant_resi: int = field(4, min=0, help="number of phi convs (0 = one per scale)")
    patch_nums: tuple[int, ...] = field(PATCH_NUMS[256], min=1, help="tokens per side at each scale")
    dead_code_steps: int = field(200, min=0, help="re-initialise codes unused this many steps (0 = off)")
    usage_window: int = field(100, min=1, help="steps over which per-scale codebook usage is measured")

    def validate(self) -> None:
        pn = self.patch_nums
        if any(b <= a for a, b in zip(pn, pn[1:])):
            raise ValueError(f"patch_nums must be strictly increasing, got {list(pn)}")
        down = self.downsample
        if self.resolution is None:
            self.resolution = pn[-1] * down  # derived, so patch_nums alone picks the image size
        if pn[-1] * down != self.resolution:
            raise ValueError(
                f"patch_nums[-1]={pn[-1]} times the downsample factor {down} (from ch_mult) must equal "
                f"resolution={self.resolution}"
            )
        self.validate_conv_layout()
        self.validate_losses()


# Decoder precisions of :meth:`MultiScaleVQVAE.fhat_to_img` (docs/var_hmar.md, *Memory and speed*).
DECODE_PRECISIONS = ("fp32", "bf16")
# The bf16 decode in channels-last memory (cuDNN's NHWC kernels take it without transposes; the
# fused group norm reads it directly and writes the last norm NCHW for the 3-channel output conv,
# 6x slower in channels-last). On since 2026-12-06: until then the first norm small enough for
# PyTorch's CUDA group norm turned the rest of the decode NCHW, and the switch measured no gain.
# Kept channels-last, the eager 256 px B 64 decode takes 122.4 ms against 153.3 NCHW (both with
# the conv bias in the norm: 144.6 NCHW), the compiled one 100.5 against 106.2 (H100;
# docs/benchmarks.md, *The layout copies found, the channels-last decode repaired*).
# MASKAR_DECODE_CHANNELS_LAST=0 restores NCHW for a whole process. Read at import.
BF16_CHANNELS_LAST = bool(env.switch("MASKAR_DECODE_CHANNELS_LAST"))
# cuDNN autotuning (``cudnn.benchmark``) for the bf16 decode on CUDA. Off: on the H200 its search
# found nothing faster than cuDNN's heuristic choice (256 px B 64: 142.8 vs 143.4 ms; 1024 px B 8:
# 293.7 vs 293.9 ms, docs/benchmarks.md), and the first decode of each shape would pay for it.
BF16_CUDNN_BENCHMARK = False


@contextlib.contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set to True inside (when ``on``), restored after."""
    if not on:
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _cast_params(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating parameters and buffers of ``module`` cast to ``dtype`` (for functional_call)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in named}


# ----------------------------------------------------------------------------- resampling


# Both go through maskar/tokenizers/resample.py: on CUDA the bicubic up-sampling is the same
# linear map as F.interpolate applied as two small float64 GEMMs (PyTorch's bicubic kernel
# was 9% of a training step); on the CPU F.interpolate itself, bit for bit as before.


def area_down(x: torch.Tensor, pn: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, pn, pn) by area averaging; identity at the same size."""
    return x if x.shape[-1] == pn else resample.resize(x, (pn, pn), "area")


def bicubic_up(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, pn, pn) -> (B, C, side, side) bicubic (align_corners False); identity at the same size."""
    return x if x.shape[-1] == side else resample.resize(x, (side, side), "bicubic")


# ----------------------------------------------------------------------------- quantizer


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h); keys ``weight``/``bias`` like the official module."""

    def __init__(self, dim: int, ratio: float):
        super().__init__(dim, dim, 3, padding=1)
        self.ratio = ratio

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class PhiBank(nn.Module):
    """The phi convs (``qresi_ls``) and the tick rule choosing one per scale."""

    def __init__(self, dim: int, ratio: float, n: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(dim, ratio) for _ in range(n if ratio > 0 else 0))
        # Official ticks: linspace(1/(3n), 1-1/(3n), n) when n == 4, else linspace(1/(2n), 1-1/(2n), n).
        d = 3 * n if n == 4 else 2 * n
        self.ticks = np.linspace(1 / d, 1 - 1 / d, n) if n > 0 else np.zeros(0)

    def index(self, si: int, num_scales: int) -> int:
        """Index of the conv used at scale si: argmin |tick - si/(K-1)|."""
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        return int(np.argmin(np.abs(self.ticks - at)))

    def forward(self, h: torch.Tensor, si: int, num_scales: int) -> torch.Tensor:
        if len(self.qresi_ls) == 0:
            return h
        return self.qresi_ls[self.index(si, num_scales)](h)


class MultiScaleQuantizer(nn.Module):
    """Codebook (``embedding``), phi convs (``quant_resi``) and the hit-count buffer."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.patch_nums = tuple(cfg.patch_nums)
        self.vocab_size = cfg.vocab_size
        self.dim = cfg.z_channels
        self.beta = cfg.beta
        n_phi = cfg.share_quant_resi if cfg.share_quant_resi > 0 else len(self.patch_nums)
        self.quant_resi = PhiBank(cfg.z_channels, cfg.quant_resi, n_phi)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.vocab_size, 1.0 / cfg.vocab_size)
        # Official buffer: EMA of per-scale code hit counts (S, V). Kept for logging and for
        # checkpoint compatibility; nothing in the forward pass depends on it.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), cfg.vocab_size))
        self.record_hit = 0
        self.last_commit = torch.zeros(())

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi(self, si: int, h: torch.Tensor) -> torch.Tensor:
        return self.quant_resi(h, si, self.num_scales)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, Cz) -> (N,) int64 ids of the nearest codes in L2."""
        # |z|^2 + |w|^2 - 2 z.w in fp32 without autocast (the official order of operations,
        # so near-ties resolve alike), in row chunks so the (N, V) matrix stays small.
        w32 = self.embedding.weight.detach().float()
        w_sq = w32.pow(2).sum(1)
        out = []
        with torch.autocast(z.device.type, enabled=False):
            for zc in z.detach().float().split(_NEAREST_CHUNK):
                d = zc.pow(2).sum(1, keepdim=True) + w_sq
                out.append(d.addmm_(zc, w32.t(), alpha=-2).argmin(1))
        return torch.cat(out)

    def contribution(self, si: int, h: torch.Tensor, side: int) -> torch.Tensor:
        """phi_si(bicubic_up(h)) at full latent size; no resampling at the last scale."""
        if si != self.num_scales - 1:
            h = bicubic_up(h, side)
        return self.phi(si, h)

    def embed_map(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """(B, pn*pn) ids -> (B, Cz, pn, pn) code map."""
        B = idx.shape[0]
        return self.embedding(idx).view(B, pn, pn, self.dim).permute(0, 3, 1, 2)

    def quantize(self, f: torch.Tensor, train: bool = False):
        """Residual quantisation of f (B, Cz, h, w).

        Returns (f_hat, ids per scale, vq loss or None, residual targets per scale). With
        ``train`` f_hat carries the straight-through gradient and the loss is
        mean_k [ beta |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2 ] over cumulative f_hat_k.
        """
        f = f.float()  # quantise in fp32 even under autocast
        B, C, H, W = f.shape
        if H != W or H != self.patch_nums[-1]:
            raise ValueError(f"latent side {H}x{W} does not match patch_nums[-1]={self.patch_nums[-1]}")
        f_sg = f.detach()
        f_rest = f_sg.clone()
        f_hat = torch.zeros_like(f_sg)
        ids, targets = [], []
        loss = f.new_zeros(()) if train else None
        commit_sum = f.new_zeros(())
        for si, pn in enumerate(self.patch_nums):
            z = area_down(f_rest, pn)  # (B, Cz, pn, pn)
            z_nc = z.permute(0, 2, 3, 1).reshape(-1, C)
            idx = self.nearest(z_nc).view(B, pn * pn)
            ids.append(idx)
            targets.append(z_nc)
            h = self.contribution(si, self.embed_map(idx, pn), H)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            if train:
                commit = F.mse_loss(f_hat.detach(), f)
                commit_sum = commit_sum + commit.detach()
                loss = loss + self.beta * commit + F.mse_loss(f_hat, f_sg)
        if train:
            loss = loss / self.num_scales
            self.last_commit = commit_sum / self.num_scales  # logged, unweighted
            f_hat = f + (f_hat - f).detach()  # straight-through estimator
        return f_hat, ids, loss, targets

    @torch.no_grad()
    def record_hits(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """Update the EMA hit buffer; returns this batch's hit counts (S, V)."""
        hits = self.ema_vocab_hit_SV.new_zeros(self.num_scales, self.vocab_size)  # (S, V)
        for si, idx in enumerate(ids):  # scatter_add: no host sync (bincount needs one on CUDA)
            hits[si].scatter_add_(0, idx.flatten(), torch.ones_like(idx.flatten(), dtype=hits.dtype))
        if self.record_hit == 0 and not self.ema_vocab_hit_SV.any():  # fresh, not resumed
            self.ema_vocab_hit_SV.copy_(hits)
        else:
            m = 0.9 if self.record_hit < 100 else 0.99
            self.ema_vocab_hit_SV.mul_(m).add_(hits, alpha=1 - m)
        self.record_hit += 1
        return hits


# ----------------------------------------------------------------------------- model


class MultiScaleVQVAE(TokenizerTrainingHooks, nn.Module):
    """VAR's multi-scale residual VQ-VAE. Images (B, C, H, W) in [-1, 1]."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = build_encoder_decoder(
            cfg, enc_out_channels=cfg.z_channels, dec_in_channels=cfg.z_channels, fused_attn=True
        )
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.quantize = MultiScaleQuantizer(cfg)

        self.patch_nums: tuple[int, ...] = tuple(cfg.patch_nums)
        self.vocab_size: int = cfg.vocab_size
        self.z_channels: int = cfg.z_channels
        self.downsample: int = cfg.downsample
        self.image_channels: int = cfg.image_channels

        # Holds parameters only when the discriminator is on (LPIPS weights are not saved).
        self.train_losses = TokenizerLosses(cfg, cfg.image_channels)
        self._init_training_state()

    @classmethod
    def from_config(cls, cfg: VQVAEConfig) -> MultiScaleVQVAE:
        return cls(cfg)

    @property
    def latent_side(self) -> int:
        return self.patch_nums[-1]

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    # ------------------------------------------------------------------ image <-> tokens

    def encode_features(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> f (B, Cz, h, w) before quantisation."""
        return self.quant_conv(self.encoder(img))

    @torch.no_grad()
    def img_to_indices(self, img: torch.Tensor) -> list[torch.Tensor]:
        """One (B, pn*pn) int64 tensor per scale."""
        _, ids, _, _ = self.quantize.quantize(self.encode_features(img))
        return ids

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, n) int64 -> (B, n, Cz) codebook vectors."""
        return self.quantize.embedding(idx)

    def embed_map(self, idx: torch.Tensor, si: int) -> torch.Tensor:
        """(B, pn_si^2) ids of scale si -> (B, Cz, pn_si, pn_si) code map h."""
        return self.quantize.embed_map(idx, self.patch_nums[si])

    def indices_to_fhat(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum over scales of phi_k(bicubic_up(embed(r_k))) -> (B, Cz, h, w)."""
        self._check_indices(indices)
        side = self.latent_side
        f_hat = None
        for si, idx in enumerate(indices):
            h = self.quantize.contribution(si, self.embed_map(idx, si), side)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def indices_to_fhats(self, indices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Cumulative f_hat after each scale: K tensors (B, Cz, h, w), the last = indices_to_fhat.

        The official ``embed_to_fhat(..., all_to_max_scale=True, last_one=False)``: every scale
        accumulated at full latent size (the path that matches training and sampling).
        """
        self._check_indices(indices)
        side = self.latent_side
        out: list[torch.Tensor] = []
        for si, idx in enumerate(indices):
            h = self.quantize.contribution(si, self.embed_map(idx, si), side)
            out.append(h if not out else out[-1] + h)
        return out

    def indices_to_imgs(self, indices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] decoded from the f_hat after each scale (K of them),
        as the official ``idxBl_to_img(..., same_shape=True, last_one=False)``."""
        return [self.fhat_to_img(f) for f in self.indices_to_fhats(indices)]

    def fhat_to_img(self, fhat: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """(B, Cz, h, w) -> image (B, C, H, W) clamped to [-1, 1].

        ``precision``: ``fp32`` runs the modules as they are (float32 in, float32 out);
        ``bf16`` runs post_quant_conv + decoder with bfloat16 weights and activations and no
        autocast (GroupNorm, convolutions and attention accumulate in float32 inside their
        kernels; on CUDA GroupNorm+SiLU is one fused kernel, ``maskar.kernels.group_norm``) and
        returns float32. Token ids never depend on it: only decoding does.
        """
        if precision == "fp32":
            return self.decoder(self.post_quant_conv(fhat)).clamp(-1, 1)
        if precision not in DECODE_PRECISIONS:
            raise ValueError(
                f"decode precision: expected one of {list(DECODE_PRECISIONS)}, got {precision!r}"
            )
        dtype = torch.bfloat16
        fmt = torch.channels_last if BF16_CHANNELS_LAST else torch.contiguous_format
        tuned = fhat.is_cuda and BF16_CUDNN_BENCHMARK
        with torch.autocast(fhat.device.type, enabled=False), _cudnn_benchmark(tuned):
            # Cast copies of the weights per call (65M parameters: ~0.4 GB of traffic, well under
            # a millisecond on a GPU); the module itself stays float32.
            x = torch.func.functional_call(
                self.post_quant_conv,
                _cast_params(self.post_quant_conv, dtype),
                (fhat.to(dtype).contiguous(memory_format=fmt),),
            )
            x = torch.func.functional_call(self.decoder, _cast_params(self.decoder, dtype), (x,))
        return x.float().clamp(-1, 1).contiguous()

    def indices_to_img(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fhat_to_img(self.indices_to_fhat(indices))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, C, H, W), clamped to [-1, 1]."""
        f_hat, _, _, _ = self.quantize.quantize(self.encode_features(img))
        return self.fhat_to_img(f_hat)

    # ------------------------------------------------------------------ generator helpers

    def phi(self, si: int, h_full: torch.Tensor) -> torch.Tensor:
        """The residual conv of scale si (tick rule) applied to a full-size map."""
        return self.quantize.phi(si, h_full)

    @staticmethod
    def area_down(x: torch.Tensor, pn: int) -> torch.Tensor:
        return area_down(x, pn)

    def bicubic_up(self, x: torch.Tensor, side: int | None = None) -> torch.Tensor:
        return bicubic_up(x, self.latent_side if side is None else side)

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, L - pn_0^2, Cz): area_down(cumulative f_hat of scales < k, pn_k) for k = 1..K-1."""
        self._check_indices(indices)
        side, K = self.latent_side, self.num_scales
        B = indices[0].shape[0]
        f_hat = torch.zeros(
            B,
            self.z_channels,
            side,
            side,
            device=indices[0].device,
            dtype=self.quantize.embedding.weight.dtype,
        )
        out = []
        for si in range(K - 1):
            f_hat = f_hat + self.quantize.contribution(si, self.embed_map(indices[si], si), side)
            nxt = area_down(f_hat, self.patch_nums[si + 1])
            out.append(nxt.flatten(2).transpose(1, 2))  # (B, pn^2, Cz)
        if not out:
            return f_hat.new_zeros(B, 0, self.z_channels)
        return torch.cat(out, 1)

    def own_residual(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """HMAR refinement input of scale si: area_down(phi_si(bicubic_up(h)), pn_si)."""
        return area_down(self.quantize.contribution(si, h, self.latent_side), self.patch_nums[si])

    def own_residual_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, L - pn_0^2, Cz): own_residual(k, embed(r_k)) for k = 1..K-1, not accumulated."""
        self._check_indices(indices)
        out = [
            self.own_residual(si, self.embed_map(indices[si], si)).flatten(2).transpose(1, 2)
            for si in range(1, self.num_scales)
        ]
        if not out:
            return self.quantize.embedding.weight.new_zeros(indices[0].shape[0], 0, self.z_channels)
        return torch.cat(out, 1)

    def next_input(self, si: int, fhat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling update: f_hat += phi_si(up(h)); returns (new f_hat, next scale's input).

        ``h`` is the (B, Cz, pn_si, pn_si) code map of scale si; ``fhat`` (B, Cz, h, w)
        starts as zeros. The next input is area_down(f_hat, pn_{si+1}); at the last scale it
        is f_hat itself, as the official ``get_next_autoregressive_input`` returns. The update
        is out of place: use the returned f_hat.
        """
        fhat = fhat + self.quantize.contribution(si, h, self.latent_side)
        if si == self.num_scales - 1:
            return fhat, fhat
        return fhat, area_down(fhat, self.patch_nums[si + 1])

    def _check_indices(self, indices: Sequence[torch.Tensor]) -> None:
        if len(indices) != self.num_scales:
            raise ValueError(f"expected {self.num_scales} index tensors (one per scale), got {len(indices)}")
        for si, (idx, pn) in enumerate(zip(indices, self.patch_nums)):
            if idx.dim() != 2 or idx.shape[1] != pn * pn:
                raise ValueError(f"indices[{si}]: expected shape (B, {pn * pn}), got {tuple(idx.shape)}")

    # ------------------------------------------------------------------ training

    def _init_training_state(self) -> None:
        S, V = self.num_scales, self.vocab_size
        # Derived training state, never saved: per-scale step of last use, hits since the
        # last step end, and a pool of recent residual targets for dead-code re-init.
        self.register_buffer("_last_hit_SV", torch.zeros(S, V, dtype=torch.long), persistent=False)
        self.register_buffer("_hits_SV", torch.zeros(S, V), persistent=False)
        self.register_buffer("_last_any", torch.zeros(V, dtype=torch.long), persistent=False)
        self.register_buffer("_pool", torch.zeros(0, self.z_channels), persistent=False)
        self._tracking = False

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        img = batch["image"]
        f = self.encode_features(img)
        f_hat, ids, vq_loss, targets = self.quantize.quantize(f, train=True)
        rec = self.decoder(self.post_quant_conv(f_hat))
        with torch.no_grad():
            self._hits_SV += self.quantize.record_hits(ids)
            self._remember_targets(targets)
        rec_loss, logs = self.reconstruction_loss(img, rec)
        logs["vq"] = vq_loss.detach()
        logs["commit"] = self.quantize.last_commit
        return {"loss": rec_loss + vq_loss, **logs}

    @torch.no_grad()
    def _remember_targets(self, targets: Sequence[torch.Tensor]) -> None:
        """Keep up to vocab_size recent residual vectors, drawn evenly from every scale."""
        if self.cfg.dead_code_steps <= 0:
            return
        per = max(1, self.vocab_size // len(targets))
        picks = []
        for t in targets:
            sel = torch.randint(0, t.shape[0], (min(per, t.shape[0]),), device=t.device)
            picks.append(t[sel].float())
        self._pool = torch.cat(picks, 0)

    @torch.no_grad()
    def on_train_step_end(self, step: int) -> dict[str, torch.Tensor]:
        """Per-scale codebook usage over the last ``usage_window`` steps; dead-code re-init.

        Works on device tensors only (no host sync); the returned scalars are tensors.
        """
        self._step = step
        if not self._tracking:
            # Start (or resume) tracking here: no code counts as recently used, and every
            # code gets a full grace period before it can be declared dead.
            self._last_hit_SV.fill_(step - self.cfg.usage_window)
            self._last_any.fill_(step)
            self._tracking = True
        hits = self._hits_SV
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(hits)
        self._last_hit_SV.masked_fill_(hits > 0, step)
        self._last_any.masked_fill_(hits.sum(0) > 0, step)
        hits.zero_()
        recent = (step - self._last_hit_SV) < self.cfg.usage_window  # (S, V)
        logs = {f"usage_s{k}": recent[k].float().mean() for k in range(self.num_scales)}
        logs["usage"] = recent.any(0).float().mean()
        if self.cfg.dead_code_steps > 0 and self._pool.shape[0] > 0:
            dead = (step - self._last_any) >= self.cfg.dead_code_steps  # (V,)
            w = self.quantize.embedding.weight
            sel = torch.randint(0, self._pool.shape[0], (self.vocab_size,), device=self._pool.device)
            w.data.copy_(torch.where(dead[:, None], self._pool[sel].to(w.dtype), w.data))
            if distributed:
                torch.distributed.broadcast(w.data, src=0)  # every rank keeps rank 0's codebook
            self._last_any.masked_fill_(dead, step)  # a fresh grace period for re-initialised codes
            logs["dead_reinit"] = dead.float().sum()
        return logs

    def no_weight_decay_keywords(self) -> set[str]:
        return {"quantize.embedding"}

    def _reconstruct_for_disc(self, img: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.quantize.quantize(self.encode_features(img))[0]))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # ema_vocab_hit_SV depends on the number of scales only; like the official loader,
        # a file made for another schedule keeps our (zeroed) buffer instead of failing.
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            state_dict = dict(state_dict)
            state_dict[key] = torch.zeros_like(self.quantize.ema_vocab_hit_SV)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


registry.register(
    "vqvae",
    kind="tokenizer",
    config_cls=VQVAEConfig,
    build=MultiScaleVQVAE.from_config,
    description="VAR multi-scale residual VQ-VAE (vae_ch160v4096z32 layout)",
)
