"""Image transforms shared by the datasets: ADM center crop, resizing, mode and range conversion."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

# PIL resampling filters by the names accepted in ``data.resize``.
RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM (guided-diffusion) center crop to ``size`` x ``size``; returns an (H, W[, C]) uint8 array.

    Halves the image with a BOX filter while its short side is at least ``2 * size`` (cheap,
    alias-free downscaling of large photos), then resizes with BICUBIC so the short side equals
    ``size``, then crops the center. MAR and VAR preprocess ImageNet this way.
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL image to "L" (channels=1) or "RGB" (channels=3).

    16/32-bit grayscale ("I;16", "I", "F") is rescaled to 8 bits first, because PIL's own
    conversion clips it instead of scaling. Transparent images are composited on black by PIL's
    plain conversion (alpha dropped), as torchvision and ADM do.
    """
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(image, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if image.mode == "F":
            top = 1.0 if peak <= 1.0 else 255.0  # float images are in [0, 1] or [0, 255]
        else:
            top = 65535.0 if image.mode.startswith("I;16") or peak > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        # Palette images may carry transparency; going through RGBA avoids PIL's warning.
        image = image.convert("RGBA")
    return image.convert("L" if channels == 1 else "RGB")


def resize_gray(arr: np.ndarray, size: int, method: str) -> np.ndarray:
    """Resize an (h, w) uint8 array to (size, size) with a PIL filter, or zero-pad it ("pad").

    "pad" centers the image on a black canvas (Fashion-MNIST 28 -> 32 without resampling); it
    needs ``size`` >= the image side.
    """
    h, w = arr.shape
    if (h, w) == (size, size):
        return arr
    if method == "pad":
        if size < h or size < w:
            raise ValueError(f"data.resize=pad needs data.resolution >= {max(h, w)}, got {size}")
        out = np.zeros((size, size), dtype=arr.dtype)  # (size, size) black canvas
        top, left = (size - h) // 2, (size - w) // 2
        out[top : top + h, left : left + w] = arr
        return out
    image = Image.fromarray(arr, mode="L").resize((size, size), resample=RESAMPLE[method])
    return np.asarray(image)


def to_tensor(arr: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) array -> float32 (channels, H, W) tensor in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        if arr.shape[2] == 1:
            arr = np.repeat(arr, channels, axis=2)  # grayscale -> RGB
        else:
            raise ValueError(f"cannot turn a {arr.shape[2]}-channel image into {channels} channels")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # arrays viewing PIL/IDX buffers are read-only; torch wants writable
        arr = arr.copy()
    x = torch.from_numpy(arr).permute(2, 0, 1)  # (C, H, W) uint8
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip (C, H, W) left-right with probability 1/2, drawn from torch's RNG.

    torch's RNG is seeded per DataLoader worker from the loader's generator, so flips are
    reproducible for a given loader seed.
    """
    if torch.rand(()) < 0.5:
        return x.flip(-1)
    return x


class GrayArrayDataset(Dataset):
    """In-memory uint8 grayscale images (N, h, w) + int64 labels, resized on access.

    Items ``{"image": (C, R, R) in [-1, 1], "label": ()}``; shared by the small
    datasets that ship as arrays (Fashion-MNIST, scikit-learn digits).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: list[str],
        resolution: int,
        channels: int,
        hflip: bool,
        resize: str,
    ) -> None:
        self.images = images  # (N, h, w) uint8
        self.labels = labels.astype(np.int64)  # (N,)
        self.classes = list(classes)
        self.num_classes = max(len(classes), int(self.labels.max()) + 1 if len(self.labels) else 0)
        self.skipped = 0  # arrays are validated whole; nothing is skipped
        self.resolution = resolution
        self.channels = channels
        self.hflip = hflip
        self.resize = resize

    def __len__(self) -> int:
        return len(self.images)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        arr = resize_gray(self.images[index], self.resolution, self.resize)  # (R, R) uint8
        x = to_tensor(arr, self.channels)  # (C, R, R)
        if self.hflip:
            x = random_hflip(x)
        return {"image": x, "label": torch.tensor(self.labels[index], dtype=torch.int64)}
