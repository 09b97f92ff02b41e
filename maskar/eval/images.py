"""Image sets for evaluation: npz batches (ADM ``arr_0`` layout), PNG folders, maskar datasets.

Every source is read as uint8 NHWC batches with 3 channels (grayscale is repeated), the layout
the ADM evaluator and ``maskar sample npz=`` use. ``arr_0`` of an npz is streamed in batches, so
a 50k x 256 x 256 set is never held in memory twice.
"""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from maskar.config import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """(N, H, W), (N, H, W, 1) or (N, H, W, 3) uint8 -> (N, H, W, 3) uint8."""
    if arr.dtype != np.uint8:
        raise ConfigError(f"images: expected uint8 pixels (0..255), got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ConfigError(f"images: expected (N, H, W, 3) or (N, H, W) uint8, got shape {arr.shape}")
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


@dataclass
class ImageSet:
    """A readable set of images: ``batches(n)`` yields (B, H, W, 3) uint8 arrays."""

    description: str
    count: int
    labels: np.ndarray | None = None  # (N,) int64 class ids where the source has them
    _npz: Path | None = None
    _files: list[Path] | None = None
    _array: np.ndarray | None = None
    _dataset: Any = None  # a maskar dataset, read lazily

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self._dataset is not None:
            for start in range(0, self.count, batch_size):
                items = [self._dataset[i]["image"] for i in range(start, min(start + batch_size, self.count))]
                x = ((torch.stack(items).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                yield to_rgb_uint8(x.permute(0, 2, 3, 1).numpy())  # ADM rounding of [-1, 1] floats
        elif self._array is not None:
            for start in range(0, self.count, batch_size):
                yield to_rgb_uint8(self._array[start : start + batch_size])
        elif self._npz is not None:
            yield from _stream_npz_array(self._npz, "arr_0", batch_size, self.count)
        else:
            assert self._files is not None
            for start in range(0, self.count, batch_size):
                yield np.stack([_read_png(p) for p in self._files[start : start + batch_size]])

    def all(self) -> np.ndarray:
        return np.concatenate(list(self.batches(1024)))


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _stream_npz_array(
    path: Path, key: str, batch_size: int, count: int | None = None
) -> Iterator[np.ndarray]:
    """Read rows of an uncompressed or compressed npz member in batches."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _read_header(f)
        if fortran:
            raise ConfigError(f"{path}: {key} is stored in Fortran order; expected C order")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        total = shape[0] if count is None else min(count, shape[0])
        for start in range(0, total, batch_size):
            n = min(batch_size, total - start)
            buf = bytearray(f.read(n * row))  # writable, so torch.as_tensor can share it
            yield to_rgb_uint8(np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:]))


def _npz_array_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an npz member, checked against the bytes actually stored."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            shape, _, dtype = _read_header(f)
            header = f.tell()
            size = zf.getinfo(f"{key}.npy").file_size
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
        raise ConfigError(
            f"images: cannot read {key} of {str(path)!r} (truncated or corrupt npz?): {e}"
        ) from None
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if size < expected:
        raise ConfigError(
            f"images: {str(path)!r}: {key} holds {size - header} bytes of data, but its header says "
            f"{shape} {dtype} ({expected - header} bytes): the file is truncated"
        )
    return tuple(shape), dtype


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"images: cannot read {str(path)!r} as an image ({e})") from None
    return arr  # (H, W, 3) uint8


def npz_keys(path: str | Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.keys())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ConfigError(
            f"images: cannot read {str(path)!r} as an npz file (truncated or corrupt?): {e}"
        ) from None


def open_images(path: str | Path, labels: np.ndarray | None = None) -> ImageSet:
    """An npz with ``arr_0`` (uint8 NHWC; labels from ``arr_1`` or ``labels`` if present), an npy
    array, or a folder of images (searched recursively, sorted by path)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"images: {str(p)!r} does not exist; expected an .npz/.npy file or an image folder")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ConfigError(f"images: folder {str(p)!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
        first = _read_png(files[0]).shape
        return ImageSet(f"{p} ({len(files)} files, {first[0]}x{first[1]})", len(files), labels, _files=files)
    if p.suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ConfigError(f"images: cannot read {str(p)!r} as an npy array (truncated?): {e}") from None
        to_rgb_uint8(arr[:1])  # checks dtype and layout
        return ImageSet(f"{p.name} ({len(arr)} images)", len(arr), labels, _array=arr)
    if p.suffix != ".npz":
        raise ConfigError(f"images: {str(p)!r} is neither a folder, an .npz nor an .npy file")
    keys = npz_keys(p)
    if "arr_0" not in keys:
        raise ConfigError(f"images: {str(p)!r} has no arr_0 (uint8 NHWC images); its keys are {keys}")
    shape, dtype = _npz_array_header(p, "arr_0")
    if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise ConfigError(
            f"images: {str(p)!r}: arr_0 is {dtype} {shape}; expected uint8 (N, H, W, 3) or (N, H, W)"
        )
    if labels is None:
        for key in ("arr_1", "labels"):
            if key in keys:
                try:
                    with np.load(p, allow_pickle=False) as data:
                        labels = np.asarray(data[key], dtype=np.int64)
                except (zipfile.BadZipFile, OSError, ValueError, EOFError, TypeError) as e:
                    raise ConfigError(f"images: cannot read {key} of {str(p)!r} as class ids ({e})") from None
                if labels.ndim != 1:
                    raise ConfigError(f"images: {key} of {str(p)!r} has shape {labels.shape}; expected (N,)")
                break
    if labels is not None and len(labels) != shape[0]:
        raise ConfigError(f"images: {p.name} has {shape[0]} images but {len(labels)} labels")
    size = f"{shape[1]}x{shape[2]}" if len(shape) >= 3 else "?"
    return ImageSet(f"{p.name} ({shape[0]} images, {size})", shape[0], labels, _npz=p)


def images_from_array(arr: np.ndarray | torch.Tensor, description: str, labels=None) -> ImageSet:
    """Wrap in-memory uint8 NHWC images (e.g. freshly generated samples)."""
    a = arr.numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    to_rgb_uint8(a[:1])
    lab = None if labels is None else np.asarray(labels, dtype=np.int64)
    return ImageSet(description, len(a), lab, _array=a)


def dataset_images(data_cfg, limit: int | None = None) -> ImageSet:
    """The images of ``build_dataset(data_cfg)`` (no flips) as uint8 NHWC, read lazily in batches."""
    from maskar.data import build_dataset

    if data_cfg.name == "latents":
        raise ConfigError("ref: data.name=latents holds latents, not images; give an image dataset")
    ds = build_dataset(dataclasses.replace(data_cfg, hflip=False))
    n = len(ds) if limit is None else min(limit, len(ds))
    labels = np.asarray(ds.targets[:n], dtype=np.int64)
    r = data_cfg.resolution
    desc = f"data.name={data_cfg.name} split={data_cfg.split} ({n} images, {r}x{r})"
    return ImageSet(desc, n, labels, _dataset=ds)
