"""Parsing of command-line values shared by several subcommands.

It sits below both :mod:`maskar.cli` and the subcommand implementations it dispatches to
(``maskar.eval.run``), so they can share it without importing each other.

Every subcommand option arrives as a YAML value (``per_class=4`` is an int, ``ema=maybe`` a
string). The helpers here check one option each and raise :class:`ConfigError` naming the key
and what was expected, so a bad value stops the command before any work starts.
"""

from __future__ import annotations

import math

from maskar.config import ConfigError


def parse_labels(value: object, num_classes: int | None) -> list[int]:
    """``labels=`` as class ids: None means every class; an int, ``"1,3"`` or a list otherwise.

    ``num_classes=None`` checks only the syntax (before the model, and so the range, is known).
    """
    if value is None:
        return list(range(num_classes or 0))
    ids = "class ids" if num_classes is None else f"class ids in [0, {num_classes - 1}]"
    expected = f"labels: expected comma-separated {ids} (e.g. labels=0,3,7)"
    if isinstance(value, int) and not isinstance(value, bool):
        items: list[object] = [value]
    elif isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ConfigError(f"{expected}, got {value!r}")
    labels = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ConfigError(f"{expected}, got {value!r}")
        try:
            labels.append(int(v))
        except ValueError:
            raise ConfigError(f"{expected}, got {value!r}") from None
    if not labels:
        raise ConfigError(f"{expected}, got none in {value!r}")
    bad = [v for v in labels if v < 0 or (num_classes is not None and v >= num_classes)]
    if bad and num_classes is None:
        raise ConfigError(f"labels: class ids must be >= 0, got {bad}")
    if bad:
        raise ConfigError(f"labels: class ids must be in [0, {num_classes - 1}], got {bad}")
    return labels


def int_option(value: object, key: str, min: int | None = None) -> int:  # noqa: A002
    """An integer option (``4``, ``4.0``); ``min`` is the smallest allowed value."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        bound = f" >= {min}" if min is not None else ""
        raise ConfigError(f"{key}: expected an integer{bound}, got {value!r}")
    if min is not None and value < min:
        raise ConfigError(f"{key}: expected an integer >= {min}, got {value}")
    return value


def float_option(value: object, key: str, min: float | None = None, above: float | None = None) -> float:  # noqa: A002
    """A finite number; ``min`` is inclusive, ``above`` exclusive."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if min is not None and value < min:
        raise ConfigError(f"{key}: expected a number >= {min}, got {value!r}")
    if above is not None and value <= above:
        raise ConfigError(f"{key}: expected a number > {above}, got {value!r}")
    return float(value)


def bool_option(value: object, key: str) -> bool:
    """true / false (YAML spelling); anything else is an error, never read as true."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def choice_option(value: object, key: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def str_option(value: object, key: str, what: str = "a path") -> str:
    """A non-empty string (YAML may have read ``out=1`` as an int: that is a valid name too)."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    text = str(value)
    if not text.strip():
        raise ConfigError(f"{key}: expected {what}, got an empty value")
    return text
