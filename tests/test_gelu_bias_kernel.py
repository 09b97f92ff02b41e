"""The training tanh GELU with the bias-gradient sums (maskar.kernels.gelu_bias) against torch.

The reference is ``F.gelu(approximate="tanh")`` differentiated by autograd on fresh random inputs,
and for the bias gradient the linear's own (d pre summed over its rows, rounded to its dtype). On
the CPU the kernels run under TRITON_INTERPRET=1 in one subprocess; the ops' torch bodies run in
this process (``CPU_REFERENCE``). GPU tests are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_aot import compile_source, require_aot_compiler
from helpers_interpreter import run_under_interpreter

from maskar.nn.blocks import FFN

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def op_vs_torch(gb, shape, dtype, device="cpu", seed=0) -> dict:
    """Output, d pre and the bias gradient of ``gelu_with_bias_grad`` against torch's GELU in fp32
    rounded to ``dtype``; and the largest output error in units of the dtype's spacing."""
    g = torch.Generator().manual_seed(seed)
    pre0 = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    pre0.view(-1)[:4] = torch.tensor([0.0, -12.0, 12.0, 1e-3])  # zero, the tails, near zero
    dy = torch.randn(shape, generator=g).to(device, dtype)
    bias = torch.randn(shape[-1], device=device, requires_grad=True)
    pre = pre0.clone().requires_grad_()
    y = gb.gelu_with_bias_grad(pre, bias)
    dpre, dbias = torch.autograd.grad(y, (pre, bias), dy)
    ref_pre = pre0.double().requires_grad_()
    ref_y = F.gelu(ref_pre, approximate="tanh")
    (ref_dpre,) = torch.autograd.grad(ref_y, ref_pre, dy.double())
    want_dbias = dpre.double().reshape(-1, shape[-1]).sum(0).to(dtype).to(bias.dtype)  # as autograd casts it
    spacing = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-7
    return {
        "y": _rel(y, ref_y),
        "y_ulp": float(((y.double() - ref_y) / ref_y.abs().clamp_min(1e-3)).abs().max() / spacing),
        "dpre": _rel(dpre, ref_dpre),
        "dbias": _rel(dbias, want_dbias),
        "dbias_dtype": str(dbias.dtype),
        "y_dtype": str(y.dtype),
    }


# ----------------------------------------------------------------------------- CPU: Triton interpreter

# (name, shape, dtype, config: block, block_m, block_n, iters, warps): rows and columns not
# multiples of the tiles, several row tiles per program, one program for everything
INTERPRET_CASES = [
    ("bf16-odd", (3, 7, 40), "bf16", (64, 4, 16, 2, 1)),
    ("fp16-iters", (2, 19, 24), "fp16", (32, 4, 8, 3, 1)),
    ("fp32-one-program", (5, 16), "fp32", (128, 8, 16, 1, 1)),
]

_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
import test_gelu_bias_kernel as T
import maskar.kernels.gelu_bias as gb
assert gb._INTERPRET
for name, shape, dn, cfg in T.INTERPRET_CASES:
    gb.FORCE_CONFIG = gb.GeluConfig(*cfg)
    print("RESULT " + json.dumps({{"case": name, **T.op_vs_torch(gb, shape, T.DTYPES[dn])}}), flush=True)
gb.FORCE_CONFIG = None
x = torch.randn(3, 9, 20, dtype=torch.bfloat16)
dy = torch.randn_like(x)
dx0, _ = gb._backward(x, dy, False)
dx1, db = gb._backward(x, dy, True)
same = bool(torch.equal(dx0, dx1)) and bool(torch.equal(gb._backward(x, dy, True)[1], db))
empty = gb._backward(x, dy, False)[1].numel()
print("RESULT " + json.dumps({{"case": "switch", "same": same, "empty": empty}}))
"""


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    pytest.importorskip("triton")
    return run_under_interpreter(_RUNNER, timeout=600)


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_CASES])
def test_kernels_match_torch_interpreted(interpreter_results, case):
    r = interpreter_results[case]
    dtype = next(c[2] for c in INTERPRET_CASES if c[0] == case)
    tol = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 8e-3}[dtype]
    assert r["y"] < tol and r["dpre"] < tol, r
    assert r["dbias"] < (1e-6 if dtype == "fp32" else 8e-3), r  # another summation order, one rounding
    assert r["dbias_dtype"] == "torch.float32" and r["y_dtype"] == str(DTYPES[dtype]), r


def test_backward_sums_are_deterministic_and_optional_interpreted(interpreter_results):
    r = interpreter_results["switch"]
    assert r["same"] and r["empty"] == 0, r


# ----------------------------------------------------------------------------- CPU: the ops' torch bodies


@pytest.fixture
def cpu_reference(monkeypatch):
    gb = pytest.importorskip("maskar.kernels.gelu_bias")
    if gb._INTERPRET:
        pytest.skip("interpreter enabled in this process")
    monkeypatch.setattr(gb, "CPU_REFERENCE", True)
    return gb


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_op_reference_matches_torch(cpu_reference, dtype):
    r = op_vs_torch(cpu_reference, (4, 6, 32), dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    assert r["y"] < tol and r["dpre"] < tol and r["dbias"] < tol, r


def test_opcheck(cpu_reference):
    gb = cpu_reference
    x = torch.randn(3, 5, 16)
    torch.library.opcheck(gb.gelu_tanh_op, (x,))
    for bias_grad in (True, False):
        torch.library.opcheck(gb.gelu_tanh_bwd_op, (x, torch.randn_like(x), bias_grad))


def _ffn_grads(ffn: FFN, x: torch.Tensor, compiled: bool = False):
    def f(x):
        return ffn(x).square().sum()

    if compiled:
        f = torch.compile(f, backend="aot_eager", fullgraph=True)
    params = [ffn.fc1.weight, ffn.fc1.bias, ffn.fc2.weight, ffn.fc2.bias]
    xi = x.clone().requires_grad_()
    return torch.autograd.grad(f(xi), [xi, *params])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ffn_with_the_op_equals_torch_code_and_traces_without_break(cpu_reference, monkeypatch, dtype):
    torch.manual_seed(0)
    ffn = FFN(32, 128).to(dtype)
    x = torch.randn(2, 7, 32, dtype=dtype)
    got = _ffn_grads(ffn, x)
    monkeypatch.setattr(cpu_reference, "ENABLED", False)
    want = _ffn_grads(ffn, x)
    monkeypatch.setattr(cpu_reference, "ENABLED", True)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < tol
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda x: ffn(x).square().sum())(x.clone().requires_grad_())
    assert ex.graph_break_count == 0, ex.break_reasons
    nodes = [n for g in ex.graphs for m in g.modules() if hasattr(m, "graph") for n in m.graph.nodes]
    assert any("gelu_tanh" in str(n.target) for n in nodes)
    for a, b in zip(_ffn_grads(ffn, x, compiled=True), got, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_ffn_takes_the_op_only_with_autograd(cpu_reference, monkeypatch):
    calls = []
    real = cpu_reference.gelu_with_bias_grad
    monkeypatch.setattr(cpu_reference, "gelu_with_bias_grad", lambda *a: calls.append(1) or real(*a))
    ffn = FFN(16, 64)
    x = torch.randn(2, 3, 16)
    ffn(x)
    assert calls == [1]
    with torch.no_grad():
        ffn(x)
    assert calls == [1]  # sampling keeps F.gelu (or the fc1 epilogue on CUDA)


def test_cpu_never_takes_the_op_by_default():
    gb = pytest.importorskip("maskar.kernels.gelu_bias")
    if gb._INTERPRET:
        pytest.skip("interpreter enabled in this process")
    x = torch.randn(2, 3, 16)
    assert not gb.supports_linear(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gb.supports_linear(x)
    assert not gb.supports_linear(torch.empty(2, 3, 16, device="meta"))  # no autocast to ask there


def test_bad_inputs_are_refused_by_name():
    gb = pytest.importorskip("maskar.kernels.gelu_bias")
    with pytest.raises(ValueError, match="not contiguous"):
        gb.gelu_with_bias_grad(torch.zeros(4, 6).t())
    with pytest.raises(ValueError, match="bias"):
        gb.gelu_with_bias_grad(torch.zeros(4, 6), torch.zeros(5))


# ----------------------------------------------------------------------------- AOT compile


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_kernels_compile_to_cubin_without_a_gpu(arch, kernel):
    require_aot_compiler()
    from triton.compiler import ASTSource

    import maskar.kernels.gelu_bias as gb

    cfg = gb._DEFAULT
    if kernel == "fwd":
        fn, consts = gb._gelu_tanh_fwd, {"BLOCK": cfg.block}
        types = {"X": "*bf16", "Y": "*bf16", "n": "i32", "beta": "fp32", "kappa": "fp32"}
    else:
        fn = gb._gelu_tanh_bwd
        consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "ITERS": cfg.iters, "BIAS_GRAD": True}
        types = {"X": "*bf16", "DY": "*bf16", "DX": "*bf16", "PART": "*fp32", "n_rows": "i32",
                 "n_cols": "i32", "beta": "fp32", "kappa": "fp32"}
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    # fresh allocations and a 16-divisible width, as the JIT specialises them
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if types.get(n, "").startswith("*") or n in ("n_cols", "n")}
    src = ASTSource(fn=fn, signature=sig, attrs=aligned,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    try:
        compiled = compile_source(src, arch, cfg.num_warps, 1)
    except FileNotFoundError as e:
        pytest.skip(f"no CUDA toolchain in this Triton: {e}")
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    assert "ld.global.v4" in compiled.asm["ptx"] or "ld.global.nc.v4" in compiled.asm["ptx"]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dname", ["bf16", "fp16"])
def test_kernels_match_torch_gpu(dname):
    import maskar.kernels.gelu_bias as gb

    r = op_vs_torch(gb, (2, 1031, 4096), DTYPES[dname], device="cuda")
    tol = {"fp16": 1e-3, "bf16": 5e-3}[dname]
    assert r["y"] < tol and r["dpre"] < tol and r["dbias"] < tol, r
