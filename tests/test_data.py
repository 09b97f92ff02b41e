"""Datasets, transforms, the latent store and the loader helper, on tiny data."""

from __future__ import annotations

import gzip
import json
import lzma
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskar.config import ConfigError, DataConfig
from maskar.data import (
    DigitsDataset,
    FashionMNISTDataset,
    ImageFolderDataset,
    LatentDataset,
    SyntheticDataset,
    UnreadableImageError,
    build_dataset,
    cache_latents,
    make_loader,
    read_idx,
    set_epoch,
    write_latents,
)
from maskar.data.fashion_mnist import DEFAULT_ROOT
from maskar.data.transforms import center_crop_arr, resize_gray, to_mode

# ----------------------------------------------------------------------------- helpers


def _rgb(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _make_folder(root: Path) -> dict[str, Path]:
    """root/train/{cat,dog,owl}/... with odd sizes, several modes, a corrupt and a truncated file."""
    split = root / "train"
    for name in ("cat", "dog", "owl"):
        (split / name).mkdir(parents=True)
    files = {
        "cat_rgb": split / "cat" / "a.png",
        "cat_bad": split / "cat" / "b_bad.jpg",
        "cat_gray": split / "cat" / "c_gray.JPEG",
        "dog_rgba": split / "dog" / "sub" / "a.png",
        "dog_trunc": split / "dog" / "z_trunc.png",
        "owl_pal": split / "owl" / "a.gif",
    }
    _rgb(37, 23, 0).save(files["cat_rgb"])
    files["cat_bad"].write_bytes(b"this is not a jpeg at all")
    Image.fromarray(np.full((31, 50), 200, dtype=np.uint8), mode="L").save(files["cat_gray"], quality=95)
    files["dog_rgba"].parent.mkdir()
    Image.new("RGBA", (19, 41), (10, 200, 30, 128)).save(files["dog_rgba"])
    _rgb(40, 40, 1).save(files["dog_trunc"])
    data = files["dog_trunc"].read_bytes()
    files["dog_trunc"].write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
    _rgb(33, 33, 2).convert("P").save(files["owl_pal"])
    (split / "owl" / "notes.txt").write_text("not an image, ignored")
    return files


def _write_idx(path: Path, arr: np.ndarray, gz: bool | str) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    packed = {"xz": lzma.compress, True: gzip.compress}.get(gz, lambda b: b)(payload)
    path.write_bytes(packed)


# ----------------------------------------------------------------------------- transforms


def test_center_crop_matches_box_halving_then_center_crop():
    img = _rgb(100, 64, 3)  # short side 64 = 2 * 32 -> one BOX halving to 50x32, no further scaling
    out = center_crop_arr(img, 32)
    arr = np.asarray(img).astype(np.float64)  # (64, 100, 3)
    box = arr.reshape(32, 2, 50, 2, 3).mean(axis=(1, 3))  # 2x2 block means: (32, 50, 3)
    ref = box[:, 9:41]  # center crop: left = (50 - 32) // 2
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out - ref).max() <= 1.0  # PIL rounds the 8-bit box filter its own way


def test_center_crop_upscales_short_side_and_crops_center():
    arr = np.zeros((10, 30), dtype=np.uint8)
    arr[:, 15:] = 255  # left half black, right half white
    out = center_crop_arr(Image.fromarray(arr, mode="L"), 20)  # 10x30 -> 20x60 -> crop cols 20..40
    assert out.shape == (20, 20)
    assert out[:, :8].max() < 20 and out[:, 12:].min() > 235


def test_to_mode_scales_16_bit_gray():
    img = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_mode(img, 3)).min() == 255
    assert to_mode(img, 1).mode == "L"


def test_resize_gray_pad_and_error():
    arr = np.full((28, 28), 7, dtype=np.uint8)
    out = resize_gray(arr, 32, "pad")
    assert out.shape == (32, 32) and out[2:30, 2:30].min() == 7 and out.sum() == 7 * 28 * 28
    with pytest.raises(ValueError, match="resolution >= 28"):
        resize_gray(arr, 16, "pad")


# ----------------------------------------------------------------------------- imagefolder


def test_imagefolder_items_labels_and_skipping(tmp_path):
    files = _make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, "train", resolution=16, channels=3)
    assert ds.classes == ["cat", "dog", "owl"] and ds.num_classes == 3
    assert len(ds) == 6 and ds.skipped == 0  # lazy: nothing decoded yet
    paths = [p for p, _ in ds.samples]
    assert str(tmp_path / "train/owl/notes.txt") not in paths
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 2
    assert len([w for w in caught if "unreadable" in str(w.message)]) == 1
    for item in items:
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
    bad = paths.index(str(files["cat_bad"]))
    # a bad item is replaced by the next readable file: deterministic, same on every access
    assert torch.equal(items[bad]["image"], items[bad + 1]["image"])
    assert torch.equal(ds[bad]["image"], items[bad]["image"])
    trunc = paths.index(str(files["dog_trunc"]))
    assert items[trunc]["label"] == 2  # wrapped onto the next class's file
    assert [int(it["label"]) for it in items] == [0, 0, 0, 1, 2, 2]
    gray = items[paths.index(str(files["cat_gray"]))]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # gray -> 3 equal channels
    assert ds.skipped == 2  # re-reading a known bad file does not count it again


def test_imagefolder_strict_names_the_file(tmp_path):
    files = _make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, "train", resolution=8, strict=True)
    bad = [p for p, _ in ds.samples].index(str(files["cat_bad"]))
    with pytest.raises(UnreadableImageError, match="b_bad.jpg"):
        ds[bad]


def test_imagefolder_channels_one_and_hflip(tmp_path):
    _make_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, "train", resolution=12, channels=1)
    x = ds[0]["image"]
    assert x.shape == (1, 12, 12)
    flip = ImageFolderDataset(tmp_path, "train", resolution=12, channels=1, hflip=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        y = flip[0]["image"]
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
        seen.add(torch.equal(y, x))
    assert seen == {True, False}


def test_imagefolder_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ImageFolderDataset(tmp_path / "nope", "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(ConfigError, match="no class folders"):
        ImageFolderDataset(tmp_path, "train")
    (tmp_path / "train" / "cls").mkdir()
    (tmp_path / "train" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ConfigError, match="no image files"):
        ImageFolderDataset(tmp_path, "train")
    with pytest.raises(ConfigError, match="data.root"):
        build_dataset(DataConfig(name="imagefolder", root=None))


def test_imagefolder_all_unreadable_is_an_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, "train", resolution=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="none of the 1 image files"):
            ds[0]


def test_imagefolder_skip_count_is_shared_with_workers(tmp_path):
    _make_folder(tmp_path)
    ds = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), resolution=8))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = torch.cat([b["label"] for b in loader])
    assert labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert ds.skipped == 2  # counted in the workers, visible here


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_read_idx_plain_gzip_xz_and_int32(tmp_path):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    _write_idx(tmp_path / "a.idx", arr, gz=False)
    _write_idx(tmp_path / "b.idx", arr, gz=True)
    _write_idx(tmp_path / "x.idx", arr, gz="xz")
    for name in ("a.idx", "b.idx", "x.idx"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), arr)
    (tmp_path / "c.idx").write_bytes((tmp_path / "a.idx").read_bytes()[:-4])
    with pytest.raises(ValueError, match="expected"):
        read_idx(tmp_path / "c.idx")
    (tmp_path / "y.idx").write_bytes((tmp_path / "x.idx").read_bytes()[:-8])
    with pytest.raises(ValueError, match="corrupt xz"):
        read_idx(tmp_path / "y.idx")


def test_fashion_mnist_reads_the_carried_layout(tmp_path):
    """.carry/fmnist (scripts/quality_collect.sh prepare): train images as .xz, labels as .gz."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.array([2, 0, 5, 9], dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.xz", images, gz="xz")
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, gz=True)
    ds = FashionMNISTDataset(tmp_path, "train", resolution=28, channels=1)
    assert len(ds) == 4 and int(ds[3]["label"]) == 9
    torch.testing.assert_close(ds[2]["image"][0], torch.from_numpy(images[2]).float() / 127.5 - 1)


def test_fashion_mnist_tiny_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 7], dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:2], gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:2], gz=False)

    ds = build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), resolution=28, channels=1))
    assert len(ds) == 6 and ds.num_classes == 10 and ds.skipped == 0
    item = ds[1]
    assert item["label"] == 9 and item["label"].dtype == torch.int64
    torch.testing.assert_close(item["image"][0], torch.from_numpy(images[1]).float() / 127.5 - 1)

    test = FashionMNISTDataset(tmp_path, "test", resolution=32, channels=3)
    assert len(test) == 2
    x = test[0]["image"]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[0], x[2])

    pad = FashionMNISTDataset(tmp_path, "train", resolution=32, channels=1, resize="pad")[0]["image"][0]
    torch.testing.assert_close(pad[2:30, 2:30], torch.from_numpy(images[0]).float() / 127.5 - 1)
    assert (pad[:2] == -1).all() and (pad[:, 30:] == -1).all()

    with pytest.raises(ConfigError, match="not a Fashion-MNIST split"):
        FashionMNISTDataset(tmp_path, "val")
    with pytest.raises(ConfigError, match="not found"):
        FashionMNISTDataset(tmp_path / "missing")
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    _write_idx(only_train / "train-images-idx3-ubyte", images, gz=False)
    with pytest.raises(ConfigError, match="no test images IDX file"):
        FashionMNISTDataset(only_train, "test")


@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    ds = build_dataset(DataConfig(name="fashion_mnist", split="test", resolution=32, limit=50))
    assert len(ds) == 50 and ds.num_classes == 10
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= int(item["label"]) < 10
    assert item["image"].min() >= -1 and item["image"].max() <= 1


# ----------------------------------------------------------------------------- digits, synthetic


def test_digits_splits_and_values():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert len(DigitsDataset("train")) == 1437 and len(DigitsDataset("test")) == 360
    full = build_dataset(DataConfig(name="digits", split="all", resolution=8, channels=1))
    assert len(full) == 1797 and full.num_classes == 10
    item = full[5]
    ref = torch.from_numpy(np.rint(bunch.images[5] * 255 / 16)).float() / 127.5 - 1
    torch.testing.assert_close(item["image"][0], ref)
    assert int(item["label"]) == int(bunch.target[5])
    up = DigitsDataset("test", resolution=32, channels=3)[0]["image"]
    assert up.shape == (3, 32, 32) and up.min() >= -1 and up.max() <= 1
    with pytest.raises(ConfigError, match="digits split"):
        DigitsDataset("val")


def test_synthetic_is_deterministic_and_class_dependent():
    a = SyntheticDataset(size=20, num_classes=4, resolution=16, seed=3)
    b = build_dataset(
        DataConfig(name="synthetic", synthetic_size=20, synthetic_classes=4, resolution=16, synthetic_seed=3)
    )
    for i in (0, 7, 19):
        assert torch.equal(a[i]["image"], b[i]["image"]) and int(a[i]["label"]) == i % 4
    c = SyntheticDataset(size=20, num_classes=4, resolution=16, seed=4)
    assert not torch.equal(a[0]["image"], c[0]["image"])
    test = SyntheticDataset(size=20, num_classes=4, resolution=16, seed=3, split="test")
    assert not torch.equal(a[0]["image"], test[0]["image"])
    x = torch.stack([a[i]["image"] for i in range(20)])  # (20, 3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1
    # foreground colours differ by class: brightest-pixel colour of class 0 vs class 1 samples
    top = x.flatten(2).max(-1).values  # (20, 3)
    assert (top[0::4] - top[1::4]).abs().max() > 0.3
    gray = SyntheticDataset(size=4, channels=1, resolution=8, limit=3)
    assert len(gray) == 3 and gray[0]["image"].shape == (1, 8, 8)


def test_num_classes_override():
    ds = build_dataset(DataConfig(name="synthetic", synthetic_size=8, synthetic_classes=4, num_classes=6))
    assert ds.num_classes == 6
    with pytest.raises(ConfigError, match="data.num_classes"):
        build_dataset(DataConfig(name="synthetic", synthetic_size=8, synthetic_classes=4, num_classes=2))


# ----------------------------------------------------------------------------- latent store


def _latent_batches(n: int, batch: int):
    g = torch.Generator().manual_seed(0)
    rows = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        rows.append(
            {
                "moments": torch.randn(b, 4, 2, 2, generator=g),
                "moments_flip": torch.randn(b, 4, 2, 2, generator=g).to(torch.bfloat16),
                "indices_0": torch.randint(0, 9, (b, 1), generator=g),
                "indices_1": torch.randint(0, 9, (b, 4), generator=g),
                "label": torch.arange(start, start + b) % 3,
            }
        )
    return rows


def test_latent_store_round_trip_several_shards(tmp_path):
    batches = _latent_batches(10, 3)
    index = write_latents(tmp_path / "lat", iter(batches), shard_size=4, source={"tokenizer": "test"})
    files = sorted(p.name for p in (tmp_path / "lat").iterdir())
    assert files == ["index.json"] + [f"shard-0000{i}.safetensors" for i in range(3)]
    on_disk = json.loads((tmp_path / "lat" / "index.json").read_text())
    assert on_disk == index and index["count"] == 10 and index["num_classes"] == 3
    assert [s["count"] for s in index["shards"]] == [4, 4, 2]
    assert index["arrays"]["moments"] == {"shape": [4, 2, 2], "dtype": "float32"}
    assert index["arrays"]["moments_flip"]["dtype"] == "bfloat16" and index["source"] == {"tokenizer": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["lat"]  # no temp dirs left

    ds = build_dataset(DataConfig(name="latents", root=str(tmp_path / "lat")))
    assert isinstance(ds, LatentDataset) and len(ds) == 10 and ds.num_classes == 3 and ds.skipped == 0
    flat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    for i in range(10):
        item = ds[i]
        assert set(item) == set(flat)
        for k, v in flat.items():
            assert item[k].dtype == (torch.int64 if k == "label" else v.dtype)
            assert torch.equal(item[k], v[i]), (k, i)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["moments"].shape == (5, 4, 2, 2) and batch["label"].shape == (5,)
    assert len(LatentDataset(tmp_path / "lat", limit=4)) == 4


def test_latent_store_errors_and_atomicity(tmp_path):
    (tmp_path / "lat").mkdir()  # an empty folder made in advance is fine
    write_latents(tmp_path / "lat", _latent_batches(4, 2), shard_size=8)
    with pytest.raises(FileExistsError, match="already exists"):
        write_latents(tmp_path / "lat", _latent_batches(4, 2))
    write_latents(tmp_path / "lat", _latent_batches(6, 2), shard_size=8, overwrite=True)
    assert len(LatentDataset(tmp_path / "lat")) == 6

    def crashing():
        yield from _latent_batches(4, 2)
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        write_latents(tmp_path / "crash", crashing(), shard_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat"]  # nothing half-written

    good = _latent_batches(4, 2)
    bad = dict(good[1], moments=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="does not match"):
        write_latents(tmp_path / "bad", [good[0], bad])
    with pytest.raises(ValueError, match="leading"):
        write_latents(tmp_path / "bad", [{"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)}])
    with pytest.raises(ConfigError, match="not found"):
        LatentDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no index.json"):
        LatentDataset(tmp_path / "empty")
    (tmp_path / "lat" / "shard-00000.safetensors").unlink()
    with pytest.raises(ConfigError, match="lacks shard files"):
        LatentDataset(tmp_path / "lat")


def test_cache_latents_with_flip(tmp_path):
    ds = SyntheticDataset(size=7, num_classes=3, resolution=8)

    def encode(x):  # (B, 3, 8, 8) -> (B, 3, 2, 2), plus a second named output
        return {"moments": torch.nn.functional.avg_pool2d(x, 4), "small": x[:, :, ::4, ::4]}

    index = cache_latents(encode, ds, tmp_path / "c", batch_size=3, hflip_too=True, shard_size=5)
    assert index["count"] == 7 and index["num_classes"] == 3
    assert set(index["arrays"]) == {"moments", "moments_flip", "small", "small_flip", "label"}
    lat = LatentDataset(tmp_path / "c")
    for i in (0, 6):
        img = ds[i]["image"][None]
        torch.testing.assert_close(lat[i]["moments"], encode(img)["moments"][0])
        torch.testing.assert_close(lat[i]["moments_flip"], encode(img.flip(-1))["moments"][0])
        assert int(lat[i]["label"]) == i % 3


# ----------------------------------------------------------------------------- loader


def test_make_loader_seeded_epochs():
    ds = SyntheticDataset(size=12, num_classes=12, resolution=4)
    order = []
    for epoch in (0, 0, 1):
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=5)
        set_epoch(loader, epoch)
        order.append(torch.cat([b["label"] for b in loader]).tolist())
    assert order[0] == order[1] and order[0] != order[2] and sorted(order[0]) == list(range(12))
    batch = next(iter(make_loader(ds, batch_size=5, shuffle=False)))
    assert batch["image"].shape == (5, 3, 4, 4) and batch["label"].tolist() == [0, 1, 2, 3, 4]
    assert len(make_loader(ds, batch_size=5, drop_last=True)) == 2
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader(ds, batch_size=13)
