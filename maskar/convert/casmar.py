"""Official CASMAR ``checkpoint-last.pth`` (gcai98/CASMAR = HiDream-ai/casmar) -> maskar ``casmar``.

    maskar convert casmar src=checkpoint-last.pth vae=kl16.ckpt preset=casmar-b out=ckpt/casmar-b
    maskar convert casmar checkpoint-last.pth ckpt/casmar-b vae=kl16.ckpt      # positional SRC DST

The file is MAR's format, ``{"model", "model_ema", "optimizer", "epoch", "scaler", "args"}``;
the official ``--evaluate`` loads ``model_ema`` strictly, so that is the default entry
(``entry=model`` for the raw weights). maskar's CASMAR uses the official names, so the
conversion is a strict load of every non-tokenizer key. The DiT head variant is read from
the keys and sets ``model.head_attention``:

- ``cond_diffloss.net.blocks.0.attn.na.q_proj.weight``  -> release v1, ``psa``
- ``cond_diffloss.net.blocks.0.attn.q_proj_loc.weight`` -> HEAD v2, ``sala``
- ``cond_diffloss.net.blocks.0.attn.qkv.weight``        -> a Hi-MAR file: refused (its global
  attention head is not CASMAR's).

``args`` is a pickled ``argparse.Namespace``: pass ``trust_pickle=true`` to allow exactly that
class under ``torch.load(weights_only=True)`` (see ``maskar.convert.mar``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

from maskar.checkpoint import CheckpointError
from maskar.convert.mar import finish_conversion, load_official_from_args, parse_cli_args, save_official
from maskar.convert.mar import load_official as _load_mar_format

__all__ = ["cli", "head_variant", "load_official", "save_official"]

_HEAD = "cond_diffloss.net.blocks.0.attn."


def head_variant(state: Mapping[str, object]) -> str:
    """``psa`` (v1) or ``sala`` (v2) from the DiT head's key names; Hi-MAR and others raise."""
    if f"{_HEAD}na.q_proj.weight" in state:
        return "psa"
    if f"{_HEAD}q_proj_loc.weight" in state:
        return "sala"
    if f"{_HEAD}qkv.weight" in state:
        raise CheckpointError(
            "this is a Hi-MAR checkpoint (DiT head with global attn.qkv): its weights do not load into "
            "CASMAR, whose head uses PSA (attn.na.*) or SALA (attn.*_loc / *_anc)"
        )
    raise CheckpointError(
        f"not a CASMAR checkpoint: no {_HEAD}na.q_proj.weight (v1, PSA) or {_HEAD}q_proj_loc.weight "
        f"(v2, SALA); first keys: {sorted(state)[:4]}"
    )


def load_official(
    path: str | os.PathLike, entry: str = "model_ema", trust_pickle: bool = False
) -> dict[str, Tensor]:
    """The CASMAR state dict under ``entry`` (falls back to ``model``), ``module.`` stripped."""
    return _load_mar_format(path, entry=entry, trust_pickle=trust_pickle, kind="CASMAR")


def cli(argv: list[str]) -> int:
    from maskar.config import load_config
    from maskar.models.casmar import CASMAR

    usage = (
        "usage: maskar convert casmar src=checkpoint-last.pth out=DIR [vae=kl16.ckpt|KLVAE_DIR] "
        "[preset=casmar-b] [entry=model_ema|model] [trust_pickle=false] [model.KEY=VALUE ...] "
        "(or: maskar convert casmar SRC DST key=value ...)"
    )
    args, overrides = parse_cli_args(argv, usage, positional=("src", "out"))
    state = load_official_from_args(args, kind="CASMAR")
    variant = head_variant(state)
    asked = [o.split("=", 1)[1] for o in overrides if o.startswith("model.head_attention=")]
    if asked and asked[-1] != variant:
        raise SystemExit(
            f"convert casmar: model.head_attention={asked[-1]} but {args['src']} holds a {variant} head"
        )
    cfg = load_config(args.get("preset", "casmar-b"), [*overrides, f"model.head_attention={variant}"])
    if cfg.model.arch != "casmar":
        raise SystemExit(f"convert casmar: preset {args.get('preset')!r} is a {cfg.model.arch!r} preset")
    finish_conversion(CASMAR(cfg.model), cfg, state, args, "CASMAR", f"casmar, {variant} head")
    return 0
