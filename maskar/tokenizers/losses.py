"""Training losses shared by the VQ and KL tokenizers.

- pixel reconstruction: L1 + L2 (weights configurable);
- optional perceptual loss (LPIPS layout on VGG16) from user-supplied weight files, never
  downloaded: ``perceptual_vgg`` is a torchvision-layout VGG16 state dict
  (``features.{i}.weight``), ``perceptual_lpips`` an optional LPIPS linear-head file
  (``lin{i}.model.1.weight``); without it every VGG channel gets weight 1;
- optional PatchGAN discriminator with hinge loss, adaptive (gradient-norm ratio) or
  fixed weight, switched on at ``disc_start``.

:class:`TokenizerTrainingHooks` holds the training hooks both tokenizer models share.

Training-only modules live under the tokenizer attribute ``train_losses`` (state-dict
prefix :data:`TRAINING_PREFIX`) and only exist when enabled, so an inference tokenizer
has exactly the official key layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from maskar.config import field

TRAINING_PREFIX = "train_losses."


def drop_training_keys(module: nn.Module, state_dict):
    """Without a discriminator, ignore a checkpoint's ``train_losses.*`` keys (inference use)."""
    has_training_keys = any(k.startswith(TRAINING_PREFIX) for k in module.state_dict())
    if has_training_keys or not any(k.startswith(TRAINING_PREFIX) for k in state_dict):
        return state_dict
    return {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_PREFIX)}


@dataclass
class TokenizerLossConfig:
    """Loss fields common to the tokenizer configs (mixed into VQVAEConfig / KLVAEConfig)."""

    l1_weight: float = field(1.0, min=0.0, help="weight of the L1 pixel loss")
    l2_weight: float = field(1.0, min=0.0, help="weight of the L2 pixel loss")
    perceptual_weight: float = field(0.0, min=0.0, help="LPIPS weight; > 0 needs perceptual_vgg")
    perceptual_vgg: str | None = field(None, help="torchvision-layout VGG16 weights file (never downloaded)")
    perceptual_lpips: str | None = field(None, help="LPIPS linear-layer weights file (optional)")
    disc_weight: float = field(0.0, min=0.0, help="GAN loss weight; 0 disables the discriminator")
    disc_start: int = field(0, min=0, help="train step at which the GAN loss switches on")
    disc_adaptive: bool = field(True, help="scale the GAN loss by the gradient-norm ratio at the last layer")
    disc_layers: int = field(3, min=1, help="PatchGAN stride-2 layers")
    disc_ch: int = field(64, min=1, help="PatchGAN base width")

    def validate_losses(self) -> None:
        if self.perceptual_weight > 0 and not self.perceptual_vgg:
            raise ValueError(
                f"perceptual_weight={self.perceptual_weight} needs perceptual_vgg=<path to VGG16 weights>"
            )


# ----------------------------------------------------------------------------- perceptual

# torchvision VGG16 ``features`` indices of the conv layers, and where the 5 LPIPS taps end.
_VGG16_CONVS = [
    (0, 3, 64),
    (2, 64, 64),
    (5, 64, 128),
    (7, 128, 128),
    (10, 128, 256),
    (12, 256, 256),
    (14, 256, 256),
    (17, 256, 512),
    (19, 512, 512),
    (21, 512, 512),
    (24, 512, 512),
    (26, 512, 512),
    (28, 512, 512),
]
_POOL_BEFORE = {5, 10, 17, 24}  # a 2x2 max-pool precedes these convs
_TAP_AFTER = {2, 7, 14, 21, 28}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _load_state(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"perceptual weights file {path!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    sd = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r}: expected a state dict, got {type(sd).__name__}")
    return sd


class LPIPS(nn.Module):
    """LPIPS distance on VGG16 features; weights are non-persistent buffers (not saved, not trained)."""

    def __init__(self, vgg_path: str, lpips_path: str | None = None):
        super().__init__()
        sd = _load_state(vgg_path)
        for idx, cin, cout in _VGG16_CONVS:
            w, b = self._find(sd, f"features.{idx}.weight"), self._find(sd, f"features.{idx}.bias")
            if w is None or tuple(w.shape) != (cout, cin, 3, 3):
                raise ValueError(f"{vgg_path!r}: expected features.{idx}.weight of shape {(cout, cin, 3, 3)}")
            self.register_buffer(f"w{idx}", w.float().clone(), persistent=False)
            self.register_buffer(f"b{idx}", b.float().clone(), persistent=False)
        widths = [64, 128, 256, 512, 512]
        lin = _load_state(lpips_path) if lpips_path else {}
        for i, c in enumerate(widths):
            w = self._find(lin, f"lin{i}.model.1.weight") if lin else None
            if w is None and lin:
                w = self._find(lin, f"lin{i}.weight")
            if lin and w is None:
                raise ValueError(f"{lpips_path!r}: missing lin{i}.model.1.weight ([1, {c}, 1, 1])")
            w = torch.ones(1, c, 1, 1) if w is None else w.float().reshape(1, c, 1, 1).clone()
            self.register_buffer(f"lin{i}", w, persistent=False)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _find(sd: dict, key: str) -> torch.Tensor | None:
        for k, v in sd.items():
            if k == key or k.endswith("." + key):
                return v
        return None

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for idx, _, _ in _VGG16_CONVS:
            if idx in _POOL_BEFORE:
                x = F.max_pool2d(x, 2)
            x = F.relu(F.conv2d(x, getattr(self, f"w{idx}"), getattr(self, f"b{idx}"), padding=1))
            if idx in _TAP_AFTER:
                feats.append(x)
        return feats

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance between image batches in [-1, 1] (1 or 3 channels)."""
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        fa = self._features((a - self.shift) / self.scale)
        fb = self._features((b - self.shift) / self.scale)
        total = a.new_zeros(())
        for i, (x, y) in enumerate(zip(fa, fb)):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((x - y).pow(2) * getattr(self, f"lin{i}")).sum(1).mean()
        return total


# ----------------------------------------------------------------------------- discriminator


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming layout) with GroupNorm instead of BatchNorm (DDP-safe)."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ch
        for n in range(1, n_layers + 1):
            c_out = ch * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(c, c_out, 4, stride, 1, bias=False),
                nn.GroupNorm(math.gcd(32, c_out), c_out),
                nn.LeakyReLU(0.2),
            ]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h', w') patch logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


# ----------------------------------------------------------------------------- combined


def psnr(rec: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR (dB) of images in [-1, 1] (peak-to-peak 2)."""
    mse = (rec.clamp(-1, 1) - img).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()


class TokenizerLosses(nn.Module):
    """Reconstruction (+ perceptual) (+ GAN) terms; ``disc`` exists only when enabled."""

    def __init__(self, cfg: TokenizerLossConfig, image_channels: int):
        super().__init__()
        self.cfg = cfg
        self.perceptual = (
            LPIPS(cfg.perceptual_vgg, cfg.perceptual_lpips) if cfg.perceptual_weight > 0 else None
        )
        self.disc = (
            PatchDiscriminator(image_channels, cfg.disc_ch, cfg.disc_layers) if cfg.disc_weight > 0 else None
        )

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.disc_start

    def generator_loss(
        self, img: torch.Tensor, rec: torch.Tensor, last_layer: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pixel/perceptual/GAN loss of reconstruction ``rec`` against ``img``; returns (loss, logs)."""
        cfg = self.cfg
        l1 = (rec - img).abs().mean()
        l2 = (rec - img).pow(2).mean()
        rec_loss = cfg.l1_weight * l1 + cfg.l2_weight * l2
        logs = {"l1": l1.detach(), "l2": l2.detach(), "psnr": psnr(rec.detach(), img)}
        if self.perceptual is not None:
            p = self.perceptual(rec, img)
            rec_loss = rec_loss + cfg.perceptual_weight * p
            logs["perceptual"] = p.detach()
        loss = rec_loss
        if self.disc is not None:
            g = -self.disc(rec).mean()
            active = self.gan_active(step)
            weight = torch.zeros((), device=img.device)
            if active:
                weight = torch.full((), cfg.disc_weight, device=img.device)
                if cfg.disc_adaptive and last_layer is not None and torch.is_grad_enabled():
                    weight = weight * self.adaptive_weight(rec_loss, g, last_layer)
            # Multiplying by 0 before disc_start keeps every parameter in the graph (DDP).
            loss = loss + weight * g
            logs["gan_g"] = g.detach()
            logs["gan_weight"] = weight.detach()
        return loss, logs

    @staticmethod
    def adaptive_weight(
        rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """||dL_rec/dW|| / ||dL_gan/dW|| at the decoder's last layer (taming's rule), detached."""
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def discriminator_loss(self, img: torch.Tensor, rec: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        if self.disc is None:
            raise RuntimeError("discriminator is disabled (disc_weight=0)")
        real = self.disc(img.detach())
        fake = self.disc(rec.detach())
        d = hinge_d_loss(real, fake)
        factor = 1.0 if self.gan_active(step) else 0.0
        return {
            "loss": d * factor,
            "gan_d": d.detach(),
            "logits_real": real.detach().mean(),
            "logits_fake": fake.detach().mean(),
        }


class TokenizerTrainingHooks:
    """Training hooks shared by the tokenizer models (a mixin placed before ``nn.Module``).

    Holds the step counter the GAN switch reads, the discriminator pass (reusing the last
    generator-step reconstruction of the same batch) and checkpoint loading with or
    without ``train_losses.*`` keys. The host has ``train_losses``, ``decoder`` and
    implements :meth:`_reconstruct_for_disc`.
    """

    train_losses: TokenizerLosses
    decoder: nn.Module
    _step: int = 0
    _disc_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (image batch, its detached rec)

    def _reconstruct_for_disc(self, img: torch.Tensor) -> torch.Tensor:
        """Unclamped training-path reconstruction of ``img`` (called under no_grad)."""
        raise NotImplementedError

    def reconstruction_loss(
        self, img: torch.Tensor, rec: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Generator loss of ``rec``; keeps ``rec`` for the discriminator step of this batch."""
        loss, logs = self.train_losses.generator_loss(img, rec, self.decoder.last_layer_weight, self._step)
        if self.train_losses.disc is not None:
            self._disc_cache = (img, rec.detach())
        return loss, logs

    def on_train_start(self, step: int) -> None:
        """On resume the GAN switch (``disc_start``) must see the restored step at once."""
        self._step = step

    def disc_parameters(self) -> list[nn.Parameter]:
        """Discriminator parameters (empty when disc_weight = 0)."""
        if self.train_losses.disc is None:
            return []
        return list(self.train_losses.disc.parameters())

    def disc_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.train_losses.disc is None:
            raise RuntimeError("disc_loss called but the discriminator is disabled (disc_weight=0)")
        img = batch["image"]
        if self._disc_cache is not None and self._disc_cache[0] is img:
            rec = self._disc_cache[1]
        else:
            with torch.no_grad():
                rec = self._reconstruct_for_disc(img)
        self._disc_cache = None
        return self.train_losses.discriminator_loss(img, rec, self._step)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict(drop_training_keys(self, state_dict), strict=strict, assign=assign)
