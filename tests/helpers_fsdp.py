"""A tiny model with repeated blocks for the FSDP2 tests (``model.arch=fsdp_blocks``).

It has what makes sharding non-trivial in the real generators: a frozen tokenizer run in fp32
outside autocast (left unsharded), repeated blocks (one FSDP2 unit each), parameters outside the
blocks (the root unit), a head whose weight the loss reads directly (as VAR's fused head + CE
does), a persistent buffer changed by training, and optional per-sample noise (per-rank RNG).

``python tests/helpers_fsdp.py train key=value ...`` runs ``maskar train`` with it registered (for
torchrun subprocesses).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from maskar import registry
from maskar.config import ModelConfig, field


@dataclass
class BlocksConfig(ModelConfig):
    arch: str = "fsdp_blocks"
    resolution: int = field(8, min=2)
    width: int = field(16, min=2)
    depth: int = field(3, min=1)
    num_classes: int = field(4, min=1)
    noise_std: float = field(0.0, min=0.0, help="noise added to the tokens (0: deterministic loss)")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)  # as VAR's blocks (CPU autocast keeps
        # an affine norm's bf16 weight and refuses the fp32 input; CUDA autocast runs norms in fp32)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.gain = nn.Parameter(torch.full((width,), 0.5))
        self.checkpoint = False  # activation checkpointing (set by maskar.train.parallelize)

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        return x + self.gain * self.fc2(F.gelu(self.fc1(self.norm(x))))


class BlocksModel(nn.Module):
    def __init__(self, cfg: BlocksConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, n = cfg.width, (cfg.resolution // 2) ** 2
        self.tokenizer = nn.Conv2d(3, 4, 2, stride=2)  # frozen: 2x2 patches -> 4 channels
        self.tokenizer.requires_grad_(False)
        self.embed = nn.Linear(4, w)
        self.pos = nn.Parameter(torch.randn(1, n, w) * 0.02)
        self.class_emb = nn.Embedding(cfg.num_classes, w)
        self.blocks = nn.ModuleList(Block(w) for _ in range(cfg.depth))
        self.head_norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, 4)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.int64))

    def named_trainable_parameters(self):
        return ((n, p) for n, p in self.named_parameters() if not n.startswith("tokenizer."))

    def no_weight_decay_keywords(self) -> set[str]:
        return {"pos"}

    def repeated_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def on_train_step_end(self, step: int) -> dict[str, float]:
        self.steps_seen += 1
        return {}

    def loss(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        image, labels = batch["image"], batch["label"].long()
        with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
            z = self.tokenizer(image.float()).flatten(2).transpose(1, 2)  # (B, n, 4) fp32
        z_in = z + self.cfg.noise_std * torch.randn_like(z) if self.cfg.noise_std > 0 else z
        h = self.embed(z_in) + self.pos + self.class_emb(labels)[:, None]
        for block in self.blocks:
            h = block(h)
        pred = F.linear(
            self.head_norm(h), self.head.weight, self.head.bias
        )  # the head's weight, read directly
        return {"loss": F.mse_loss(pred.float(), z), "z_rms": z.square().mean().sqrt()}


registry.register("fsdp_blocks", kind="generator", config_cls=BlocksConfig, build=BlocksModel)


if __name__ == "__main__":
    from maskar.cli import main

    sys.exit(main(sys.argv[1:]))
