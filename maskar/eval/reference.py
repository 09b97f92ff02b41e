"""Feature extraction over image sets and reference statistics, cached on disk.

A reference is an ADM-style npz (``arr_0`` uint8 NHWC images and/or precomputed ``mu``/``sigma``
[/``mu_s``/``sigma_s`` for sFID]), a folder of images, an .npy array, or a maskar dataset
(``data.*`` config). Statistics computed from images are cached as an npz keyed by the source
(path, size, mtime or the data config) and the feature network, so a second evaluation against
the same reference only extracts the samples. A cache file is itself a valid ``ref=``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from maskar.config import ConfigError, DataConfig
from maskar.eval.images import ImageSet, dataset_images, npz_keys, open_images
from maskar.eval.metrics import feature_stats


class Extractor(Protocol):
    name: str  # says which network (and weights) made the features

    def __call__(self, images: np.ndarray) -> dict[str, torch.Tensor]: ...


def default_cache_dir() -> Path:
    root = os.environ.get("MASKAR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "maskar"
    )
    return Path(root) / "eval_stats"


def extract_features(
    extractor: Extractor, images: ImageSet, batch_size: int = 100, desc: str | None = "features"
) -> dict[str, np.ndarray]:
    """Run ``extractor`` over all images; returns each output as an (N, D) float32 array."""
    parts: dict[str, list[np.ndarray]] = {}
    steps = (images.count + batch_size - 1) // batch_size
    for batch in tqdm(images.batches(batch_size), total=steps, desc=desc, unit="batch", disable=desc is None):
        for key, value in extractor(batch).items():
            parts.setdefault(key, []).append(value.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


@dataclasses.dataclass
class Stats:
    """Fréchet statistics of one image set in one feature space, and what they came from."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    count: int
    source: str
    network: str
    features: np.ndarray | None = None  # (N, D) float32, for precision / recall
    mu_s: np.ndarray | None = None  # spatial (sFID) statistics
    sigma_s: np.ndarray | None = None

    def describe(self) -> str:
        return f"{self.source}, N={self.count if self.count >= 0 else 'unknown'}"

    def save(self, path: str | os.PathLike) -> None:
        from maskar.checkpoint import atomic_write_bytes

        arrays = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, np.ndarray)}
        meta = json.dumps({"count": self.count, "source": self.source, "network": self.network})
        atomic_write_bytes(path, lambda f: np.savez(f, meta=np.array(meta), **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike, key: str = "ref") -> Stats:
        """Read statistics saved by :meth:`save` (or an ADM npz with ``mu``/``sigma``), checked:
        a truncated file, missing arrays or inconsistent shapes fail with one message."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"])) if "meta" in data else {}
                arrays = {k: data[k] for k in ("mu", "sigma", "features", "mu_s", "sigma_s") if k in data}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ConfigError(f"{key}: cannot read {str(path)!r} as statistics npz ({e})") from None
        if not isinstance(meta, dict):
            raise ConfigError(f"{key}: {str(path)!r} has a malformed meta entry")
        mu, sigma = arrays.get("mu"), arrays.get("sigma")
        if mu is None or sigma is None:
            raise ConfigError(f"{key}: {str(path)!r} has no mu/sigma arrays; keys {sorted(arrays)}")
        d = mu.shape[0] if mu.ndim == 1 else -1
        feats = arrays.get("features")
        if d < 1 or sigma.shape != (d, d) or (feats is not None and (feats.ndim != 2 or feats.shape[1] != d)):
            shapes = {k: v.shape for k, v in arrays.items()}
            raise ConfigError(f"{key}: {str(path)!r} has inconsistent statistics shapes {shapes}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ConfigError(f"{key}: {str(path)!r} has non-finite mu/sigma values")
        return cls(
            count=int(meta.get("count", -1)),
            source=meta.get("source", Path(path).name),
            network=meta.get("network", "unknown"),
            **arrays,
        )


def stats_from_features(feats: dict[str, np.ndarray], source: str, network: str, keep: bool = True) -> Stats:
    mu, sigma = feature_stats(feats["pool"])
    st = Stats(mu, sigma, len(feats["pool"]), source, network, feats["pool"] if keep else None)
    if "spatial" in feats:
        st.mu_s, st.sigma_s = feature_stats(feats["spatial"])
    return st


def _source_key(ref: str | DataConfig, limit: int | None) -> dict[str, Any]:
    if isinstance(ref, DataConfig):
        return {"data": dataclasses.asdict(ref), "limit": limit}
    p = Path(ref).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "limit": limit}


def reference_stats(
    ref: str | DataConfig,
    extractor: Extractor,
    need_features: bool = False,
    need_spatial: bool = False,
    batch_size: int = 100,
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> Stats:
    """Statistics of a reference set in ``extractor``'s feature space (see the module docstring).

    Precomputed ``mu``/``sigma`` in an npz are used as they are (as the ADM evaluator does) when
    the features themselves are not needed; they are assumed to come from the same network.
    """
    images: ImageSet | None = None
    pre: Stats | None = None
    if isinstance(ref, DataConfig):
        source = f"data.name={ref.name} split={ref.split} res={ref.resolution}"
    else:
        path = Path(ref)
        if not path.exists():
            raise ConfigError(
                f"ref: {str(path)!r} does not exist; expected an npz, an image folder or ref=data"
            )
        source = path.name
        if path.suffix == ".npz":
            keys = npz_keys(path)
            if "mu" in keys and "sigma" in keys:
                pre = Stats.load(path)
                if pre.network == "unknown":  # an ADM / torch-fidelity file: TF-Inception statistics
                    if extractor.name.startswith("TF-Inception"):
                        pre.network = extractor.name
                        pre.source = f"{path.name} (precomputed mu/sigma)"
                    else:
                        pre = None
            if "arr_0" not in keys:
                if pre is None:
                    raise ConfigError(
                        f"ref: {path.name} has no arr_0 (images) and no mu/sigma of {extractor.name}; "
                        f"keys {keys}"
                    )
                if need_features and pre.features is None:
                    raise ConfigError(
                        f"ref: {path.name} holds only mu/sigma; precision/recall need reference "
                        "images (arr_0)"
                    )
                if need_spatial and pre.mu_s is None:
                    raise ConfigError(f"ref: {path.name} has no mu_s/sigma_s and no images (arr_0) for sFID")
    if pre is not None and pre.network != extractor.name:
        raise ConfigError(f"ref: {source} was computed with {pre.network!r}, not {extractor.name!r}")
    pre_ok = pre is not None and (not need_features or pre.features is not None)
    pre_ok = pre_ok and (not need_spatial or pre.mu_s is not None)
    if pre_ok:
        return pre

    key = json.dumps({"src": _source_key(ref, limit), "net": extractor.name, "spatial": need_spatial})
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz"
        if cache.is_file():
            return Stats.load(cache)
    images = dataset_images(ref, limit) if isinstance(ref, DataConfig) else open_images(ref)
    if limit is not None and images.count > limit:
        lab = None if images.labels is None else images.labels[:limit]
        images = dataclasses.replace(images, count=limit, labels=lab)
    feats = extract_features(extractor, images, batch_size, "reference features" if progress else None)
    st = stats_from_features(feats, f"{source} ({images.count} images)", extractor.name)
    if pre is not None:  # keep the file's own mu/sigma for FID, as ADM does
        st.mu, st.sigma, st.source = (
            pre.mu,
            pre.sigma,
            f"{source} (precomputed mu/sigma; features from arr_0)",
        )
        if pre.mu_s is not None:
            st.mu_s, st.sigma_s = pre.mu_s, pre.sigma_s
    if cache is not None:
        st.save(cache)
    return st
