"""The checkpoint the README's main command samples from loads and generates sensible images."""

from pathlib import Path

import pytest
import torch

from maskar.checkpoint import load_model

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "hmar-fmnist"


@pytest.mark.skipif(not CKPT.exists(), reason="shipped checkpoint not present")
def test_shipped_hmar_fmnist_samples_on_cpu():
    model, cfg = load_model(CKPT, device="cpu")
    assert cfg.model.arch == "hmar" and model.num_classes == 10 and model.image_size == 32
    assert model.has_mask_head  # stage 2: refinement branch present
    labels = torch.tensor([1, 7])  # trouser, sneaker
    a = model.generate(labels, seed=3, cfg=1.5, top_k=0, top_p=0.96)
    b = model.generate(labels, seed=3, cfg=1.5, top_k=0, top_p=0.96)
    assert a.shape == (2, 1, 32, 32)
    assert torch.equal(a, b)  # seeded
    assert a.min() >= -1 and a.max() <= 1
    # Not noise: Fashion-MNIST images have a dark background and a bright object.
    border = torch.cat([a[..., 0, :], a[..., -1, :]], dim=-1).mean()
    center = a[..., 8:24, 8:24].mean()
    assert center > border + 0.3


VAR = Path(__file__).resolve().parents[1] / "checkpoints" / "var-fmnist"


@pytest.mark.skipif(not (VAR.exists() and CKPT.exists()), reason="shipped checkpoints not present")
def test_shipped_var_fmnist_shares_hmar_fmnists_tokenizer_and_samples_on_cpu():
    from maskar.checkpoint import load_tensors

    assert not any(k.startswith("tokenizer.") for k in load_tensors(VAR / "model.safetensors"))
    model, cfg = load_model(VAR, device="cpu")
    hmar, _ = load_model(CKPT, device="cpu")
    assert cfg.model.arch == "var" and model.num_classes == 10 and model.image_size == 32
    ours, theirs = model.tokenizer.state_dict(), hmar.tokenizer.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    labels = torch.tensor([1, 7])  # trouser, sneaker
    a = model.generate(labels, seed=3, cfg=1.5, top_k=0, top_p=0.96)
    assert torch.equal(a, model.generate(labels, seed=3, cfg=1.5, top_k=0, top_p=0.96))
    assert a.shape == (2, 1, 32, 32) and a.min() >= -1 and a.max() <= 1
    border = torch.cat([a[..., 0, :], a[..., -1, :]], dim=-1).mean()
    assert a[..., 8:24, 8:24].mean() > border + 0.3  # a bright object on a dark background
