"""ImageNet-layout folders: ``root/<split>/<class>/**/<image>``, decoded lazily with the ADM crop.

Corrupt files are found lazily: decoding happens in ``__getitem__``. In the default non-strict
mode a file that fails to decode is marked bad and the item is replaced by the next readable file
in index order (wrapping around), so the same index always yields the same file whatever the
worker or the order of access. Bad-file marks live in a shared-memory tensor, so ``.skipped``
counts each bad file once, also when DataLoader workers found it. With ``strict=True`` the first
unreadable file raises :class:`UnreadableImageError` naming its path.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from maskar.config import ConfigError
from maskar.data.transforms import center_crop_arr, random_hflip, to_mode, to_tensor

# Lower-case suffixes read as images; other files (README, .txt, ...) are ignored, not counted.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


class UnreadableImageError(OSError):
    """An image file could not be decoded (raised only in strict mode)."""


def _shared_flags(n: int) -> torch.Tensor:
    """A length-n bool tensor in shared memory (visible across forked/spawned workers)."""
    flags = torch.zeros(n, dtype=torch.bool)  # (n,) True = file known to be unreadable
    try:
        flags.share_memory_()
    except (RuntimeError, OSError):  # no /dev/shm: counts stay per process
        pass
    return flags


def list_classes(split_dir: Path) -> list[str]:
    """Class folder names sorted alphabetically (their positions are the label ids)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def list_images(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir`` (recursively, following links), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Labelled images from ``root/<split>/<class>/``; items ``{"image": (C, R, R), "label": ()}``.

    ``split=""`` reads the class folders directly under ``root``. Every class folder counts as a
    class even when it holds no image, so label ids agree between splits.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        resolution: int = 256,
        channels: int = 3,
        hflip: bool = False,
        strict: bool = False,
        limit: int | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root = Path(root)
        self.split_dir = self.root / split if split else self.root
        if not self.split_dir.is_dir():
            raise ConfigError(
                f"data.root: folder {str(self.split_dir)!r} not found; expected an ImageNet-layout "
                f"folder {str(self.root)}/{split or ''}{'/' if split else ''}<class>/<images>"
            )
        self.classes = list_classes(self.split_dir)
        if not self.classes:
            raise ConfigError(
                f"data.root: {str(self.split_dir)!r} has no class folders; expected "
                f"{str(self.split_dir)}/<class>/<images>"
            )
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            self.samples.extend((str(p), label) for p in list_images(self.split_dir / name))
        if not self.samples:
            raise ConfigError(
                f"data.root: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the "
                f"{len(self.classes)} class folders of {str(self.split_dir)!r}"
            )
        if limit is not None:
            self.samples = self.samples[:limit]
        self.num_classes = len(self.classes)
        self.resolution = resolution
        self.channels = channels
        self.hflip = hflip
        self.strict = strict
        self._bad = _shared_flags(len(self.samples))
        self._warned = False

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def skipped(self) -> int:
        """Number of distinct unreadable files met so far (decoding is lazy)."""
        return int(self._bad.sum())

    def _decode(self, path: str) -> Image.Image:
        with Image.open(path) as image:
            image.load()  # forces the full decode so truncated files fail here
            return to_mode(image, self.channels)

    def _mark_bad(self, index: int, path: str, err: Exception) -> None:
        first = self.skipped == 0
        self._bad[index] = True
        if first and not self._warned:
            self._warned = True
            warnings.warn(
                f"skipping unreadable image {path!r} ({type(err).__name__}: {err}); further "
                f"unreadable files are skipped silently and counted in dataset.skipped "
                f"(set data.strict=true to fail instead)",
                stacklevel=3,
            )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                continue
            path, label = self.samples[i]
            try:
                image = self._decode(path)
            except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable file"
                if self.strict:
                    raise UnreadableImageError(f"cannot read image {path!r}: {err}") from err
                self._mark_bad(i, path, err)
                continue
            x = to_tensor(center_crop_arr(image, self.resolution), self.channels)  # (C, R, R)
            if self.hflip:
                x = random_hflip(x)
            return {"image": x, "label": torch.tensor(label, dtype=torch.int64)}
        raise ConfigError(f"data.root: none of the {n} image files in {str(self.split_dir)!r} is readable")
