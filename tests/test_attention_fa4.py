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
from typing import NamedTuple

import pytest
import torch

from maskar.nn.attention import ScalePattern, sdpa_attention


def _sequences(q, k, cu_q, cu_k):
    """[(q rows, k rows)] per sequence, each (L, H, D)."""
    if cu_q is None:
        return [(q[b], k[b]) for b in range(q.shape[0])]
    return [(q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]]) for i in range(len(cu_q) - 1)]


def _attend(q, k, v, scale, visible=None):  # (L, H, D) -> out (L, H, D), lse (H, L)
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.double()), s.logsumexp(-1)


class _SparseMaps(NamedTuple):  # FA4's BlockSparseTensorsTorch, the fields maskar fills
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    cu_total_m_blocks: torch.Tensor | None = None
    cu_block_idx_offsets: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None


FWD_BLOCK_TAKEN = (4, 4)  # the stand-in's tile: other sparse block sizes are refused, as FA4 does


def _visible(maps, aux_tensors, Lq, Lk, backward):
    """(Lq, Lk) bool from the tile maps alone: a full tile all visible, a partial one where the
    block-causal mask_mod's rule (key < the query's end, aux_tensors[0]) holds, the rest skipped.
    The maps broadcast over (B, H) with leading dims of 1."""
    ends = aux_tensors[0][:Lq]  # padded past the sequence for the kernel's last tile
    bm, bn = maps.block_size
    vis = torch.zeros(Lq, Lk, dtype=torch.bool)
    cols = torch.arange(Lk)
    for cnt, idx, full in ((maps.mask_block_cnt, maps.mask_block_idx, False),
                           (maps.full_block_cnt, maps.full_block_idx, True)):  # fmt: skip
        cnt, idx = cnt[0, 0], idx[0, 0]
        for r in range(cnt.numel()):
            for j in idx[r, : int(cnt[r])].tolist():
                m, n = (j, r) if backward else (r, j)
                rs, cs = slice(m * bm, (m + 1) * bm), slice(n * bn, (n + 1) * bn)
                vis[rs, cs] = True if full else cols[cs][None, :] < ends[rs].long()[:, None]
    return vis


def _check_block(maps, backward):
    if maps is not None and not backward and tuple(maps.block_size) != FWD_BLOCK_TAKEN:
        raise ValueError(f"Block sparsity requires block_size={FWD_BLOCK_TAKEN}, got {maps.block_size}")


def _fake_fwd(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              softmax_scale=None, return_lse=False, mask_mod=None, aux_tensors=None,
              block_sparse_tensors=None, **_):  # fmt: skip
    _check_block(block_sparse_tensors, False)
    vis = None
    if block_sparse_tensors is not None:
        assert mask_mod == "block_causal_mod" and cu_seqlens_q is None
        vis = _visible(block_sparse_tensors, aux_tensors, q.shape[1], k.shape[1], backward=False)
    vs = [b for _, b in _sequences(v, v, cu_seqlens_q, cu_seqlens_k)]
    qks = _sequences(q, k, cu_seqlens_q, cu_seqlens_k)
    res = [_attend(qi, ki, vi, softmax_scale, vis) for (qi, ki), vi in zip(qks, vs, strict=True)]
    if cu_seqlens_q is None:
        out, lse = torch.stack([o for o, _ in res]), torch.stack([s for _, s in res])
    else:
        out, lse = torch.cat([o for o, _ in res]), torch.cat([s for _, s in res], dim=1)
    return out.to(q.dtype), lse.float(), None, None, None


def _fake_bwd(q, k, v, out, dout, lse, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None,
              mask_mod=None, aux_tensors=None, block_sparse_tensors=None, dq=None, **_):  # fmt: skip
    """The attention backward by its formulas (custom ops run below autograd); dq, where given,
    is written in place and returned, as FA4 does."""
    assert lse.shape[-1] == (q.shape[1] if cu_seqlens_q is None else q.shape[0])
    assert out.shape == q.shape and dout.shape == q.shape
    grads = _bwd_formulas(q, k, v, dout, softmax_scale, cu_seqlens_q, cu_seqlens_k, mask_mod, aux_tensors,
                          block_sparse_tensors)  # fmt: skip
    if dq is not None:
        assert dq.shape == q.shape
        grads = (dq.copy_(grads[0]), *grads[1:])
    return grads


def _bwd_formulas(q, k, v, dout, softmax_scale, cu_seqlens_q, cu_seqlens_k, mask_mod, aux_tensors,
                  block_sparse_tensors):  # fmt: skip
    vis = None
    if block_sparse_tensors is not None:
        assert mask_mod == "block_causal_mod" and cu_seqlens_q is None
        vis = _visible(block_sparse_tensors, aux_tensors, q.shape[1], k.shape[1], backward=True)
    seqs = zip(_sequences(q, k, cu_seqlens_q, cu_seqlens_k), _sequences(v, dout, cu_seqlens_k, cu_seqlens_q))
    grads = []
    for (qi, ki), (vi, doi) in seqs:
        qi, ki, vi, doi = (x.double() for x in (qi, ki, vi, doi))
        s = torch.einsum("qhd,khd->hqk", qi, ki) * softmax_scale
        p = (s if vis is None else s.masked_fill(~vis, float("-inf"))).softmax(-1)
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
    sparsity = types.ModuleType("flash_attn.cute.block_sparsity")
    sparsity.BlockSparseTensorsTorch = _SparseMaps
    saved[sparsity.__name__] = sys.modules.get(sparsity.__name__)
    sys.modules[sparsity.__name__] = sparsity
    import maskar.nn.attention_fa4 as mod

    real = mod._flash_attn_fwd, mod._flash_attn_bwd, mod._block_causal_mod
    mod._flash_attn_fwd, mod._flash_attn_bwd = _fake_fwd, _fake_bwd
    mod._block_causal_mod = lambda: "block_causal_mod"  # the real one is a CuTe DSL function
    mod.FWD_BLOCKS, blocks = ((8, 4), FWD_BLOCK_TAKEN), mod.FWD_BLOCKS  # the first refused
    mod.BWD_BLOCKS, bwd_blocks = ((4, 4),), mod.BWD_BLOCKS
    mod._BC.clear()
    yield mod
    mod._flash_attn_fwd, mod._flash_attn_bwd, mod._block_causal_mod = real
    mod.FWD_BLOCKS, mod.BWD_BLOCKS = blocks, bwd_blocks
    mod._BC.clear()
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


def _matches_sdpa(fa4, p: ScalePattern, seed: int = 0) -> None:
    """The backend's output and gradients under ``p`` equal masked SDPA's (fp64)."""
    buf, (q, k, v) = _qkv(2, p.total, seed=seed)
    dout = torch.randn(2, 2, p.total, 8, dtype=torch.float64)
    out = fa4.fa4_attention(q, k, v, p)
    (out * dout).sum().backward()
    got = buf.grad.clone()
    buf.grad = None
    ref = sdpa_attention(q, k, v, p)
    (ref * dout).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got, buf.grad)


@pytest.mark.parametrize("kind", ["block_diagonal", "block_causal"])
@pytest.mark.parametrize("lengths", [(1, 4, 9, 16), (1, 4, 9, 16, 64, 100)])
def test_patterns_match_sdpa(fa4, kind, lengths, monkeypatch):
    """HMAR's varlen call; VAR's per-scale calls (MASKAR_FA4_ONE_CALL=0)."""
    monkeypatch.setattr(fa4, "ONE_CALL", False)
    _matches_sdpa(fa4, ScalePattern(kind, lengths))


@pytest.mark.parametrize("lengths", [(1, 4, 9, 16), (1, 4, 9, 16, 25, 36), (1, 3, 5)])
def test_block_causal_one_call_matches_sdpa(fa4, lengths, monkeypatch):
    """MASKAR_FA4_ONE_CALL: one masked call whose tile maps the stand-in turns back into the
    visible pairs (a tile wrongly marked full, partial or skipped changes the result), against
    the masked SDPA reference; the refused first block size falls through to the accepted one."""
    monkeypatch.setattr(fa4, "ONE_CALL", True)
    monkeypatch.setattr(fa4, "LAST_DENSE", False)
    _matches_sdpa(fa4, ScalePattern("block_causal", lengths), seed=3)
    state = fa4._BC[(lengths, "cpu")]
    assert state[("block", False)] == FWD_BLOCK_TAKEN and state[("block", True)] == (4, 4)


@pytest.mark.parametrize("lengths", [(1, 4, 9, 16), (1, 4, 9, 16, 25, 36), (1, 3, 5), (2, 5)])
def test_block_causal_last_dense_matches_sdpa(fa4, lengths, monkeypatch):
    """MASKAR_FA4_LAST_DENSE: the one call's backward as the last scale dense plus the earlier
    scales masked, their dq rows written into one buffer and dk / dv summed over the shared keys."""
    monkeypatch.setattr(fa4, "ONE_CALL", True)
    monkeypatch.setattr(fa4, "LAST_DENSE", True)
    calls = []
    real = fa4._flash_attn_bwd
    monkeypatch.setattr(fa4, "_flash_attn_bwd", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    _matches_sdpa(fa4, ScalePattern("block_causal", lengths), seed=5)
    # a masked call over the earlier scales and one dense call, both writing into a dq buffer
    assert len(calls) == 2 and sum(kw.get("mask_mod") is not None for kw in calls) == 1
    assert all(kw["dq"] is not None for kw in calls)
    assert fa4._BC[(lengths[:-1], "cpu")][("block", True)] == (4, 4)


def test_block_causal_last_dense_one_scale(fa4, monkeypatch):
    """A pattern of one scale has nothing before its last: the masked backward alone."""
    monkeypatch.setattr(fa4, "ONE_CALL", True)
    monkeypatch.setattr(fa4, "LAST_DENSE", True)
    _matches_sdpa(fa4, ScalePattern("block_causal", (6,)), seed=2)


def test_block_causal_one_call_op_shapes(fa4, monkeypatch):
    monkeypatch.setattr(fa4, "LAST_DENSE", False)
    q, k, v = (torch.randn(2, 14, 3, 8, dtype=torch.float32) for _ in range(3))
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(fa4.fa4_block_causal_fwd, (q, k, v, [1, 4, 9], 0.35), test_utils=checks)
    out, lse = fa4.fa4_block_causal_fwd(q, k, v, [1, 4, 9], 0.35)
    assert lse.shape == (2, 3, 14) and out.shape == q.shape
    args = (q, k, v, out, torch.randn_like(out), lse, [1, 4, 9], 0.35)
    torch.library.opcheck(fa4.fa4_block_causal_bwd, args, test_utils=checks)
    monkeypatch.setattr(fa4, "LAST_DENSE", True)
    torch.library.opcheck(fa4.fa4_block_causal_bwd, args, test_utils=checks)


def test_block_causal_one_call_refused_everywhere(fa4, monkeypatch):
    monkeypatch.setattr(fa4, "FWD_BLOCKS", ((8, 4),))
    q, k, v = (torch.randn(1, 5, 2, 8) for _ in range(3))
    with pytest.raises(ValueError, match=r"no block size accepted: \(8, 4\): Block sparsity requires"):
        fa4.fa4_block_causal_fwd(q, k, v, [2, 3], 0.35)


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


@pytest.mark.parametrize(
    ("kind", "one_call", "last_dense"),
    [("block_diagonal", False, False), ("block_causal", True, False), ("block_causal", True, True)],
)
def test_compiles_without_graph_breaks(fa4, kind, one_call, last_dense, monkeypatch):
    """Both single-call paths (HMAR's varlen call; VAR's under MASKAR_FA4_ONE_CALL, with either
    backward) trace whole."""
    monkeypatch.setattr(fa4, "ONE_CALL", one_call)
    monkeypatch.setattr(fa4, "LAST_DENSE", last_dense)
    p = ScalePattern(kind, (1, 4, 9, 16))
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
