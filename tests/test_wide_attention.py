"""The tokenizers' wide-head attention as two matmuls (maskar.tokenizers.wide_attention) against
SDPA: the op's steps on the CPU, the AttnBlock routed through it, chunking, compile, and on a GPU
the cuBLAS path at the VQ-VAE's 640-wide head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskar.tokenizers import wide_attention
from maskar.tokenizers.common import AttnBlock


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def qkv(b: int, n: int, d: int, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator(device=device).manual_seed(0)
    return [(2 * torch.randn(b, 1, n, d, generator=g, device=device)).to(dtype) for _ in range(3)]


def test_op_matches_sdpa_in_float32():
    q, k, v = qkv(3, 50, 320)
    want = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)))
    got = wide_attention.attention(q, k, v)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # one rounding of P to bf16 and one of the output: a few bf16 ulps of the output
    assert rel(got, want) < 2e-2, rel(got, want)
    bf16_sdpa = F.scaled_dot_product_attention(q, k, v)
    assert rel(got, want) <= 2 * rel(bf16_sdpa, want) + 4e-3


def test_op_splits_the_batch_without_changing_the_result(monkeypatch):
    q, k, v = qkv(5, 40, 272)
    whole = wide_attention.attention(q, k, v)
    monkeypatch.setattr(wide_attention, "MAX_SCORE_BYTES", 2 * 40 * 40 * 4)  # two images a chunk
    assert torch.equal(wide_attention.attention(q, k, v), whole)


def test_applies_only_to_wide_low_precision_cuda_inference(monkeypatch):
    monkeypatch.setattr(wide_attention, "ENABLED", True)
    q = torch.zeros(1, 1, 4, 640, dtype=torch.bfloat16)
    assert not wide_attention.applies(q)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    with torch.no_grad():
        assert wide_attention.applies(q)
        assert not wide_attention.applies(q[..., :256])  # SDPA's fused kernels take it
        assert not wide_attention.applies(q.float())
    assert not wide_attention.applies(q)  # autograd on
    monkeypatch.setattr(wide_attention, "ENABLED", False)
    with torch.no_grad():
        assert not wide_attention.applies(q)


def test_attn_block_through_the_op_and_compiled(monkeypatch):
    torch.manual_seed(0)
    block = AttnBlock(288, groups=32).eval()
    x = torch.randn(2, 288, 6, 5)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        sdpa = block(x)
        monkeypatch.setattr(wide_attention, "applies", lambda q: True)
        ours = block(x)
        torch._dynamo.reset()
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    assert not torch.equal(ours, sdpa)  # the op ran
    assert rel(ours, sdpa) < 2e-2
    # traced through the custom op whole (fullgraph); aot_eager decomposes the group norm around it
    assert rel(compiled, ours) < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_wide_head_at_the_vq_vae_width(dtype):
    """VAR's VQ-VAE at 1024 px: one 640-wide head over 64 x 64 positions, 2 images."""
    q, k, v = qkv(2, 4096, 640, dtype, "cuda")
    want = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)))
    with torch.no_grad():
        got = wide_attention.attention(q, k, v)
        sdpa = F.scaled_dot_product_attention(q, k, v)
    print(f"{dtype}: ours {rel(got, want):.2e}, SDPA (memory-efficient) {rel(sdpa, want):.2e} against fp32")
    assert rel(got, want) <= 2 * rel(sdpa, want) + 1e-3


def test_flop_counter_counts_the_fused_ops():
    """The bench's FLOP counts include the wide-head op and cuBLASLt's GELU epilogue
    (maskar.bench.flops): 4 B L^2 D for the attention, addmm's 2 M N K for the epilogue."""
    from torch.utils.flop_counter import FlopCounterMode

    import maskar.bench.flops  # noqa: F401

    def count(fn) -> int:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    q, k, v = qkv(2, 24, 272)
    assert count(lambda: wide_attention.attention(q, k, v)) == 2 * 2 * 24 * 24 * (272 + 272)  # q k^T, P v
    x, w, b = torch.randn(5, 8), torch.randn(8, 12), torch.randn(12)
    assert count(lambda: torch.ops.aten._addmm_activation(b, x, w, use_gelu=True)) == \
        count(lambda: torch.addmm(b, x, w)) == 2 * 5 * 12 * 8  # fmt: skip
