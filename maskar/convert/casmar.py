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
import re
from collections.abc import Mapping

from torch import Tensor

from maskar.checkpoint import CheckpointError, load_state_dict_checked
from maskar.checkpoint import load_official as read_official_file
from maskar.convert.common import parse_cli_args, resolve_config
from maskar.convert.mar import KEYS, check_args, finish_conversion, load_official_from_args, save_official
from maskar.convert.mar import load_official as _load_mar_format

__all__ = ["cli", "head_variant", "load_dit_head", "load_official", "load_psa", "save_official"]

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


# ----------------------------------------------------------------------------- standalone head / PSA


def _read(src: str | os.PathLike | Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    sd = src if isinstance(src, Mapping) else read_official_file(src)
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{what}: expected a flat state dict of tensors, got {type(sd).__name__}")
    return dict(sd)


def _strip(sd: Mapping[str, Tensor], anchor: str) -> dict[str, Tensor]:
    """Drop whatever prefix precedes ``anchor`` (e.g. ``module.cond_diffloss.net.``); keys without
    the prefix are dropped too (other modules of a full checkpoint)."""
    hits = [k for k in sd if k.endswith(anchor) or f".{anchor}" in k or k.startswith(anchor)]
    if not hits:
        raise CheckpointError(f"no key ending in {anchor!r}; first keys: {sorted(sd)[:4]}")
    key = min(hits, key=len)
    prefix = key[: key.index(anchor)]
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def load_dit_head(
    src: str | os.PathLike | Mapping[str, Tensor],
    *,
    heads: int | None = None,
    kernel_size: int = 7,
    dilation: int = 1,
    num_sampling_steps: str | int = "250",
):
    """The stage-2 DiT head alone, from its state dict (a file or mapping): a
    :class:`~maskar.models.casmar.GlobalDiffLoss` whose ``net`` holds the weights.

    Accepts the official ``DiT`` keys with any prefix (``cond_diffloss.net.`` of a full
    checkpoint, ``net.``, ``module.``). Width, depth, grid, input / condition channels, MLP
    ratio, the attention variant (PSA v1 / SALA v2) and the class count (SALA) are read from
    the shapes; ``heads`` (default width / 64, the official head dim), the PSA window and
    dilation (official 7 / 1) cannot be and are arguments. Loads strictly.
    """
    from maskar.models.casmar import GlobalDiffLoss, LocalDiT

    sd = _strip(_read(src, "DiT head"), "x_embedder.proj.weight")
    width, in_ch = sd["x_embedder.proj.weight"].shape[:2]
    z_ch = sd["c_embedder.proj.weight"].shape[1]
    n = sd["pos_embed"].shape[1]
    side = int(round(n**0.5))
    if side * side != n:
        raise CheckpointError(f"DiT head: pos_embed has {n} positions, not a square grid")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    variant = "sala" if "blocks.0.attn.q_proj_loc.weight" in sd else "psa"
    if variant == "psa" and "blocks.0.attn.na.q_proj.weight" not in sd:
        raise CheckpointError("DiT head: neither PSA (attn.na.*) nor SALA (attn.*_loc) attention keys")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width
    table = sd.get("y_embedder.embedding_table.weight")
    num_classes = 1000 if table is None else table.shape[0] - 1
    net = LocalDiT(
        in_channels=in_ch,
        z_channels=z_ch,
        grid=(side, side),
        depth=depth,
        width=width,
        heads=heads or max(1, width // 64),
        mlp_ratio=mlp_ratio,
        attention=variant,
        kernel_size=kernel_size,
        dilation=dilation,
        num_classes=num_classes,
        label_drop_prob=0.0,
    )
    load_state_dict_checked(net, sd, context="DiT head state dict")
    return GlobalDiffLoss(net.eval(), num_sampling_steps=num_sampling_steps)


def load_psa(
    src: str | os.PathLike | Mapping[str, Tensor],
    num_heads: int,
    *,
    kernel_size: int = 7,
    dilation: int = 1,
):
    """One official ``ProximalAttention2D_PyTorch`` from its state dict (keys ``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj``, with any prefix such as ``blocks.0.attn.na.``; the
    first such module is taken): a :class:`~maskar.nn.proximal_attention.ProximalAttention2D`.
    Call it as ``psa(x, (h, w))`` with x (B, h*w, C). Loads strictly."""
    from maskar.nn.proximal_attention import ProximalAttention2D

    sd = _strip(_read(src, "PSA module"), "q_proj.weight")
    sd = {k: v for k, v in sd.items() if k.split(".")[0] in ("q_proj", "k_proj", "v_proj", "out_proj")}
    dim = sd["q_proj.weight"].shape[1]
    psa = ProximalAttention2D(dim, num_heads, kernel_size, dilation, qkv_bias="q_proj.bias" in sd)
    load_state_dict_checked(psa, sd, context="PSA state dict")
    return psa.eval()


DEFAULT_PRESET = "casmar-b"  # the architecture of an official file when no preset= is given


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The argument checks of :func:`cli`, reading no file: ``(args, overrides)``."""
    usage = (
        "usage: maskar convert casmar src=checkpoint-last.pth out=DIR [vae=kl16.ckpt|KLVAE_DIR] "
        "[preset=casmar-b] [entry=model_ema|model] [trust_pickle=false] [model.KEY=VALUE ...] "
        "(or: maskar convert casmar SRC DST key=value ...)"
    )
    args, overrides = parse_cli_args(argv, usage, KEYS, positional=("src", "out"))
    check_args(args, usage, "casmar")
    return args, overrides


def cli(argv: list[str]) -> int:
    from maskar.models.casmar import CASMAR

    args, overrides = parse(argv)
    state = load_official_from_args(args, kind="CASMAR")
    variant = head_variant(state)
    asked = [o.split("=", 1)[1] for o in overrides if o.startswith("model.head_attention=")]
    if asked and asked[-1] != variant:
        raise SystemExit(
            f"convert casmar: model.head_attention={asked[-1]} but {args['src']} holds a {variant} head"
        )
    overrides = [*overrides, f"model.head_attention={variant}"]
    cfg = resolve_config("casmar", args.get("preset", DEFAULT_PRESET), overrides)
    finish_conversion(CASMAR(cfg.model), cfg, state, args, "CASMAR", f"casmar, {variant} head")
    return 0
