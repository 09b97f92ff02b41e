"""maskar.nn.linear_gelu: fc1 + tanh GELU with the GELU in cuBLASLt's epilogue (opt-in, CUDA
inference). CPU tests: the switch and the conditions keep every other path unchanged. GPU tests
(``-m gpu``): the fused path against the two-kernel one, eager, compiled and in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskar.nn import linear_gelu
from maskar.nn.blocks import FFN
from maskar.nn.vit import Mlp

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def enabled(monkeypatch):
    monkeypatch.setattr(linear_gelu, "ENABLED", True)


def tanh_mlp(width: int = 32) -> Mlp:
    mlp = Mlp(width, 4 * width)
    mlp.act = nn.GELU(approximate="tanh")
    return mlp


def test_off_by_default_and_never_on_the_cpu(enabled):
    x = torch.randn(3, 5, 32)
    assert not linear_gelu.fusable(x)  # a CPU tensor, though switched on
    mlp, ffn = tanh_mlp(), FFN(32, 128)
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")))
        assert torch.equal(ffn(x), ffn.fc2(F.gelu(ffn.fc1(x), approximate="tanh")))
        assert torch.equal(linear_gelu.linear_gelu_tanh(mlp.fc1, x), F.gelu(mlp.fc1(x), approximate="tanh"))


def test_default_switch_is_per_layer(monkeypatch):
    """Unset: each layer's default (the DiT MLP's on, the others' off); 1 / 0: on / off for all."""
    import importlib

    monkeypatch.delenv("MASKAR_FUSED_GELU", raising=False)
    assert importlib.reload(linear_gelu).ENABLED is None
    assert linear_gelu.epilogue_on(True) and not linear_gelu.epilogue_on(False)
    monkeypatch.setenv("MASKAR_FUSED_GELU", "1")
    assert importlib.reload(linear_gelu).ENABLED is True and linear_gelu.epilogue_on(False)
    monkeypatch.setenv("MASKAR_FUSED_GELU", "0")
    assert importlib.reload(linear_gelu).ENABLED is False and not linear_gelu.epilogue_on(True)
    monkeypatch.delenv("MASKAR_FUSED_GELU")
    importlib.reload(linear_gelu)


def test_layer_defaults():
    """CASMAR's DiT MLP and VAR / HMAR's FFN take the epilogue by default, MAR's / CASMAR's ViT
    MLPs (exact GELU) do not."""
    from maskar.models.casmar import DiTBlock

    assert DiTBlock(32, 2, 4.0, "psa", 3, 1).mlp.gelu_epilogue is True
    assert Mlp(32, 128).gelu_epilogue is False
    assert FFN(32, 128).gelu_epilogue is True


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["autocast-bf16", "fp16"])
def test_gpu_fused_equals_two_kernels_to_rounding(enabled, mode):
    torch.manual_seed(0)
    mlp = tanh_mlp(512).cuda()
    x = torch.randn(8, 256, 512, device="cuda")
    if mode == "fp16":
        mlp, x = mlp.half(), x.half()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "autocast-bf16")
    with torch.no_grad(), ctx:
        assert linear_gelu.fusable(x)
        fused = linear_gelu.linear_gelu_tanh(mlp.fc1, x)
        ref = F.gelu(mlp.fc1(x), approximate="tanh")
        out, out_ref = mlp(x), mlp.fc2(ref)
    print(f"{mode}: fc1+GELU rel max {_rel(fused, ref):.3g}, Mlp rel max {_rel(out, out_ref):.3g}")
    assert fused.dtype == ref.dtype and fused.shape == ref.shape
    assert _rel(fused, ref) < 2e-2 and _rel(out, out_ref) < 2e-2
    with torch.enable_grad():  # autograd: the two-kernel path, exactly
        assert not linear_gelu.fusable(x)


@gpu
@needs_cuda
def test_gpu_fused_under_compile_and_in_a_cuda_graph(enabled):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    ffn = FFN(256, 1024).cuda()
    x = torch.randn(4, 64, 256, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = ffn(x)
        compiled = torch.compile(ffn, fullgraph=True)(x)
        static_x = x.clone()
        ffn(static_x)  # warm-up before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ffn(static_x)
        static_x.copy_(x)
        graph.replay()
    print(f"compiled rel max {_rel(compiled, eager):.3g}, graph rel max {_rel(static_out, eager):.3g}")
    assert _rel(compiled, eager) < 2e-2 and torch.equal(static_out, eager)
