"""scikit-learn's digits: 1,797 8x8 handwritten digits (17 gray levels, 0..16), 10 classes.

The data ships inside the scikit-learn wheel, so it is always available offline. There is no
official split: ``train`` holds the samples whose index is not a multiple of 5 (1,437),
``test`` every fifth sample (360) and ``all`` all 1,797.
"""

from __future__ import annotations

import numpy as np

from maskar.config import ConfigError
from maskar.data.transforms import GrayArrayDataset

SPLITS = ("train", "test", "all")


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 images scaled 0..16 -> 0..255 and (1797,) int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # scikit-learn is an optional dependency (extra "data")
        raise ConfigError("data.name=digits needs scikit-learn (pip install scikit-learn)") from err
    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


class DigitsDataset(GrayArrayDataset):
    """Items ``{"image": (C, R, R) in [-1, 1], "label": ()}``; 8x8 upscaled with ``resize``."""

    def __init__(
        self,
        split: str = "train",
        resolution: int = 32,
        channels: int = 1,
        hflip: bool = False,
        resize: str = "bicubic",
        limit: int | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"data.split: {split!r} is not a digits split; expected {', '.join(SPLITS)}")
        if resize == "pad" and resolution < 8:
            raise ConfigError(f"data.resize=pad needs data.resolution >= 8, got {resolution}")
        images, labels = load_digits_uint8()
        index = np.arange(len(images))
        if split == "train":
            index = index[index % 5 != 0]
        elif split == "test":
            index = index[index % 5 == 0]
        if limit is not None:
            index = index[:limit]
        super().__init__(
            images[index], labels[index], [str(d) for d in range(10)], resolution, channels, hflip, resize
        )  # (N, 8, 8) uint8
