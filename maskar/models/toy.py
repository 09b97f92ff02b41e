"""A tiny class-conditional denoiser (``arch: toy``) for trainer tests and smoke runs.

Not a method from the paper list: it exists so the trainer, checkpoints and CLI can be
exercised end to end in seconds on a CPU. It learns to map a noisy image (plus its class)
to the clean image; ``generate`` starts from noise and applies it a few times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskar import registry
from maskar.config import ModelConfig, SampleConfig, field


@dataclass
class ToyConfig(ModelConfig):
    arch: str = "toy"
    resolution: int = field(16, min=4, help="image side length")
    channels: int = field(3, choices=(1, 3))
    num_classes: int = field(10, min=1)
    width: int = field(32, min=1, help="conv channels")
    noise_std: float = field(0.5, min=0.0, help="training noise level (0: deterministic loss)")
    class_dropout: float = field(0.1, min=0.0, max=1.0, help="label dropout (enables guidance)")


@dataclass
class ToySampleConfig(SampleConfig):
    steps: int = field(4, min=1, help="denoising iterations")
    cfg: float = field(1.0, min=0.0, help="classifier-free guidance scale")


class ToyDenoiser(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, w = cfg.channels, cfg.width
        # Index num_classes is the "no label" class used by label dropout and guidance.
        self.class_emb = nn.Embedding(cfg.num_classes + 1, w)
        self.conv_in = nn.Conv2d(c, w, 3, padding=1)
        self.norm = nn.GroupNorm(4 if w % 4 == 0 else 1, w)
        self.conv_mid = nn.Conv2d(w, w, 3, padding=1)
        self.conv_out = nn.Conv2d(w, c, 3, padding=1)
        self.coord_gain = nn.Parameter(torch.zeros(w, 1, 1))
        # Derived buffer: must never be saved in a checkpoint.
        ramp = torch.linspace(-1, 1, cfg.resolution)
        self.register_buffer(
            "coord", ramp.view(1, 1, 1, -1).expand(1, 1, cfg.resolution, -1).clone(), persistent=False
        )
        # A persistent buffer that training changes (counts updates), like VQ usage statistics.
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_config(cls, cfg: ToyConfig) -> ToyDenoiser:
        return cls(cfg)

    def no_weight_decay_keywords(self) -> set[str]:
        return {"class_emb"}

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        h = self.conv_in(x) + self.coord_gain * self.coord  # (B, W, H, W)
        h = h + self.class_emb(labels)[:, :, None, None]
        h = F.silu(self.norm(h))
        h = F.silu(self.conv_mid(h))
        return x + self.conv_out(h)  # (B, C, H, W)

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image, labels = batch["image"], batch["label"]
        if self.cfg.class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
        noisy = image + self.cfg.noise_std * torch.randn_like(image)
        pred = self(noisy, labels)
        loss = F.mse_loss(pred, image)
        return {"loss": loss, "mse_noisy": F.mse_loss(noisy, image).detach()}

    def on_train_step_end(self, step: int) -> dict[str, Tensor]:
        self.steps_seen += 1
        return {"steps_seen": self.steps_seen.float()}

    @torch.no_grad()
    def generate(self, labels: Tensor, seed: int = 0, steps: int = 4, cfg: float = 1.0) -> Tensor:
        c, r = self.cfg.channels, self.cfg.resolution
        g = torch.Generator(device=labels.device).manual_seed(seed)
        x = torch.randn(labels.shape[0], c, r, r, generator=g, device=labels.device)  # (B, C, R, R)
        uncond = torch.full_like(labels, self.cfg.num_classes)
        for _ in range(steps):
            pred = self(x, labels)
            if cfg != 1.0:
                pred_uncond = self(x, uncond)
                pred = pred_uncond + cfg * (pred - pred_uncond)
            x = pred.clamp(-1, 1)
        if c == 1:
            x = x.expand(-1, 3, -1, -1)
        return x


registry.register(
    "toy",
    kind="generator",
    config_cls=ToyConfig,
    sample_cls=ToySampleConfig,
    build=ToyDenoiser.from_config,
    description="tiny class-conditional denoiser for tests and smoke runs",
)
