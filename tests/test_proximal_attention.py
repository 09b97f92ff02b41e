"""PSA / SALA: the SDPA + bias formulation equals the official unfold formulation exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from maskar.nn.proximal_attention import (
    ProximalAttention2D,
    ProximalSelfAttention,
    SALAAttention2D,
    proximal_attention,
    psa_bias,
)


def unfold_psa(q, k, v, grid, kernel_size, dilation):
    """Reference: F.unfold k x k windows of K and V with zero padding; padded slots stay in
    the softmax (logit 0, value 0). q, k, v (B, H, L, D)."""
    b, nh, n, d = q.shape
    h, w = grid
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    pad = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)

    def windows(x):  # (B, H, L, D) -> (B*H, L, k*k, D)
        img = x.reshape(b * nh, h, w, d).permute(0, 3, 1, 2)
        cols = F.unfold(img, (kh, kw), dilation=(dh, dw), padding=pad)  # (BH, D*k*k, L)
        return cols.reshape(b * nh, d, kh * kw, n).permute(0, 3, 2, 1)

    kw_, vw = windows(k), windows(v)
    logits = torch.einsum("bld,blkd->blk", q.reshape(b * nh, n, d), kw_) / math.sqrt(d)
    out = torch.einsum("blk,blkd->bld", logits.softmax(-1), vw)
    return out.reshape(b, nh, n, d)


def window_loop_psa(q, k, v, grid, kernel_size, dilation):
    """Second reference, a plain loop: valid window keys plus (k*k - valid) exp(0) terms."""
    b, nh, n, d = q.shape
    h, w = grid
    r = kernel_size // 2
    out = torch.zeros_like(q)
    for i in range(h):
        for j in range(w):
            keys = [
                (i + dilation * a) * w + (j + dilation * c)
                for a in range(-r, r + 1)
                for c in range(-r, r + 1)
                if 0 <= i + dilation * a < h and 0 <= j + dilation * c < w
            ]
            qi = q[:, :, i * w + j]  # (B, H, D)
            logits = torch.einsum("bhd,bhkd->bhk", qi, k[:, :, keys]) / math.sqrt(d)
            missing = kernel_size**2 - len(keys)
            denom = logits.exp().sum(-1, keepdim=True) + missing
            out[:, :, i * w + j] = torch.einsum("bhk,bhkd->bhd", logits.exp() / denom, v[:, :, keys])
    return out


@pytest.mark.parametrize(
    ("grid", "kernel", "dilation"),
    [
        ((16, 16), 7, 1),  # the released setting: 16x16 grid, k 7, dilation 1
        ((8, 8), 7, 1),
        ((6, 5), 3, 2),
        ((9, 9), 5, 2),
        ((4, 4), 7, 1),  # window larger than the grid
        ((5, 7), (3, 5), (2, 1)),  # per-axis kernel and dilation
        ((3, 3), 1, 1),
    ],
)
def test_psa_matches_unfold_reference(grid, kernel, dilation):
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    got = proximal_attention(q, k, v, grid, kernel, dilation)
    torch.testing.assert_close(got, unfold_psa(q, k, v, grid, kernel, dilation), rtol=1e-10, atol=1e-12)


def test_psa_matches_window_loop_and_border_weighting():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 36, 4, generator=g, dtype=torch.float64) for _ in range(3))
    got = proximal_attention(q, k, v, (6, 6), 5, 1)
    torch.testing.assert_close(got, window_loop_psa(q, k, v, (6, 6), 5, 1), rtol=1e-10, atol=1e-12)
    # With q = 0 and v = 1 every valid key gets weight 1 / k^2: a corner keeps 9/25 of the mass.
    ones = torch.ones(1, 1, 36, 4, dtype=torch.float64)
    out = proximal_attention(torch.zeros_like(ones), torch.randn_like(ones), ones, (6, 6), 5, 1)
    assert out[0, 0, 0, 0].item() == pytest.approx(9 / 25)
    assert out[0, 0, 14, 0].item() == pytest.approx(1.0)  # (2, 2): full window inside


def test_psa_bias_layout():
    bias = psa_bias((4, 4), 3, 1)
    assert bias.shape == (16, 24)  # 16 keys + zero key, padded to 24
    assert torch.isinf(bias[:, 17:]).all()
    assert (bias[5, :16] == 0).sum() == 9 and torch.isinf(bias[5, 16])  # interior: nothing missing
    assert bias[0, 16].item() == pytest.approx(math.log(5))  # corner: 4 valid, 5 padded
    with pytest.raises(ValueError, match="odd"):
        psa_bias((4, 4), 4, 1)


def test_psa_module_matches_unfold_in_fp32_and_has_official_names():
    torch.manual_seed(0)
    attn = ProximalSelfAttention(32, 4, kernel_size=7, dilation=1)
    assert sorted(attn.state_dict()) == sorted(
        f"na.{p}_proj.{t}" for p in ("q", "k", "v", "out") for t in ("weight", "bias")
    )
    x = torch.randn(2, 64, 32)
    na = attn.na
    q, k, v = (na.q_proj(x), na.k_proj(x), na.v_proj(x))
    heads = [t.reshape(2, 64, 4, 8).transpose(1, 2) for t in (q, k, v)]
    ref = unfold_psa(*heads, (8, 8), 7, 1).transpose(1, 2).reshape(2, 64, 32)
    torch.testing.assert_close(attn(x, (8, 8)), na.out_proj(ref), rtol=1e-5, atol=1e-5)
    # gradients flow through the bias formulation
    x.requires_grad_(True)
    attn(x, (8, 8)).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_fused_qkv_projection_gives_the_separate_projections_result(monkeypatch, backend):
    """MASKAR_PSA_QKV: in inference q, k and v come from one matmul on the concatenated weights
    (strided views into it); the same values as the three projections, also for SALA."""
    from maskar.nn.attention import set_backend
    from maskar.nn.proximal_attention import ProximalAttention2D

    torch.manual_seed(0)
    psa, sala = ProximalSelfAttention(32, 4, kernel_size=5), SALAAttention2D(32, 4, 5, 1)
    x, cond = torch.randn(2, 64, 32), torch.randn(2, 64, 32)
    with torch.no_grad():
        for m in (psa, sala):
            set_backend(m, backend)
        want = (psa(x, (8, 8)), sala(x, (8, 8), cond))
        monkeypatch.setattr(ProximalAttention2D, "fused_qkv", True)
        got = (psa(x, (8, 8)), sala(x, (8, 8), cond))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    x.requires_grad_(True)  # under autograd the separate projections run
    psa(x, (8, 8)).sum().backward()
    assert psa.na.q_proj.weight.grad is not None


def test_sala_matches_reference():
    torch.manual_seed(0)
    dim, heads, grid = 16, 2, (6, 6)
    sala = SALAAttention2D(dim, heads, kernel_size=3, dilation=2)
    assert sala.gate_proj.weight.abs().sum() == 0 and (sala.gate_proj.bias == -2).all()
    with torch.no_grad():  # a non-trivial gate
        sala.gate_proj.weight.normal_(0, 0.2)
    x, cond = torch.randn(2, 36, dim), torch.randn(2, 36, dim)

    def split(t):
        return t.reshape(2, -1, heads, dim // heads).transpose(1, 2)

    def merge(t):
        return t.transpose(1, 2).reshape(2, -1, dim)

    qkv_loc = (split(sala.q_proj_loc(x)), split(sala.k_proj_loc(x)), split(sala.v_proj_loc(x)))
    loc = unfold_psa(*qkv_loc, grid, 3, 2)
    grid_cond = cond.transpose(1, 2).reshape(2, dim, 6, 6)
    anchors = sala.anchor_norm(F.avg_pool2d(grid_cond, 2).flatten(2).transpose(1, 2))  # (2, 9, dim)
    qa, ka, va = split(sala.q_proj_anc(x)), split(sala.k_proj_anc(anchors)), split(sala.v_proj_anc(anchors))
    anc = ((qa @ ka.transpose(-1, -2)) / math.sqrt(dim // heads)).softmax(-1) @ va
    o_loc, o_anc = merge(loc), merge(anc)
    gate = torch.sigmoid(sala.gate_proj(torch.cat([x, o_loc, o_anc], -1)))
    ref = sala.out_proj(o_loc + gate * o_anc)
    torch.testing.assert_close(sala(x, grid, cond), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cond"):
        sala(x, grid)


def test_rectangular_and_size_errors():
    attn = ProximalAttention2D(8, 2, kernel_size=3)
    assert attn(torch.randn(1, 12, 8), (3, 4)).shape == (1, 12, 8)
    with pytest.raises(ValueError, match="grid"):
        attn(torch.randn(1, 10, 8), (3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_qkv_through_the_kernel(monkeypatch):
    """MASKAR_PSA_QKV on CUDA: the kernel reads q, k, v as strided views of one (B, L, 3C) matmul
    output; CASMAR-B's DiT attention shapes under bf16 autocast."""
    from maskar.nn.proximal_attention import ProximalAttention2D

    torch.manual_seed(0)
    attn = ProximalSelfAttention(512, 8, kernel_size=7).cuda()
    x = torch.randn(16, 256, 512, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        want = attn(x, (16, 16)).float()
        monkeypatch.setattr(ProximalAttention2D, "fused_qkv", True)
        got = attn(x, (16, 16)).float()
    err = float((got - want).abs().max() / want.abs().max())
    print(f"fused qkv vs separate projections (bf16): rel max {err:.2e}")
    assert err <= 1e-2
