"""Official HMAR checkpoints <-> maskar ``hmar`` (stage 1 and stage 2), both directions.

    maskar convert hmar src=hmar-d16.pth vae=vae_ch160v4096z32.pth out=DIR [stage=2|1]
    maskar convert hmar src=nsp.pth mp=mp.pth vae=vae.pth out=DIR      # stage-1 + stage-2 training files
    maskar convert hmar ckpt=DIR out=hmar-d16.pth [vae_out=vae.pth]    # back to the official layout

Layouts (reference §4.2, §6):

* released ``hmar-dNN.pth`` (the official inference class, "combined"):
  ``base_blocks.{0..d-n-1}``, ``ns_blocks.{0..n-1}``, ``mask_blocks.{0..n-1}``,
  ``ns_head(_nm)``, ``mask_head(_nm)``, ``mask_embed.weight`` [1, C], and a bias-free
  ``word_embed.weight`` plus a separate ``word_embed_bias``;
* stage-1 training file (NSP): VAR's layout (``blocks.i``, ``word_embed.{weight,bias}``,
  ``head``), block-diagonal mask buffer;
* stage-2 training file (MP): VAR's layout + ``mask_embed`` + ``word_embed_bias``, whose
  last n blocks and head are the fine-tuned mask branch.

Ours: stage 1 = the NSP layout; stage 2 = ``blocks`` (= base ++ ns) + ``head`` (= ns_head)
+ ``mask_blocks`` + ``mask_head(_nm)`` + ``mask_embed``. Derived buffers are verified and
dropped on import, rebuilt on export.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

from torch import Tensor

from maskar.checkpoint import CheckpointError, load_state_dict_checked
from maskar.config import to_dict
from maskar.convert.common import resolve_config
from maskar.convert.var import (
    check_and_drop_buffers,
    detached,
    export_cli,
    official_buffers,
    parse_import_or_export,
    patch_nums_for_length,
    read_state_dict,
    save_converted,
    tokenizer_state,
    var_config,
)
from maskar.nn.attention import ScalePattern

# Per-checkpoint sampling YAMLs (reference §4.5).
HMAR_SAMPLE_DEFAULTS = {
    16: {"cfg": 1.7, "top_k": 1000, "top_p": 0.99},
    20: {"cfg": 1.9, "top_k": 950, "top_p": 0.99},
    24: {"cfg": 2.1, "top_k": 900, "top_p": 0.99},
    30: {"cfg": 1.7, "top_k": 1000, "top_p": 0.99},
}


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _rename_block(key: str, src: str, dst: str, offset: int = 0) -> str | None:
    m = re.match(rf"{src}\.(\d+)\.(.*)$", key)
    return f"{dst}.{int(m.group(1)) + offset}.{m.group(2)}" if m else None


def is_combined(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("ns_blocks.", "base_blocks.")) for k in sd)


def combined_to_ours(sd: Mapping[str, Tensor], stage: int = 2) -> dict[str, Tensor]:
    """Released combined layout (buffers already dropped) -> our stage-2 (or stage-1) keys."""
    n_base = _count(sd, "base_blocks")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("base_blocks."):
            out[_rename_block(k, "base_blocks", "blocks")] = v
        elif k.startswith("ns_blocks."):
            out[_rename_block(k, "ns_blocks", "blocks", n_base)] = v
        elif k.startswith("ns_head_nm."):
            out["head_nm." + k[len("ns_head_nm.") :]] = v
        elif k.startswith("ns_head."):
            out["head." + k[len("ns_head.") :]] = v
        elif k == "word_embed_bias":
            out["word_embed.bias"] = v
        elif k.startswith("mask_"):
            if stage == 2:
                out[k] = v
        else:
            out[k] = v
    return out


def ours_to_combined(sd: Mapping[str, Tensor], depth: int, n_mask: int) -> dict[str, Tensor]:
    """Our stage-2 keys -> released combined layout (no buffers)."""
    n_base = depth - n_mask
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = re.match(r"blocks\.(\d+)\.(.*)$", k)
        if m:
            i = int(m.group(1))
            name = f"base_blocks.{i}" if i < n_base else f"ns_blocks.{i - n_base}"
            out[f"{name}.{m.group(2)}"] = v
        elif k.startswith("head_nm."):
            out["ns_head_nm." + k[len("head_nm.") :]] = v
        elif k.startswith("head."):
            out["ns_head." + k[len("head.") :]] = v
        elif k == "word_embed.bias":
            out["word_embed_bias"] = v
        else:
            out[k] = v
    return out


def nsp_mp_to_ours(nsp: Mapping[str, Tensor], mp: Mapping[str, Tensor], n_mask: int) -> dict[str, Tensor]:
    """Stage-1 (NSP) + stage-2 (MP) training files -> our stage-2 keys (official load_* helpers)."""
    depth = _count(nsp, "blocks")
    out = dict(nsp)
    for k, v in mp.items():
        m = re.match(r"blocks\.(\d+)\.(.*)$", k)
        if m and int(m.group(1)) >= depth - n_mask:
            out[f"mask_blocks.{int(m.group(1)) - (depth - n_mask)}.{m.group(2)}"] = v
        elif k.startswith(("head.", "head_nm.")):
            out["mask_" + k] = v
        elif k == "mask_embed.weight":
            out[k] = v
    return out


def _hmar_config(sd: Mapping[str, Tensor], depth: int, stage: int, n_mask: int):
    width = sd["pos_start"].shape[-1]
    cfg = var_config(depth, width, False, patch_nums_for_length(sd["pos_1LC"].shape[1]), arch="hmar")
    cfg.stage, cfg.n_layers_train = stage, max(n_mask, 1)
    cfg.validate()
    return cfg


def load_official(
    src: str | os.PathLike | Mapping[str, Tensor],
    vae: str | os.PathLike | Mapping[str, Tensor] | None = None,
    stage: int | None = None,
    mp: str | os.PathLike | Mapping[str, Tensor] | None = None,
    cfg=None,
):
    """Build a maskar HMAR from an official file and load strictly.

    ``src`` is a released combined file (-> stage 2 by default, ``stage=1`` keeps only the
    next-scale network) or a stage-1 NSP file (-> stage 1, or stage 2 with ``mp`` = the
    stage-2 training file). ``vae``: the official VQ-VAE (else the tokenizer stays fresh).
    """
    from maskar.models.hmar import HMAR

    ours, cfg = official_layout(src, stage, mp, cfg)
    model = HMAR(cfg)
    ours.update(tokenizer_state(model, vae))
    load_state_dict_checked(model, ours, context="official HMAR checkpoint")
    return model


def official_layout(
    src: str | os.PathLike | Mapping[str, Tensor],
    stage: int | None = None,
    mp: str | os.PathLike | Mapping[str, Tensor] | None = None,
    cfg=None,
) -> tuple[dict[str, Tensor], object]:
    """An official file's weights in our keys (no tokenizer) and the model config they need
    (read from the file, or ``cfg`` with the file's stage); see :func:`load_official`."""
    sd = read_state_dict(src, "official HMAR checkpoint")
    if cfg is not None:
        patch_nums = tuple(cfg.tokenizer.patch_nums)
    else:
        patch_nums = patch_nums_for_length(sd["pos_1LC"].shape[1])
    pattern = ScalePattern.from_sides("block_diagonal", patch_nums)
    sd = check_and_drop_buffers(sd, pattern, "official HMAR checkpoint")
    if is_combined(sd):
        n_mask = _count(sd, "mask_blocks")
        depth = _count(sd, "base_blocks") + _count(sd, "ns_blocks")
        stage = 2 if stage is None else stage
        if mp is not None:
            raise CheckpointError("convert hmar: mp= goes with a stage-1 NSP file, not a combined file")
        ours = combined_to_ours(sd, stage)
    else:
        depth = _count(sd, "blocks")
        if mp is not None:
            msd = read_state_dict(mp, "official HMAR stage-2 file")
            msd = check_and_drop_buffers(msd, pattern, "official HMAR stage-2 file")
            n_mask = 8 if cfg is None else cfg.n_layers_train
            stage = 2 if stage is None else stage
            if stage != 2:
                raise CheckpointError("convert hmar: mp= (the stage-2 file) needs stage=2")
            ours = nsp_mp_to_ours(sd, msd, n_mask)
        else:
            if stage == 2:
                raise CheckpointError("convert hmar: a stage-1 file has no mask branch; give mp= or stage=1")
            stage, n_mask = 1, 0
            ours = {k: v for k, v in sd.items() if not k.startswith("mask_") and k != "word_embed_bias"}
    if cfg is None:
        cfg = _hmar_config(sd, depth, stage, n_mask)
    else:  # caller's architecture (e.g. a non-official schedule); the file decides the stage
        n_train = max(n_mask, 1) if stage == 2 else cfg.n_layers_train
        cfg = dataclasses.replace(cfg, stage=stage, n_layers_train=n_train)
    return ours, cfg


def export_official(model, combined: bool = True) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(transformer, VQ-VAE) state dicts. Stage 2 -> the released combined layout;
    stage 1 -> the NSP layout (VAR's keys, block-diagonal mask buffer)."""
    from maskar.convert.var import export_official as export_var_layout

    if model.stage == 1 or not combined:
        return export_var_layout(model)
    own, vae = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("tokenizer."):
            if not k.startswith("tokenizer.train_losses."):
                vae[k[len("tokenizer.") :]] = detached(v)
        else:
            own[k] = detached(v)
    n_mask = len(model.mask_blocks)
    out = ours_to_combined(own, model.depth, n_mask)
    n_base = model.depth - n_mask
    blocks = [f"base_blocks.{i}" for i in range(n_base)]
    blocks += [f"ns_blocks.{i}" for i in range(n_mask)] + [f"mask_blocks.{i}" for i in range(n_mask)]
    out.update(official_buffers(model.pattern, blocks, model.C))
    return out, vae


USAGE = (
    "maskar convert hmar src=hmar-dNN.pth vae=vae_ch160v4096z32.pth out=DIR [stage=2|1] [preset=P] "
    "[model.K=V ...]\n"
    "       maskar convert hmar src=nsp.pth mp=mp.pth vae=vae.pth out=DIR\n"
    "       maskar convert hmar ckpt=DIR out=hmar-dNN.pth [vae_out=vae.pth]"
)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The argument checks of :func:`cli`, reading no file (``parse_import_or_export``)."""
    keys = ("src", "vae", "out", "stage", "mp", "preset")
    args, overrides = parse_import_or_export(argv, "hmar", USAGE, keys)
    if args.get("stage") not in (None, "1", "2"):
        raise SystemExit(f"convert hmar: stage must be 1 or 2, got {args['stage']!r}")
    return args, overrides


def cli(argv: list[str]) -> int:
    args, overrides = parse(argv)
    if "ckpt" in args:
        return export_cli(args, "hmar", export_official)
    stage = args.get("stage")
    stage = None if stage is None else int(stage)
    if args.get("preset"):  # the preset's architecture; the file decides the stage
        cfg = resolve_config("hmar", args["preset"], overrides)
        ours, cfg.model = official_layout(args["src"], stage, args.get("mp"), cfg.model)
    else:
        ours, model_cfg = official_layout(args["src"], stage, args.get("mp"))
        sample = HMAR_SAMPLE_DEFAULTS.get(model_cfg.depth)
        cfg = resolve_config("hmar", None, overrides, model_cfg, sample)
    from maskar.models.hmar import HMAR

    model = HMAR(cfg.model)
    ours.update(tokenizer_state(model, args["vae"]))
    load_state_dict_checked(model, ours, context=f"official HMAR checkpoint {args['src']}")
    save_converted(model, args["out"], to_dict(cfg.sample))
    print(f"wrote {args['out']} (hmar stage {model.stage}, depth {model.depth})")
    return 0
