"""Sampling and editing drivers shared by the CLI: batching, precision, grids, npz files."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm.auto import tqdm

from maskar.checkpoint import _UMASK, atomic_write_bytes
from maskar.config import (
    Config,
    ConfigError,
    SampleConfig,
    apply_overrides,
    build,
    check_device_name,
    to_dict,
)


def pick_device(name: str = "auto") -> torch.device:
    check_device_name(name, "device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {name!r} requested but there are {torch.cuda.device_count()} CUDA device(s)"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r} requested but MPS is not available")
    return dev


def low_precision_dtype(precision: str) -> torch.dtype:
    """The autocast dtype of a low ``precision`` (fp16; bf16 for bf16 and auto)."""
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; fp32 on CPU."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"precision: expected auto, bf16, fp16 or fp32, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=low_precision_dtype(precision))


def inference_weights(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """On CUDA under bf16 / fp16 autocast (``precision`` auto, bf16 or fp16): models that can
    (VAR, HMAR, MAR, CASMAR: ``cast_linears_``) store their linears in that dtype once. The
    outputs are the same bit for bit (autocast casts those weights anyway), without re-casting
    them at every scale pass, in less memory. The CLI's processes only sample, so the model is
    not trained after."""
    cast = getattr(model, "cast_linears_", None)
    done = getattr(model, "_linears_dtype", None)
    if done is not None and (precision == "fp32" or device.type != "cuda"):
        raise ConfigError(
            f"precision: {precision} on {device.type} needs the fp32 weights, but this model's linears "
            f"were stored in {done} by an earlier bf16 / fp16 call; load the checkpoint again"
        )
    if cast is None or device.type != "cuda" or precision == "fp32":
        return
    cast(low_precision_dtype(precision))


def read_generator_config(ckpt: str, overrides: list[str], key: str = "ckpt") -> Config:
    """The config of a generator checkpoint with ``sample.*`` / ``attention_backend`` overrides
    applied and validated; reads only ``config.yaml`` (no weights)."""
    from maskar import registry
    from maskar.checkpoint import read_config, resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(ckpt)
    cfg = read_config(directory)
    spec = registry.get_model_spec(cfg.model.arch)
    if spec.kind != "generator":
        generators = sorted(a for a, s in registry.all_specs().items() if s.kind == "generator")
        raise ConfigError(
            f"{key}: {ckpt!r} holds a {cfg.model.arch!r} {spec.kind} ({spec.description}); "
            f"expected a generator checkpoint ({', '.join(generators)})"
        )
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("sample.", "attention_backend"))]
    if bad:
        raise ConfigError(
            f"sample/edit: only sample.* and attention_backend can be overridden here, got {bad}"
        )
    return build(Config, apply_overrides(to_dict(cfg), overrides))


def load_for_sampling(
    ckpt: str, overrides: list[str], device: str = "auto", ema: bool = True, verify: bool = True
):
    """Load a generator checkpoint dir; apply ``sample.*`` / ``attention_backend`` overrides to
    its config. Everything is validated before any weight is read."""
    from maskar.checkpoint import load_model
    from maskar.nn.attention import check_backend, set_backend

    cfg = read_generator_config(ckpt, overrides)
    dev = pick_device(device)
    check_backend(cfg.attention_backend, dev)
    model, _ = load_model(ckpt, device="cpu", prefer_ema=ema, verify=verify)
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
    sinks: Sequence[BatchSink] = (),
) -> tuple[torch.Tensor, list[int]]:
    """Generate ``per_class`` images for each label, in batches. Returns uint8 NHWC and labels.

    The GPU never waits for the host: each batch's images are converted to uint8 on the device,
    copied to pinned host memory without blocking, and a writer thread puts them in the result
    (and hands them to ``sinks``, e.g. :class:`NpzStream`) while the next batch generates.
    Labels stay on the CPU until the model takes them, so no label check waits for the GPU.
    A progress bar counts the model's steps (scales / iterations) and appears when sampling
    takes more than two seconds, so a slow batch is never silent.
    """
    if per_class < 1 or batch_size < 1 or not labels:
        raise ConfigError(
            f"sampling: need per_class >= 1, batch_size >= 1 and labels, got {per_class}, {batch_size}, "
            f"{labels}"
        )
    device = next(model.parameters()).device
    all_labels = [lab for lab in labels for _ in range(per_class)]
    kwargs = sampling_kwargs(cfg.sample)
    seed = int(kwargs.pop("seed", 0))
    starts = range(0, len(all_labels), batch_size)
    # Models that check labels on the CPU take them there (no wait for the GPU per batch).
    label_device = torch.device("cpu") if getattr(model, "takes_host_labels", False) else device
    inference_weights(model, device, precision)
    pipe = HostPipeline(len(all_labels), sinks)
    try:
        with step_progress(model, "sampling") as bar:
            for i, start in enumerate(starts):
                if len(starts) > 1:
                    # refresh=False: a forced redraw would show the bar before its 2 s delay
                    bar.set_description(f"sampling batch {i + 1}/{len(starts)}", refresh=False)
                ticks = getattr(bar, "n", None)
                batch = all_labels[start : start + batch_size]
                chunk = torch.tensor(batch, dtype=torch.long, device=label_device)
                with autocast_for(device, precision):
                    # Each batch gets its own seed so results do not depend on the batch size split.
                    imgs = model.generate(chunk, seed=seed + start, **kwargs)
                pipe.put(start, imgs)
                if ticks is not None and bar.n == ticks:  # replayed CUDA graphs run no hooks: count the steps
                    bar.update(len(getattr(model, "patch_nums", ())) or 1)
                if i == 0 and len(starts) > 1 and ticks is not None:
                    # every batch takes as many steps as the first (the schedule does not depend on
                    # the batch size): the bar gets its total, and so an ETA, from here on
                    bar.total = bar.n * len(starts)
        images = pipe.finish()
    except BaseException:
        pipe.abort()
        raise
    return images, all_labels


class BatchSink(Protocol):
    """Receives the uint8 (n, H, W, 3) images of consecutive batches on the writer thread."""

    def write(self, start: int, images: np.ndarray) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


def to_uint8_device(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the same device, contiguous."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous()


class HostPipeline:
    """Device images -> pinned host buffers -> a writer thread filling the result and the sinks.

    ``put`` returns once the copy is queued on the GPU; at most ``depth`` batches are in flight
    (their pinned buffers are reused), so a long run holds a bounded amount of staging memory.
    Batches are written in the order they were put.
    """

    def __init__(self, total: int, sinks: Sequence[BatchSink] = (), depth: int = 3) -> None:
        self.total, self.sinks, self.depth = total, list(sinks), depth
        self.out: np.ndarray | None = None  # (total, H, W, 3) uint8, allocated at the first batch
        self.jobs: queue.Queue = queue.Queue()
        self.free: queue.Queue = queue.Queue()
        self.slots = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="maskar-sample-writer", daemon=True)
        self.thread.start()

    def put(self, start: int, images: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        u8 = to_uint8_device(images)  # (n, H, W, 3)
        if self.out is None:
            self.out = np.empty((self.total, *u8.shape[1:]), dtype=np.uint8)
        if u8.device.type != "cuda":
            self.jobs.put((start, u8, None, None))
            return
        slot = self._slot(u8.shape)
        host = slot[: u8.shape[0]]
        host.copy_(u8, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.jobs.put((start, host, done, slot))

    def _slot(self, shape: torch.Size) -> torch.Tensor:
        """A free pinned buffer of at least ``shape``; waits for the writer when all are in flight."""
        while self.slots >= self.depth:
            slot = self.free.get()
            if self.error is not None:
                raise self.error
            if slot.shape[0] >= shape[0] and slot.shape[1:] == shape[1:]:
                return slot
            self.slots -= 1  # a smaller batch's buffer: drop it
        self.slots += 1
        return torch.empty(shape, dtype=torch.uint8, pin_memory=True)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            start, host, done, slot = job
            try:
                if self.error is None:
                    if done is not None:
                        done.synchronize()
                    arr = host.numpy()
                    self.out[start : start + len(arr)] = arr
                    for sink in self.sinks:
                        sink.write(start, self.out[start : start + len(arr)])
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                self.error = e
            finally:
                if slot is not None:
                    self.free.put(slot)

    def finish(self) -> torch.Tensor:
        """Wait for the writer; close the sinks; the (total, H, W, 3) uint8 result."""
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        for sink in self.sinks:
            sink.close()
        return torch.from_numpy(self.out if self.out is not None else np.zeros((0, 0, 0, 3), np.uint8))

    def abort(self) -> None:
        if self.thread.is_alive():
            self.error = self.error or RuntimeError("sampling stopped")
            self.jobs.put(None)
            self.thread.join()
        for sink in self.sinks:
            sink.abort()


class NpzStream:
    """An .npz written while sampling runs: ``arr_0`` (N, H, W, 3) uint8 batch by batch, then
    ``arr_1`` int64 labels (the ADM layout; ``np.load`` reads it like :func:`save_npz`'s). Like
    :func:`maskar.checkpoint.atomic_write_bytes` it writes a temporary file beside ``path`` and
    renames it at ``close``, so an interrupted run leaves no partial file under ``path``."""

    def __init__(self, path: str, total: int, labels: list[int] | None = None) -> None:
        self.path, self.total, self.labels = Path(path), int(total), labels
        self.file = None
        self.tmp: str | None = None
        self.zip: zipfile.ZipFile | None = None
        self.entry = None
        self.written = 0

    def write(self, start: int, images: np.ndarray) -> None:
        if start != self.written:
            raise RuntimeError(f"NpzStream: batch at {start} arrived after {self.written} images")
        if self.zip is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self.file = os.fdopen(fd, "w+b")
            self.zip = zipfile.ZipFile(self.file, "w", zipfile.ZIP_STORED, allowZip64=True)
            self.entry = self.zip.open("arr_0.npy", "w", force_zip64=True)
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                "fortran_order": False,
                "shape": (self.total, *images.shape[1:]),
            }
            np.lib.format.write_array_header_2_0(self.entry, header)
        self.entry.write(np.ascontiguousarray(images).data)
        self.written += len(images)

    def close(self) -> None:
        if self.zip is None or self.written != self.total:
            raise RuntimeError(f"NpzStream: {self.written} of {self.total} images written to {self.path}")
        self.entry.close()
        if self.labels is not None:
            with self.zip.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(self.labels, dtype=np.int64))
        self.zip.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; use the usual file mode
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            with contextlib.suppress(Exception):  # close the zip's handles: the file is deleted anyway
                if self.entry is not None:
                    self.entry.close()
                if self.zip is not None:
                    self.zip.close()
            if self.file is not None:
                self.file.close()
        finally:
            self.entry = self.zip = self.file = None
            if self.tmp is not None:
                Path(self.tmp).unlink(missing_ok=True)


def _step_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that runs once per sampling step: the first transformer block (once per scale
    for VAR/HMAR, once per iteration for MAR/CASMAR)."""
    for name in ("encoder_blocks", "blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks[0]
    return None


@contextlib.contextmanager
def step_progress(model: torch.nn.Module, desc: str):
    """A progress bar counting the model's sampling steps (a forward hook on its first block);
    it appears only once the work has taken two seconds, so quick runs stay quiet."""
    bar = tqdm(desc=desc, unit="step", delay=2.0, dynamic_ncols=True)

    def tick(*_) -> None:  # must return None: a forward hook's return value replaces the output
        bar.update(1)

    step_module = _step_module(model)
    hook = step_module.register_forward_hook(tick) if step_module is not None else None
    try:
        yield bar
    finally:
        if hook is not None:
            hook.remove()
        bar.close()


def _available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CUDA: mem_get_info; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def check_sampling_memory(
    model: torch.nn.Module, cfg: Config, num_images: int, batch_size: int, precision: str, grid: bool
) -> None:
    """Refuse, before sampling, a run that cannot fit: a lower bound (the widest activation of
    every token, doubled by guidance) for one batch on the device, and the uint8 results (plus
    the PNG grid canvas) in host memory."""
    device = next(model.parameters()).device
    gib = 2**30
    side = int(getattr(model, "image_size", cfg.data.resolution))
    host_need = num_images * side * side * 3 * (2 if grid else 1)
    host_free = _available_bytes(torch.device("cpu"))
    if host_free is not None and host_need > host_free:
        raise ConfigError(
            f"per_class: {num_images} images of {side}x{side} need {host_need / gib:.1f} GiB of host "
            f"memory{' with the PNG grid' if grid else ''}, but {host_free / gib:.1f} GiB are available; "
            f"sample fewer images per run"
        )
    tokens = getattr(model, "L", None) or getattr(model, "seq_len", None)
    widest = max((m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=0)
    free = _available_bytes(device)
    if not tokens or not widest or free is None:
        return  # not cheap to bound for this model: nothing is claimed
    free -= host_need if device.type == "cpu" else 0
    guidance = 1 if float(getattr(cfg.sample, "cfg", 1.0)) == 1.0 else 2
    elem = 4 if device.type != "cuda" or precision == "fp32" else 2
    per_image = guidance * int(tokens) * widest * elem
    need = min(batch_size, num_images) * per_image
    if need > free:
        fits = max(free // per_image, 1)
        raise ConfigError(
            f"batch_size: {batch_size} images per batch need at least {need / gib:.1f} GiB on {device} "
            f"({guidance} x {tokens} tokens x {widest} features x {elem} bytes per image), but "
            f"{max(free, 0) / gib:.1f} GiB are free; use batch_size <= {fits}"
        )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the CPU."""
    return to_uint8_device(images).cpu()


def class_names(cfg: Config) -> list[str] | None:
    """Human-readable class names for grid captions, where the training data has them."""
    if cfg.data.name == "fashion_mnist":
        from maskar.data.fashion_mnist import CLASSES

        return list(CLASSES)
    return None


def save_npz(images: torch.Tensor, path: str, labels: list[int] | None = None) -> None:
    """``arr_0`` uint8 NHWC images and, with ``labels``, ``arr_1`` int64 class ids (ADM layout)."""
    arrays = {"arr_0": images.numpy()}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    atomic_write_bytes(path, lambda f: np.savez(f, **arrays))


def image_format(path: str, key: str = "out") -> str:
    """The PIL format that the file name's extension names (``.png``, ``.jpg`` ...)."""
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    writable = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
    if ext not in writable or fmt is None or fmt not in Image.SAVE:
        raise ConfigError(f"{key}: expected an image file name ending in {', '.join(writable)}, got {path!r}")
    return fmt


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
    fmt = image_format(path)
    options = {"quality": 95} if fmt == "JPEG" else {}
    atomic_write_bytes(path, lambda f: canvas.save(f, format=fmt, **options))


# ----------------------------------------------------------------------------- editing


def load_image(path: str, size: int, channels: int = 3) -> torch.Tensor:
    """Read an image file, center-crop to square, resize to ``size``; (1, C, size, size) in [-1, 1]."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ConfigError(f"image: cannot read {path!r} as an image ({e})") from None
    img = _to_8bit(img, path)
    img = img.convert("RGB" if channels == 3 else "L")
    s = min(img.size)
    left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)) / 127.5 - 1
    x = x[None] if channels == 1 else x.permute(2, 0, 1)
    return x[None]


def _to_8bit(img: Image.Image, path: str) -> Image.Image:
    """Float / 16-bit / 32-bit images as 8-bit gray; PIL would clip or wrap them silently.

    Floats must be finite, in [0, 1] (scaled to 0..255) or [0, 255]; 16-bit values are 0..65535.
    """
    if img.mode not in ("F", "I") and not img.mode.startswith("I;16"):
        return img
    a = np.asarray(img, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ConfigError(f"image: {path!r} has non-finite pixel values (nan/inf)")
    lo, hi = float(a.min()), float(a.max())
    if img.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif img.mode.startswith("I;16") or (img.mode == "I" and 255 < hi <= 65535 and lo >= 0):
        a = a / 257
    elif lo < 0 or hi > 255:
        raise ConfigError(
            f"image: {path!r} ({img.mode} pixels) has values in [{lo:.4g}, {hi:.4g}]; expected "
            f"[0, 1] or [0, 255] (or 16-bit 0..65535)"
        )
    return Image.fromarray(a.round().astype(np.uint8), "L")


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
    inference_weights(model, device, precision)
    with step_progress(model, "editing"), autocast_for(device, precision):
        out = model.edit(img.expand(n, -1, -1, -1), keep.expand(n, -1, -1, -1), labels, seed=seed, **kwargs)
    masked = img * keep  # show what was kept
    images = torch.cat([to_uint8(img), to_uint8(masked), to_uint8(out)])
    return {"images": images, "labels": [lab] * len(images), "nrow": n + 2}
