"""Registry of architectures: ``arch`` name -> config dataclasses and builder.

Model and tokenizer modules register themselves on import with :func:`register`.
The modules listed in ``_MODULES`` are imported lazily the first time the registry
is queried, so ``import maskar`` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from maskar.config_base import ConfigError, ModelConfig, SampleConfig

_MODULES = (
    "maskar.tokenizers.vqvae",
    "maskar.tokenizers.klvae",
    "maskar.models.var",
    "maskar.models.hmar",
    "maskar.models.mar",
    "maskar.models.casmar",
    "maskar.models.toy",
)


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    kind: str  # "generator" | "tokenizer"
    config_cls: type[ModelConfig]
    sample_cls: type[SampleConfig]
    build: Callable[[ModelConfig], nn.Module]
    description: str = ""


_SPECS: dict[str, ModelSpec] = {}
_loaded = False


def register(
    arch: str,
    *,
    kind: str,
    config_cls: type[ModelConfig],
    build: Callable[[ModelConfig], nn.Module],
    sample_cls: type[SampleConfig] = SampleConfig,
    description: str = "",
) -> None:
    if kind not in ("generator", "tokenizer"):
        raise ValueError(f"register({arch!r}): kind must be generator or tokenizer, got {kind!r}")
    _SPECS[arch] = ModelSpec(arch, kind, config_cls, sample_cls, build, description)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            # Only a module that does not exist yet is optional; a broken import is an error.
            if e.name != mod:
                raise


def get_model_spec(arch: str, key: str = "model.arch") -> ModelSpec:
    _load_all()
    if arch not in _SPECS:
        raise ConfigError(f"{key}: unknown architecture {arch!r}; available: {sorted(_SPECS)}")
    return _SPECS[arch]


def all_specs() -> dict[str, ModelSpec]:
    _load_all()
    return dict(_SPECS)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the module for a resolved model config."""
    return get_model_spec(cfg.arch).build(cfg)
