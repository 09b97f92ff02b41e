"""MAR's KL-16 autoencoder (``kl16.ckpt``) and its training loss.

LDM KL autoencoder: the encoder outputs 2 x z_channels, ``quant_conv`` (1x1) maps them to
the posterior moments (mean, logvar) of ``embed_dim`` channels each; ``post_quant_conv``
(1x1) maps a latent back to the decoder. The official decoder has no attention at its
levels (only in the middle block). Generators see latents multiplied by ``scale_factor``
(0.2325 for kl16, about 1 / std of ImageNet latents; the mean is not re-centred).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maskar import registry
from maskar.config import field
from maskar.tokenizers.common import ConvAutoencoderConfig, build_encoder_decoder
from maskar.tokenizers.losses import TokenizerLosses, TokenizerTrainingHooks


@dataclass
class KLVAEConfig(ConvAutoencoderConfig):
    """Defaults = MAR's ``kl16.ckpt``."""

    arch: str = "klvae"
    dec_attn_levels: tuple[int, ...] = field((), help="decoder levels with attention (kl16: none)")
    z_channels: int = field(16, min=1, help="decoder input / half the encoder output width")
    embed_dim: int = field(16, min=1, help="latent channels")
    scale_factor: float = field(0.2325, help="latent scale seen by generators (z * scale_factor)")
    kl_weight: float = field(1e-6, min=0.0, help="KL weight (LDM convention: per-pixel reconstruction)")

    def validate(self) -> None:
        if self.resolution % self.downsample:
            raise ValueError(
                f"resolution={self.resolution} must be a multiple of the downsample factor {self.downsample}"
            )
        self.validate_conv_layout()
        if self.scale_factor == 0:
            raise ValueError("scale_factor must be non-zero")
        self.validate_losses()


class KLVAE(TokenizerTrainingHooks, nn.Module):
    """KL autoencoder. Images (B, C, H, W) in [-1, 1]; latents (B, embed_dim, H/16, W/16)."""

    def __init__(self, cfg: KLVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = build_encoder_decoder(
            cfg,
            enc_out_channels=2 * cfg.z_channels,
            dec_in_channels=cfg.z_channels,
            fused_attn=False,  # separate q, k, v convs (LDM layout)
        )
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.train_losses = TokenizerLosses(cfg, cfg.image_channels)

        self.embed_dim: int = cfg.embed_dim
        self.downsample: int = cfg.downsample
        self.scale_factor: float = cfg.scale_factor
        self.image_channels: int = cfg.image_channels

    @classmethod
    def from_config(cls, cfg: KLVAEConfig) -> KLVAE:
        return cls(cfg)

    # ------------------------------------------------------------------ image <-> latent

    def encode_moments(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> posterior moments (B, 2*embed_dim, h, w): mean | logvar (unscaled)."""
        return self.quant_conv(self.encoder(img))

    def sample_latent(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(mean + std * eps) * scale_factor, logvar clamped to [-30, 20]; (B, embed_dim, h, w)."""
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps) * self.scale_factor

    def encode(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sampled, scaled latent (B, embed_dim, h, w)."""
        return self.sample_latent(self.encode_moments(img), generator)

    def encode_mean(self, img: torch.Tensor) -> torch.Tensor:
        """Posterior mean, scaled (B, embed_dim, h, w)."""
        return self.encode_moments(img).chunk(2, dim=1)[0] * self.scale_factor

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image, not clamped (the training path)."""
        return self.decoder(self.post_quant_conv(z))

    def decode(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, embed_dim, h, w) -> image (B, C, H, W) clamped to [-1, 1]."""
        return self.decode_unscaled(z_scaled / self.scale_factor).clamp(-1, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean, clamped to [-1, 1]."""
        return self.decode(self.encode_mean(img))

    # ------------------------------------------------------------------ training

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        img = batch["image"]
        moments = self.encode_moments(img)
        mean, logvar = moments.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = self.decode_unscaled(z)
        rec_loss, logs = self.reconstruction_loss(img, rec)
        # KL(q || N(0, I)) summed over latent elements, averaged over the batch; divided by
        # the pixel count so kl_weight keeps LDM's meaning next to per-pixel mean losses.
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        loss = rec_loss + self.cfg.kl_weight * kl / img[0].numel()
        logs["kl"] = kl.detach()
        logs["latent_std"] = mean.detach().std()
        return {"loss": loss, **logs}

    def on_train_step_end(self, step: int) -> dict[str, float]:
        self._step = step
        return {}

    def no_weight_decay_keywords(self) -> set[str]:
        return set()

    def _reconstruct_for_disc(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode_unscaled(self.encode_moments(img).chunk(2, dim=1)[0])


registry.register(
    "klvae",
    kind="tokenizer",
    config_cls=KLVAEConfig,
    build=KLVAE.from_config,
    description="MAR KL-16 autoencoder (kl16.ckpt layout)",
)
