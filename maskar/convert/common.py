"""Argument parsing and config resolution shared by the ``maskar convert`` subcommands.

Every converter takes ``key=value`` arguments of its own (``src=``, ``out=``, ...), a
``preset=NAME`` giving the architecture of a file whose sizes are not official, and
``model.*`` / ``sample.*`` overrides applied on top of the preset, or on top of the
configuration read from the file when no preset is given.
"""

from __future__ import annotations

from typing import Any

from maskar.config import Config, load_config, to_dict


def parse_cli_args(
    argv: list[str],
    usage: str,
    keys: tuple[str, ...],
    positional: tuple[str, ...] = (),
    required: tuple[str, ...] = ("src", "out"),
) -> tuple[dict[str, str], list[str]]:
    """``key=value`` arguments (``keys``) and ``model.*`` / ``sample.*`` overrides.

    Bare words fill ``positional`` in order (none allowed when it is empty). Exits with the
    usage line on an unknown key, a stray word or a missing ``required`` key.
    """
    args: dict[str, str] = {}
    overrides: list[str] = []
    words = [a for a in argv if "=" not in a]
    if words and not positional:
        raise SystemExit(f"{usage}; got {words[0]!r}")
    if len(words) > len(positional):
        raise SystemExit(f"{usage}; got extra arguments {words[len(positional) :]}")
    args.update(zip(positional, words, strict=False))
    for a in argv:
        if "=" not in a:
            continue
        k, v = a.split("=", 1)
        if k in keys:
            args[k] = v
        elif k.startswith(("model.", "sample.")):
            overrides.append(a)
        else:
            raise SystemExit(f"{usage}; unknown argument {k!r}")
    missing = [k for k in required if k not in args]
    if missing:
        raise SystemExit(f"{usage}; missing {', '.join(f'{k}=' for k in missing)}")
    return args, overrides


def resolve_config(
    arch: str,
    preset: str | None,
    overrides: list[str],
    model_cfg: Any = None,
    sample: dict | None = None,
) -> Config:
    """The config a conversion writes: ``preset`` + ``overrides``, or (no preset) the file's
    ``model_cfg`` and ``sample`` defaults + ``overrides``. Exits if the result is not ``arch``."""
    if preset:
        cfg = load_config(preset, overrides)
    else:
        base: dict[str, Any] = {"model": to_dict(model_cfg)}
        if sample:
            base["sample"] = dict(sample)
        cfg = load_config(None, overrides, base=base)
    if cfg.model.arch != arch:
        name = f"preset {preset!r}" if preset else "the overrides"
        raise SystemExit(f"convert {arch}: {name} give a {cfg.model.arch!r} model, not {arch!r}")
    return cfg
