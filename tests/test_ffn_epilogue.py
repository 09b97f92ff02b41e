"""maskar.nn.ffn_epilogue (MASKAR_FFN_EPILOGUE): the training FFN with its GELU in cuBLASLt's
epilogues. On the CPU the ops' torch bodies run (the autograd.Function, the casts, the bias
handling, the compile path); the cuBLASLt calls themselves are the ``gpu`` tests, against float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskar.nn import cublaslt, ffn_epilogue
from maskar.nn.blocks import FFN


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setattr(ffn_epilogue, "ENABLED", True)
    monkeypatch.setattr(ffn_epilogue, "CPU_REFERENCE", True)
    calls = {"fc1": 0, "fc2": 0}
    real1, real2 = ffn_epilogue._torch_fc1_gelu, ffn_epilogue._torch_fc2_dgelu

    def fc1(*a):
        calls["fc1"] += 1
        return real1(*a)

    def fc2(*a):
        calls["fc2"] += 1
        return real2(*a)

    monkeypatch.setattr(ffn_epilogue, "_torch_fc1_gelu", fc1)
    monkeypatch.setattr(ffn_epilogue, "_torch_fc2_dgelu", fc2)
    return calls


def _plain(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    return ffn.fc2(F.gelu(ffn.fc1(x), approximate="tanh"))


def _grads(f, ffn: FFN, x: torch.Tensor, seed: int = 1):
    xi = x.clone().requires_grad_()
    y = f(xi)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(y.device, y.dtype)
    params = [p for p in ffn.parameters() if p.requires_grad]
    return (y, *torch.autograd.grad(y, [xi, *params], g, allow_unused=True))


@pytest.mark.parametrize("bias_grad", ["wgrad", "wgrad_t", "ones", "dgelu", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ffn_equals_the_torch_code(on, monkeypatch, dtype, bias_grad):
    monkeypatch.setattr(ffn_epilogue, "BIAS_GRAD", bias_grad)
    torch.manual_seed(0)
    ffn = FFN(32, 128).to(dtype)
    x = torch.randn(3, 7, 32, dtype=dtype)
    got = _grads(ffn, ffn, x)
    assert on == {"fc1": 1, "fc2": 1}
    want = _grads(lambda t: _plain(ffn, t), ffn, x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < tol


def test_detached_out_bias_and_frozen_weights(on):
    torch.manual_seed(0)
    ffn = FFN(16, 64).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    xi = x.clone().requires_grad_()
    y = ffn(xi, detach_out_bias=True)
    torch.testing.assert_close(y, _plain(ffn, x))  # the bias is still added
    y.sum().backward()
    assert ffn.fc2.bias.grad is None and ffn.fc1.bias.grad is not None
    ffn.zero_grad(set_to_none=True)
    for p in ffn.parameters():  # HMAR stage 2's frozen base blocks: input gradients only
        p.requires_grad_(False)
    xi = x.clone().requires_grad_()
    ffn(xi).sum().backward()
    assert all(p.grad is None for p in ffn.parameters())
    xr = x.clone().requires_grad_()
    _plain(ffn, xr).sum().backward()
    torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-12, atol=1e-12)


def test_autocast_casts_like_the_linears(on):
    """bf16 autocast: fp32 parameters and input, the math in bf16; gradients come back in fp32."""
    torch.manual_seed(0)
    ffn = FFN(32, 128)
    x = torch.randn(4, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(ffn, ffn, x)
        want = _grads(lambda t: _plain(ffn, t), ffn, x)
    ref = _grads(lambda t: _plain(ffn, t), ffn, x)  # fp32
    assert got[0].dtype == torch.bfloat16
    for a, b, r in zip(got, want, ref, strict=True):
        assert a.dtype == b.dtype
        # the epilogue rounds pre once less than the two-kernel path: as close to fp32 as it
        assert _rel(a, r) < 1.5 * _rel(b, r) + 1e-3


def test_compiles_without_graph_breaks_and_matches_eager(on):
    torch.manual_seed(0)
    ffn = FFN(32, 128)
    x = torch.randn(2, 6, 32)
    want = _grads(ffn, ffn, x)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda t: ffn(t).sum())(x.clone().requires_grad_())
    assert ex.graph_break_count == 0, ex.break_reasons
    got = _grads(torch.compile(ffn, backend="aot_eager", fullgraph=True), ffn, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_opcheck(on):
    x, w, b = torch.randn(10, 16), torch.randn(24, 16), torch.randn(24)
    torch.library.opcheck(ffn_epilogue.fc1_gelu_op, (x, w, b))
    dy, w2, pre = torch.randn(10, 8), torch.randn(8, 24), torch.randn(10, 24)
    for with_sum in (True, False):
        torch.library.opcheck(ffn_epilogue.fc2_dgelu_op, (dy, w2, pre, with_sum))
    torch.library.opcheck(ffn_epilogue.fc1_wgrad_op, (pre, x))


def test_op_bodies_against_float64_math():
    """The bodies' math (the reference the GPU path is checked against): the bias sum is the
    column sum of d pre, the derivative PyTorch's tanh GELU's."""
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((9, 16), (24, 16), (24,)))
    act, pre = ffn_epilogue.fc1_gelu_op(x, w, b)
    torch.testing.assert_close(pre, x @ w.T + b)
    torch.testing.assert_close(act, F.gelu(x @ w.T + b, approximate="tanh"))
    dy, w2 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((9, 8), (8, 24)))
    pre_r = pre.clone().requires_grad_()
    (d_pre_want,) = torch.autograd.grad(F.gelu(pre_r, approximate="tanh"), pre_r, dy @ w2)
    dpre, dbias = ffn_epilogue.fc2_dgelu_op(dy, w2, pre, True)
    torch.testing.assert_close(dpre, d_pre_want)
    torch.testing.assert_close(dbias, d_pre_want.sum(0))
    assert ffn_epilogue.fc2_dgelu_op(dy, w2, pre, False)[1].numel() == 0
    dw, db = ffn_epilogue.fc1_wgrad_op(dpre, x)
    torch.testing.assert_close(dw, d_pre_want.T @ x)
    torch.testing.assert_close(db, d_pre_want.sum(0))


@pytest.mark.parametrize("bias_grad", ["sum", "dgelu", "ones", "wgrad", "wgrad_t"])
def test_weight_gradient_op_counts_a_fallback_only_where_an_epilogue_was_meant(monkeypatch, bias_grad):
    """fc1's weight-gradient op runs torch's column sum by design in the "sum" / "dgelu" forms
    (the GPU check once counted that as cuBLASLt falling back); on the CPU every form takes the
    torch body, which is a fallback only for the two forms that mean an epilogue there."""
    calls = []
    monkeypatch.setattr(ffn_epilogue, "_count_fallback", calls.append)
    monkeypatch.setattr(ffn_epilogue, "BIAS_GRAD", bias_grad)
    dpre, x = torch.randn(6, 16), torch.randn(6, 8)
    dw, db = ffn_epilogue.fc1_wgrad_op(dpre, x)
    torch.testing.assert_close(dw, dpre.T @ x)
    torch.testing.assert_close(db, dpre.sum(0))
    assert len(calls) == (bias_grad in ("wgrad", "wgrad_t"))


def test_cublaslt_plans_need_ampere_or_later(monkeypatch):
    """The ops' bodies take cuBLASLt only on sm80+ (older GPUs run the torch body, counted)."""
    caps = {0: (7, 5), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: caps[index])
    cublaslt.arch_ok.cache_clear()
    try:
        assert [cublaslt.arch_ok(i) for i in caps] == [False, True, True]
    finally:
        cublaslt.arch_ok.cache_clear()


def test_supports():
    ffn = FFN(32, 128)
    x = torch.randn(2, 3, 32)
    odd = FFN(20, 80)
    exact = nn.GELU()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ffn_epilogue, "ENABLED", False)
        mp.setattr(ffn_epilogue, "CPU_REFERENCE", True)
        assert not ffn_epilogue.supports(x, ffn.fc1, ffn.fc2, "tanh")  # switched off
        mp.setattr(ffn_epilogue, "CPU_REFERENCE", False)
        mp.setattr(ffn_epilogue, "ENABLED", True)
        assert not ffn_epilogue.supports(x, ffn.fc1, ffn.fc2, "tanh")  # CPU without CPU_REFERENCE
        mp.setattr(ffn_epilogue, "CPU_REFERENCE", True)
        assert ffn_epilogue.supports(x, ffn.fc1, ffn.fc2, "tanh")
        assert not ffn_epilogue.supports(x, ffn.fc1, ffn.fc2, exact.approximate)
        assert not ffn_epilogue.supports(torch.randn(2, 20), odd.fc1, odd.fc2, "tanh")
        with torch.no_grad():
            assert not ffn_epilogue.supports(x, ffn.fc1, ffn.fc2, "tanh")  # sampling: unchanged
    assert not cublaslt.available(torch.device("cpu"))


def test_fits_names_what_the_plans_need():
    buf = torch.zeros(4096, dtype=torch.bfloat16)  # CPU storage is 64-byte aligned: place it at 256
    off = (-buf.data_ptr() % 256) // 2
    t = buf[off:off + 1024].view(64, 16)
    assert cublaslt.fits(t, t)
    assert not cublaslt.fits(t, t.float())  # one dtype
    assert not cublaslt.fits(t[:, :12].contiguous()[:, :8])  # a strided view
    assert not cublaslt.fits(torch.zeros(4, 12, dtype=torch.bfloat16))  # width not a multiple of 8
    with pytest.raises(ValueError, match="256-byte aligned"):
        cublaslt.linear_gelu_aux(t[1:], t[:8], t[0, :8])


def test_block_under_activation_checkpointing(on):
    """train.activation_checkpointing recomputes the block's forward (the op's saved pre and act)
    in the backward: the same gradients."""
    from maskar.nn.blocks import AdaLNSelfAttnBlock

    torch.manual_seed(0)
    block = AdaLNSelfAttnBlock(32, 24, 4).train()
    x, cond = torch.randn(2, 5, 32), torch.randn(2, 24)

    def grads():
        xi = x.clone().requires_grad_()
        loss = block(xi, cond).square().sum()
        return torch.autograd.grad(loss, [xi, *block.parameters()], allow_unused=True)

    want = grads()
    block.checkpoint = True
    got = grads()
    assert on["fc1"] == 3 and on["fc2"] == 2  # the recompute ran the forward op again
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch,stage", [("var", 1), ("hmar", 1), ("hmar", 2)])
def test_whole_model_gradients_equal_torch_code(on, monkeypatch, arch, stage):
    from test_train_speed import batch_of, loss_grads, tiny

    model = tiny(arch, stage=stage, drop_path_rate=0.2)
    batch = batch_of(model)
    monkeypatch.setattr(ffn_epilogue, "ENABLED", False)
    _, want = loss_grads(model, batch)
    assert on == {"fc1": 0, "fc2": 0}
    monkeypatch.setattr(ffn_epilogue, "ENABLED", True)
    _, got = loss_grads(model, batch)
    assert on["fc1"] > 0 and on["fc2"] > 0
    worst = max(_rel(a, b) for a, b in zip(got, want, strict=True))
    assert worst < 1e-5, worst


# ----------------------------------------------------------------------------- GPU


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_case(M: int, K: int, N: int, dtype: torch.dtype, seed: int = 0):
    """x (M, K), fc1's w (N, K) and b (N,), and for the backward dy (M, 96) and fc2's w (96, N)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    return r(M, K), r(N, K, scale=K ** -0.5), r(N, scale=0.1), r(M, 96), r(96, N, scale=N ** -0.5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bias_grad", ["dgelu", "sum", "wgrad_t", "ones"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1031 * 2, 4096])
def test_epilogues_match_float64_gpu(monkeypatch, dtype, M, bias_grad):
    monkeypatch.setattr(ffn_epilogue, "BIAS_GRAD", bias_grad)
    x, w, b, dy, w2 = _gpu_case(M, 256, 1024, dtype)
    before = ffn_epilogue.FALLBACKS
    act, pre = ffn_epilogue.fc1_gelu_op(x, w, b)
    pre64 = x.double() @ w.double().T + b.double()
    act64 = F.gelu(pre64, approximate="tanh")
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    assert _rel(pre, pre64) < tol and _rel(act, act64) < tol
    dpre, dbias = ffn_epilogue.fc2_dgelu_op(dy, w2, pre, True)
    p = pre.double().requires_grad_()
    (dpre64,) = torch.autograd.grad(F.gelu(p, approximate="tanh"), p, dy.double() @ w2.double())
    assert _rel(dpre, dpre64) < tol and _rel(dbias, dpre64.sum(0)) < tol
    dw, db = ffn_epilogue.fc1_wgrad_op(dpre, x)  # BGRADB / BGRADA: the sums of the matmul's operand
    assert _rel(dw, dpre.double().T @ x.double()) < tol and _rel(db, dpre.double().sum(0)) < tol
    assert ffn_epilogue.FALLBACKS == before  # the cuBLASLt calls ran
    assert dbias.dtype == dtype and dpre.dtype == dtype


@pytest.mark.gpu
@needs_cuda
def test_ffn_under_autocast_and_graph_capture_gpu(monkeypatch):
    monkeypatch.setattr(ffn_epilogue, "ENABLED", True)
    torch.manual_seed(0)
    ffn = FFN(256, 1024).cuda()
    x = torch.randn(3, 517, 256, device="cuda")

    def run(f):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _grads(f, ffn, x)

    ref64 = _grads(lambda t: _plain(ffn.double(), t), ffn, x.double())
    ffn.float()
    got = run(ffn)
    want = run(lambda t: _plain(ffn, t))
    for a, b, r in zip(got, want, ref64, strict=True):
        assert _rel(a, r) < 1.5 * _rel(b, r) + 2e-3
    # captured in a CUDA graph, replayed on new inputs: the plans' pointers are baked at capture.
    # A fresh copy warmed up on a side stream: parameters whose gradient accumulators the eager
    # calls above made on the default stream break a capture (pytorch/pytorch#164302)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fg = copy.deepcopy(ffn)
        xs = x.clone().requires_grad_()
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fg(xs).float().square().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    xs.grad = None
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # as maskar.train.graph_step
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fg(xs).float().square().sum().backward()
    x2 = torch.randn_like(x)
    with torch.no_grad():
        xs.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    xe = x2.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fg(xe).float().square().sum().backward()
    assert _rel(xs.grad, xe.grad) < 1e-6


def test_info_says_whether_cublaslt_was_found(monkeypatch, capsys):
    from maskar.cli import main

    monkeypatch.setenv("MASKAR_FFN_EPILOGUE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for found, words in ((False, "cuBLASLt not found: the FFN keeps its separate GELU launches"),
                         (True, "cuBLASLt found")):
        monkeypatch.setattr(cublaslt, "load", lambda f=found: f)
        assert main(["info"]) == 0
        assert f"(MASKAR_FFN_EPILOGUE: {words})" in capsys.readouterr().out
