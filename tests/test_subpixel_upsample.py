"""upsample_conv_subpixel: conv3x3(nearest x2) as one 2x2 convolution with 4x the channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskar.tokenizers import common
from maskar.tokenizers.common import Upsample, upsample_conv_subpixel


def _two_step(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9, 6), (1, 3, 1, 1, 4), (3, 8, 4, 6, 8), (1, 4, 2, 3, 4)])
def test_equals_the_two_step_form_in_float64(shape) -> None:
    B, C, H, W, Co = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    w = torch.randn(Co, C, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(Co, dtype=torch.float64, generator=g)
    out, ref = upsample_conv_subpixel(x, w, b), _two_step(x, w, b)
    assert out.shape == ref.shape == (B, Co, 2 * H, 2 * W)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        upsample_conv_subpixel(x, w, None), _two_step(x, w, None), rtol=1e-12, atol=1e-12
    )


def test_bf16_within_the_rounding_of_the_merged_weights() -> None:
    """bf16 input and weights: the two-step form and this one differ by the merged taps' extra
    rounding, well inside bf16's own error against float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g)
    w = torch.randn(16, 16, 3, 3, generator=g) * 0.1
    b = torch.randn(16, generator=g)
    exact = _two_step(x.double(), w.double(), b.double())
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    err_two = (_two_step(xb, wb, bb).double() - exact).norm() / exact.norm()
    err_sub = (upsample_conv_subpixel(xb, wb, bb).double() - exact).norm() / exact.norm()
    assert err_sub < 2 * err_two + 1e-3, (err_sub, err_two)


def test_upsample_takes_it_only_for_low_precision_inference(monkeypatch) -> None:
    up = Upsample(4)
    x = torch.randn(1, 4, 3, 3)
    calls = []
    monkeypatch.setattr(common, "upsample_conv_subpixel", lambda *a: calls.append(1) or _two_step(*a))
    monkeypatch.setattr(common, "SUBPIXEL_UPSAMPLE", True)
    with torch.no_grad():
        up(x)  # float32: the two-step form
        up.bfloat16()(x.bfloat16())
    assert calls == [1]
    up(x.bfloat16())  # autograd on: the two-step form (the fast path has no training use)
    assert calls == [1]
    monkeypatch.setattr(common, "SUBPIXEL_UPSAMPLE", False)
    with torch.no_grad():
        up(x.bfloat16())
    assert calls == [1]
