"""Large-N sampling (maskar sample / eval): the writer-thread pipeline and the streamed npz.

The pipeline must give exactly what the plain loop gives (one ``model.generate`` per batch with
seed + offset, uint8 NHWC), write the same npz as ``save_npz``, and fail cleanly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskar import sampling
from maskar.config import load_config
from maskar.registry import build_model


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("var-tiny", ["sample.top_k=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith("tokenizer."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, cfg


def _plain_loop(model, cfg, labels, per_class, batch_size):
    all_labels = [lab for lab in labels for _ in range(per_class)]
    kwargs = sampling.sampling_kwargs(cfg.sample)
    seed = kwargs.pop("seed")
    out = []
    for start in range(0, len(all_labels), batch_size):
        chunk = torch.tensor(all_labels[start : start + batch_size])
        out.append(sampling.to_uint8(model.generate(chunk, seed=seed + start, **kwargs)))
    return torch.cat(out), all_labels


def test_pipeline_equals_the_plain_loop_and_streams_the_npz(tiny, tmp_path):
    model, cfg = tiny
    labels, per_class, batch = [0, 3, 7], 3, 4  # 9 images: batches of 4, 4, 1
    path = tmp_path / "sub" / "s.npz"
    order = [lab for lab in labels for _ in range(per_class)]
    images, got_labels = sampling.generate(
        model, cfg, labels, per_class, batch, "fp32", [sampling.NpzStream(str(path), len(order), order)]
    )
    want, want_labels = _plain_loop(model, cfg, labels, per_class, batch)
    assert images.dtype == torch.uint8 and images.shape == (9, 16, 16, 3)
    assert torch.equal(images, want) and got_labels == want_labels == order
    with np.load(path) as f:
        assert np.array_equal(f["arr_0"], want.numpy()) and f["arr_1"].tolist() == order
    ref = tmp_path / "ref.npz"
    sampling.save_npz(want, str(ref), order)  # the same layout as the one-shot writer
    with np.load(ref) as a, np.load(path) as b:
        assert sorted(a.files) == sorted(b.files)
        assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a.files)
    assert [p.name for p in path.parent.iterdir()] == ["s.npz"]  # no temporary left


def test_a_failing_sink_stops_sampling_and_leaves_no_file(tiny, tmp_path):
    model, cfg = tiny
    path = tmp_path / "s.npz"

    class Broken:
        def write(self, start, images):
            raise OSError("disk full")

        def close(self):
            pass

        def abort(self):
            pass

    with pytest.raises(OSError, match="disk full"):
        sampling.generate(
            model, cfg, [0, 1], 4, 2, "fp32", [sampling.NpzStream(str(path), 8, None), Broken()]
        )
    assert list(tmp_path.iterdir()) == []


def test_npz_stream_refuses_a_short_or_out_of_order_write(tmp_path):
    s = sampling.NpzStream(str(tmp_path / "a.npz"), 4)
    s.write(0, np.zeros((2, 2, 2, 3), np.uint8))
    with pytest.raises(RuntimeError, match="arrived"):
        s.write(3, np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(RuntimeError, match="2 of 4"):
        s.close()
    s.abort()
    assert list(tmp_path.iterdir()) == []


def test_labels_go_to_next_scale_models_on_the_cpu(tiny, monkeypatch):
    model, cfg = tiny
    seen = []
    real = model.generate
    monkeypatch.setattr(
        model, "generate", lambda labels, **kw: seen.append(labels.device) or real(labels, **kw)
    )
    sampling.generate(model, cfg, [1], 2, 2, "fp32")
    assert seen == [torch.device("cpu")] and model.takes_host_labels


def test_progress_bar_gets_its_total_after_the_first_batch(tiny, monkeypatch):
    """After the first batch the bar knows the whole run's steps (every batch takes as many), and
    the total is what it counts by the end: the ETA is right from the second batch on."""
    model, cfg = tiny
    bars = []
    real = sampling.step_progress

    def spy(model, desc):
        ctx = real(model, desc)

        class Wrapped:
            def __enter__(self):
                bars.append(ctx.__enter__())
                return bars[-1]

            def __exit__(self, *exc):
                bar = bars[-1]
                bars[-1] = (bar.n, bar.total)  # read before close
                return ctx.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(sampling, "step_progress", spy)
    sampling.generate(model, cfg, [0, 3, 7], 3, 4, "fp32")  # batches of 4, 4, 1
    (n, total), = bars
    assert total == n and n > 0 and n % 3 == 0
