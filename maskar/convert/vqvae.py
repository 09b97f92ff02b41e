"""VAR's ``vae_ch160v4096z32.pth`` (flat state dict) <-> maskar ``vqvae``.

    maskar convert vqvae src=vae_ch160v4096z32.pth out=ckpt/vqvae [pn=256|512|1024]
    maskar convert vqvae src=vae.pth out=ckpt/vq 'model.patch_nums=[1,2,4,8]'   # any schedule; preset= too

The maskar module uses the official names, so conversion is a strict load. The buffer
``quantize.ema_vocab_hit_SV`` (EMA hit counts, shape [num_scales, vocab]) only feeds
logging; a file made for another number of scales gets a zeroed buffer of the right
shape instead of failing (as the official loader does). Everything else must match.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch

from maskar.checkpoint import load_official as read_official_file
from maskar.checkpoint import load_state_dict_checked
from maskar.tokenizers.vqvae import PATCH_NUMS, MultiScaleVQVAE, VQVAEConfig

_HIT_KEY = "quantize.ema_vocab_hit_SV"


def official_config(pn: int = 256) -> VQVAEConfig:
    """The ``vae_ch160v4096z32`` config with the official patch schedule for ``pn`` px."""
    if pn not in PATCH_NUMS:
        raise ValueError(f"pn={pn}: expected one of {sorted(PATCH_NUMS)}")
    cfg = VQVAEConfig(patch_nums=PATCH_NUMS[pn])
    dataclasses.replace(cfg).validate()  # checked on a copy: resolution stays null (derived)
    return cfg


def load_official(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    cfg: VQVAEConfig | None = None,
) -> MultiScaleVQVAE:
    """Build the tokenizer (default: official config, 256 px schedule) and load strictly."""
    sd = path_or_state_dict
    if not isinstance(sd, Mapping):
        sd = read_official_file(sd)
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a flat state dict in {path_or_state_dict!r}, got {type(sd).__name__}")
    if "model" in sd and isinstance(sd["model"], Mapping):  # tolerate a wrapped dict
        sd = sd["model"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model = MultiScaleVQVAE(cfg or official_config())
    hits = model.quantize.ema_vocab_hit_SV
    if _HIT_KEY in sd and tuple(sd[_HIT_KEY].shape) != tuple(hits.shape):
        sd[_HIT_KEY] = torch.zeros_like(hits)  # derived statistics of another schedule
    load_state_dict_checked(
        model,
        sd,
        context=f"official VQ-VAE {_source_name(path_or_state_dict)}",
    )
    return model


def _source_name(src: object) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else "state dict"


def export_official(model: MultiScaleVQVAE) -> dict[str, torch.Tensor]:
    """Flat state dict in the official layout (training-only modules dropped)."""
    return {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if not k.startswith("train_losses.")
    }


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The argument checks of :func:`cli`, reading no file: ``(args, overrides)``."""
    from maskar.convert.common import parse_cli_args

    usage = "usage: maskar convert vqvae src=FILE out=DIR [pn=256|512|1024] [preset=NAME] [model.K=V ...]"
    args, overrides = parse_cli_args(argv, usage, ("src", "out", "pn", "preset"))
    if "pn" in args:  # the image size of an official patch schedule, checked before any file is read
        sizes = [str(n) for n in sorted(PATCH_NUMS)]
        pn = args["pn"]
        if pn.strip() not in sizes:
            raise SystemExit(f"convert vqvae: pn: expected one of {', '.join(sizes)}, got {pn!r}\n{usage}")
        args["pn"] = pn.strip()
    return args, overrides


def cli(argv: list[str]) -> int:
    from maskar.checkpoint import save_model
    from maskar.convert.common import resolve_config

    args, overrides = parse(argv)
    base = None if args.get("preset") else official_config(int(args.get("pn", 256)))
    cfg = resolve_config("vqvae", args.get("preset"), overrides, base)
    model = load_official(args["src"], cfg.model)
    save_model(args["out"], model, cfg)
    print(f"wrote {args['out']} (vqvae, patch_nums {list(cfg.model.patch_nums)})")
    return 0
