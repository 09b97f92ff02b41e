"""MAR's ``kl16.ckpt`` (``{"model": state_dict}``) <-> maskar ``klvae``.

    maskar convert klvae src=kl16.ckpt out=ckpt/klvae-16

The maskar module uses the official names, so conversion is a strict load. LDM training
files may also hold the loss module (``loss.*``: LPIPS and discriminator); those keys are
dropped, everything else must match exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from maskar.checkpoint import load_official as read_official_file
from maskar.checkpoint import load_state_dict_checked
from maskar.tokenizers.klvae import KLVAE, KLVAEConfig

_TRAINING_ONLY = ("loss.",)


def official_config() -> KLVAEConfig:
    cfg = KLVAEConfig()
    cfg.validate()
    return cfg


def load_official(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    cfg: KLVAEConfig | None = None,
) -> KLVAE:
    """Build the KL-16 autoencoder (default: official config) and load strictly."""
    sd = path_or_state_dict
    if not isinstance(sd, Mapping):
        sd = read_official_file(sd)
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a dict in {path_or_state_dict!r}, got {type(sd).__name__}")
    for key in ("model", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    sd = {k.removeprefix("module."): v for k, v in sd.items() if not k.startswith(_TRAINING_ONLY)}
    model = KLVAE(cfg or official_config())
    src = str(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else "state dict"
    load_state_dict_checked(model, sd, context=f"official KL VAE {src}")
    return model


def export_official(model: KLVAE) -> dict[str, torch.Tensor]:
    """Flat state dict in the official layout (training-only modules dropped)."""
    return {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if not k.startswith("train_losses.")
    }


def save_official(model: KLVAE, path: str | os.PathLike) -> None:
    """Write ``{"model": state_dict}`` like ``kl16.ckpt``."""
    torch.save({"model": export_official(model)}, path)


def cli(argv: list[str]) -> int:
    from maskar.checkpoint import save_model
    from maskar.config import Config, build, to_dict

    args = dict(a.split("=", 1) for a in argv if "=" in a)
    bad = [a for a in argv if "=" not in a] + [k for k in args if k not in ("src", "out")]
    if bad or "src" not in args or "out" not in args:
        raise SystemExit(f"usage: maskar convert klvae src=kl16.ckpt out=DIR; got {argv}")
    cfg = official_config()
    model = load_official(args["src"], cfg)
    save_model(args["out"], model, build(Config, {"model": to_dict(cfg)}))
    print(f"wrote {args['out']} (klvae, embed_dim {cfg.embed_dim}, scale_factor {cfg.scale_factor})")
    return 0
