"""The training LayerNorm + modulate with the gated residual in front (maskar.kernels.adaln_norm)
against torch.

The reference is the block's own torch code (``LayerNorm`` without affine, ``addcmul``)
differentiated by autograd in float64 on fresh random inputs, with a random gradient on both
outputs (h, and the residual stream past the norm). On the CPU the kernels run under
TRITON_INTERPRET=1 in one subprocess; the ops' torch bodies run in this process
(``CPU_REFERENCE``). GPU tests are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_aot import compile_source, require_aot_compiler, resource_usage
from helpers_interpreter import run_under_interpreter

from maskar.nn.blocks import AdaLNSelfAttnBlock

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EPS = 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _torch_block_part(x, o, gate, scale, shift):
    """The block's torch code for one norm: (h, the stream past it)."""
    if o is not None:
        x = torch.addcmul(x, o, gate)
    h = torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=EPS), 1 + scale)
    return h, x


def op_vs_torch(an, B, L, C, dtype, residual, out_dtype=None, device="cpu", seed=0, batch1_vectors=False,
                with_dx_out=True, bias=False) -> dict:
    """h, the stream and every gradient of ``_AdaLNNorm`` against the torch code in float64.
    x is float32; o and the (B | 1, 1, C) vectors are ``dtype`` (autocast's linears' output).
    ``bias``: o's linear added a (C,) bias detached and the op gives its gradient (the torch code
    adds it to o)."""
    g = torch.Generator().manual_seed(seed)
    vb = 1 if batch1_vectors else B
    x0 = (torch.randn(B, L, C, generator=g) * 2 + 0.5).to(device)
    o0 = torch.randn(B, L, C, generator=g).to(device, dtype)
    gate0, scale0, shift0 = [(torch.randn(vb, 1, C, generator=g) * 0.5).to(device, dtype) for _ in range(3)]
    b0 = torch.randn(C, generator=g).to(device, dtype)
    out_dtype = out_dtype or torch.float32
    dh = torch.randn(B, L, C, generator=g).to(device, out_dtype)
    dxo = torch.randn(B, L, C, generator=g).to(device) if with_dx_out else None
    names = ["x", "o", "gate", "scale", "shift"] if residual else ["x", "scale", "shift"]
    names += ["b"] if bias and residual else []

    def run(fn, cast):
        t = {"x": x0, "o": o0, "gate": gate0, "scale": scale0, "shift": shift0, "b": b0}
        t = {k: cast(v).requires_grad_() for k, v in t.items() if k in names}
        h, xo = fn(t["x"], t.get("o"), t.get("gate"), t["scale"], t["shift"], t.get("b"))
        loss = (h.double() * dh.double()).sum()
        if dxo is not None:
            loss = loss + (xo.double() * dxo.double()).sum()
        return h, xo, torch.autograd.grad(loss, [t[n] for n in names])

    def ours(x, o, gate, scale, shift, b):
        if b is not None:  # as the block's linear adds it: detached
            o = o + b.detach()
        return an._AdaLNNorm.apply(x, o, gate, scale, shift, EPS, out_dtype, b)

    def reference(x, o, gate, scale, shift, b):
        return _torch_block_part(x, o if b is None else o + b, gate, scale, shift)

    h, xo, got = run(ours, lambda t: t.clone())
    rh, rxo, want = run(reference, lambda t: t.double())
    out = {"h": _rel(h, rh), "stream": _rel(xo, rxo), "h_dtype": str(h.dtype), "x_dtype": str(xo.dtype)}
    for n, a, b in zip(names, got, want, strict=True):
        out["d" + n] = _rel(a, b)
        out["d" + n + "_dtype"] = str(a.dtype)
    return out


def count_calls(module, names, patch=setattr) -> dict[str, int]:
    """Wrap ``module``'s functions ``names`` (through ``patch``, e.g. monkeypatch.setattr) to count
    their calls: the returned dict, updated as they run."""
    calls = dict.fromkeys(names, 0)

    def counted(name, real):
        def call(*a):
            calls[name] += 1
            return real(*a)
        return call

    for name in names:
        patch(module, name, counted(name, getattr(module, name)))
    return calls


def gated_add_vs_torch(an, B, L, C, dtype, device="cpu", seed=0, batch1_gate=False, bias=True) -> dict:
    """y and every gradient of ``gated_add`` (f's linear adding ``bias`` detached) against
    ``torch.addcmul(x, f + bias, gate)`` in float64; x float32, f, gate and bias ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, L, C, generator=g).to(device)
    f0 = torch.randn(B, L, C, generator=g).to(device, dtype)
    gate0 = (torch.randn(1 if batch1_gate else B, 1, C, generator=g) * 0.5).to(device, dtype)
    b0 = torch.randn(C, generator=g).to(device, dtype)
    dy = torch.randn(B, L, C, generator=g).to(device)
    names = ["x", "f", "gate"] + (["b"] if bias else [])

    def run(fn, cast):
        t = {"x": x0, "f": f0, "gate": gate0, "b": b0}
        t = {k: cast(v).requires_grad_() for k, v in t.items() if k in names}
        y = fn(t["x"], t["f"], t["gate"], t.get("b"))
        return y, torch.autograd.grad((y.double() * dy.double()).sum(), [t[n] for n in names])

    def ours(x, f, gate, b):
        return an.gated_add(x, f if b is None else f + b.detach(), gate, b)

    def reference(x, f, gate, b):
        return torch.addcmul(x, f if b is None else f + b, gate)

    y, got = run(ours, lambda t: t.clone())
    ry, want = run(reference, lambda t: t.double())
    out = {"y": _rel(y, ry), "y_dtype": str(y.dtype)}
    for n, a, b in zip(names, got, want, strict=True):
        out["d" + n] = _rel(a, b)
        out["d" + n + "_dtype"] = str(a.dtype)
    return out


# ----------------------------------------------------------------------------- CPU: Triton interpreter

# (name, B, L, C, dtype, residual, out dtype, config: fwd_block_m, fwd_warps, bwd_block_m, bwd_iters,
# bwd_warps, batch-1 vectors, dx_out): L not a multiple of the tiles, C not a power of two, several
# tiles a program, one program a sample
INTERPRET_CASES = [
    ("res-fp32", 2, 7, 24, "fp32", True, "fp32", (2, 1, 2, 2, 1), False, True),
    ("nores-fp32", 3, 5, 16, "fp32", False, "fp32", (4, 1, 2, 3, 1), False, True),
    ("res-bf16-out", 2, 9, 32, "bf16", True, "bf16", (2, 1, 4, 1, 1), False, True),
    ("res-batch1-no-dxo", 2, 6, 20, "fp32", True, "fp32", (8, 1, 8, 1, 1), True, False),
]
# the proj bias's gradient from the launch: (name, B, L, C, dtype, config, batch-1 vectors)
INTERPRET_BIAS_CASES = [
    ("bias-fp32", 2, 7, 24, "fp32", (2, 1, 2, 2, 1), False),
    ("bias-bf16-batch1", 3, 5, 16, "bf16", (4, 1, 2, 3, 1), True),
]
# gated_add: (name, B, L, C, dtype, config: block_m, iters, warps, batch-1 gate, bias)
INTERPRET_GATED_CASES = [
    ("gated-fp32", 2, 7, 24, "fp32", (2, 2, 1), False, True),
    ("gated-bf16-batch1", 3, 9, 20, "bf16", (4, 1, 1), True, True),
    ("gated-no-bias", 2, 5, 16, "fp32", (1, 3, 1), False, False),
]

_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
import test_adaln_norm_kernel as T
import maskar.kernels.adaln_norm as an
assert an._INTERPRET
for name, B, L, C, dn, res, on, cfg, b1, dxo in T.INTERPRET_CASES:
    an.FORCE_CONFIG = an.AdaLNNormConfig(*cfg)
    r = T.op_vs_torch(an, B, L, C, T.DTYPES[dn], res, T.DTYPES[on], batch1_vectors=b1, with_dx_out=dxo)
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
for name, B, L, C, dn, cfg, b1 in T.INTERPRET_BIAS_CASES:
    an.FORCE_CONFIG = an.AdaLNNormConfig(*cfg)
    r = T.op_vs_torch(an, B, L, C, T.DTYPES[dn], True, batch1_vectors=b1, bias=True)
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
for name, B, L, C, dn, cfg, b1, bias in T.INTERPRET_GATED_CASES:
    an.GATED_FORCE_CONFIG = an.GatedAddConfig(*cfg)
    r = T.gated_add_vs_torch(an, B, L, C, T.DTYPES[dn], batch1_gate=b1, bias=bias)
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
an.FORCE_CONFIG = an.GATED_FORCE_CONFIG = None
x = torch.randn(2, 11, 24)
o, dh, dxo = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
v = [torch.randn(2, 1, 24) for _ in range(3)]
h, x2, mean, rstd = an._forward(x, o, v[0], v[1], v[2], 1e-6, torch.float32)
a = an._backward(dh, x, dxo, o, v[0], v[1], mean, rstd)
b = an._backward(dh, x, dxo, o, v[0], v[1], mean, rstd)
same = all(bool(torch.equal(p, q)) for p, q in zip(a, b))
an.PAIRED_REDUCE = False
c = an._backward(dh, x, dxo, o, v[0], v[1], mean, rstd)
an.PAIRED_REDUCE = True
paired = max(float((p - q).abs().max()) for p, q in zip(a, c) if p.numel())
print("RESULT " + json.dumps({{"case": "deterministic", "same": same, "paired_vs_two_sums": paired}}))
# the loads one tile ahead: the same results bit for bit, with several tiles a program, a partial
# last tile and a program cut short by L, for both backward kernels
same_pf = []
for cfg in [(2, 1, 2, 3, 1), (2, 1, 4, 2, 1), (2, 1, 1, 4, 1)]:
    an.FORCE_CONFIG = an.AdaLNNormConfig(*cfg)
    an.GATED_FORCE_CONFIG = an.GatedAddConfig(*cfg[2:])
    for res in (False, True):
        oo, gg = (o, v[0]) if res else (None, None)
        h, x2, mean, rstd = an._forward(x, oo, gg, v[1], v[2], 1e-6, torch.float32)
        out = []
        for pf in (False, True):
            an.PREFETCH = pf
            out.append(an._backward(dh, x, dxo, oo, gg, v[1], mean, rstd, bias_sum=res)
                       + an._gated_add_backward(dh, o, v[0], True))
        an.PREFETCH = False
        same_pf.append(all(bool(torch.equal(p, q)) for p, q in zip(*out)))
an.FORCE_CONFIG = an.GATED_FORCE_CONFIG = None
print("RESULT " + json.dumps({{"case": "prefetch", "same": same_pf}}))
"""


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    pytest.importorskip("triton")
    return run_under_interpreter(_RUNNER, timeout=600)


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_CASES])
def test_kernels_match_torch_interpreted(interpreter_results, case):
    r = interpreter_results[case]
    spec = next(c for c in INTERPRET_CASES if c[0] == case)
    dtype, out = spec[4], spec[6]
    # bf16: one rounding of the inputs the reference shares, and the interpreter's truncating cast of h
    tol = 1e-5 if dtype == "fp32" and out == "fp32" else 1e-2
    grads = {k: v for k, v in r.items() if k.startswith("d") and not k.endswith("_dtype")}
    assert r["h"] < tol and r["stream"] < 1e-6 and all(v < tol for v in grads.values()), r
    assert r["h_dtype"] == str(DTYPES[out]) and r["x_dtype"] == "torch.float32", r
    assert r["dx_dtype"] == "torch.float32" and r["dscale_dtype"] == str(DTYPES[dtype]), r


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_BIAS_CASES])
def test_bias_gradient_from_the_launch_interpreted(interpreter_results, case):
    r = interpreter_results[case]
    tol = 1e-5 if "fp32" in case else 1e-2
    assert all(v < tol for k, v in r.items() if not k.endswith("_dtype")), r
    assert "db" in r and r["db_dtype"] == r["dgate_dtype"], r  # the bias's own dtype


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_GATED_CASES])
def test_gated_add_matches_torch_interpreted(interpreter_results, case):
    r = interpreter_results[case]
    spec = next(c for c in INTERPRET_GATED_CASES if c[0] == case)
    tol = 1e-5 if spec[4] == "fp32" else 1e-2
    assert all(v < tol for k, v in r.items() if not k.endswith("_dtype")), r
    assert r["y_dtype"] == "torch.float32" and r["dx_dtype"] == "torch.float32", r
    assert r["df_dtype"] == str(DTYPES[spec[4]]) and ("db" in r) == spec[7], r


def test_prefetched_loads_give_the_same_bits_interpreted(interpreter_results):
    r = interpreter_results["prefetch"]
    assert len(r["same"]) == 6 and all(r["same"]), r


def test_backward_is_deterministic_interpreted(interpreter_results):
    r = interpreter_results["deterministic"]
    assert r["same"] and r["paired_vs_two_sums"] < 1e-5, r  # one reduction of a pair, or two sums


# ----------------------------------------------------------------------------- CPU: the ops' torch bodies


@pytest.fixture
def cpu_reference(monkeypatch):
    an = pytest.importorskip("maskar.kernels.adaln_norm")
    if an._INTERPRET:
        pytest.skip("interpreter enabled in this process")
    monkeypatch.setattr(an, "CPU_REFERENCE", True)
    monkeypatch.setattr(an, "ENABLED", True)
    return an


@pytest.mark.parametrize("residual,bias", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_reference_matches_torch(cpu_reference, residual, bias, dtype):
    r = op_vs_torch(cpu_reference, 2, 9, 32, dtype, residual, bias=bias)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert all(v < tol for k, v in r.items() if not k.endswith("_dtype")), r
    assert ("db" in r) == bias, r


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch1_gate", [False, True])
def test_gated_add_reference_matches_torch(cpu_reference, bias, dtype, batch1_gate):
    r = gated_add_vs_torch(cpu_reference, 3, 9, 32, dtype, batch1_gate=batch1_gate, bias=bias)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert all(v < tol for k, v in r.items() if not k.endswith("_dtype")), r
    assert r["dgate_dtype"] == str(dtype) and ("db" in r) == bias, r


def test_opcheck(cpu_reference):
    an = cpu_reference
    x = torch.randn(2, 5, 16)
    v = [torch.randn(2, 1, 16) for _ in range(3)]
    o = torch.randn_like(x)
    torch.library.opcheck(an.adaln_norm_op, (x, o, v[0], v[1], v[2], EPS, torch.float32))
    torch.library.opcheck(an.adaln_norm_op, (x, None, None, v[1], v[2], EPS, torch.float32))
    h, x2, mean, rstd = an.adaln_norm_op(x, o, v[0], v[1], v[2], EPS, torch.float32)
    torch.library.opcheck(an.adaln_norm_bwd_op, (torch.randn_like(h), x, torch.randn_like(x), o, v[0], v[1],
                                                 mean, rstd))  # fmt: skip
    torch.library.opcheck(an.adaln_norm_bwd_op, (torch.randn_like(h), x, torch.randn_like(x), o, v[0], v[1],
                                                 mean, rstd, True))  # fmt: skip
    _, _, mean, rstd = an.adaln_norm_op(x, None, None, v[1], v[2], EPS, torch.float32)
    torch.library.opcheck(an.adaln_norm_bwd_op, (torch.randn_like(x), x, None, None, None, v[1], mean, rstd))
    for bias_sum in (True, False):
        torch.library.opcheck(an.gated_add_bwd_op, (torch.randn_like(x), o.bfloat16(), v[0], bias_sum))
    torch.library.opcheck(an.gated_add_bwd_op, (torch.randn_like(x), o, v[0][:1], True))


def _block_grads(block: AdaLNSelfAttnBlock, x: torch.Tensor, cond: torch.Tensor, compiled: bool = False):
    def f(x, cond):
        return block(x, cond).square().sum()

    if compiled:
        f = torch.compile(f, backend="aot_eager", fullgraph=True)
    xi, ci = x.clone().requires_grad_(), cond.clone().requires_grad_()
    params = [p for p in block.parameters() if p.requires_grad]
    return torch.autograd.grad(f(xi, ci), [xi, ci, *params])


@pytest.mark.parametrize("sums", [False, True])
@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_block_with_the_op_equals_torch_code_and_traces_without_break(cpu_reference, monkeypatch, drop_path,
                                                                       sums):
    """MASKAR_ADALN_SUMS (``sums``): the FFN residual through gated_add and the proj / fc2 bias
    gradients from the launches; every gradient (the biases' too) equals the torch code's."""
    monkeypatch.setattr(cpu_reference, "SUMS", sums)
    torch.manual_seed(0)
    block = AdaLNSelfAttnBlock(32, 24, 4, drop_path=drop_path).train()
    x, cond = torch.randn(3, 7, 32), torch.randn(3, 24)
    torch.manual_seed(1)  # the same drop-path draws both ways
    got = _block_grads(block, x, cond)
    calls = []
    real = cpu_reference.adaln_norm
    monkeypatch.setattr(cpu_reference, "adaln_norm", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_reference, "ENABLED", False)
    torch.manual_seed(1)
    want = _block_grads(block, x, cond)
    assert calls == []
    monkeypatch.setattr(cpu_reference, "ENABLED", True)
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 1e-5
    torch.manual_seed(1)
    _block_grads(block, x, cond)
    assert calls == [1, 1]
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda x, c: block(x, c).square().sum())(x.clone().requires_grad_(), cond)
    assert ex.graph_break_count == 0, ex.break_reasons
    nodes = [n for g in ex.graphs for m in g.modules() if hasattr(m, "graph") for n in m.graph.nodes]
    assert sum("adaln_norm" in str(n.target) for n in nodes) >= 2
    assert any("gated_add" in str(n.target) or "GatedAdd" in str(n.target) for n in nodes) == sums
    if drop_path == 0.0:
        for a, b in zip(_block_grads(block, x, cond, compiled=True), got, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("sums", [False, True])
def test_block_with_the_op_under_activation_checkpointing(cpu_reference, monkeypatch, sums):
    """train.activation_checkpointing recomputes the block's forward in the backward: the op's
    saved tensors and the stream it returns as a view come back the same."""
    monkeypatch.setattr(cpu_reference, "SUMS", sums)
    torch.manual_seed(0)
    block = AdaLNSelfAttnBlock(32, 24, 4).train()
    x, cond = torch.randn(2, 5, 32), torch.randn(2, 24)
    want = _block_grads(block, x, cond)
    block.checkpoint = True
    got = _block_grads(block, x, cond)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch,stage", [("var", 1), ("hmar", 1), ("hmar", 2)])
def test_whole_model_gradients_with_the_ops_equal_torch_code(cpu_reference, monkeypatch, arch, stage):
    """A tiny VAR / HMAR loss (drop path on): every trained parameter's gradient with the ops (and
    MASKAR_ADALN_SUMS) against the torch code, the same random draws both ways."""
    from test_train_speed import batch_of, loss_grads, tiny

    model = tiny(arch, stage=stage, drop_path_rate=0.2)
    batch = batch_of(model)
    calls = count_calls(cpu_reference, ("adaln_norm", "gated_add"), monkeypatch.setattr)
    grads, seen = {}, {}
    for name, enabled, sums in [("torch", False, False), ("ops", True, False), ("sums", True, True)]:
        monkeypatch.setattr(cpu_reference, "ENABLED", enabled)
        monkeypatch.setattr(cpu_reference, "SUMS", sums)
        out, grads[name] = loss_grads(model, batch)
        seen[name] = dict(calls)
    assert seen["torch"] == {"adaln_norm": 0, "gated_add": 0}
    assert seen["ops"]["adaln_norm"] > 0 and seen["ops"]["gated_add"] == 0
    assert seen["sums"]["gated_add"] > 0
    for name in ("ops", "sums"):
        worst = max(_rel(a, b) for a, b in zip(grads[name], grads["torch"], strict=True))
        assert worst < 1e-5, (name, worst)


def test_block_takes_the_op_only_with_autograd(cpu_reference, monkeypatch):
    calls = []
    real = cpu_reference.adaln_norm
    monkeypatch.setattr(cpu_reference, "adaln_norm", lambda *a: calls.append(1) or real(*a))
    block = AdaLNSelfAttnBlock(16, 8, 2)
    x, cond = torch.randn(2, 3, 16), torch.randn(2, 8)
    block(x, cond)
    assert calls == [1, 1]
    with torch.no_grad():
        block(x, cond)
    assert calls == [1, 1]  # sampling keeps the torch code (or its compiled parts on CUDA)


def test_cpu_never_takes_the_op_by_default(monkeypatch):
    an = pytest.importorskip("maskar.kernels.adaln_norm")
    if an._INTERPRET:
        pytest.skip("interpreter enabled in this process")
    monkeypatch.setattr(an, "ENABLED", True)
    assert an.supports(torch.randn(2, 3, 16, device="meta")) is False  # not CUDA, not the interpreter
    x = torch.randn(2, 3, 16)
    assert not an.supports(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not an.supports(x)
    assert not an.supports(torch.empty(2, 3, 16, device="meta"))


# ----------------------------------------------------------------------------- AOT compile


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("kernel", ["fwd", "bwd", "gated_add_bwd"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_kernels_compile_to_cubin_without_a_gpu(arch, kernel, prefetch):
    require_aot_compiler()
    from triton.compiler import ASTSource

    import maskar.kernels.adaln_norm as an

    cfg = an._DEFAULT
    if kernel == "fwd":
        fn, warps = an._adaln_norm_fwd, cfg.fwd_warps
        consts = {"BLOCK_M": cfg.fwd_block_m, "BLOCK_C": 1024, "RESIDUAL": True}
        types = {"X": "*fp32", "O": "*bf16", "G": "*bf16", "S": "*bf16", "SH": "*bf16", "X2": "*fp32",
                 "H": "*bf16", "MEAN": "*fp32", "RSTD": "*fp32", "L": "i32", "C": "i32", "sg": "i32",
                 "ss": "i32", "ssh": "i32", "eps": "fp32"}
    elif kernel == "bwd":  # with every sum (the bias's too)
        fn, warps = an._adaln_norm_bwd, cfg.bwd_warps
        consts = {"BLOCK_M": cfg.bwd_block_m, "BLOCK_C": 1024, "ITERS": cfg.bwd_iters, "RESIDUAL": True,
                  "HAS_DXO": True, "PAIRED": an.PAIRED_REDUCE, "BIAS_SUM": True, "PREFETCH": prefetch}
        types = {"DH": "*bf16", "X": "*fp32", "DXO": "*fp32", "O": "*bf16", "G": "*bf16", "S": "*bf16",
                 "MEAN": "*fp32", "RSTD": "*fp32", "DX": "*fp32", "DO": "*bf16", "PS": "*fp32",
                 "PSH": "*fp32", "PG": "*fp32", "PB": "*fp32", "L": "i32", "C": "i32", "sg": "i32",
                 "ss": "i32", "n_chunks": "i32"}
    else:
        gcfg = an._GATED_DEFAULT
        fn, warps = an._gated_add_bwd, gcfg.warps
        consts = {"BLOCK_M": gcfg.block_m, "BLOCK_C": 1024, "ITERS": gcfg.iters, "BIAS_SUM": True,
                  "PREFETCH": prefetch}
        types = {"DY": "*fp32", "F": "*bf16", "G": "*fp32", "DF": "*bf16", "PG": "*fp32", "PB": "*fp32",
                 "L": "i32", "C": "i32", "sg": "i32", "n_chunks": "i32"}
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    # fresh allocations and a 16-divisible width and vector strides, as the JIT specialises them
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if types.get(n, "").startswith("*") or n in ("C", "sg", "ss", "ssh")}
    src = ASTSource(fn=fn, signature=sig, attrs=aligned,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    try:
        compiled = compile_source(src, arch, warps, 1)
    except FileNotFoundError as e:
        pytest.skip(f"no CUDA toolchain in this Triton: {e}")
    ptx = compiled.asm["ptx"]
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx
    usage = resource_usage(compiled)
    print(f"adaln_norm {kernel} sm{arch} prefetch={prefetch}: {usage}")
    assert usage is None or usage["STACK"] == 0, usage  # no register spills


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("residual,bias", [(True, False), (True, True), (False, False)])
def test_kernels_match_torch_gpu(residual, bias):
    import maskar.kernels.adaln_norm as an  # the op itself: ENABLED only routes the block

    r = op_vs_torch(an, 2, 1031, 1024, torch.bfloat16, residual, torch.bfloat16, device="cuda", bias=bias)
    print(f"adaln_norm residual={residual} bias={bias} bf16 on CUDA: {r}")
    assert all(v < 1e-2 for k, v in r.items() if not k.endswith("_dtype")), r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch1_gate", [False, True])
def test_gated_add_matches_torch_gpu(batch1_gate):
    import maskar.kernels.adaln_norm as an

    r = gated_add_vs_torch(an, 2, 1031, 1024, torch.bfloat16, device="cuda", batch1_gate=batch1_gate)
    print(f"gated_add batch1_gate={batch1_gate} bf16 on CUDA: {r}")
    assert all(v < 1e-2 for k, v in r.items() if not k.endswith("_dtype")), r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sums", [False, True])
def test_block_with_the_kernels_equals_torch_code_gpu(monkeypatch, sums):
    """A d16-width block under bf16 autocast, compiled as `maskar train` compiles it: every gradient
    against the same block with the torch code (both bf16; the fp32 one as the scale of rounding).
    ``sums``: with MASKAR_ADALN_SUMS."""
    import maskar.kernels.adaln_norm as an

    monkeypatch.setattr(an, "SUMS", sums)
    torch.manual_seed(0)
    block = AdaLNSelfAttnBlock(1024, 1024, 16).cuda().train()
    x, cond = torch.randn(2, 680, 1024, device="cuda"), torch.randn(2, 1024, device="cuda")

    def grads(enabled: bool, amp: bool = True):
        monkeypatch.setattr(an, "ENABLED", enabled)
        torch._dynamo.reset()
        f = torch.compile(lambda x, c: block(x, c).float().square().mean())
        xi, ci = x.clone().requires_grad_(), cond.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = f(xi, ci)
        return torch.autograd.grad(loss, [xi, ci, *block.parameters()])

    got, want, exact = grads(True), grads(False), grads(False, amp=False)
    worst = max(_rel(a, b) for a, b in zip(got, want, strict=True))
    base = max(_rel(a, b) for a, b in zip(want, exact, strict=True))
    print(f"block grads, kernels (sums={sums}) vs torch code under bf16: rel max {worst:.2e} "
          f"(bf16 vs fp32: {base:.2e})")
    assert worst < max(2 * base, 1e-3)
