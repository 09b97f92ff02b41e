"""Official MAR ``checkpoint-last.pth`` (LTH14/mar) <-> maskar ``mar``.

    maskar convert mar src=checkpoint-last.pth vae=kl16.ckpt preset=mar-b out=ckpt/mar-b

The official file is ``{"model", "model_ema", "optimizer", "epoch", "scaler", "args"}``;
inference uses ``model_ema``. maskar's MAR uses the official parameter names, so the
conversion is a strict load of every non-tokenizer key; the tokenizer comes from
``vae=`` (``kl16.ckpt`` or a maskar klvae dir) or from the preset's ``model.tokenizer_ckpt``.

``args`` is a pickled ``argparse.Namespace``, which ``torch.load(weights_only=True)``
refuses. ``trust_pickle=true`` allow-lists exactly that class
(``torch.serialization.safe_globals``); nothing else is ever unpickled.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from maskar.checkpoint import CheckpointError, load_state_dict_checked, unpickling_reason
from maskar.convert.common import parse_cli_args, resolve_config

TOKENIZER_PREFIX = "tokenizer."


def load_official(
    path: str | os.PathLike, entry: str = "model_ema", trust_pickle: bool = False, kind: str = "MAR"
) -> dict[str, Tensor]:
    """The state dict stored under ``entry`` (falls back to ``model``) of an official file.

    ``kind`` names the method in error messages (CASMAR files share the format)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official {kind} checkpoint {path} does not exist")
    try:
        if trust_pickle:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        hint = (
            " The file pickles Python objects besides tensors (the official checkpoint stores its "
            "argparse.Namespace under 'args'). Pass trust_pickle=true to allow exactly "
            "argparse.Namespace (still weights_only loading, nothing else is unpickled)."
            if not trust_pickle
            else " Even with argparse.Namespace allowed it pickles other objects; maskar will not load it."
        )
        raise CheckpointError(
            f"official {kind} checkpoint {path} cannot be read with torch.load(weights_only=True).{hint} "
            f"{unpickling_reason(e)}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(
            f"official {kind} checkpoint {path} is not a readable torch file: {e}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"official {kind} checkpoint {path}: expected a dict, got {type(obj).__name__}")
    if entry in obj and isinstance(obj[entry], Mapping):
        state = obj[entry]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        state = obj["model"]
    elif all(isinstance(v, Tensor) for v in obj.values()):
        state = obj  # a bare state dict
    else:
        raise CheckpointError(
            f"official {kind} checkpoint {path}: no {entry!r} or 'model' entry; "
            f"top-level entries: {sorted(obj)}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(
    model: torch.nn.Module, state: Mapping[str, Tensor], context: str = "official MAR weights"
) -> None:
    """Strictly load an official state dict into every non-tokenizer parameter of ``model``."""
    full = {k: v for k, v in model.state_dict().items() if k.startswith(TOKENIZER_PREFIX)}
    clash = [k for k in state if k.startswith(TOKENIZER_PREFIX)]
    if clash:
        raise CheckpointError(f"{context}: unexpected tokenizer keys in a MAR file: {clash[:3]}")
    full.update(state)
    load_state_dict_checked(model, full, context=context)


def export_official(model: torch.nn.Module) -> dict[str, Tensor]:
    """The official layout (no tokenizer keys), detached CPU copies."""
    return {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(TOKENIZER_PREFIX)
    }


def save_official(
    model: torch.nn.Module, path: str | os.PathLike, ema: Mapping[str, Tensor] | None = None
) -> None:
    """Write ``{"model", "model_ema"}`` like ``checkpoint-last.pth`` (EMA = the weights unless given)."""
    state = export_official(model)
    torch.save({"model": state, "model_ema": dict(ema) if ema is not None else state}, path)


# ----------------------------------------------------------------------------- CLI (MAR and CASMAR)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
KEYS = ("src", "out", "vae", "preset", "entry", "trust_pickle")


def check_args(args: Mapping[str, str], usage: str, arch: str = "mar") -> None:
    """The values :func:`load_official_from_args` reads, checked before any file is: a
    ``trust_pickle`` that is neither true nor false is refused (never read as false)."""
    flag = args.get("trust_pickle")
    if flag is not None and flag.lower() not in _TRUE + _FALSE:
        raise SystemExit(f"convert {arch}: trust_pickle: expected true or false, got {flag!r}\n{usage}")


def load_official_from_args(args: Mapping[str, str], kind: str = "MAR") -> dict[str, Tensor]:
    """:func:`load_official` of ``src`` with the CLI's ``entry`` and ``trust_pickle``."""
    return load_official(
        args["src"],
        entry=args.get("entry", "model_ema"),
        trust_pickle=args.get("trust_pickle", "").lower() in _TRUE,
        kind=kind,
    )


def finish_conversion(
    model: torch.nn.Module,
    cfg: Any,
    state: Mapping[str, Tensor],
    args: Mapping[str, str],
    kind: str,
    label: str,
) -> None:
    """Load ``state`` strictly and the tokenizer from ``vae=`` (or the preset), save to ``out``."""
    from maskar.checkpoint import save_model
    from maskar.models.mar import load_tokenizer_weights

    load_into(model, state, context=f"official {kind} checkpoint {args['src']}")
    vae = args.get("vae") or cfg.model.tokenizer_ckpt
    if not vae:
        raise SystemExit(
            f"convert {kind.lower()}: give vae=kl16.ckpt (or a maskar klvae dir); {kind} files hold no VAE"
        )
    load_tokenizer_weights(model.tokenizer, vae)
    cfg.model.tokenizer_ckpt = None  # the weights now live inside the checkpoint
    save_model(args["out"], model, cfg)
    n = sum(v.numel() for v in state.values())
    print(f"wrote {args['out']} ({label}, {n / 1e6:.1f}M params from {args['src']}, tokenizer from {vae})")


DEFAULT_PRESET = "mar-b"  # the architecture of an official file when no preset= is given


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """The argument checks of :func:`cli`, reading no file: ``(args, overrides)``."""
    usage = (
        "usage: maskar convert mar src=checkpoint-last.pth out=DIR [vae=kl16.ckpt|KLVAE_DIR] "
        "[preset=mar-b] [entry=model_ema|model] [trust_pickle=false] [model.KEY=VALUE ...]"
    )
    args, overrides = parse_cli_args(argv, usage, KEYS)
    check_args(args, usage)
    return args, overrides


def cli(argv: list[str]) -> int:
    from maskar.models.mar import MAR

    args, overrides = parse(argv)
    cfg = resolve_config("mar", args.get("preset", DEFAULT_PRESET), overrides)
    state = load_official_from_args(args)
    finish_conversion(MAR(cfg.model), cfg, state, args, "MAR", "mar")
    return 0
