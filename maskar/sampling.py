"""Sampling and editing drivers shared by the CLI: batching, precision, grids, npz files."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm.auto import tqdm

from maskar.checkpoint import atomic_write_bytes
from maskar.config import Config, ConfigError, SampleConfig, apply_overrides, build, to_dict


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    return dev


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; fp32 on CPU."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"precision: expected auto, bf16, fp16 or fp32, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def load_for_sampling(ckpt: str, overrides: list[str], device: str = "auto", ema: bool = True):
    """Load a checkpoint dir; apply ``sample.*`` / ``attention_backend`` overrides to its config."""
    from maskar.checkpoint import load_model
    from maskar.nn.attention import set_backend

    dev = pick_device(device)
    model, cfg = load_model(ckpt, device="cpu", prefer_ema=ema)
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("sample.", "attention_backend"))]
    if bad:
        raise ConfigError(
            f"sample/edit: only sample.* and attention_backend can be overridden here, got {bad}"
        )
    data = apply_overrides(to_dict(cfg), overrides)
    cfg = build(Config, data)
    set_backend(model, cfg.attention_backend)
    model.to(dev).eval()
    return model, cfg


def sampling_kwargs(sample_cfg: SampleConfig) -> dict[str, Any]:
    return {f.name: getattr(sample_cfg, f.name) for f in dataclasses.fields(sample_cfg)}


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    cfg: Config,
    labels: list[int],
    per_class: int,
    batch_size: int,
    precision: str = "auto",
) -> tuple[torch.Tensor, list[int]]:
    """Generate ``per_class`` images for each label, in batches. Returns uint8 NHWC and labels."""
    device = next(model.parameters()).device
    all_labels = [lab for lab in labels for _ in range(per_class)]
    kwargs = sampling_kwargs(cfg.sample)
    seed = int(kwargs.pop("seed", 0))
    out = []
    bar = tqdm(
        range(0, len(all_labels), batch_size),
        desc="sampling",
        unit="batch",
        disable=len(all_labels) <= batch_size,
    )
    for start in bar:
        chunk = torch.tensor(all_labels[start : start + batch_size], dtype=torch.long, device=device)
        with autocast_for(device, precision):
            # Each batch gets its own seed so results do not depend on the batch size split.
            imgs = model.generate(chunk, seed=seed + start, **kwargs)
        out.append(to_uint8(imgs))
    return torch.cat(out), all_labels


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).cpu()


def class_names(cfg: Config) -> list[str] | None:
    """Human-readable class names for grid captions, where the training data has them."""
    if cfg.data.name == "fashion_mnist":
        from maskar.data.fashion_mnist import CLASSES

        return list(CLASSES)
    return None


def save_npz(images: torch.Tensor, path: str) -> None:
    arr = images.numpy()
    atomic_write_bytes(path, lambda f: np.savez(f, arr_0=arr))


def save_grid(
    images: torch.Tensor,
    labels: list[int],
    path: str,
    nrow: int = 8,
    class_names: list[str] | None = None,
    pad: int = 2,
) -> None:
    """Write a PNG grid: ``nrow`` images per row, each row captioned with its labels."""
    n, h, w, _ = images.shape
    rows = (n + nrow - 1) // nrow
    cap = 12
    canvas = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad + cap) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, nrow)
        x, y = pad + c * (w + pad), pad + r * (h + pad + cap)
        if i % nrow == 0 or labels[i] != labels[i - 1]:
            known = class_names is not None and 0 <= labels[i] < len(class_names)
            name = f"{labels[i]} {class_names[labels[i]]}" if known else str(labels[i])
            draw.text((x, y), name, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(images[i].numpy()), (x, y + cap))
    atomic_write_bytes(path, lambda f: canvas.save(f, format="PNG"))


# ----------------------------------------------------------------------------- editing


def load_image(path: str, size: int, channels: int = 3) -> torch.Tensor:
    """Read an image file, center-crop to square, resize to ``size``; (1, C, size, size) in [-1, 1]."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"image: cannot read {path!r} as an image ({e})") from None
    img = img.convert("RGB" if channels == 3 else "L")
    s = min(img.size)
    left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)) / 127.5 - 1
    x = x[None] if channels == 1 else x.permute(2, 0, 1)
    return x[None]


def parse_mask(spec: str, size: int) -> torch.Tensor:
    """``box:x0,y0,x1,y1`` (regenerate the box), ``outpaint:x0,y0,x1,y1`` (keep only the box)
    or a PNG path (white = keep). Coordinates are fractions of the side. Returns keep mask
    (1, 1, size, size) bool."""
    kind, _, rest = spec.partition(":")
    if kind in ("box", "outpaint") and rest:
        try:
            x0, y0, x1, y1 = (float(v) for v in rest.split(","))
        except ValueError:
            raise ConfigError(
                f"mask: expected {kind}:x0,y0,x1,y1 with fractions in [0, 1], got {spec!r}"
            ) from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ConfigError(f"mask: box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {spec!r}")
        inside = torch.zeros(1, 1, size, size, dtype=torch.bool)
        inside[..., round(y0 * size) : round(y1 * size), round(x0 * size) : round(x1 * size)] = True
        return ~inside if kind == "box" else inside
    if not Path(spec).exists():
        raise ConfigError(f"mask: expected box:..., outpaint:... or a mask image path, got {spec!r}")
    m = load_image(spec, size, channels=1)
    return m > 0


@torch.no_grad()
def edit_image(
    model: torch.nn.Module, cfg: Config, image: str, mask: str, label: Any, n: int, precision: str = "auto"
) -> dict[str, Any]:
    device = next(model.parameters()).device
    size = int(getattr(model, "image_size", cfg.data.resolution))
    channels = int(getattr(model, "image_channels", 3))
    img = load_image(image, size, channels).to(device)
    keep = parse_mask(mask, size).to(device)
    num_classes = int(getattr(model, "num_classes", 1000))
    if label is None:
        lab = num_classes  # null class: pure in/out-painting
    else:
        lab = int(label)
        if not 0 <= lab < num_classes:
            raise ConfigError(f"label: expected a class id in [0, {num_classes - 1}], got {label!r}")
    kwargs = sampling_kwargs(cfg.sample)
    seed = int(kwargs.pop("seed", 0))
    labels = torch.full((n,), lab, dtype=torch.long, device=device)
    with autocast_for(device, precision):
        out = model.edit(img.expand(n, -1, -1, -1), keep.expand(n, -1, -1, -1), labels, seed=seed, **kwargs)
    masked = img * keep  # show what was kept
    images = torch.cat([to_uint8(img), to_uint8(masked), to_uint8(out)])
    return {"images": images, "labels": [lab] * len(images), "nrow": n + 2}
