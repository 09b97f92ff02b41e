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
                with_dx_out=True) -> dict:
    """h, the stream and every gradient of ``_AdaLNNorm`` against the torch code in float64.
    x is float32; o and the (B | 1, 1, C) vectors are ``dtype`` (autocast's linears' output)."""
    g = torch.Generator().manual_seed(seed)
    vb = 1 if batch1_vectors else B
    x0 = (torch.randn(B, L, C, generator=g) * 2 + 0.5).to(device)
    o0 = torch.randn(B, L, C, generator=g).to(device, dtype)
    gate0, scale0, shift0 = [(torch.randn(vb, 1, C, generator=g) * 0.5).to(device, dtype) for _ in range(3)]
    out_dtype = out_dtype or torch.float32
    dh = torch.randn(B, L, C, generator=g).to(device, out_dtype)
    dxo = torch.randn(B, L, C, generator=g).to(device) if with_dx_out else None
    names = ["x", "o", "gate", "scale", "shift"] if residual else ["x", "scale", "shift"]

    def run(fn, cast):
        t = {"x": x0, "o": o0, "gate": gate0, "scale": scale0, "shift": shift0}
        t = {k: cast(v).requires_grad_() for k, v in t.items() if k in names}
        h, xo = fn(t["x"], t.get("o"), t.get("gate"), t["scale"], t["shift"])
        loss = (h.double() * dh.double()).sum()
        if dxo is not None:
            loss = loss + (xo.double() * dxo.double()).sum()
        return h, xo, torch.autograd.grad(loss, [t[n] for n in names])

    def ours(x, o, gate, scale, shift):
        return an._AdaLNNorm.apply(x, o, gate, scale, shift, EPS, out_dtype)

    h, xo, got = run(ours, lambda t: t.clone())
    rh, rxo, want = run(_torch_block_part, lambda t: t.double())
    out = {"h": _rel(h, rh), "stream": _rel(xo, rxo), "h_dtype": str(h.dtype), "x_dtype": str(xo.dtype)}
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
an.FORCE_CONFIG = None
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


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_reference_matches_torch(cpu_reference, residual, dtype):
    r = op_vs_torch(cpu_reference, 2, 9, 32, dtype, residual)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert all(v < tol for k, v in r.items() if not k.endswith("_dtype")), r


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
    _, _, mean, rstd = an.adaln_norm_op(x, None, None, v[1], v[2], EPS, torch.float32)
    torch.library.opcheck(an.adaln_norm_bwd_op, (torch.randn_like(x), x, None, None, None, v[1], mean, rstd))


def _block_grads(block: AdaLNSelfAttnBlock, x: torch.Tensor, cond: torch.Tensor, compiled: bool = False):
    def f(x, cond):
        return block(x, cond).square().sum()

    if compiled:
        f = torch.compile(f, backend="aot_eager", fullgraph=True)
    xi, ci = x.clone().requires_grad_(), cond.clone().requires_grad_()
    params = [p for p in block.parameters() if p.requires_grad]
    return torch.autograd.grad(f(xi, ci), [xi, ci, *params])


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_block_with_the_op_equals_torch_code_and_traces_without_break(cpu_reference, monkeypatch, drop_path):
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
    if drop_path == 0.0:
        for a, b in zip(_block_grads(block, x, cond, compiled=True), got, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_block_with_the_op_under_activation_checkpointing(cpu_reference):
    """train.activation_checkpointing recomputes the block's forward in the backward: the op's
    saved tensors and the stream it returns as a view come back the same."""
    torch.manual_seed(0)
    block = AdaLNSelfAttnBlock(32, 24, 4).train()
    x, cond = torch.randn(2, 5, 32), torch.randn(2, 24)
    want = _block_grads(block, x, cond)
    block.checkpoint = True
    got = _block_grads(block, x, cond)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


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
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_kernels_compile_to_cubin_without_a_gpu(arch, kernel):
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
    else:
        fn, warps = an._adaln_norm_bwd, cfg.bwd_warps
        consts = {"BLOCK_M": cfg.bwd_block_m, "BLOCK_C": 1024, "ITERS": cfg.bwd_iters, "RESIDUAL": True,
                  "HAS_DXO": True, "PAIRED": an.PAIRED_REDUCE}
        types = {"DH": "*bf16", "X": "*fp32", "DXO": "*fp32", "O": "*bf16", "G": "*bf16", "S": "*bf16",
                 "MEAN": "*fp32", "RSTD": "*fp32", "DX": "*fp32", "DO": "*bf16", "PS": "*fp32",
                 "PSH": "*fp32", "PG": "*fp32", "L": "i32", "C": "i32", "sg": "i32", "ss": "i32",
                 "n_chunks": "i32"}
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
    print(f"adaln_norm {kernel} sm{arch}: {usage}")
    assert usage is None or usage["STACK"] == 0, usage  # no register spills


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("residual", [True, False])
def test_kernels_match_torch_gpu(residual):
    import maskar.kernels.adaln_norm as an  # the op itself: ENABLED only routes the block

    r = op_vs_torch(an, 2, 1031, 1024, torch.bfloat16, residual, torch.bfloat16, device="cuda")
    print(f"adaln_norm residual={residual} bf16 on CUDA: {r}")
    assert all(v < 1e-2 for k, v in r.items() if not k.endswith("_dtype")), r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_block_with_the_kernels_equals_torch_code_gpu(monkeypatch):
    """A d16-width block under bf16 autocast, compiled as `maskar train` compiles it: every gradient
    against the same block with the torch code (both bf16; the fp32 one as the scale of rounding)."""
    import maskar.kernels.adaln_norm as an

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
    print(f"block grads, kernels vs torch code under bf16: rel max {worst:.2e} (bf16 vs fp32: {base:.2e})")
    assert worst < max(2 * base, 1e-3)
