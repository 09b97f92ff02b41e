"""The base types shared by :mod:`maskar.config` and :mod:`maskar.registry`.

:mod:`maskar.config` resolves ``model.arch`` through the registry, and the registry's
entries name subclasses of these bases; keeping the bases here lets both import them
without importing each other. Import them from :mod:`maskar.config` as usual.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any


class ConfigError(ValueError):
    """A user-caused config problem; the message names the key and what was expected."""


def field(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    min: float | None = None,  # noqa: A002 - reads naturally at call sites
    max: float | None = None,  # noqa: A002
    choices: tuple | None = None,
    help: str = "",  # noqa: A002
) -> Any:
    """A dataclass field with validation metadata and a help string."""
    meta = {"min": min, "max": max, "choices": choices, "help": help}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Base of every registered model config; ``arch`` selects the subclass."""

    arch: str = "none"


@dataclass
class SampleConfig:
    """Base of every registered sampling config."""

    seed: int = field(0, help="sampling seed")
