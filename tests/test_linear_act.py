"""The matmul with the GELU in its epilogue (maskar.kernels.linear_act) and its use by the MLPs.

Truth: the same product computed in float64 from the same rounded inputs. The kernel rounds once
from float32, so it must stay within one unit in the last place of the output dtype (the CPU
interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest: one ulp covers both) plus
the float32 accumulation's error, relative to sum |x| |w| + |b|. On the CPU the kernel runs under
TRITON_INTERPRET=1 in one subprocess; GPU tests are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_aot import compiles_as_launched, require_aot_compiler, resource_usage
from helpers_interpreter import run_under_interpreter
from torch import nn

from maskar.nn import linear_gelu
from maskar.nn.vit import Mlp

MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
APPROX = {"none": "none", "gelu": "none", "gelu_tanh": "tanh"}


def make(m: int, n: int, k: int, dtype, bias: bool, seed: int = 0, row_stride: int | None = None,
         device="cpu"):
    """x (m, k) (a column slice of a wider buffer when row_stride > k), w (n, k), b (n,) or None."""
    g = torch.Generator(device=device).manual_seed(seed)
    wide = torch.randn(m, row_stride or k, generator=g, device=device).to(dtype)
    x = wide[:, :k]
    w = (torch.randn(n, k, generator=g, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    return x, w, b


def truth(x, w, b, act: str):
    """(y, scale) in float64: the activation of x w^T + b, and sum |x| |w| + |b| per element."""
    pre = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if b is not None:
        pre, scale = pre + b.double(), scale + b.double().abs()
    y = pre if act == "none" else F.gelu(pre, approximate=APPROX[act])
    return y, scale * 1.2  # |gelu'| <= 1.13


def excess(got, x, w, b, act: str, ulps: float = 1.0, rel: float = 1e-5) -> float:
    """Largest |got - truth| / (ulps ulp(truth) + rel scale); <= 1 passes."""
    y, scale = truth(x, w, b, act)
    ulp = torch.exp2(torch.floor(torch.log2(y.abs().clamp_min(1e-30))) - MANTISSA[x.dtype])
    return float(((got.double() - y).abs() / (ulps * ulp + rel * scale + 1e-30)).max())


# (m, n, k, bias, row_stride): ragged tiles, K not a multiple of the 32-deep interpreter tile, a
# strided x, one row, fewer rows than a tile
SHAPES = [(50, 70, 96, True, None), (64, 64, 64, False, None), (33, 40, 40, True, None),
          (37, 48, 64, True, 80), (1, 96, 32, True, None), (9, 33, 17, False, None)]
CASES = [(dt, act, i) for dt in DTYPES for act in ("none", "gelu", "gelu_tanh") for i in range(len(SHAPES))]

_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
from test_linear_act import CASES, DTYPES, SHAPES, excess, make
from maskar.kernels import linear_act as la
from maskar.nn import linear_gelu
from maskar.nn.vit import Mlp

def out(case, **kw):
    print("RESULT " + json.dumps(dict(case=case, **kw)), flush=True)

for dt, act, i in CASES:
    m, n, k, bias, stride = SHAPES[i]
    x, w, b = make(m, n, k, DTYPES[dt], bias, seed=i, row_stride=stride)
    y = la.linear_act(x, w, b, act)
    yp = la._launch(x, w, b, act, la.MMConfig(32, 32, 32, 2, 4, 1, persistent=True))  # 2 programs
    try:  # through tensor descriptors, persistent
        yt = la._launch(x, w, b, act, la.MMConfig(32, 32, 32, 2, 4, 1, path="tma", persistent=True))
        tma = excess(yt, x, w, b, act)
    except ValueError as e:  # rows not 16-byte aligned
        tma = str(e)
    out(f"{{dt}}-{{act}}-{{i}}", excess=excess(y, x, w, b, act), dtype=str(y.dtype), shape=list(y.shape),
        finite=bool(torch.isfinite(y).all()), persistent_excess=excess(yp, x, w, b, act), tma_excess=tma)

# the exact GELU's erfc fit in fp32 against float64, over the negative tail too
import triton, triton.language as tl

@triton.jit
def _gelu_probe(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, la._gelu_erf(tl.load(X + offs)))

xs = torch.linspace(-9, 9, 4096, dtype=torch.float64)
ys = torch.empty(4096, dtype=torch.float32)
_gelu_probe[(1,)](xs.float(), ys, N=4096)
phi = torch.where(xs < 0, 0.5 * torch.special.erfc(-xs / 2**0.5), 0.5 * (1 + torch.erf(xs / 2**0.5)))
exact = xs * phi
out("gelu-erf", max_rel=float(((ys.double() - exact).abs() / exact.abs().clamp_min(1e-300)).max()))

# the opaque op under torch.compile (dynamic rows) equals the eager call, bit for bit
torch._dynamo.reset()
f = torch.compile(lambda x, w, b: la.linear_act_op(x, w, b, "gelu") * 2, backend="aot_eager", dynamic=True)
diffs = []
for m in (48, 20, 33):
    x, w, b = make(m, 40, 64, torch.bfloat16, True, seed=m)
    diffs.append(float((f(x, w, b) - la.linear_act(x, w, b, "gelu") * 2).abs().max()))
out("compiled", diffs=diffs)

# the MLP: with the switch on, in bf16 without autograd, fc1 + GELU go through the op
linear_gelu.enable_triton(True)
for approximate in ("none", "tanh"):
    torch.manual_seed(0)
    mlp = Mlp(64, 256).to(torch.bfloat16).eval()
    mlp.act = torch.nn.GELU(approximate=approximate)
    x = torch.randn(2, 7, 64).to(torch.bfloat16)
    with torch.no_grad():
        took = linear_gelu.takes(x, approximate)
        got = mlp(x)
        act = "gelu" if approximate == "none" else "gelu_tanh"
        h = la.linear_act(x.reshape(-1, 64), mlp.fc1.weight, mlp.fc1.bias, act)
        want = mlp.fc2(h.reshape(2, 7, 256))
    with torch.enable_grad():  # autograd on: the plain pair, exactly
        took_grad = linear_gelu.takes(x, approximate)
    torch._dynamo.reset()  # and the MLP compiled whole (no graph break at the op), dynamic rows
    cm = torch.compile(mlp, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        cdiff = max(float((cm(x[:, :n]) - mlp(x[:, :n])).abs().max()) for n in (7, 5))
    out(f"mlp-{{approximate}}", took=took, took_grad=took_grad, diff=float((got - want).abs().max()),
        shape=list(got.shape), compiled_diff=cdiff)

# the diffusion head's batched adaLN projection goes through the op (act none) when switched on
from maskar.nn import diffloss as dl
torch.manual_seed(1)
net = dl.DiffLoss(16, 48, depth=2, width=64).net
for p in net.parameters():  # not the adaLN-zero init, whose output is 0
    torch.nn.init.normal_(p, std=0.1)
net = net.to(torch.bfloat16)
x, z = torch.randn(6, 16).to(torch.bfloat16), torch.randn(6, 48).to(torch.bfloat16)
calls, orig = [], la.linear_act
la.linear_act = lambda *a: (calls.append(a[3]), orig(*a))[1]
with torch.no_grad():
    c_emb, t_emb = net.cond_embed(z), net.time_embed(torch.full((1,), 2))
    mw = net.modulation_weights(torch.bfloat16)
    on = net.forward_embedded(x, t_emb, c_emb, mw)
    linear_gelu.enable_triton(False)
    off = net.forward_embedded(x, t_emb, c_emb, mw)
    linear_gelu.enable_triton(True)
la.linear_act = orig
out("head-modulation", acts=calls, diff=float((on.float() - off.float()).abs().max() / off.abs().max()))

# the benchmark's case runner (wall-clock timer on the CPU): one row per method, all of them run
from maskar.bench.linear_act import run_case
rows = run_case(40, 48, 32, "gelu_tanh", torch.bfloat16, reps=1, device="cpu")
out("bench", methods=[r["method"] for r in rows], errors=[r.get("error") for r in rows],
    diffs=[r.get("rel_diff") for r in rows])
from maskar.bench.linear_act import head_step_rows
head = head_step_rows([6], steps=2, reps=1, device="cpu", width=64, depth=2)
out("bench-head", methods=[r["method"] for r in head], diffs=[r["rel_diff_vs_first"] for r in head],
    us=[r["us_per_step"] for r in head])
"""


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_under_interpreter(_RUNNER, timeout=600)


@pytest.mark.parametrize("dt,act,i", CASES)
def test_kernel_matches_float64_within_one_ulp(interp, dt, act, i):
    r = interp[f"{dt}-{act}-{i}"]
    m, n, _k, _bias, _stride = SHAPES[i]
    assert r["finite"] and r["shape"] == [m, n] and r["dtype"] == str(DTYPES[dt])
    assert r["excess"] <= 1.0 and r["persistent_excess"] <= 1.0, r
    if (_stride or _k) * 2 % 16:
        assert "16-byte aligned" in r["tma_excess"]
    else:
        assert r["tma_excess"] <= 1.0, r


def test_exact_gelu_keeps_relative_precision_on_the_tail(interp):
    assert interp["gelu-erf"]["max_rel"] < 2e-5  # torch's fp32 0.5 x (1 + erf) loses all of it there


def test_op_under_torch_compile_equals_eager_for_every_row_count(interp):
    assert interp["compiled"]["diffs"] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_mlp_takes_the_op_only_without_autograd(interp, approximate):
    r = interp[f"mlp-{approximate}"]
    assert r["took"] and not r["took_grad"] and r["shape"] == [2, 7, 64]
    assert r["diff"] == 0.0 and r["compiled_diff"] == 0.0


def test_bench_case_runs_every_method(interp):
    from maskar.kernels.linear_act import CANDIDATES

    r = interp["bench"]
    assert r["methods"] == ["linear", "unfused", *[f"triton:{i}" for i in range(len(CANDIDATES))], "op"]
    assert r["errors"] == [None] * len(r["methods"])
    assert max(r["diffs"][1:]) < 2e-2 and r["diffs"][1] == 0.0  # the GELU'd methods agree


def test_head_modulation_takes_the_op_when_switched_on(interp):
    r = interp["head-modulation"]
    assert r["acts"] == ["none"] and r["diff"] < 3e-2  # interpreter bf16 (truncating) vs F.linear


def test_bench_head_step_runs_every_variant(interp):
    r = interp["bench-head"]
    assert r["methods"] == ["module, eager", "module, compiled", "fused, compiled"]
    assert r["diffs"][0] == 0.0 and r["diffs"][1] == 0.0 and 0 < r["diffs"][2] < 5e-2  # fused: rounding
    assert min(r["us"]) > 0


def test_switch_off_by_default_and_off_keeps_the_plain_pair(monkeypatch):
    import importlib

    monkeypatch.delenv("MASKAR_LINEAR_ACT", raising=False)
    assert importlib.reload(linear_gelu).TRITON is False
    torch.manual_seed(0)
    mlp = Mlp(32, 128).eval()
    x = torch.randn(3, 5, 32)
    assert not linear_gelu.takes(x, "none") and not linear_gelu.takes(x.bfloat16(), "none")
    with torch.no_grad():
        assert torch.equal(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))
    monkeypatch.setenv("MASKAR_LINEAR_ACT", "1")
    assert importlib.reload(linear_gelu).TRITON is True
    monkeypatch.delenv("MASKAR_LINEAR_ACT")
    importlib.reload(linear_gelu)


def test_fp32_and_cpu_without_the_interpreter_keep_the_plain_pair(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(linear_gelu, "TRITON", True)
    linear_gelu.load_kernel()
    if linear_gelu._kernel is None or linear_gelu._kernel._INTERPRET:
        pytest.skip("Triton missing, or the interpreter is on in this process")
    x = torch.randn(4, 32)
    assert not linear_gelu.takes(x, "none")  # fp32
    assert not linear_gelu.takes(x.bfloat16(), "none")  # a CPU tensor without the interpreter


@pytest.mark.parametrize(
    "args,match",
    [((torch.randn(4, 8).half(), torch.randn(6, 8).half(), None, "relu"), "act: expected one of"),
     ((torch.randn(4, 8).half(), torch.randn(6, 9).half(), None, "gelu"), r"expected x \(M, K\)"),
     ((torch.randn(4, 8).half(), torch.randn(6, 8).half(), torch.randn(5).half(), "gelu"), r"bias \(6,\)"),
     ((torch.randn(4, 8), torch.randn(6, 8), None, "gelu"), "fp16 / bf16"),
     ((torch.randn(8, 4).half().t(), torch.randn(6, 8).half(), None, "gelu"), "contiguous along K")],
)
def test_bad_inputs_are_named(args, match):
    la = pytest.importorskip("maskar.kernels.linear_act")
    with pytest.raises(ValueError, match=match):
        la.linear_act(*args)


def test_rows_class_buckets_powers_of_two():
    la = pytest.importorskip("maskar.kernels.linear_act")
    assert [la._rows_class(m) for m in (1, 128, 129, 24576, 40960, 40961)] == [64, 128, 256, 32768,
                                                                                   65536, 65536]


def test_candidates_compile_for_sm90_with_wgmma_in_shared_memory():
    """Every tile config, compiled for Hopper as its launch specialises it (Triton ships ptxas):
    its dots become wgmma, its shared memory fits the H200's 227 KB per block, and the default
    config keeps the exact GELU's accumulator in registers (no spills)."""
    require_aot_compiler()
    from maskar.kernels import linear_act as la

    x, w, b = make(1000, 3072, 768, torch.bfloat16, True, seed=0)
    for cfg in la.CANDIDATES:
        try:
            with compiles_as_launched() as found:
                la._launch(x, w, b, "gelu", cfg)
        except FileNotFoundError as e:  # no ptxas in this Triton build
            pytest.skip(f"no CUDA toolchain in this Triton: {e}")
        [(_, compiled)] = found
        assert "wgmma.mma_async" in compiled.asm["ptx"], cfg
        assert compiled.metadata.shared <= 232448, (cfg, compiled.metadata.shared)
        usage = resource_usage(compiled)
        if cfg == la.CANDIDATES[0] and usage is not None:
            assert usage["STACK"] == 0, usage


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "none"])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_gpu_every_config_within_one_ulp(act, dt):
    """Every candidate (bf16 exact GELU, MAR's case; the first tiled, persistent and descriptor
    ones otherwise, to bound compile time) and the baselines on MAR-B's fc1 shape with ragged rows:
    within one ulp of the float64 truth (the baselines round the pre-activation first: four)."""
    from maskar.kernels import linear_act as la

    x, w, b = make(3000, 3072, 768, DTYPES[dt], True, seed=1, device="cuda")
    baselines = [la.UNFUSED] + ([la.CUBLASLT] if act == "gelu_tanh" else [])
    configs = la.CANDIDATES
    if (dt, act) != ("bf16", "gelu"):
        configs = [next(c for c in la.CANDIDATES if c.path == p and c.persistent == q)
                   for p, q in (("triton", False), ("triton", True), ("tma", True))]
    for cfg in [*configs, *baselines]:
        y = la._launch(x, w, b, act, cfg)
        limit = 1.0 if cfg.path in ("triton", "tma") else 4.0  # cuBLAS(Lt) baselines: not under test
        assert excess(y, x, w, b, act) <= limit, cfg


@gpu
@needs_cuda
def test_gpu_tuned_op_compiled_and_in_a_cuda_graph_equal_eager():
    """The tuned op (first call tunes), then the same op inside a compiled function replayed from
    a CUDA graph: bit for bit the eager result, and repeated calls are deterministic."""
    from maskar.kernels import linear_act as la

    x, w, b = make(4096, 3072, 768, torch.bfloat16, True, seed=2, device="cuda")
    eager = la.linear_act(x, w, b, "gelu")
    assert torch.equal(la.linear_act(x, w, b, "gelu"), eager)
    f = torch.compile(lambda x: la.linear_act_op(x, w, b, "gelu"), dynamic=False)
    static = x.clone()
    f(static)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = f(static)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    key = next(k for k in la.tuned_configs() if k[2:5] == (3072, 768, "gelu"))
    print("tuned:", la.tuning_log()[key])


@gpu
@needs_cuda
def test_gpu_mar_block_with_the_op_equals_the_plain_block_to_rounding():
    """A MAR-B ViT block under bf16 autocast, no grad: the op's path against the plain pair."""
    from maskar.nn.vit import Block

    torch.manual_seed(0)
    blk = Block(768, 12).cuda().eval()
    x = torch.randn(8, 320, 768, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        linear_gelu.enable_triton(False)
        plain = blk(x)
        linear_gelu.enable_triton(True)
        try:
            fused = blk(x)
        finally:
            linear_gelu.enable_triton(False)
    rel = ((fused - plain).abs().max() / plain.abs().max()).item()
    assert rel < 2e-2, rel
    assert isinstance(blk.mlp.act, nn.GELU) and blk.mlp.act.approximate == "none"
