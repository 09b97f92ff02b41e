"""CASMAR's DiT head with its residual stream in the autocast dtype (MASKAR_DIT_LOW_RESIDUAL):
where it applies, that the blocks then carry bf16, and how far the head's output moves against an
fp32 reference next to the default float32 stream's distance."""

from __future__ import annotations

import pytest
import torch
from test_casmar import casmar_b_dit, randomize_heads, tiny_casmar

from maskar.models import casmar
from maskar.models.casmar import DiTBlock, LocalDiT


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def forward_seeing_block_dtypes(net: LocalDiT, *args) -> tuple[torch.Tensor, set[torch.dtype]]:
    """``net.forward_embedded(*args)`` and the dtypes its blocks were given."""
    seen: set[torch.dtype] = set()
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.add(a[0].dtype)) for b in net.blocks]
    try:
        out = net.forward_embedded(*args)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def errors_against_fp32(net: LocalDiT, x, t, z, device_type: str, monkeypatch) -> dict[str, float]:
    """The head's eps under bf16 autocast, float32 stream and low stream, against fp32."""
    with torch.no_grad():
        cond32 = net.embed_condition(z)
        want = net.forward_embedded(x, t, cond32, None)
        out = {}
        for low in (False, True):
            monkeypatch.setattr(DiTBlock, "low_residual", low)
            with torch.autocast(device_type, torch.bfloat16):
                got, dtypes = forward_seeing_block_dtypes(net, x, t, net.embed_condition(z), None)
            out["low" if low else "fp32_stream"] = rel(got, want)
            out[f"dtypes_{low}"] = dtypes
    return out


def test_low_residual_carries_bf16_and_stays_near_the_float32_stream(monkeypatch):
    model = tiny_casmar(gdm_d=3)
    randomize_heads(model)
    net = model.cond_diffloss.net.eval()
    torch.manual_seed(0)
    x, z, t = torch.randn(4, 4, 4, 4), torch.randn(4, 32, 4, 4), torch.full((4,), 100)
    e = errors_against_fp32(net, x, t, z, "cpu", monkeypatch)
    assert e["dtypes_False"] == {torch.float32} and e["dtypes_True"] == {torch.bfloat16}
    # bf16 matmuls already move eps by ~1e-2 of its range; the bf16 stream adds a rounding per add
    assert 0 < e["fp32_stream"] <= 3e-2, e
    assert e["low"] <= max(2 * e["fp32_stream"], 2e-2), e


def test_low_residual_only_in_low_precision_inference(monkeypatch):
    monkeypatch.setattr(DiTBlock, "low_residual", True)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert not casmar._low_residual_applies(x)  # fp32: no autocast
        with torch.autocast("cpu", torch.bfloat16):
            assert casmar._low_residual_applies(x)
    with torch.autocast("cpu", torch.bfloat16):
        assert not casmar._low_residual_applies(x)  # autograd on: training keeps float32
    monkeypatch.setattr(DiTBlock, "low_residual", False)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert not casmar._low_residual_applies(x)


def test_low_residual_sample_chain_static_equals_eager(monkeypatch):
    """The sampler's static-buffer chain (what the CUDA graph replays) equals the eager chain with
    the switch on, as with it off."""
    monkeypatch.setattr(DiTBlock, "low_residual", True)
    model = tiny_casmar(gdm_d=2)
    randomize_heads(model)
    head = model.cond_diffloss.eval()
    z = torch.randn(4, 32, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        eager = head.sample(z, 1.0, 2.0, generator=torch.Generator().manual_seed(0), cuda_graph=False)
        static = head._sample_graphed(z, 1.0, 2.0, head.gen_diffusion(), torch.Generator().manual_seed(0),
                                      capture=False)
    assert torch.equal(static, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_low_residual_at_casmar_b_width(monkeypatch):
    """CASMAR-B's DiT head (6 blocks, 512 wide, 8 heads, 16 x 16, PSA 7 x 7) with weights
    everywhere: eps under bf16 autocast against fp32, with the float32 and the bf16 stream."""
    net = casmar_b_dit(6)
    x = torch.randn(32, 16, 16, 16, device="cuda")
    z = torch.randn(32, 768, 16, 16, device="cuda")
    t = torch.randint(0, 1000, (32,), device="cuda")
    e = errors_against_fp32(net, x, t, z, "cuda", monkeypatch)
    print(f"DiT head eps vs fp32: float32 stream {e['fp32_stream']:.2e}, bf16 stream {e['low']:.2e}")
    assert e["dtypes_True"] == {torch.bfloat16}
    assert e["low"] <= max(2 * e["fp32_stream"], 2e-2), e
