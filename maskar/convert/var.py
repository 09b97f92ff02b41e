"""Official VAR checkpoints (``var_dNN.pth`` + ``vae_ch160v4096z32.pth``) <-> maskar ``var``.

    maskar convert var src=var_d16.pth vae=vae_ch160v4096z32.pth out=DIR
    maskar convert var ckpt=DIR out=var_d16.pth [vae_out=vae.pth]      # back to the official layout

Our parameter names are the official ones, and the tokenizer sits under ``tokenizer.``.
The official files also store three derived buffers, which we recompute instead:
``lvl_1L`` (scale id per token), ``attn_bias_for_masking`` ([1,1,L,L], 0 / -inf) and
``blocks.*.attn.zero_k_bias`` (zeros). On import they are checked against our own
construction and dropped; on export they are rebuilt. Depth, width and ``shared_aln``
(d36-s) are read from the file; the patch schedule from ``pos_1LC``'s length.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from maskar.checkpoint import CheckpointError, load_state_dict_checked
from maskar.checkpoint import load_official as read_official_file
from maskar.config import to_dict
from maskar.convert.common import parse_cli_args, resolve_config
from maskar.nn.attention import ScalePattern
from maskar.tokenizers.vqvae import PATCH_NUMS

DERIVED = ("lvl_1L", "attn_bias_for_masking")
_ZERO_K = re.compile(r"(^|\.)attn\.zero_k_bias$")

# README FID protocol (reference §3).
VAR_SAMPLE_DEFAULTS = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}


def read_state_dict(src: str | os.PathLike | Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """A flat state dict from a file or mapping; unwraps training checkpoints and DDP prefixes."""
    sd = src if isinstance(src, Mapping) else read_official_file(src)
    if isinstance(sd, Mapping) and "trainer" in sd and isinstance(sd["trainer"], Mapping):
        trainer = sd["trainer"]
        for key in ("var_wo_ddp", "transformer_wo_ddp"):
            if key in trainer:
                sd = trainer[key]
                break
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{what}: expected a flat state dict of tensors, got {type(sd).__name__}")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}


def patch_nums_for_length(L: int) -> tuple[int, ...]:
    for pn in PATCH_NUMS.values():
        if sum(p * p for p in pn) == L:
            return tuple(pn)
    raise CheckpointError(f"pos_1LC has {L} tokens, which matches no official patch schedule {PATCH_NUMS}")


def official_buffers(pattern: ScalePattern, prefix_blocks: list[str], width: int) -> dict[str, Tensor]:
    """The derived buffers exactly as the official modules store them."""
    L = pattern.total
    bias = torch.zeros(1, 1, L, L)
    bias.masked_fill_(~pattern.dense_mask(), float("-inf"))
    out = {"lvl_1L": pattern.scale_ids().view(1, L), "attn_bias_for_masking": bias}
    for p in prefix_blocks:
        out[f"{p}.attn.zero_k_bias"] = torch.zeros(width)
    return out


def check_and_drop_buffers(sd: dict[str, Tensor], pattern: ScalePattern, what: str) -> dict[str, Tensor]:
    """Verify the file's derived buffers against ours, then drop them (meta tensors: shape only)."""
    L = pattern.total
    out = dict(sd)
    lvl = out.pop("lvl_1L", None)
    if lvl is not None and not lvl.is_meta:
        if tuple(lvl.shape) != (1, L) or not torch.equal(lvl.long().cpu(), pattern.scale_ids().view(1, L)):
            raise CheckpointError(f"{what}: lvl_1L does not match the scale ids of patch_nums")
    bias = out.pop("attn_bias_for_masking", None)
    if bias is not None and not bias.is_meta:
        allowed = bias.reshape(bias.shape[-2:]).cpu() == 0
        if tuple(bias.shape[-2:]) != (L, L) or not torch.equal(allowed, pattern.dense_mask()):
            raise CheckpointError(
                f"{what}: attn_bias_for_masking is not the {pattern.kind} mask this model expects "
                "(a VAR file is block-causal, an HMAR file block-diagonal)"
            )
    for k in [k for k in out if _ZERO_K.search(k)]:
        v = out.pop(k)
        if not v.is_meta and bool(v.abs().max() > 0):
            raise CheckpointError(f"{what}: {k} should be zeros")
    return out


def var_config(depth: int, width: int, shared_aln: bool, patch_nums: tuple[int, ...], arch: str = "var"):
    """maskar config of an official VAR/HMAR transformer on the official VQ-VAE."""
    from maskar.convert.vqvae import official_config as vae_config
    from maskar.models.hmar import HMARConfig
    from maskar.models.var import VARConfig

    res = {tuple(v): k for k, v in PATCH_NUMS.items()}[tuple(patch_nums)]
    cls = VARConfig if arch == "var" else HMARConfig
    cfg = cls(tokenizer=vae_config(res), depth=depth, width=width, heads=depth, shared_aln=shared_aln)
    cfg.validate()
    return cfg


def infer_var_config(sd: Mapping[str, Tensor]):
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    width = sd["pos_start"].shape[-1]
    patch_nums = patch_nums_for_length(sd["pos_1LC"].shape[1])
    return var_config(depth, width, "shared_ada_lin.1.weight" in sd, patch_nums)


def tokenizer_state(model: torch.nn.Module, vae: str | os.PathLike | Mapping[str, Tensor] | None) -> dict:
    """``tokenizer.``-prefixed weights: from the official VAE file, else the model's current ones."""
    if vae is None:
        return {f"tokenizer.{k}": v for k, v in model.tokenizer.state_dict().items()}
    vsd = read_state_dict(vae, "official VQ-VAE")
    hits = model.tokenizer.quantize.ema_vocab_hit_SV
    key = "quantize.ema_vocab_hit_SV"
    if key in vsd and tuple(vsd[key].shape) != tuple(hits.shape):
        vsd[key] = torch.zeros_like(hits)  # statistics of another schedule; nothing depends on them
    return {f"tokenizer.{k}": v for k, v in vsd.items()}


def load_official(
    src: str | os.PathLike | Mapping[str, Tensor],
    vae: str | os.PathLike | Mapping[str, Tensor] | None = None,
    cfg=None,
):
    """Build a maskar VAR from an official ``var_dNN.pth`` (+ the VQ-VAE file) and load strictly.

    Without ``vae`` the tokenizer keeps its fresh weights (load it later with ``tokenizer_ckpt``).
    """
    from maskar.models.var import VAR

    sd = read_state_dict(src, "official VAR checkpoint")
    cfg = cfg or infer_var_config(sd)
    model = VAR(cfg)
    sd = check_and_drop_buffers(sd, model.pattern, "official VAR checkpoint")
    sd.update(tokenizer_state(model, vae))
    load_state_dict_checked(model, sd, context="official VAR checkpoint")
    return model


def detached(v: Tensor) -> Tensor:
    """A CPU copy (meta tensors, used in shape-only tests, stay meta)."""
    return v.detach().clone() if v.is_meta else v.detach().cpu().clone()


def export_official(model) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(transformer state dict, VQ-VAE state dict) in the official flat layouts, derived buffers included.

    An HMAR stage-1 model exports to the same layout with its block-diagonal mask (NSP).
    """
    tf, vae = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("tokenizer."):
            if not k.startswith("tokenizer.train_losses."):
                vae[k[len("tokenizer.") :]] = detached(v)
        elif not k.startswith("mask_"):
            tf[k] = detached(v)
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    tf.update(official_buffers(model.pattern, blocks, model.C))
    return tf, vae


def save_converted(model, out: str, sample: Mapping | None = None) -> None:
    from maskar.checkpoint import save_model
    from maskar.config import Config, build

    data = {"model": to_dict(model.cfg)}
    if sample:
        data["sample"] = dict(sample)
    save_model(out, model, build(Config, data))


EXPORT_KEYS = ("ckpt", "out", "vae_out")


USAGE = (
    "maskar convert var src=var_dNN.pth vae=vae_ch160v4096z32.pth out=DIR [preset=NAME] [model.K=V ...]\n"
    "       maskar convert var ckpt=DIR out=var_dNN.pth [vae_out=vae.pth]   # to the official layout\n"
    "preset= gives the architecture of a non-official file (default: read from the file); model.* /\n"
    "sample.* overrides apply on top of it"
)


def parse_import_or_export(
    argv: list[str], name: str, usage: str, keys: tuple[str, ...]
) -> tuple[dict[str, str], list[str]]:
    """The argument checks of a VAR-family converter, reading no file: ``(args, overrides)``;
    ``ckpt`` in ``args`` means an export to the official layout, else an import needing vae=."""
    if any(a.startswith("ckpt=") for a in argv):
        args, _ = parse_cli_args(argv, f"usage: {usage}", EXPORT_KEYS, required=("ckpt", "out"))
        return args, []
    args, overrides = parse_cli_args(argv, f"usage: {usage}", keys)
    if "vae" not in args:
        raise SystemExit(f"convert {name}: give vae=VAE.pth (tokenizer weights)\nusage: {usage}")
    return args, overrides


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The argument checks of :func:`cli`, reading no file (:func:`parse_import_or_export`)."""
    return parse_import_or_export(argv, "var", USAGE, ("src", "vae", "out", "preset"))


def cli(argv: list[str]) -> int:
    args, overrides = parse(argv)
    if "ckpt" in args:
        return export_cli(args, "var")
    sd = read_state_dict(args["src"], "official VAR checkpoint")
    inferred = None if args.get("preset") else infer_var_config(sd)
    cfg = resolve_config("var", args.get("preset"), overrides, inferred, VAR_SAMPLE_DEFAULTS)
    model = load_official(sd, args["vae"], cfg.model)
    save_converted(model, args["out"], to_dict(cfg.sample))
    print(f"wrote {args['out']} (var depth {model.depth}, patch_nums {list(model.patch_nums)})")
    return 0


def export_cli(args: dict[str, str], arch: str, export=None) -> int:
    """``ckpt=DIR out=FILE [vae_out=FILE]``: a maskar checkpoint back to the official layout
    (``export``: the model's ``export_official``; VAR's by default)."""
    from maskar.checkpoint import load_model

    model, _ = load_model(args["ckpt"], device="cpu")
    if arch == "var" and (model.cfg.arch not in ("var", "hmar") or getattr(model, "stage", 1) != 1):
        raise SystemExit(f"convert var: {args['ckpt']} is not a VAR or stage-1 HMAR checkpoint")
    if arch != "var" and model.cfg.arch != arch:
        raise SystemExit(f"convert {arch}: {args['ckpt']} is a {model.cfg.arch!r} checkpoint, not {arch}")
    tf, vae = (export or export_official)(model)
    torch.save(tf, args["out"])
    if "vae_out" in args:
        torch.save(vae, args["vae_out"])
    print(f"wrote {args['out']}" + (f" and {args['vae_out']}" if "vae_out" in args else ""))
    return 0
