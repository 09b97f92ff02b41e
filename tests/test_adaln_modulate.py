"""The DiT block's adaLN projection with the LayerNorm modulation in its epilogue
(maskar.kernels.adaln_modulate) against the module path.

The reference takes the module path's steps: the projection rounded to the compute dtype, the
LayerNorm in fp32, the modulation in fp32 from the rounded shift / scale, one rounding. fp16
agrees to about one ulp of the output; under the CPU interpreter bf16 truncates where a GPU
rounds to nearest, so its bound is looser (the GPU test holds it to the tight one). CPU:
TRITON_INTERPRET=1 in one subprocess.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_aot import compiles_as_launched, require_aot_compiler, resource_usage, tensor_core_ops
from helpers_interpreter import run_under_interpreter
from test_adaln_mlp import DTYPES, rel

BOUND = {"fp16": 2e-3, "bf16": 3e-2}  # relative to the output's max |value|
gpu = pytest.mark.gpu


def reference(act, w3, b3, x, eps):
    """(h, gate) by the module path's steps (float64 products of the rounded operands)."""
    c = x.shape[1]
    mod = F.linear(act.double(), w3.double(), b3.double()).to(act.dtype)
    shift, scale, gate = mod.chunk(3, -1)
    ln = F.layer_norm(x.double(), (c,), eps=eps)
    return torch.addcmul(shift.double(), ln, 1 + scale.double()).to(act.dtype), gate


_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
from test_adaln_modulate import DTYPES, reference, rel
from maskar.kernels import adaln_modulate as am
from maskar.kernels.linear_act import MMConfig

def out(case, **kw):
    print("RESULT " + json.dumps(dict(case=case, **kw)), flush=True)

torch.manual_seed(0)
# rows and features that the tiles do not divide, K not a multiple of the block (EVEN_K False)
M, C, K = 37, 40, 48
for name, dt in DTYPES.items():
    act = torch.randn(M, K).to(dt)
    w3, b3 = (0.2 * torch.randn(3 * C, K)).to(dt), (0.2 * torch.randn(3 * C)).to(dt)
    x = 3 + 2 * torch.randn(M, C)  # the residual stream: float32, off-centre
    mean, rstd = am.ln_stats(x, 1e-6)
    h_ref, g_ref = reference(act, w3, b3, x, 1e-6)
    for label, cfg in (("tiles", MMConfig(32, 16, 32, 2, 4, 1)),
                       ("persistent", MMConfig(16, 16, 16, 2, 4, 1, persistent=True)),
                       ("tma", MMConfig(16, 16, 16, 2, 4, 1, path="tma", persistent=True)),
                       ("unfused", am.UNFUSED)):
        am.FORCE_CONFIG = cfg
        h, g = am.adaln_modulate(act, w3, b3, x, mean, rstd)
        out(f"op-{{name}}-{{label}}", h=rel(h, h_ref), g=rel(g, g_ref), dtypes=[str(h.dtype), str(g.dtype)])
    am.FORCE_CONFIG = None

# CASMAR's DiT (two blocks: the residual kernel hands its statistics on) and a sampled chain with
# the kernels off / the modulation kernel / both kernels, bf16 autocast on the CPU
from test_casmar import randomize_heads, tiny_casmar
from maskar.models.casmar import DiTBlock
from maskar.nn.attention import set_backend
model = tiny_casmar(gdm_d=2)
randomize_heads(model)
head = model.cond_diffloss.eval()
net = head.net
z = torch.randn(4, 32, 4, 4)
t = torch.full((4,), 100)
x = torch.randn(4, 4, 4, 4)
samples, steps = {{}}, {{}}
for mode in ("off", "modulate", "both"):
    DiTBlock.modulate_kernel, DiTBlock.residual_kernel = mode != "off", mode == "both"
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        cond = net.embed_condition(z)
        steps[mode] = net.forward_embedded(x, t, cond, None).float()
        samples[mode] = head.sample(z, 1.0, 2.0, generator=torch.Generator().manual_seed(0), cuda_graph=False)
        static = head._sample_graphed(z, 1.0, 2.0, head.gen_diffusion(), torch.Generator().manual_seed(0),
                                      capture=False)
    compiled = None
    if mode != "off":  # the step compiled whole (the ops opaque to Dynamo, their fakes giving the
        # shapes); PSA through SDPA, as the interpreter's PSA kernel does not trace
        set_backend(net, "sdpa")
        torch._dynamo.reset()
        f = torch.compile(net.forward_embedded, backend="aot_eager", fullgraph=True)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            eager = net.forward_embedded(x, t, cond, None).float()
            compiled = float((f(x, t, cond, None).float() - eager).abs().max())
        set_backend(net, "auto")
    out(f"dit-{{mode}}", step=rel(steps[mode], steps["off"]), sample=rel(samples[mode], samples["off"]),
        differs=bool(not torch.equal(steps[mode], steps["off"])), compiled=compiled,
        static_equals_eager=bool(torch.equal(static, samples[mode])))
DiTBlock.modulate_kernel = DiTBlock.residual_kernel = False
out("dit-residual-vs-modulate", step=rel(steps["both"], steps["modulate"]),
    differs=bool(not torch.equal(steps["both"], steps["modulate"])))
"""


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_under_interpreter(_RUNNER, timeout=900)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("label", ["tiles", "persistent", "tma", "unfused"])
def test_op_follows_the_module_path(interp, dt, label):
    r = interp[f"op-{dt}-{label}"]
    assert r["h"] <= BOUND[dt] and r["g"] <= BOUND[dt], r
    assert r["dtypes"] == [str(DTYPES[dt])] * 2


@pytest.mark.parametrize("mode", ["modulate", "both"])
def test_dit_with_the_kernels_stays_close_compiles_whole_and_graphs_equal_eager(interp, mode):
    r = interp[f"dit-{mode}"]
    assert r["differs"]  # the kernel path ran
    assert r["step"] <= BOUND["bf16"] and r["sample"] <= 5e-2, r
    assert r["compiled"] == 0.0  # compiled whole (fullgraph): the same bits
    assert r["static_equals_eager"] and interp["dit-off"]["static_equals_eager"]


def test_the_residual_kernel_ran_and_stays_close(interp):
    r = interp["dit-residual-vs-modulate"]
    assert r["differs"] and r["step"] <= BOUND["bf16"], r  # MASKAR_DIT_RESIDUAL changed the path


def test_off_by_default_and_in_the_graph_key():
    import os
    import subprocess
    import sys

    from maskar.models.casmar import DiTBlock, GlobalDiffLoss

    code = "from maskar.models.casmar import DiTBlock as B; print(B.modulate_kernel, B.residual_kernel)"
    for env, want in (("0", "False False"), ("1", "True True")):  # read at import: a fresh process
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=dict(os.environ, MASKAR_DIT_MODULATE=env, MASKAR_DIT_RESIDUAL=env))
        assert proc.stdout.strip() == want
    from maskar.nn.proximal_attention import ProximalAttention2D

    key = (DiTBlock.modulate_kernel, DiTBlock.residual_kernel, ProximalAttention2D.fused_qkv,
           DiTBlock.low_residual)
    assert GlobalDiffLoss.graph_key(None) == key


def test_fp32_and_autograd_run_the_module_path(monkeypatch):
    from test_casmar import randomize_heads, tiny_casmar

    from maskar.models.casmar import DiTBlock

    model = tiny_casmar()
    randomize_heads(model)
    block = model.cond_diffloss.net.blocks[0]
    x, c = torch.randn(2, 16, 16), torch.randn(2, 16, 16)
    with torch.no_grad():
        want = block(x, c, (4, 4), c)
        monkeypatch.setattr(DiTBlock, "modulate_kernel", True)
        assert torch.equal(block(x, c, (4, 4), c), want)  # fp32: not applied
    # the predicate: a low-precision compute dtype on a device the kernel runs on, and no autograd
    from maskar.models import casmar

    monkeypatch.setattr(casmar._adaln_modulate, "_INTERPRET", True)  # as under TRITON_INTERPRET
    with torch.autocast("cpu", torch.bfloat16):
        with torch.no_grad():
            assert casmar._modulate_kernel_applies(x)
        assert not casmar._modulate_kernel_applies(x)  # grad enabled
    with torch.no_grad():
        assert not casmar._modulate_kernel_applies(x)  # fp32


@pytest.mark.parametrize(
    "args,match",
    [(lambda: (torch.randn(4, 8).half(), torch.randn(9, 8).half(), torch.randn(9).half(), torch.randn(4, 4)),
      r"w3 \(12, K\)"),
     (lambda: (torch.randn(4, 8), torch.randn(12, 8), torch.randn(12), torch.randn(4, 4)), "fp16 / bf16"),
     (lambda: (torch.randn(4, 8).half(), torch.randn(12, 8).half(), torch.randn(12).half(),
               torch.randn(4, 8)[:, ::2]), "unit stride")],
)
def test_bad_inputs_are_named(args, match):
    am = pytest.importorskip("maskar.kernels.adaln_modulate")
    act, w3, b3, x = args()
    mean, rstd = am.ln_stats(x, 1e-6)
    with pytest.raises(ValueError, match=match):
        am.adaln_modulate(act, w3, b3, x, mean, rstd)


def test_kernels_compile_for_sm90():
    """Every candidate, compiled for Hopper as launched at CASMAR-B's DiT shapes (32,768 rows,
    width 512): tensor-core dots, shared memory within the H200's, no register spills."""
    require_aot_compiler()
    from maskar.kernels import adaln_modulate as am

    m, c = 32768, 512
    act = torch.randn(m, c, dtype=torch.bfloat16)
    w3, b3 = torch.randn(3 * c, c, dtype=torch.bfloat16), torch.randn(3 * c, dtype=torch.bfloat16)
    x = torch.randn(m, c)
    mean, rstd = am.ln_stats(x, 1e-6)
    for cfg in am.CANDIDATES:
        am.FORCE_CONFIG = cfg
        try:
            with compiles_as_launched() as found:
                am.adaln_modulate(act, w3, b3, x, mean, rstd)
        except FileNotFoundError as e:
            pytest.skip(f"no CUDA toolchain in this Triton: {e}")
        finally:
            am.FORCE_CONFIG = None
        ((name, c),) = found
        assert "mma" in c.asm["ptx"] and c.metadata.shared <= 232448, (name, cfg)
        # A from shared memory: the modulation is in the epilogue, so no wgmma takes A from
        # registers (the prologue form that ran at ~80 TFLOP/s; scripts/aot_resource_usage.py)
        tc = tensor_core_ops(c)
        assert tc["wgmma"] > 0 and tc["wgmma_reg_a"] == 0, (name, cfg, tc)
        usage = resource_usage(c)
        assert usage is None or usage["STACK"] == 0, (name, cfg, usage)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_op_at_casmar_b_shapes():
    """Every candidate at CASMAR-B's DiT shapes in bf16 against the float64 reference; the tuned
    op; the DiT block with the kernel against the module path (compiled, bf16)."""
    from maskar.kernels import adaln_modulate as am

    torch.manual_seed(0)
    m, c = 32768, 512
    act = torch.randn(m, c, device="cuda").bfloat16()
    w3 = (0.05 * torch.randn(3 * c, c, device="cuda")).bfloat16()
    b3 = (0.05 * torch.randn(3 * c, device="cuda")).bfloat16()
    x = 2 * torch.randn(m, c, device="cuda")
    mean, rstd = am.ln_stats(x, 1e-6)
    h_ref, g_ref = reference(act, w3, b3, x, 1e-6)
    for cfg in [am.UNFUSED, *am.CANDIDATES]:
        am.FORCE_CONFIG = cfg
        try:
            h, g = am.adaln_modulate(act, w3, b3, x, mean, rstd)
        finally:
            am.FORCE_CONFIG = None
        print(f"{cfg}: h rel {rel(h, h_ref):.2e}, gate rel {rel(g, g_ref):.2e}")
        assert rel(h, h_ref) <= 8e-3 and rel(g, g_ref) <= 8e-3, cfg
    h, g = am.adaln_modulate(act, w3, b3, x, mean, rstd)
    print("tuned:", am.tuning_log())
    assert rel(h, h_ref) <= 8e-3 and rel(g, g_ref) <= 8e-3


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("residual", [False, True])
def test_gpu_dit_with_the_kernels_at_casmar_b_width(monkeypatch, residual):
    """A two-block DiT at CASMAR-B's width (512, 8 heads, 16 x 16 grid, PSA 7 x 7) under bf16
    autocast, with MASKAR_DIT_MODULATE (and MASKAR_DIT_RESIDUAL) against the module path."""
    from test_casmar import casmar_b_dit

    from maskar.models.casmar import DiTBlock

    net = casmar_b_dit(2)
    x = torch.randn(16, 16, 16, 16, device="cuda")
    z = torch.randn(16, 768, 16, 16, device="cuda")
    t = torch.full((16,), 400, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        cond = net.embed_condition(z)
        want = net.forward_embedded(x, t, cond, None).float()
        monkeypatch.setattr(DiTBlock, "modulate_kernel", True)
        monkeypatch.setattr(DiTBlock, "residual_kernel", residual)
        got = net.forward_embedded(x, t, cond, None).float()
    err = rel(got, want)
    which = "modulate + residual kernels" if residual else "modulate kernel"
    print(f"DiT, {which} vs module path (bf16): rel max {err:.2e}")
    assert 0 < err <= 2e-2
