"""Cached-latent store: sharded safetensors + ``index.json``, and the dataset that reads it.

Layout of a store directory::

    index.json              {"format": "maskar-latents", "version": 1, "count": N,
                             "arrays": {name: {"shape": per-sample shape, "dtype": "float32"}},
                             "shards": [{"file": "shard-00000.safetensors", "count": n0}, ...],
                             "num_classes": K or null, "source": {...}}
    shard-00000.safetensors one tensor per array name, leading dim = samples in the shard
    shard-00001.safetensors ...

Any named arrays can be stored (``moments``, ``moments_flip``, ``indices_0`` ... ``indices_K``,
``label``); all share the sample dimension. The writer builds the store in a temporary sibling
directory and renames it into place at the end, so a crash never leaves a half-written store.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from maskar.config import ConfigError

FORMAT = "maskar-latents"
VERSION = 1
INDEX = "index.json"


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _ShardWriter:
    """Buffers rows and writes a shard each time ``shard_size`` rows are collected."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory = directory
        self.shard_size = shard_size
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_rows = 0
        self.shards: list[dict[str, Any]] = []
        self.spec: dict[str, dict[str, Any]] | None = None
        self.count = 0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        batch = {k: torch.as_tensor(v).detach().cpu() for k, v in batch.items()}
        rows = {k: (v.shape[0] if v.ndim else -1) for k, v in batch.items()}
        if not batch or len(set(rows.values())) != 1 or -1 in rows.values():
            raise ValueError(f"latent batch arrays need one shared leading (batch) dim, got {rows}")
        spec = {k: {"shape": list(v.shape[1:]), "dtype": _dtype_name(v.dtype)} for k, v in batch.items()}
        if self.spec is None:
            self.spec = spec
            self.pending = {k: [] for k in spec}
        elif spec != self.spec:
            raise ValueError(f"latent batch does not match earlier batches: got {spec}, expected {self.spec}")
        n = next(iter(rows.values()))
        start = 0
        while start < n:  # split the batch across shard boundaries
            take = min(n - start, self.shard_size - self.pending_rows)
            for k, v in batch.items():
                self.pending[k].append(v[start : start + take])
            self.pending_rows += take
            start += take
            if self.pending_rows == self.shard_size:
                self.flush()

    def flush(self) -> None:
        if self.pending_rows == 0:
            return
        tensors = {k: torch.cat(parts).contiguous() for k, parts in self.pending.items()}
        name = _shard_name(len(self.shards))
        save_file(tensors, str(self.directory / name))
        self.shards.append({"file": name, "count": self.pending_rows})
        self.count += self.pending_rows
        self.pending = {k: [] for k in self.pending}
        self.pending_rows = 0


def write_latents(
    out_dir: str | os.PathLike,
    batches: Iterable[dict[str, torch.Tensor]],
    shard_size: int = 4096,
    num_classes: int | None = None,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write batches of named arrays (each (B, ...)) as a latent store; returns the index dict.

    ``source`` (e.g. the tokenizer and data config) is recorded in ``index.json``. An existing
    ``out_dir`` is an error unless ``overwrite``; it is replaced only after the new store is
    complete.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder made in advance is not a store to protect
    if out.exists() and not overwrite:
        raise FileExistsError(f"latent store {str(out)!r} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, shard_size)
        for batch in batches:
            writer.add(batch)
        writer.flush()
        if writer.count == 0:
            raise ValueError(f"no samples to write to latent store {str(out)!r}")
        if num_classes is None and "label" in writer.spec:
            num_classes = _max_label(tmp, writer.shards) + 1
        index = {
            "format": FORMAT,
            "version": VERSION,
            "count": writer.count,
            "shard_size": shard_size,
            "arrays": writer.spec,
            "shards": writer.shards,
            "num_classes": num_classes,
            "source": source or {},
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True))
        if out.exists():  # overwrite: move the old store aside, then swap the new one in
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _max_label(directory: Path, shards: list[dict[str, Any]]) -> int:
    top = -1
    for shard in shards:
        with safe_open(str(directory / shard["file"]), framework="pt") as f:
            top = max(top, int(f.get_tensor("label").max()))
    return top


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``index.json`` of a latent store (clear errors for a wrong/missing dir)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"data.root: latent store folder {str(directory)!r} not found")
    path = directory / INDEX
    if not path.is_file():
        raise ConfigError(
            f"data.root: {str(directory)!r} is not a latent store (no {INDEX}); write one with cache_latents"
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"data.root: {str(path)!r} is not valid JSON ({err})") from err
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ConfigError(
            f"data.root: {str(path)!r} has format {index.get('format')!r} v{index.get('version')}, "
            f"expected {FORMAT!r} v{VERSION}"
        )
    missing = [s["file"] for s in index["shards"] if not (directory / s["file"]).is_file()]
    if missing:
        raise ConfigError(f"data.root: latent store {str(directory)!r} lacks shard files {missing}")
    if sum(s["count"] for s in index["shards"]) != index["count"]:
        raise ConfigError(f"data.root: {str(path)!r} shard counts do not add up to count={index['count']}")
    return index


class LatentDataset(Dataset):
    """Items ``{name: array[i] for every stored array}``; ``label`` as an int64 0-d tensor.

    Shards are memory-mapped lazily with ``safetensors.safe_open`` and only the requested row is
    read, so stores far larger than RAM work. A store without a ``label`` array yields label 0.
    """

    def __init__(self, root: str | os.PathLike, limit: int | None = None) -> None:
        self.root = Path(root)
        self.index = read_index(self.root)
        self.arrays: dict[str, dict[str, Any]] = self.index["arrays"]
        counts = [s["count"] for s in self.index["shards"]]
        self._starts = torch.tensor([0] + counts).cumsum(0)  # (shards + 1,) first row of each shard
        self.count = int(self.index["count"]) if limit is None else min(limit, int(self.index["count"]))
        if self.count == 0:
            raise ConfigError(f"data.root: latent store {str(self.root)!r} is empty")
        self.num_classes = int(self.index.get("num_classes") or 1)
        self.skipped = 0
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # open files are per process; workers reopen them
        return state

    def _handle(self, shard: int) -> Any:
        if shard not in self._handles:
            path = self.root / self.index["shards"][shard]["file"]
            self._handles[shard] = safe_open(str(path), framework="pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} latents")
        index %= self.count
        shard = int(torch.searchsorted(self._starts, index, right=True)) - 1
        row = index - int(self._starts[shard])
        f = self._handle(shard)
        item = {name: f.get_slice(name)[row : row + 1][0] for name in self.arrays}
        if "label" in item:
            item["label"] = item["label"].to(torch.int64)
        else:
            item["label"] = torch.tensor(0, dtype=torch.int64)
        return item


def _encode_batches(
    encode_fn: Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]],
    loader: Iterable[dict[str, torch.Tensor]],
    hflip_too: bool,
    device: torch.device | str | None,
    progress: Any,
) -> Iterator[dict[str, torch.Tensor]]:
    def as_dict(out: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(out) if isinstance(out, dict) else {"moments": out}

    for batch in loader:
        images = batch["image"]  # (B, C, H, W) in [-1, 1]
        if device is not None:
            images = images.to(device, non_blocking=True)
        with torch.inference_mode():
            out = {k: v.cpu() for k, v in as_dict(encode_fn(images)).items()}
            if hflip_too:
                flipped = as_dict(encode_fn(images.flip(-1)))
                out.update({f"{k}_flip": v.cpu() for k, v in flipped.items()})
        out["label"] = batch["label"].to(torch.int64)
        progress.update(images.shape[0])
        yield out


def cache_latents(
    encode_fn: Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]],
    dataset: Dataset,
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    hflip_too: bool = False,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    shard_size: int = 4096,
    source: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Encode every image of ``dataset`` (in order) and store the results with :func:`write_latents`.

    ``encode_fn`` maps images (B, C, H, W) in [-1, 1] to a tensor (stored as ``moments``) or a
    dict of named tensors, each (B, ...). With ``hflip_too`` it is also run on the mirrored
    images and those results are stored as ``<name>_flip``. The dataset's own random flip should
    be off (a warning says so otherwise).
    """
    from tqdm.auto import tqdm

    if getattr(dataset, "hflip", False):
        warnings.warn("cache_latents: the dataset applies a random h-flip (set hflip off)", stacklevel=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    with tqdm(total=len(dataset), desc="caching latents", unit="img", dynamic_ncols=True) as progress:
        batches = _encode_batches(encode_fn, loader, hflip_too, device, progress)
        index = write_latents(
            out_dir,
            batches,
            shard_size=shard_size,
            num_classes=getattr(dataset, "num_classes", None),
            source=source,
            overwrite=overwrite,
        )
    skipped = getattr(dataset, "skipped", 0)
    if skipped:
        warnings.warn(f"cache_latents: {skipped} unreadable images were replaced by neighbours", stacklevel=2)
    return index
