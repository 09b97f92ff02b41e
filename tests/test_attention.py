import pytest
import torch

from maskar.nn.attention import (
    ScalePattern,
    attention,
    auto_backend_name,
    available_backends,
    naive_attention,
    sdpa_attention,
)

SCHEDULES = [(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 2, 3), (2, 1, 3)]


def direct_mask(kind, sides):
    ids = []
    for s, n in enumerate(sides):
        ids += [s] * (n * n)
    L = len(ids)
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            m[i, j] = ids[i] == ids[j] if kind == "block_diagonal" else ids[i] >= ids[j]
    return m


@pytest.mark.parametrize("kind", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("sides", SCHEDULES[1:])
def test_dense_mask_equals_direct_construction(kind, sides):
    p = ScalePattern.from_sides(kind, sides)
    assert torch.equal(p.dense_mask(), direct_mask(kind, sides))


def test_density_matches_reference_numbers():
    s256 = SCHEDULES[0]
    assert ScalePattern.from_sides("block_causal", s256).density() == pytest.approx(0.619, abs=1e-3)
    assert ScalePattern.from_sides("block_diagonal", s256).density() == pytest.approx(0.239, abs=1e-3)
    s512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    assert ScalePattern.from_sides("block_causal", s512).density() == pytest.approx(0.652, abs=1e-3)
    assert ScalePattern.from_sides("block_diagonal", s512).density() == pytest.approx(0.303, abs=1e-3)


@pytest.mark.parametrize("kind", ["block_diagonal", "block_causal", None])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_sdpa_reference_matches_naive_softmax(kind, scale):
    torch.manual_seed(0)
    p = ScalePattern.from_sides(kind, (1, 2, 3, 4)) if kind else None
    B, H, L, D = 2, 3, 30, 16
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    out = sdpa_attention(q, k, v, p, scale)
    ref = naive_attention(q, k, v, p, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_strided_views_from_fused_qkv():
    torch.manual_seed(1)
    B, L, H, D = 2, 14, 2, 8
    qkv = torch.randn(B, L, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) views, no copy
    p = ScalePattern.from_sides("block_causal", (1, 2, 3))
    out = attention(q, k, v, p, backend="sdpa")
    ref = naive_attention(q.contiguous(), k.contiguous(), v.contiguous(), p)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_matches_reference_and_dense_kv_cache_shape():
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 2, 9, 8)
    out = attention(q, k, k)
    assert out.shape == (1, 2, 4, 8)
    torch.testing.assert_close(out, naive_attention(q, k, k), rtol=1e-5, atol=1e-5)


def test_auto_backend_name_is_the_backend_auto_runs():
    """On the CPU the pattern backends that need CUDA decline, `scales` (long-sequence CUDA
    training only) too: auto's name is a registered backend whose output auto returns."""
    p = ScalePattern.from_sides("block_causal", (1, 2, 3))
    q = torch.randn(1, 2, p.total, 8)
    name = auto_backend_name(q, q, q, p)
    assert name != "scales" and name in available_backends()
    assert torch.equal(attention(q, q, q, p), attention(q, q, q, p, backend=name))
    assert auto_backend_name(q, q, q) in available_backends()


def test_errors_are_clear():
    p = ScalePattern.from_sides("block_diagonal", (1, 2))
    q = torch.randn(1, 1, 6, 8)
    with pytest.raises(ValueError, match="pattern covers 5 tokens"):
        attention(q, q, q, p, backend="sdpa")
    with pytest.raises(ValueError, match="expected one of"):
        attention(q, q, q, None, backend="fast")
    with pytest.raises(ValueError, match="block_diagonal or block_causal"):
        ScalePattern("causal", (1,))
    with pytest.raises(ValueError, match="positive token counts"):
        ScalePattern("block_causal", (1, 0))
    assert "sdpa" in available_backends()


# ----------------------------------------------------------------------------- cudnn-first dense backend


def test_cudnn_backend_takes_only_enabled_dense_low_precision_inference_on_hopper(monkeypatch):
    from maskar.nn import attention_cudnn as ac

    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    p = ScalePattern.from_sides("block_diagonal", (1, 1))
    monkeypatch.setattr(ac, "ENABLED", False)
    assert not ac.supports(q, q, q, None)
    monkeypatch.setattr(ac, "ENABLED", True)
    assert not ac.supports(q, q, q, None)  # the CPU is no Hopper GPU
    monkeypatch.setattr(ac, "_device_ok", lambda device: True)
    assert ac.supports(q, q, q, None)
    assert not ac.supports(q, q, q, p)  # patterns go to the pattern backends
    assert not ac.supports(q.float(), q.float(), q.float(), None)
    g = q.clone().requires_grad_()
    assert not ac.supports(g, g, g, None)  # training keeps SDPA's own order
    with torch.no_grad():
        assert ac.supports(g, g, g, None)
    with pytest.raises(ValueError, match="dense calls only"):
        ac.cudnn_first_attention(q, q, q, p)


def test_cudnn_backend_is_what_auto_picks_for_dense_calls_and_restores_sdpa_order(monkeypatch):
    """Wiring on the CPU (where SDPA has no cuDNN kernel and takes its next choice): auto sends a
    dense call to the backend when it applies; the result is SDPA's; SDPA's priority order is the
    same after the call."""
    from maskar.nn import attention_cudnn as ac

    calls = []
    real = ac.cudnn_first_attention
    monkeypatch.setattr(ac, "ENABLED", True)
    monkeypatch.setattr(ac, "_device_ok", lambda device: True)
    monkeypatch.setattr(
        __import__("maskar.nn.attention", fromlist=["_BACKENDS"])._BACKENDS["cudnn"],
        "fn",
        lambda *a: calls.append(1) or real(*a),
    )
    before = torch._C._get_sdp_priority_order()
    q = torch.randn(2, 4, 5, 16, dtype=torch.bfloat16)
    k = torch.randn(2, 4, 9, 16, dtype=torch.bfloat16)
    v = torch.randn(2, 4, 9, 16, dtype=torch.bfloat16)
    out = attention(q, k, v, None, scale=0.3)
    assert calls == [1]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3))
    assert torch._C._get_sdp_priority_order() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "lq,lk", [(1, 1), (4, 5), (256, 256), (256, 680), (4096, 4096)], ids=lambda n: str(n)
)
def test_gpu_cudnn_backend_equals_fp32_attention_and_runs_cudnn(monkeypatch, lq, lk):
    """The sampling passes' shapes (HMAR's per-scale, VAR's KV-cached: q against a slice of a
    static cache) against fp32 attention; on Hopper the large ones must run cuDNN's kernels."""
    from maskar.nn import attention_cudnn as ac

    monkeypatch.setattr(ac, "ENABLED", True)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, d = (16 if lq * lk < 2**20 else 2), 16, 64  # the fp32 reference's scores fit
    q = (
        torch.randn(b, lq, 3, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
        .unbind(2)[0]
        .transpose(1, 2)
    )
    cache = torch.randn(2, b, h, max(lk, 680) + 64, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = cache[0, :, :, :lk], cache[1, :, :, :lk]
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = attention(q, k, v, None, scale=0.125)
            torch.cuda.synchronize()
    ref = naive_attention(q.float(), k.float(), v.float(), None, scale=0.125)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    names = [e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if ac._hopper(q.device) and lq >= 256:
        assert any("cudnn" in n or "sdpa" in n and "flash" not in n for n in names), names[:20]
