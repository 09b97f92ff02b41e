"""Parsing of command-line values shared by several subcommands.

It sits below both :mod:`maskar.cli` and the subcommand implementations it dispatches to
(``maskar.eval.run``), so they can share it without importing each other.
"""

from __future__ import annotations

from maskar.config import ConfigError


def parse_labels(value: object, num_classes: int) -> list[int]:
    """``labels=`` as class ids: None means every class; an int, ``"1,3"`` or a list otherwise."""
    if value is None:
        return list(range(num_classes))
    if isinstance(value, int):
        labels = [value]
    elif isinstance(value, str):
        labels = [int(v) for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, (list, tuple)):
        labels = [int(v) for v in value]
    else:
        raise ConfigError(f"labels: expected a comma-separated list of class ids, got {value!r}")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ConfigError(f"labels: class ids must be in [0, {num_classes - 1}], got {bad}")
    return labels
