"""The fused q/k L2 norm (maskar.kernels.qk_norm) against the model's torch code.

The reference is ``maskar.nn.blocks.l2_norm_qk`` (F.normalize and the clamped exp, as the
official VAR / HMAR, fp32 inside as under autocast) differentiated by autograd, on fresh
random inputs given as the model's fused (B, L, 3, H, D) projection. On the CPU the Triton
kernels run under TRITON_INTERPRET=1 in ONE subprocess (the variable must be set before
triton is imported); the parametrised tests read its results. GPU tests are marked ``gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers_aot import compile_source, require_aot_compiler
from helpers_interpreter import run_under_interpreter

from maskar.nn.blocks import SelfAttention, l2_norm_qk

# relative error of each head vector (outputs, dqkv) and of dgain. bf16: the interpreter
# truncates fp32 -> bf16 (a GPU rounds to nearest), so 1-2 ulp there; fp32 pins the math.
TOL = {"fp32": 2e-6, "fp16": 2e-3, "bf16": 1.6e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LN100 = math.log(100.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _rel_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative error of one head vector (last dim): a zero vector's huge gradient (dy / eps)
    must not hide the others. Where the reference overflows (fp16), the same infinity is required."""
    a, b = a.detach().double(), b.detach().double()
    bad = ~torch.isfinite(b)
    if not torch.equal(a[bad], b[bad]):
        return math.inf
    a, b = a.masked_fill(bad, 0.0), b.masked_fill(bad, 0.0)
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max())


def make_inputs(B: int, L: int, H: int, D: int, dtype, gain_dtype=torch.float32, seed: int = 0):
    """qkv (B, L, 3, H, D) with a zero and a tiny (< eps) head vector, and gains below, at, above
    the clamp and very small (the clamp's two sides and the normalize eps' two sides)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3, H, D, generator=g) * torch.rand(B, L, 3, H, 1, generator=g).mul(3)
    qkv[0, 0, 0, 0] = 0.0  # n = 0: norm gradient masked
    qkv[-1, -1, 1, -1] = 1e-14  # n < eps: clamp_min cuts the projection term
    s = torch.tensor([math.log(4.0), 10.0, LN100, -30.0, 3.0, 4.8])[:H]  # ln 100 ~ 4.605
    s = torch.cat([s, torch.randn(max(H - 6, 0), generator=g)]).view(1, H, 1, 1)
    return qkv.to(dtype), s.to(gain_dtype)


def torch_reference(qkv: torch.Tensor, s: torch.Tensor):
    """(q_hat, k_hat, v) of the model's torch code, in fp32 inside as under autocast."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    acc = torch.promote_types(qkv.dtype, torch.float32)
    q, k = l2_norm_qk(q.to(acc), k.to(acc), s, qkv.dtype)
    return q, k, v


def errors_vs_reference(
    fn, B, L, H, D, dtype, gain_dtype=torch.float32, gain_grad=True, device="cpu"
) -> dict:
    """Relative errors of q_hat, k_hat, dqkv (q / k parts), dgain of ``fn`` vs the torch code; the
    v part of dqkv bitwise; layout facts."""
    qkv0, s0 = (t.to(device) for t in make_inputs(B, L, H, D, dtype, gain_dtype))
    res = {}
    outs, grads = {}, {}
    for name, f in (("got", fn), ("ref", torch_reference)):
        qkv = qkv0.clone().requires_grad_()
        s = s0.clone().requires_grad_(gain_grad)
        out = f(qkv, s)
        if name == "got":
            q, k, v = out
            same_storage = q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
            blhd = (L * 2 * H * D, 2 * H * D, D, 1)  # (B, L, 2, H, D) memory
            res["qk_one_buffer"] = same_storage and q.transpose(1, 2).stride() == blhd
            v_strides = qkv0[:, :, 2].transpose(1, 2).stride()
            res["v_is_view"] = v.data_ptr() == qkv[:, :, 2].data_ptr() and v.stride() == v_strides
        g = torch.Generator().manual_seed(1)
        douts = [torch.randn(o.shape, generator=g).to(o) for o in out]
        wrt = (qkv, s) if gain_grad else (qkv,)
        outs[name], grads[name] = out, torch.autograd.grad(out, wrt, douts)
    for i, n in enumerate(("q", "k")):
        res[n] = _rel_rows(outs["got"][i], outs["ref"][i])
        res["d" + n] = _rel_rows(grads["got"][0][:, :, i], grads["ref"][0][:, :, i])
    res["dv_exact"] = bool(torch.equal(grads["got"][0][:, :, 2], grads["ref"][0][:, :, 2]))
    if gain_grad:
        # the clamped heads (s = 10, above ln 100) get exactly 0, as torch's clamp gradient
        res["dgain"] = _rel(grads["got"][1], grads["ref"][1])
        clamped = (s0.cpu() > LN100).flatten()
        res["dgain_clamped_zero"] = bool((grads["got"][1].flatten().cpu()[clamped] == 0).all())
    res["finite"] = not any(bool(torch.isnan(t).any()) for t in (*outs["got"], *grads["got"]))  # no NaN
    res["dqkv_contiguous"] = grads["got"][0].is_contiguous()
    return res


# ----------------------------------------------------------------------------- CPU: Triton interpreter

# (name, B, L, H, D, dtype, gain dtype, gain gradient, block_t): odd token counts, tails shorter
# than a tile, a tile larger than all tokens, head dims 64 and 128, a bf16 gain (FSDP2's bf16 blocks)
INTERPRET_CASES = [
    (f"{dn}-d{D}", 2, 7, 6, D, dn, "fp32", True, 4) for dn in DTYPES for D in (64, 128)
] + [
    ("bf16-d64-bf16gain", 3, 5, 6, 64, "bf16", "bf16", True, 4),
    ("fp16-d64-frozen-gain", 1, 9, 6, 64, "fp16", "fp32", False, 4),
    ("bf16-d64-big-tile", 1, 3, 7, 64, "bf16", "fp32", True, 16),
    ("fp32-d32-odd", 3, 11, 2, 32, "fp32", "fp32", True, 8),
]

_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
import test_qk_norm_kernel as T
import maskar.kernels.qk_norm as qn
assert qn._INTERPRET
torch.manual_seed(0)
for name, B, L, H, D, dn, gdn, gain_grad, bt in T.INTERPRET_CASES:
    qn.FORCE_CONFIG = qn.QKConfig(bt, 4)
    r = T.errors_vs_reference(qn.qk_norm, B, L, H, D, T.DTYPES[dn], T.DTYPES[gdn], gain_grad)
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
qn.FORCE_CONFIG = qn.QKConfig(4, 4)
# the same call twice: the same bits (no atomics anywhere)
qkv, s = T.make_inputs(2, 9, 6, 64, torch.bfloat16)
runs = []
for _ in range(2):
    x, g = qkv.clone().requires_grad_(), s.clone().requires_grad_()
    out = qn.qk_norm(x, g)
    runs.append(torch.autograd.grad(out, (x, g), [torch.ones_like(o) for o in out]))
same = all(torch.equal(a, b) for a, b in zip(*runs))
print("RESULT " + json.dumps({{"case": "deterministic", "same": same}}), flush=True)
# the projection's bias gradient from the backward launch: the column sums of d qkv as stored
# (tiles of bt tokens, `it` tiles per backward program: the last program's tiles partly past the end)
for name, B, L, H, D, dn, bt, it in (("bias-bf16", 2, 7, 3, 64, "bf16", 4, 1),
                                     ("bias-fp32", 3, 5, 2, 32, "fp32", 8, 1),
                                     ("bias-bf16-iters", 2, 9, 3, 64, "bf16", 4, 3)):
    qn.FORCE_CONFIG = qn.QKConfig(bt, 4, it)
    r = T.bias_grad_errors(qn, B, L, H, D, T.DTYPES[dn])
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
qn.FORCE_CONFIG = qn.QKConfig(4, 4, 3)
r = T.errors_vs_reference(qn.qk_norm, 2, 9, 6, 64, torch.bfloat16)
print("RESULT " + json.dumps({{"case": "iters", **r}}), flush=True)
# the backward's reciprocal instead of IEEE division (exact_div=False), fp32 (the math) and bf16
for dn in ("fp32", "bf16"):
    qn.FORCE_CONFIG = qn.QKConfig(4, 4, 3, False)
    r = T.errors_vs_reference(qn.qk_norm, 2, 9, 6, 64, T.DTYPES[dn])
    print("RESULT " + json.dumps({{"case": "reciprocal-" + dn, **r}}), flush=True)
qn.FORCE_CONFIG = qn.QKConfig(4, 4)
# through the custom ops as torch.compile calls them (kernels interpreted), and the model's block
def f(qkv, s):
    return qn.qk_norm(qkv, s)
r = T.errors_vs_reference(torch.compile(f, backend="aot_eager", fullgraph=True), 2, 5, 6, 64, torch.float16)
print("RESULT " + json.dumps({{"case": "compiled", **r}}), flush=True)
# a graph break before the launch: the kernel runs eagerly inside a compiled function, called
# with many sizes. Dynamo once compiled Triton's launcher as a frame of its own there (on a GPU:
# a symbolic grid it could not launch, VAR / HMAR compiled sampling at 1024 px after 256 px);
# the launch now runs behind torch.compiler.disable.
def broken(qkv, s):
    y = qkv * 1.0
    torch._dynamo.graph_break()
    return qn._forward(y.contiguous(), s).float().sum()
g = torch.compile(broken, backend="eager")
ok, err = True, ""
try:
    for L in (3, 5, 7, 9, 11, 13):
        qkv, s = T.make_inputs(2, L, 2, 32, torch.float16)
        want = qn._forward(qkv, s).float().sum()
        ok = ok and bool(torch.allclose(g(qkv, s), want))
except Exception as e:  # only this case fails, not the module's other results
    ok, err = False, repr(e)[:300]
print("RESULT " + json.dumps({{"case": "launch_after_graph_break", "ok": ok, "err": err}}), flush=True)
attn = T.SelfAttention(6 * 64, 6).to(torch.bfloat16)
x = torch.randn(2, 5, 6 * 64, dtype=torch.bfloat16)
assert qn.supports(attn.mat_qkv(x).view(2, 5, 3, 6, 64), attn.scale_mul_1H11.float())
print("RESULT " + json.dumps({{"case": "block", **T.block_vs_torch(attn, x)}}), flush=True)
"""


def bias_grad_errors(qn, B, L, H, D, dtype, device="cpu") -> dict:
    """The bias gradient :func:`qk_norm` returns for ``bias`` against d qkv summed over its rows
    (fp32 sums rounded to qkv's dtype, as the linear's own bias gradient), and the other
    gradients unchanged by passing it."""
    qkv0, s0 = (t.to(device) for t in make_inputs(B, L, H, D, dtype))
    bias0 = torch.randn(3 * H * D, device=device)
    g = torch.Generator().manual_seed(3)
    douts = [torch.randn((B, H, L, D), generator=g).to(device, dtype) for _ in range(3)]
    qkv, s, bias = qkv0.clone().requires_grad_(), s0.clone().requires_grad_(), bias0.clone().requires_grad_()
    dqkv, ds, dbias = torch.autograd.grad(qn.qk_norm(qkv, s, bias), (qkv, s, bias), douts)
    qkv, s = qkv0.clone().requires_grad_(), s0.clone().requires_grad_()
    dqkv0, ds0 = torch.autograd.grad(qn.qk_norm(qkv, s), (qkv, s), douts)
    acc = torch.promote_types(dtype, torch.float32)
    want = dqkv.to(acc).sum((0, 1)).reshape(-1).to(dtype).float()
    fin = torch.isfinite(want)  # fp16: the zero head vector's d qkv overflows (as the torch code's)
    return {
        "dbias": _rel(dbias[fin], want[fin]),
        "nonfinite_match": bool(torch.equal(torch.isfinite(dbias), fin)),
        "dbias_dtype": str(dbias.dtype),
        "same_dqkv": bool(torch.equal(dqkv, dqkv0)),
        "same_ds": bool(torch.equal(ds, ds0)),
    }


def block_vs_torch(attn: SelfAttention, x: torch.Tensor) -> dict:
    """Output and gradients of one SelfAttention with the fused op (as dispatched) vs with the
    torch code (the kernel module hidden from the block)."""
    import maskar.nn.blocks as blocks

    res = {}
    for name in ("fused", "torch"):
        saved = blocks._qk_norm_kernel
        if name == "torch":
            blocks._qk_norm_kernel = None
        try:
            xi = x.clone().requires_grad_()
            out = attn(xi)
            params = [xi, attn.mat_qkv.weight, attn.scale_mul_1H11, attn.q_bias, attn.v_bias]
            g = torch.Generator().manual_seed(2)
            res[name] = (out, *torch.autograd.grad(out, params, torch.randn(out.shape, generator=g).to(out)))
        finally:
            blocks._qk_norm_kernel = saved
    names = ("out", "dx", "dw_qkv", "dgain", "dq_bias", "dv_bias")
    return {n: _rel(a, b) for n, a, b in zip(names, res["fused"], res["torch"])}


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    pytest.importorskip("triton")
    return run_under_interpreter(_RUNNER, timeout=600)


def _check(r: dict, tol: float, gain_grad: bool = True, gain_tol: float = 1e-5) -> None:
    assert r["finite"] and r["dv_exact"] and r["dqkv_contiguous"], r
    assert r["qk_one_buffer"] and r["v_is_view"], r
    for t in ("q", "k", "dq", "dk"):
        assert r[t] < tol, (t, r)
    if gain_grad:
        assert r["dgain"] < gain_tol and r["dgain_clamped_zero"], r


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_CASES])
def test_kernel_matches_torch_code_interpreted(interpreter_results, case):
    _, B, L, H, D, dn, gdn, gain_grad, _ = next(c for c in INTERPRET_CASES if c[0] == case)
    _check(interpreter_results[case], TOL[dn], gain_grad, TOL[gdn] if gdn == "bf16" else 1e-5)


def test_backward_programs_over_several_tiles_interpreted(interpreter_results):
    _check(interpreter_results["iters"], TOL["bf16"])


@pytest.mark.parametrize("dn", ["fp32", "bf16"])
def test_backward_with_reciprocal_instead_of_division_interpreted(interpreter_results, dn):
    _check(interpreter_results["reciprocal-" + dn], TOL[dn])


@pytest.mark.parametrize("case", ["bias-bf16", "bias-fp32", "bias-bf16-iters"])
def test_kernel_sums_the_bias_gradient_interpreted(interpreter_results, case):
    r = interpreter_results[case]
    assert r["same_dqkv"] and r["same_ds"] and r["nonfinite_match"] and r["dbias_dtype"] == "torch.float32", r
    # the same sums in another order; one bf16 rounding at most
    assert r["dbias"] < (1e-6 if case == "bias-fp32" else 8e-3), r


def test_kernel_is_deterministic_interpreted(interpreter_results):
    assert interpreter_results["deterministic"]["same"]


def test_compiled_custom_ops_run_the_kernels_interpreted(interpreter_results):
    _check(interpreter_results["compiled"], TOL["fp16"])


def test_kernel_launch_after_a_graph_break_in_compiled_code_interpreted(interpreter_results):
    """Triton's launcher is never compiled as a frame of its own (maskar.kernels.block_sparse._jit_launch)."""
    r = interpreter_results["launch_after_graph_break"]
    assert r["ok"], r["err"]


def test_attention_block_dispatches_to_the_kernel_interpreted(interpreter_results):
    r = interpreter_results["block"]
    # bf16 end to end (the block's projection and attention too): the same function to bf16 rounding
    for k in ("out", "dx", "dw_qkv", "dgain", "dq_bias", "dv_bias"):
        assert r[k] < 2e-2, (k, r)


# ----------------------------------------------------------------------------- CPU: the ops' reference


@pytest.fixture
def cpu_reference(monkeypatch):
    """Route the model's CPU q/k norm to the custom op's reference body (a GPU run: to the kernels)."""
    qn = pytest.importorskip("maskar.kernels.qk_norm")
    if qn._INTERPRET:
        pytest.skip("interpreter enabled in this process")
    monkeypatch.setattr(qn, "CPU_REFERENCE", True)
    return qn


@pytest.mark.parametrize("gain_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_op_reference_matches_torch_code(cpu_reference, dtype, gain_grad):
    r = errors_vs_reference(cpu_reference.qk_norm, 2, 5, 6, 64, dtype, gain_grad=gain_grad)
    _check(r, {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2}[dtype], gain_grad)
    assert r["q"] == 0.0 and r["k"] == 0.0  # the forward: the same torch ops, the same bits


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_op_reference_bias_gradient(cpu_reference, dtype):
    r = bias_grad_errors(cpu_reference, 2, 5, 3, 64, dtype)
    assert r["same_dqkv"] and r["same_ds"] and r["nonfinite_match"], r
    assert r["dbias"] == 0.0, r  # the same sums


def test_projection_check_predicts_supports(cpu_reference, monkeypatch):
    """The block decides before its linear (whose bias it then detaches) what supports() says after it."""
    qn = cpu_reference
    attn = SelfAttention(128, 2)
    s = attn.scale_mul_1H11
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for autocast in (False, True):
            x = torch.randn(2, 5, 128, dtype=dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                qkv = attn.mat_qkv.to(dtype)(x).view(2, 5, 3, 2, 64)
                assert qn.supports_projection(x, attn.mat_qkv.weight, 2, s) == qn.supports(qkv, s)
    x = torch.randn(2, 5, 128)
    assert not qn.supports_projection(x, torch.zeros(3 * 96, 128), 2, s)  # head dim 48
    assert not qn.supports_projection(x, attn.mat_qkv.weight, 2, torch.zeros(1, 3, 1, 1))  # 3 gains
    meta = torch.empty(2, 5, 128, device="meta")  # the pool model traces on meta: no autocast to ask
    assert not qn.supports_projection(meta, attn.mat_qkv.weight, 2, s.to("meta"))
    monkeypatch.setattr(qn, "CPU_REFERENCE", False)
    assert not qn.supports_projection(x, attn.mat_qkv.weight, 2, s)
    with pytest.raises(ValueError, match="qk_norm: bias"):
        qn.qk_norm(torch.zeros(1, 4, 3, 2, 64), torch.zeros(1, 2, 1, 1), torch.zeros(64))


def test_opcheck(cpu_reference):
    qn = cpu_reference
    qkv, s = make_inputs(2, 3, 6, 32, torch.float32)
    torch.library.opcheck(qn.qk_norm_op, (qkv.requires_grad_(), s.requires_grad_()))
    dq, dk, dv = torch.randn(3, 2, 6, 3, 32).unbind(0)
    for dv_ in (dv, None):
        for gain_grad in (True, False):
            for bias_grad in (True, False):
                args = (qkv.detach(), s.detach(), dq, dk, dv_, gain_grad, bias_grad)
                torch.library.opcheck(qn.qk_norm_bwd_op, args)


def test_op_autograd_alone_gives_zero_v_gradient(cpu_reference):
    qkv, s = make_inputs(1, 4, 6, 64, torch.float64)
    qkv.requires_grad_()
    s.requires_grad_()
    out = cpu_reference.qk_norm_op(qkv, s)
    d = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, s), d)
    q, k, _ = torch_reference(qkv, s)
    want = torch.autograd.grad((q, k), (qkv, s), (d[:, :, 0].transpose(1, 2), d[:, :, 1].transpose(1, 2)))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.equal(got[0][:, :, 2], torch.zeros_like(got[0][:, :, 2]))


def test_cpu_model_never_takes_the_op_by_default(monkeypatch):
    """The op is CUDA-only: CPU outputs (and the recorded sampling fixtures) run the torch code."""
    qn = pytest.importorskip("maskar.kernels.qk_norm")
    if qn._INTERPRET:
        pytest.skip("interpreter enabled in this process")
    attn = SelfAttention(128, 2)
    x = torch.randn(2, 5, 128)
    for dtype in (torch.float32, torch.bfloat16):
        qkv = attn.mat_qkv(x).view(2, 5, 3, 2, 64).to(dtype)
        assert not qn.supports(qkv, attn.scale_mul_1H11)

    def boom(*a, **k):
        raise AssertionError("the fused op ran on the CPU")

    monkeypatch.setattr(qn, "qk_norm", boom)
    attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x)


@pytest.mark.parametrize("bias_grad", [True, False])
def test_block_with_op_reference_equals_torch_code_and_traces_without_break(cpu_reference, monkeypatch,
                                                                            bias_grad):
    monkeypatch.setattr(cpu_reference, "BIAS_GRAD", bias_grad)
    torch.manual_seed(0)
    attn = SelfAttention(128, 2)
    with torch.no_grad():
        attn.scale_mul_1H11.copy_(torch.tensor([0.3, 5.0]).view(1, 2, 1, 1))  # head 1 clamped
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 7, 128)
    r = block_vs_torch(attn, x)
    for k, v in r.items():
        assert v < 1e-5, (k, r)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda x: attn(x).square().sum())(x)
    assert ex.graph_break_count == 0, ex.break_reasons
    nodes = [n for g in ex.graphs for m in g.modules() if hasattr(m, "graph") for n in m.graph.nodes]
    assert any("qk_norm" in str(n.target) for n in nodes)
    compiled = torch.compile(lambda x: attn(x).square().sum(), backend="aot_eager", fullgraph=True)
    params = [attn.mat_qkv.weight, attn.scale_mul_1H11, attn.q_bias, attn.v_bias]
    got = torch.autograd.grad(compiled(x), params)
    want = torch.autograd.grad(attn(x).square().sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_bad_inputs_are_refused_by_name():
    qn = pytest.importorskip("maskar.kernels.qk_norm")
    s = torch.zeros(1, 2, 1, 1)
    with pytest.raises(ValueError, match="qk_norm: expected qkv"):
        qn.qk_norm(torch.zeros(1, 4, 3, 2, 48), s)  # head dim 48
    with pytest.raises(ValueError, match="scale_mul"):
        qn.qk_norm(torch.zeros(1, 4, 3, 2, 64), torch.zeros(1, 3, 1, 1))  # 3 gains for 2 heads
    assert not qn.supports(torch.zeros(1, 4, 3, 2, 64).transpose(0, 1), s)  # not contiguous


def test_disabled_op_is_never_taken(cpu_reference, monkeypatch):
    qkv, s = make_inputs(1, 4, 2, 64, torch.float32)
    assert cpu_reference.supports(qkv, s)
    monkeypatch.setattr(cpu_reference, "ENABLED", False)
    assert not cpu_reference.supports(qkv, s)


# ----------------------------------------------------------------------------- AOT compile


def _compile_for(kernel, arch: int, dtype: str, gain_dtype: str, consts: dict, num_warps: int = 4):
    """Compile one of the q/k-norm kernels for a CUDA target without a GPU (Triton ships ptxas)."""
    from triton.compiler import ASTSource

    fp = {"fp16": "*fp16", "bf16": "*bf16"}[dtype]
    gp = {"fp32": "*fp32", "bf16": "*bf16"}[gain_dtype]
    pointers = {"QKV": fp, "OUT": fp, "DQ": fp, "DK": fp, "DV": fp, "DQKV": fp, "PART": "*fp32",
                "BPART": "*fp32", "S": gp, "DS": gp}
    types = {}
    for n in kernel.arg_names:
        if n in consts:
            types[n] = "constexpr"
        elif n in pointers:
            types[n] = pointers[n]
        elif n in ("eps", "log_max"):
            types[n] = "fp32"
        else:
            types[n] = "i32"
    # as the JIT specialises a launch on fresh allocations and 16-divisible strides: those
    # arguments 16-divisible (what lets the loads and stores vectorise)
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
               if n in pointers or (n.startswith("s") and len(n) == 3)}
    src = ASTSource(fn=kernel, signature=types, attrs=aligned,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    return compile_source(src, arch, num_warps, 1)


@pytest.mark.parametrize(
    "arch,dtype,gain_dtype,kernel,head_dim,flags",
    [(90, "bf16", "fp32", "fwd", 64, None), (90, "fp16", "bf16", "fwd", 128, None),
     (90, "bf16", "fp32", "bwd", 64, (True, True, True)),
     (90, "fp16", "fp32", "bwd", 128, (False, False, False)),
     (90, "bf16", "bf16", "gain", 0, None), (80, "bf16", "fp32", "bwd", 64, (True, True, True)),
     (90, "bf16", "fp32", "bwd", 64, (True, True, True, False))],  # the reciprocal (exact_div False)
)
def test_kernels_compile_to_cubin_without_a_gpu(arch, dtype, gain_dtype, kernel, head_dim, flags):
    """The interpreter does not compile: this catches what only the real compiler rejects."""
    require_aot_compiler()
    import maskar.kernels.qk_norm as qn

    cfg = qn._config(head_dim) if head_dim else None
    if kernel == "fwd":
        fn, consts = qn._qk_norm_fwd, dict(BLOCK_T=cfg.block_t, HEAD_DIM=head_dim)
    elif kernel == "bwd":
        fn, consts = qn._qk_norm_bwd, dict(BLOCK_T=cfg.block_t, HEAD_DIM=head_dim, HAS_DV=flags[0],
                                           GAIN_GRAD=flags[1], AT_BOUND=qn.clamp_grad_at_bound(),
                                           BIAS_GRAD=flags[2], ITERS=2, EXACT_DIV=flags[3:] != (False,))
    else:
        fn, consts = qn._qk_norm_gain_grad, dict(BLOCK_R=256, BLOCK_H=16, AT_BOUND=qn.clamp_grad_at_bound())
    try:
        compiled = _compile_for(fn, arch, dtype, gain_dtype, consts)
    except FileNotFoundError as e:  # no ptxas in this Triton build
        pytest.skip(f"no CUDA toolchain in this Triton: {e}")
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    if kernel != "gain":  # coalesced rows: 16-byte vector loads and stores
        assert "ld.global.v4" in compiled.asm["ptx"] and "st.global.v4" in compiled.asm["ptx"]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gain_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dname", ["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_matches_torch_code_gpu(dname, D, gain_dtype):
    import maskar.kernels.qk_norm as qn

    r = errors_vs_reference(qn.qk_norm, 4, 37, 6, D, DTYPES[dname], DTYPES[gain_dtype], device="cuda")
    _check(r, TOL[dname], gain_tol=TOL[gain_dtype] if gain_dtype == "bf16" else 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dname", ["bf16", "fp16"])
def test_kernel_bias_gradient_gpu(dname):
    import maskar.kernels.qk_norm as qn

    r = bias_grad_errors(qn, 3, 301, 16, 64, DTYPES[dname], device="cuda")
    assert r["same_dqkv"] and r["same_ds"] and r["nonfinite_match"] and r["dbias_dtype"] == "torch.float32", r
    assert r["dbias"] < 8e-3, r  # the same fp32 sums in another order, one rounding to qkv's dtype
