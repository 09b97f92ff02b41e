"""Datasets (imagefolder, fashion_mnist, digits, synthetic, latents), the latent store and loaders.

``build_dataset(cfg.data)`` returns a map-style dataset whose items are dicts:
``{"image": (C, R, R) float32 in [-1, 1], "label": int64 0-d}``, or for ``latents`` the stored
arrays (``moments``, ``moments_flip``, ...) plus ``label``. Every dataset has ``num_classes``
and ``skipped`` (unreadable files skipped so far). See docs/data.md.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from maskar.config import ConfigError, DataConfig
from maskar.data.digits import DigitsDataset
from maskar.data.fashion_mnist import FashionMNISTDataset, read_idx
from maskar.data.imagefolder import ImageFolderDataset, UnreadableImageError
from maskar.data.latent_store import LatentDataset, cache_latents, read_index, write_latents
from maskar.data.loader import make_loader, set_epoch
from maskar.data.synthetic import SyntheticDataset

__all__ = [
    "DigitsDataset",
    "FashionMNISTDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "SyntheticDataset",
    "UnreadableImageError",
    "build_dataset",
    "cache_latents",
    "make_loader",
    "read_idx",
    "read_index",
    "set_epoch",
    "write_latents",
]


def _need_root(cfg: DataConfig) -> str:
    if not cfg.root:
        raise ConfigError(f"data.root: data.name={cfg.name} needs a folder (data.root=PATH)")
    return cfg.root


def build_dataset(cfg: DataConfig) -> Dataset:
    """The dataset described by the ``data`` config section."""
    if cfg.name == "imagefolder":
        ds = ImageFolderDataset(
            _need_root(cfg), cfg.split, cfg.resolution, cfg.channels, cfg.hflip, cfg.strict, cfg.limit
        )
    elif cfg.name == "fashion_mnist":
        ds = FashionMNISTDataset(
            cfg.root, cfg.split, cfg.resolution, cfg.channels, cfg.hflip, cfg.resize, cfg.limit
        )
    elif cfg.name == "digits":
        ds = DigitsDataset(cfg.split, cfg.resolution, cfg.channels, cfg.hflip, cfg.resize, cfg.limit)
    elif cfg.name == "synthetic":
        ds = SyntheticDataset(
            cfg.synthetic_size,
            cfg.synthetic_classes,
            cfg.resolution,
            cfg.channels,
            cfg.hflip,
            cfg.split,
            cfg.synthetic_seed,
            cfg.limit,
        )
    elif cfg.name == "latents":
        ds = LatentDataset(_need_root(cfg), cfg.limit)
    else:
        raise ConfigError(
            f"data.name: unknown dataset {cfg.name!r}; expected imagefolder, fashion_mnist, digits, "
            f"synthetic or latents"
        )
    if cfg.num_classes is not None:
        if cfg.num_classes < ds.num_classes:
            raise ConfigError(
                f"data.num_classes: {cfg.num_classes} is fewer than the {ds.num_classes} classes "
                f"found in the data"
            )
        ds.num_classes = cfg.num_classes
    return ds
