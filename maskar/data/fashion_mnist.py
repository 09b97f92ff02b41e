"""Fashion-MNIST (or any MNIST-style data) from IDX files, optionally gzip- or xz-compressed.

Default folder: the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``). The uint8 arrays (47 MB for train)
are read into memory at construction; resizing happens per item.
"""

from __future__ import annotations

import gzip
import lzma
import os
from pathlib import Path

import numpy as np

from maskar.config import ConfigError
from maskar.data.transforms import GrayArrayDataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX type byte -> numpy dtype (big-endian on disk).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# data.split -> file-name prefixes tried in order.
_SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test"), "t10k": ("t10k", "test")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain, gzip or xz, detected from its first bytes) into a numpy array."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{str(path)!r}: corrupt gzip data ({err})") from err
    elif raw[:6] == b"\xfd7zXZ\x00":  # xz: what .carry/fmnist holds (4 MB smaller than gzip)
        try:
            raw = lzma.decompress(raw)
        except lzma.LZMAError as err:
            raise ValueError(f"{str(path)!r}: corrupt xz data ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file (expected magic 0x0000<type><ndim>)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{str(path)!r}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{str(path)!r}: IDX file has {len(raw)} bytes, expected {expected} for {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(root: Path, split: str, kind: str) -> Path:
    """Locate ``<prefix>-<kind>-idx?-ubyte[.gz|.xz]`` (also the ``.idx?-ubyte`` spelling) under root."""
    if split not in _SPLIT_PREFIXES:
        raise ConfigError(f"data.split: {split!r} is not a Fashion-MNIST split; expected train or test")
    ndim = 3 if kind == "images" else 1
    tried = []
    for prefix in _SPLIT_PREFIXES[split]:
        for sep in ("-", "."):
            for suffix in (".gz", ".xz", ""):
                candidate = root / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
                tried.append(candidate.name)
                if candidate.is_file():
                    return candidate
    raise ConfigError(f"data.root: no {split} {kind} IDX file in {str(root)!r}; tried {', '.join(tried)}")


class FashionMNISTDataset(GrayArrayDataset):
    """Items ``{"image": (C, R, R) in [-1, 1], "label": ()}``; 28x28 resized with ``resize``."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        resolution: int = 32,
        channels: int = 1,
        hflip: bool = False,
        resize: str = "bicubic",
        limit: int | None = None,
    ) -> None:
        self.root = Path(root or DEFAULT_ROOT)
        if not self.root.is_dir():
            raise ConfigError(
                f"data.root: Fashion-MNIST folder {str(self.root)!r} not found; install the data with "
                f"`apt-get install dataset-fashion-mnist` (IDX files under {DEFAULT_ROOT}) or point "
                f"data.root at a folder holding train-images-idx3-ubyte.gz and the other IDX files"
            )
        images_path = find_idx_file(self.root, split, "images")
        labels_path = find_idx_file(self.root, split, "labels")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{str(images_path)!r}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{str(labels_path)!r}: expected {len(images)} labels, got shape {labels.shape}")
        if len(images) == 0:
            raise ConfigError(f"data.root: {str(images_path)!r} holds no images")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        if resize == "pad" and resolution < max(images.shape[1:]):
            side = max(images.shape[1:])
            raise ConfigError(f"data.resize=pad needs data.resolution >= {side}, got {resolution}")
        super().__init__(images, labels, list(CLASSES), resolution, channels, hflip, resize)  # (N, 28, 28)
