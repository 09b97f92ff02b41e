"""The ``fa4`` backend's real kernels (FlashAttention-4 on an sm90 GPU) against fp32 attention.

Skipped where FlashAttention-4 or a Hopper GPU is missing (tests/test_attention_fa4.py checks the
plumbing on the CPU with a stand-in). On fresh random inputs of both scale patterns, bf16, the
output and the three gradients must be as close to an fp32 reference as the bf16 SDPA path is
(within 1.5× plus a small floor: both round to bf16, FlashAttention-4 adds dq with atomics), and
a CUDA-graph replay of forward + backward must give the eager call's gradients.
"""

from __future__ import annotations

import pytest
import torch

from maskar.nn.attention import ScalePattern, attention, available_backends, sdpa_attention

pytestmark = pytest.mark.gpu

SIDES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # 256 px: L 680


def _fa4_ready() -> str | None:
    """Why the real kernels cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs CUDA"
    if torch.cuda.get_device_capability()[0] != 9:
        return "FlashAttention-4's sm90 kernels need a Hopper GPU"
    if "fa4" not in available_backends():
        return "FlashAttention-4 is not installed (pip install 'maskar[fa4]')"
    return None


@pytest.fixture(scope="module")
def cuda_fa4():
    why = _fa4_ready()
    if why:
        pytest.skip(why)
    return torch.device("cuda")


def _grads(fn, buf, dout):
    buf.grad = None
    q, k, v = (buf[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach().float()] + [buf.grad[:, :, i].transpose(1, 2).float() for i in range(3)]


def _rel(a, ref):
    return float((a - ref).abs().max() / ref.abs().max())


# (kind, MASKAR_FA4_ONE_CALL, MASKAR_FA4_LAST_DENSE)
CASES = [("block_diagonal", False, False), ("block_causal", False, False), ("block_causal", True, False),
         ("block_causal", True, True)]  # fmt: skip


@pytest.mark.parametrize(("kind", "one_call", "last_dense"), CASES)
def test_fa4_as_close_to_fp32_as_sdpa(cuda_fa4, kind, one_call, last_dense, monkeypatch):
    """one_call: VAR's pattern as one masked, block-sparse call; last_dense: its backward's last
    scale as a dense call."""
    import maskar.nn.attention_fa4 as fa4_backend

    monkeypatch.setattr(fa4_backend, "ONE_CALL", one_call)
    monkeypatch.setattr(fa4_backend, "LAST_DENSE", last_dense)
    p = ScalePattern.from_sides(kind, SIDES)
    g = torch.Generator(device=cuda_fa4).manual_seed(1234)
    B, H, D = 3, 4, 64
    buf = torch.randn(B, p.total, 3, H, D, device=cuda_fa4, generator=g).bfloat16().requires_grad_()
    dout = torch.randn(B, H, p.total, D, device=cuda_fa4, generator=g).bfloat16()
    ref32 = buf.detach().float().requires_grad_()
    ref = _grads(lambda q, k, v: sdpa_attention(q, k, v, p), ref32, dout.float())
    fa4 = _grads(lambda q, k, v: attention(q, k, v, p, backend="fa4"), buf, dout)
    sdpa = _grads(lambda q, k, v: sdpa_attention(q, k, v, p), buf, dout)
    for name, a, s, r in zip(("out", "dq", "dk", "dv"), fa4, sdpa, ref, strict=True):
        err, base = _rel(a, r), _rel(s, r)
        assert err <= 1.5 * base + 2e-3, f"{kind} {name}: fa4 {err:.2e} against bf16 SDPA's {base:.2e}"


@pytest.mark.parametrize(("kind", "one_call", "last_dense"), [CASES[0], CASES[2], CASES[3]])
def test_fa4_graph_replay_equals_eager(cuda_fa4, kind, one_call, last_dense, monkeypatch):
    """Forward + backward captured in one CUDA graph (after a warm-up on a side stream, as the
    training step does) replays the eager gradients, on new inputs copied into the same buffer."""
    import maskar.nn.attention_fa4 as fa4_backend

    monkeypatch.setattr(fa4_backend, "ONE_CALL", one_call)
    monkeypatch.setattr(fa4_backend, "LAST_DENSE", last_dense)
    p = ScalePattern.from_sides(kind, SIDES)
    B, H, D = 2, 4, 64
    leaf = torch.randn(B, p.total, 3, H, D, device=cuda_fa4).bfloat16().requires_grad_()
    dout = torch.randn(B, H, p.total, D, device=cuda_fa4).bfloat16()

    def step():
        q, k, v = (leaf[:, :, i].transpose(1, 2) for i in range(3))
        return torch.autograd.grad(attention(q, k, v, p, backend="fa4"), leaf, dout)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grad = step()
    with torch.no_grad():
        leaf.copy_(torch.randn_like(leaf))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    # dq is summed with atomics: equal up to the order of the fp32 additions
    assert _rel(static_grad.float(), eager.float()) < 1e-2
    assert static_grad.abs().max() > 0
