"""Gradient clipping folded into fused AdamW's step (maskar.train.clipping) against
``clip_grad_norm_`` then ``step()``, on the CPU (fused AdamW has a CPU kernel)."""

from __future__ import annotations

import pytest
import torch

from maskar.train import clipping
from maskar.train.clipping import clip_and_step, folds_clipping


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((96, 40), (40,), (7, 3, 5))]


def _run(fold: bool, max_norm: float, steps: int = 4, **opt_kw):
    params = _params()
    groups = [{"params": params[:1], "weight_decay": 0.05}, {"params": params[1:], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), **opt_kw)
    g = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 3.0
        if fold:
            norm = clip_and_step(opt, params, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else None
            opt.step()
        norms.append(norm)
    return params, norms, opt


def test_fused_adamw_takes_the_clipping_as_grad_scale():
    opt = torch.optim.AdamW(_params(), fused=True)
    assert folds_clipping(opt)
    assert not folds_clipping(torch.optim.AdamW(_params(), foreach=True))
    assert not folds_clipping(torch.optim.SGD(_params(), lr=0.1))


def test_folded_clipping_equals_clip_grad_norm_then_step_to_rounding():
    a, na, opt = _run(True, 2.0, fused=True)
    b, nb, _ = _run(False, 2.0, fused=True)
    for x, y in zip(na, nb, strict=True):
        assert x.item() > 2.0  # every step clipped
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    for p, q in zip(a, b, strict=True):
        # one rounding apart: the kernel divides by the factor's fp32 reciprocal
        torch.testing.assert_close(p, q, rtol=3e-7, atol=3e-7)
        assert not torch.equal(p.grad, p.grad * 0)
        torch.testing.assert_close(p.grad, q.grad, rtol=3e-7, atol=1e-7)  # the clipped gradients
    assert not hasattr(opt, "grad_scale")


def test_folded_clipping_is_exact_below_the_limit():
    a, na, _ = _run(True, 1e6, fused=True)
    b, nb, _ = _run(False, 1e6, fused=True)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    assert all(torch.equal(x, y) for x, y in zip(na, nb, strict=True))


@pytest.mark.parametrize("kw", [{"foreach": True}, {"foreach": False}])
def test_unfused_optimizers_keep_clip_grad_norm(kw):
    a, na, _ = _run(True, 2.0, **kw)
    b, nb, _ = _run(False, 2.0, **kw)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


def test_switch_off_keeps_clip_grad_norm(monkeypatch):
    monkeypatch.setattr(clipping, "ENABLED", False)
    a, _, _ = _run(True, 2.0, fused=True)
    b, _, _ = _run(False, 2.0, fused=True)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_no_clipping_returns_the_norm_and_steps():
    a, na, _ = _run(True, 0.0, fused=True)
    b, _, _ = _run(False, 0.0, fused=True)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    assert all(n.item() > 0 for n in na)
