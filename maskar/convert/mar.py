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

import torch
from torch import Tensor

from maskar.checkpoint import CheckpointError, load_state_dict_checked

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
            f"Original error: {str(e).splitlines()[0]}"
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


def save_official(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write ``{"model": ..., "model_ema": ...}`` (the same weights) like ``checkpoint-last.pth``."""
    state = export_official(model)
    torch.save({"model": state, "model_ema": state}, path)


_TRUE = ("1", "true", "yes", "on")
_KEYS = ("src", "out", "vae", "preset", "entry", "trust_pickle")


def cli(argv: list[str]) -> int:
    from maskar.checkpoint import save_model
    from maskar.config import load_config
    from maskar.models.mar import MAR, load_tokenizer_weights

    usage = (
        "usage: maskar convert mar src=checkpoint-last.pth out=DIR [vae=kl16.ckpt|KLVAE_DIR] "
        "[preset=mar-b] [entry=model_ema|model] [trust_pickle=false] [model.KEY=VALUE ...]"
    )
    args, overrides = {}, []
    for a in argv:
        if "=" not in a:
            raise SystemExit(f"{usage}; got {a!r}")
        k, v = a.split("=", 1)
        if k in _KEYS:
            args[k] = v
        elif k.startswith(("model.", "sample.")):
            overrides.append(a)
        else:
            raise SystemExit(f"{usage}; unknown argument {k!r}")
    if "src" not in args or "out" not in args:
        raise SystemExit(usage)
    cfg = load_config(args.get("preset", "mar-b"), overrides)
    if cfg.model.arch != "mar":
        raise SystemExit(f"convert mar: preset {args.get('preset')!r} is a {cfg.model.arch!r} preset")
    state = load_official(
        args["src"],
        entry=args.get("entry", "model_ema"),
        trust_pickle=args.get("trust_pickle", "").lower() in _TRUE,
    )
    model = MAR(cfg.model)
    load_into(model, state, context=f"official MAR checkpoint {args['src']}")
    vae = args.get("vae") or cfg.model.tokenizer_ckpt
    if not vae:
        raise SystemExit("convert mar: give vae=kl16.ckpt (or a maskar klvae dir); MAR files hold no VAE")
    load_tokenizer_weights(model.tokenizer, vae)
    cfg.model.tokenizer_ckpt = None  # the weights now live inside the checkpoint
    save_model(args["out"], model, cfg)
    n = sum(v.numel() for v in state.values())
    print(f"wrote {args['out']} (mar, {n / 1e6:.1f}M params from {args['src']}, tokenizer from {vae})")
    return 0
