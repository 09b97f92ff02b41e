"""Procedural class-dependent images for tests and smoke training; no files, fully deterministic.

Class ``c`` fixes the shape (disk, square, stripes, ring; ``c % 4``) and the colour (hue
``c / num_classes``; for 1 channel a gray level). Position, size and a little noise vary per
sample, drawn from ``numpy.random.default_rng([seed, split, index])``: item ``i`` is the same in
every process, worker and run, and can be generated at any resolution.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from torch.utils.data import Dataset

from maskar.config import ConfigError
from maskar.data.transforms import random_hflip

SPLITS = {"train": 0, "test": 1, "val": 2}
SHAPES = ("disk", "square", "stripes", "ring")


def class_color(label: int, num_classes: int, channels: int) -> np.ndarray:
    """Foreground colour of a class in [-1, 1], shape (channels,)."""
    if channels == 1:
        level = 0.1 + 0.9 * (label + 1) / num_classes  # distinct gray levels, never the background
        return np.array([2.0 * level - 1.0])
    rgb = colorsys.hsv_to_rgb(label / num_classes, 0.85, 0.95)
    return np.asarray(rgb) * 2.0 - 1.0


def render(
    label: int, num_classes: int, resolution: int, channels: int, rng: np.random.Generator
) -> np.ndarray:
    """One (channels, R, R) float32 image in [-1, 1] of class ``label``."""
    r = resolution
    coords = (np.arange(r) + 0.5) / r
    yy, xx = np.meshgrid(coords, coords, indexing="ij")  # (R, R) each, in (0, 1)
    cy, cx = rng.uniform(0.35, 0.65, size=2)
    size = rng.uniform(0.18, 0.32)
    shape = SHAPES[label % len(SHAPES)]
    if shape == "disk":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= size**2
    elif shape == "square":
        mask = (np.abs(yy - cy) <= size) & (np.abs(xx - cx) <= size)
    elif shape == "stripes":
        period = rng.uniform(0.15, 0.3)
        mask = ((yy + rng.uniform(0, 1)) % period) < period / 2
    else:
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        mask = (dist <= size) & (dist >= size * 0.55)
    background = rng.uniform(-1.0, -0.6)
    color = np.clip(class_color(label, num_classes, channels) + rng.normal(0, 0.05, size=channels), -1, 1)
    img = np.where(mask[None], color[:, None, None], background)  # (C, R, R)
    img = img + rng.normal(0.0, 0.03, size=img.shape)
    return np.clip(img, -1.0, 1.0).astype(np.float32)


class SyntheticDataset(Dataset):
    """``size`` items ``{"image": (C, R, R) in [-1, 1], "label": ()}``; label of item i is i % classes."""

    def __init__(
        self,
        size: int = 256,
        num_classes: int = 10,
        resolution: int = 32,
        channels: int = 3,
        hflip: bool = False,
        split: str = "train",
        seed: int = 0,
        limit: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"data.split: {split!r} is not a synthetic split; expected {', '.join(SPLITS)}")
        self.size = min(size, limit) if limit is not None else size
        self.num_classes = num_classes
        self.resolution = resolution
        self.channels = channels
        self.hflip = hflip
        self.split = split
        self.seed = seed
        self.skipped = 0
        self.classes = [f"{SHAPES[c % len(SHAPES)]}-{c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    @property
    def targets(self) -> list[int]:
        return [i % self.num_classes for i in range(self.size)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} synthetic images")
        index %= self.size
        label = index % self.num_classes
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        x = torch.from_numpy(render(label, self.num_classes, self.resolution, self.channels, rng))
        if self.hflip:
            x = random_hflip(x)
        return {"image": x, "label": torch.tensor(label, dtype=torch.int64)}
