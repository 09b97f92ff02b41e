"""Helpers shared by the masked-autoregressive model tests (test_mar.py, test_casmar.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

# The transformer / MLP-head fields of the tiny MAR and CASMAR test configs (32 px, 4x4 tokens).
TINY_FIELDS = dict(
    img_size=32,
    class_num=10,
    encoder_embed_dim=32,
    encoder_depth=1,
    encoder_num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
    buffer_size=4,
    diffloss_d=1,
    diffloss_w=32,
    num_sampling_steps="4",
    diffusion_batch_mul=2,
)


class StandInKL(nn.Module):
    """A tiny stand-in with the KL tokenizer API (patchwise linear encoder / decoder, any size)."""

    def __init__(self, embed_dim: int = 4, downsample: int = 8):
        super().__init__()
        self.embed_dim, self.downsample, self.scale_factor = embed_dim, downsample, 0.2325
        self.enc = nn.Conv2d(3, 2 * embed_dim, downsample, downsample)
        self.dec = nn.ConvTranspose2d(embed_dim, 3, downsample, downsample)

    def encode_moments(self, img):
        return self.enc(img)

    def sample_latent(self, moments, generator=None):
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30, 20))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + std * noise) * self.scale_factor

    def encode(self, img):
        return self.sample_latent(self.encode_moments(img))

    def encode_mean(self, img):
        return self.encode_moments(img).chunk(2, dim=1)[0] * self.scale_factor

    def decode(self, z):
        return self.dec(z / self.scale_factor)


def assert_strict_meta_load(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """A random official state dict of ``shapes`` (plus the model's tokenizer) loads strictly."""
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    state.update({f"tokenizer.{k}": v for k, v in model.tokenizer.state_dict().items()})
    result = model.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def official_file(tmp_path: Path, model: nn.Module, with_args: bool, run_name: str, epoch: int) -> Path:
    """An official-layout ``checkpoint-last.pth``: ``model`` = the weights, ``model_ema`` = weights
    + 1, optionally the pickled ``argparse.Namespace`` the official scripts store as ``args``."""
    from maskar.convert.mar import export_official

    raw = export_official(model)
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in raw.items()}
    obj = {"model": raw, "model_ema": ema, "epoch": epoch}
    if with_args:
        obj["args"] = argparse.Namespace(model=run_name, cfg=2.9)
    path = tmp_path / "checkpoint-last.pth"
    torch.save(obj, path)
    return path
