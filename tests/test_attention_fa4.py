"""The ``fa4`` backend's plumbing on the CPU, with FlashAttention-4's two entry points stood in
by an exact fp64 implementation of their contract (docs of ``flash_attn_varlen_func``: batched
q (B, Lq, H, D) with lse (B, H, Lq), packed q (total, H, D) with cu_seqlens and lse (H, total)).

What this checks: the packing of the scale patterns into one variable-length call (HMAR) or one
call per scale (VAR), the custom ops' fake shapes (``opcheck``), their autograd (the gradients of
every pattern against the masked SDPA reference) and a compiled call without graph breaks. The
real kernels are checked on the GPU by tests/test_attention_fa4_gpu.py and scripts/gpu/fa4_probe.py.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from maskar.nn.attention import ScalePattern, sdpa_attention


def _sequences(q, k, cu_q, cu_k):
    """[(q rows, k rows)] per sequence, each (L, H, D)."""
    if cu_q is None:
        return [(q[b], k[b]) for b in range(q.shape[0])]
    return [(q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]]) for i in range(len(cu_q) - 1)]


def _attend(q, k, v, scale):  # (L, H, D) -> out (L, H, D), lse (H, L)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()), s.logsumexp(-1)


def _fake_fwd(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              softmax_scale=None, return_lse=False, **_):  # fmt: skip
    vs = [b for _, b in _sequences(v, v, cu_seqlens_q, cu_seqlens_k)]
    qks = _sequences(q, k, cu_seqlens_q, cu_seqlens_k)
    res = [_attend(qi, ki, vi, softmax_scale) for (qi, ki), vi in zip(qks, vs, strict=True)]
    if cu_seqlens_q is None:
        out, lse = torch.stack([o for o, _ in res]), torch.stack([s for _, s in res])
    else:
        out, lse = torch.cat([o for o, _ in res]), torch.cat([s for _, s in res], dim=1)
    return out.to(q.dtype), lse.float(), None, None, None


def _fake_bwd(q, k, v, out, dout, lse, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None, **_):
    """The attention backward by its formulas (custom ops run below autograd)."""
    seqs = zip(_sequences(q, k, cu_seqlens_q, cu_seqlens_k), _sequences(v, dout, cu_seqlens_k, cu_seqlens_q))
    grads = []
    for (qi, ki), (vi, doi) in seqs:
        qi, ki, vi, doi = (x.double() for x in (qi, ki, vi, doi))
        p = (torch.einsum("qhd,khd->hqk", qi, ki) * softmax_scale).softmax(-1)
        oi = torch.einsum("hqk,khd->qhd", p, vi)
        dp = torch.einsum("qhd,khd->hqk", doi, vi)
        ds = p * (dp - (doi * oi).sum(-1).transpose(0, 1)[..., None])
        grads.append((
            torch.einsum("hqk,khd->qhd", ds, ki) * softmax_scale,
            torch.einsum("hqk,qhd->khd", ds, qi) * softmax_scale,
            torch.einsum("hqk,qhd->khd", p, doi),
        ))  # fmt: skip
    join = torch.stack if cu_seqlens_q is None else torch.cat
    return tuple(join([g[i] for g in grads]).to(q.dtype) for i in range(3))


@pytest.fixture(scope="module")
def fa4():
    """maskar.nn.attention_fa4 imported against the stand-in (its custom ops register once)."""
    names = ("flash_attn", "flash_attn.cute", "flash_attn.cute.interface")
    saved = {n: sys.modules.get(n) for n in names}
    from maskar.nn import attention as attn

    registered_before = "fa4" in attn._BACKENDS
    if "maskar.nn.attention_fa4" not in sys.modules:
        iface = types.ModuleType("flash_attn.cute.interface")
        iface._flash_attn_fwd, iface._flash_attn_bwd = _fake_fwd, _fake_bwd
        for n in names[:2]:
            sys.modules[n] = types.ModuleType(n)
        sys.modules[names[2]] = iface
    import maskar.nn.attention_fa4 as mod

    real = mod._flash_attn_fwd, mod._flash_attn_bwd
    mod._flash_attn_fwd, mod._flash_attn_bwd = _fake_fwd, _fake_bwd
    yield mod
    mod._flash_attn_fwd, mod._flash_attn_bwd = real
    # the stand-in must not stay a registered backend for the tests after these
    from maskar.nn import attention as attn

    if not registered_before:
        attn._BACKENDS.pop("fa4", None)
        attn._BY_PRIORITY[:] = [b for b in attn._BY_PRIORITY if b.name != "fa4"]
    for n, m in saved.items():
        if m is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = m


def _qkv(B, L, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(B, L, 3, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    return buf, [buf[:, :, i].transpose(1, 2) for i in range(3)]  # (B, H, L, D) views, as the model's


@pytest.mark.parametrize("kind", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("lengths", [(1, 4, 9, 16), (1, 4, 9, 16, 64, 100)])
def test_patterns_match_sdpa(fa4, kind, lengths):
    p = ScalePattern(kind, lengths)
    buf, (q, k, v) = _qkv(2, p.total)
    dout = torch.randn(2, 2, p.total, 8, dtype=torch.float64)
    out = fa4.fa4_attention(q, k, v, p)
    (out * dout).sum().backward()
    got = buf.grad.clone()
    buf.grad = None
    ref = sdpa_attention(q, k, v, p)
    (ref * dout).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got, buf.grad)


def test_dense_with_longer_keys(fa4):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = fa4.fa4_attention(q, k, v, None, scale=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, ref)
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    rq, rk, rv = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(a, b)


def test_custom_ops_fake_shapes(fa4):
    """opcheck: the fake implementations' shapes and strides equal the real ones, batched and packed."""
    q, k, v = (torch.randn(2, 7, 3, 8, dtype=torch.float32) for _ in range(3))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(fa4.fa4_fwd, (q, k, v, [], 0.35), test_utils=checks)
    qp, kp, vp = (x.reshape(14, 3, 8) for x in (q, k, v))  # sequences 3, 4, 3, 4
    torch.library.opcheck(fa4.fa4_fwd, (qp, kp, vp, [3, 4], 0.35), test_utils=checks)
    out, lse = fa4.fa4_fwd(qp, kp, vp, [3, 4], 0.35)
    assert lse.shape == (3, 14) and out.shape == qp.shape
    cu = fa4._cu_seqlens([3, 4], 14, qp.device)
    assert cu.tolist() == [0, 3, 7, 10, 14] and cu.dtype == torch.int32
    args = (qp, kp, vp, out, torch.randn_like(out), lse, [3, 4], 0.35)
    torch.library.opcheck(fa4.fa4_bwd, args, test_utils=checks)
    with pytest.raises(ValueError, match="whole repeats"):
        fa4._cu_seqlens([3, 4], 15, qp.device)


def test_compiles_without_graph_breaks(fa4):
    p = ScalePattern("block_diagonal", (1, 4, 9, 16))
    buf, (q, k, v) = _qkv(2, p.total)

    def f(q, k, v):
        return fa4.fa4_attention(q, k, v, p).square().sum()

    explain = torch._dynamo.explain(f)(q, k, v)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    (gc,) = torch.autograd.grad(compiled(q, k, v), buf)
    (ge,) = torch.autograd.grad(f(q, k, v), buf)
    torch.testing.assert_close(gc, ge)


def test_auto_takes_it_only_where_scales_would(fa4):
    """auto's condition is the scales backend's (long-sequence fp16 / bf16 training on CUDA), and
    fa4 is ahead of scales there: both measured at 1024 px (docs/benchmarks.md)."""
    from maskar.nn import attention as attn
    from maskar.nn.attention_scales import picked_by_auto

    b = attn._BACKENDS["fa4"]
    assert b.auto and b.auto_when is picked_by_auto
    assert b.priority < attn._BACKENDS["scales"].priority


def test_check_backend_refuses_it_on_the_cpu(fa4):
    """Installed (the stand-in here), it still cannot run on the CPU: refused before any work."""
    from maskar.config_base import ConfigError
    from maskar.nn.attention import check_backend

    with pytest.raises(ConfigError, match="'fa4' does not run on the CPU"):
        check_backend("fa4", "cpu")
