"""MAR's ``kl16.ckpt`` (``{"model": state_dict}``) <-> maskar ``klvae``.

    maskar convert klvae src=kl16.ckpt out=ckpt/klvae-16
    maskar convert klvae src=kl8.ckpt out=ckpt/kl8 model.embed_dim=4 model.ch_mult=[1,2,4,4]  # other sizes

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


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The argument checks of :func:`cli`, reading no file: ``(args, overrides)``."""
    from maskar.convert.common import parse_cli_args

    usage = "usage: maskar convert klvae src=kl16.ckpt out=DIR [preset=NAME] [model.KEY=VALUE ...]"
    return parse_cli_args(argv, usage, ("src", "out", "preset"))


def cli(argv: list[str]) -> int:
    from maskar.checkpoint import save_model
    from maskar.convert.common import resolve_config

    args, overrides = parse(argv)
    cfg = resolve_config("klvae", args.get("preset"), overrides, official_config())
    model = load_official(args["src"], cfg.model)
    save_model(args["out"], model, cfg)
    m = cfg.model
    print(f"wrote {args['out']} (klvae, embed_dim {m.embed_dim}, scale_factor {m.scale_factor})")
    return 0
