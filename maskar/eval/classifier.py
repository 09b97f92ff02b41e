"""A small CNN classifier for small grayscale datasets (Fashion-MNIST, digits) and its metrics.

Inception features say little about 28x28 clothes or 8x8 digits, so for those datasets we also
report a Fréchet distance in the penultimate (128-d) feature space of a classifier trained on
the dataset itself, and that classifier's accuracy on class-conditional samples (does a sample
generated for class c look like a c?). These numbers are comparable only between runs that use
the same classifier file (its hash is part of the network name printed next to every number).

A classifier directory holds ``model.safetensors``, ``classifier.yaml`` (architecture, training
data, held-out accuracy) and ``ref_stats.npz`` (features and statistics of the held-out split,
the default reference of the classifier metrics).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from maskar.config import ConfigError, DataConfig
from maskar.eval.images import dataset_images

KIND = "maskar-eval-classifier"


class SmallCNN(nn.Module):
    """Two conv stages (conv-BN-ReLU x2, max-pool), a 4x4 pool, a 128-d feature layer, a linear head."""

    def __init__(
        self,
        channels: int = 1,
        resolution: int = 32,
        num_classes: int = 10,
        width: int = 32,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.width, self.feature_dim = width, feature_dim

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(channels, width), *block(width, width), nn.MaxPool2d(2, ceil_mode=True),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(4),
        )  # fmt: skip
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.body(x))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)

    def arch(self) -> dict[str, int]:
        return {
            k: getattr(self, k) for k in ("channels", "resolution", "num_classes", "width", "feature_dim")
        }


def prepare(
    images: np.ndarray | torch.Tensor, channels: int, resolution: int, device: torch.device
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, channels, resolution, resolution) in [-1, 1].

    Grayscale uses the channel mean (samples of grayscale models are gray repeated to RGB);
    other sizes are resized bilinearly with antialiasing.
    """
    x = torch.as_tensor(np.asarray(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
    return x


class ClassifierExtractor:
    """uint8 NHWC -> {"pool": penultimate features (B, 128), "logits": (B, num_classes)}."""

    def __init__(self, directory: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        from maskar.checkpoint import load_state_dict_checked, load_tensors
        from maskar.eval.inception import sha1_of

        self.dir = Path(directory)
        meta_path = self.dir / "classifier.yaml"
        if not meta_path.is_file():
            raise ConfigError(
                f"classifier: {str(self.dir)!r} has no classifier.yaml; train one with "
                f"`maskar eval train_classifier=true data.name=fashion_mnist out=DIR`"
            )
        try:
            self.meta = yaml.safe_load(meta_path.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"classifier: cannot read {meta_path} ({e})") from None
        if not isinstance(self.meta, dict) or self.meta.get("kind") != KIND:
            raise ConfigError(f"classifier: {meta_path} is not a {KIND} file")
        self.device = torch.device(device)
        try:
            self.model = SmallCNN(**self.meta["arch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"classifier: {meta_path} has an unusable arch entry ({e})") from None
        weights = self.dir / "model.safetensors"
        load_state_dict_checked(self.model, load_tensors(weights), f"classifier {self.dir}")
        self.model.to(self.device).eval()
        data = self.meta.get("data", {})
        self.name = f"SmallCNN classifier on {data.get('name', '?')} (sha1 {sha1_of(weights)[:12]})"
        ref = self.reference_path()
        if ref.exists():  # written last by train_classifier; checked now, not after the samples' features
            from maskar.eval.reference import Stats

            stats = Stats.load(ref, "classifier")
            if stats.mu.shape[0] != self.model.feature_dim or stats.network != self.name:
                raise ConfigError(
                    f"classifier: {ref} does not belong to these weights (network {stats.network!r}, "
                    f"{stats.mu.shape[0]} features; expected {self.name!r}, {self.model.feature_dim})"
                )

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        a = self.model.arch()
        x = prepare(images, a["channels"], a["resolution"], self.device)
        feats = self.model.features(x)
        return {"pool": feats, "logits": self.model.head(feats)}

    def reference_path(self) -> Path:
        return self.dir / "ref_stats.npz"


def train_classifier(
    data: DataConfig,
    out: str | os.PathLike,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    eval_split: str = "test",
    seed: int = 0,
    device: str | torch.device = "cpu",
    width: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a SmallCNN on ``data`` (its ``split``), measure it on ``eval_split``, save it to ``out``.

    Returns the metadata written to ``classifier.yaml`` (including ``test_accuracy``).
    """
    from maskar.checkpoint import atomic_write_text, save_tensors, update_checksums
    from maskar.eval.reference import extract_features, stats_from_features

    dev = torch.device(device)
    torch.manual_seed(seed)
    train_set = dataset_images(data)
    test_cfg = dataclasses.replace(data, split=eval_split, limit=None)
    test_set = dataset_images(test_cfg)
    if train_set.labels is None or len(set(train_set.labels.tolist())) < 2:
        raise ConfigError(f"train_classifier: data.name={data.name} needs at least 2 labelled classes")
    num_classes = int(max(int(train_set.labels.max()) + 1, getattr(data, "num_classes", None) or 0))
    model = SmallCNN(data.channels, data.resolution, num_classes, width).to(dev)
    x_all = prepare(train_set.all(), data.channels, data.resolution, torch.device("cpu"))  # (N, C, R, R)
    y_all = torch.from_numpy(train_set.labels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.time()
    bar = tqdm(range(steps), desc="classifier", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        x, y = x_all[idx].to(dev), y_all[idx].to(dev)
        # Random circular shifts of up to 2 px (black borders) make the features less brittle.
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digest = save_tensors(out / "model.safetensors", model.state_dict())
    update_checksums(out, {"model.safetensors": digest})
    meta: dict[str, Any] = {
        "kind": KIND,
        "arch": model.arch(),
        "data": dataclasses.asdict(data),
        "eval_split": eval_split,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_count": train_set.count,
        "train_seconds": round(time.time() - start, 1),
    }
    atomic_write_text(out / "classifier.yaml", yaml.safe_dump(meta, sort_keys=False))
    (out / "ref_stats.npz").unlink(missing_ok=True)  # an older classifier's statistics
    clf = ClassifierExtractor(out, dev)
    feats = extract_features(clf, test_set, 500, "classifier test features" if progress else None)
    acc = accuracy(feats["logits"], test_set.labels)
    stats = stats_from_features(feats, f"{test_set.description}", clf.name)
    stats.save(clf.reference_path())
    meta.update(test_accuracy=round(acc, 5), test_count=test_set.count, network=clf.name)
    atomic_write_text(out / "classifier.yaml", yaml.safe_dump(meta, sort_keys=False))
    return meta


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max class equals the label."""
    if len(logits) != len(labels):
        raise ValueError(f"accuracy: {len(logits)} predictions but {len(labels)} labels")
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())
