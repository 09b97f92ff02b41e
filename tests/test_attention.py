import pytest
import torch

from maskar.nn.attention import (
    ScalePattern,
    attention,
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
