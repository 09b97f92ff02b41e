"""The MLP head's residual block as two Triton kernels (maskar.kernels.adaln_mlp) against the
module path with the same rounding steps.

The reference follows the eager bf16 path step for step (LayerNorm in fp32, ``1 + scale`` in the
modulation's dtype, the linear's output rounded before SiLU / the gate, the gate product and the
sum rounded), so in fp16 the two differ only by the order of fp32 sums: about one ulp. In bf16
the CPU interpreter truncates at each rounding where a GPU rounds to nearest, so its bound is
looser (the GPU tests hold bf16 to the tight one). CPU: TRITON_INTERPRET=1 in one subprocess.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers_aot import compiles_as_launched, require_aot_compiler, resource_usage
from helpers_interpreter import run_under_interpreter

from maskar.nn import diffloss as dl

BOUND = {"fp16": 2.5e-3, "bf16": 3e-2}  # relative to the output's max |value|
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def reference_block(x, mod, off, block, dtype):
    """(h, y) of one ResBlock on the batched modulation's columns [off, off + 3W), eager steps."""
    w = x.shape[1]
    shift, scale, gate = mod[:, off:off + 3 * w].chunk(3, -1)
    ln_mod = block.in_ln
    ln = F.layer_norm(x.float(), (w,), ln_mod.weight.float(), ln_mod.bias.float(), ln_mod.eps)
    a = torch.addcmul(shift.float(), ln, (1 + scale).float()).to(dtype)
    lin1, lin2 = block.mlp[0], block.mlp[2]
    h = F.silu(F.linear(a.float(), lin1.weight.to(dtype).float(), lin1.bias.to(dtype).float()).to(dtype))
    out = F.linear(h.float(), lin2.weight.to(dtype).float(), lin2.bias.to(dtype).float()).to(dtype)
    return h, x + gate * out


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
from test_adaln_mlp import DTYPES, reference_block, rel
from maskar.kernels import adaln_mlp as ah
from maskar.nn import diffloss as dl

def out(case, **kw):
    print("RESULT " + json.dumps(dict(case=case, **kw)), flush=True)

torch.manual_seed(0)
W, N = 64, 37
block = dl.ResBlock(W)
for p in block.parameters():
    torch.nn.init.normal_(p, std=0.2)
for name, dt in DTYPES.items():
    x = torch.randn(N, W).to(dt)
    mod = torch.randn(N, 6 * W).to(dt)  # a wider table: this block's columns start at 3W
    h_ref, y_ref = reference_block(x, mod, 3 * W, block, dt)
    lin1, lin2, ln = block.mlp[0], block.mlp[2], block.in_ln
    h = ah.modulated_linear(x, mod, 3 * W, 4 * W, ln.weight, ln.bias, ln.eps, lin1.weight.to(dt),
                            lin1.bias.to(dt), "silu")
    y = ah.gated_residual_linear(h_ref, lin2.weight.to(dt), lin2.bias.to(dt), x, mod, 5 * W)
    out(f"ops-{{name}}", h=rel(h, h_ref), y=rel(y, y_ref), dtypes=[str(h.dtype), str(y.dtype)])

# the whole step, fused against the module path (batched modulation), and compiled (aot_eager)
head = dl.DiffLoss(16, 48, depth=3, width=64, num_sampling_steps="5")
for p in head.parameters():
    torch.nn.init.normal_(p, std=0.1)
dl.load_fused_kernels()
for name, dt in DTYPES.items():
    net = head.net.to(dt)
    x, z = torch.randn(10, 16).to(dt), torch.randn(10, 48).to(dt)
    with torch.no_grad():
        c_emb, t_emb = net.cond_embed(z), net.time_embed(torch.full((1,), 3))
        mw = net.modulation_weights(dt)
        ref = net.forward_embedded(x, t_emb, c_emb, mw, fused=False)
        got = net.forward_embedded(x, t_emb, c_emb, mw, fused=True)
        grad_off = dl.fused_blocks_apply(net.input_proj(x), mw)
        torch._dynamo.reset()
        f = torch.compile(lambda x, c: net.forward_embedded(x, t_emb, c, mw, fused=True), backend="aot_eager",
                          fullgraph=True, dynamic=True)
        comp = [float((f(x[:k], c_emb[:k]) - net.forward_embedded(x[:k], t_emb, c_emb[:k], mw, fused=True))
                      .abs().max()) for k in (10, 6)]
    with torch.enable_grad():
        grad_on = dl.fused_blocks_apply(net.input_proj(x).detach(), mw)
    out(f"step-{{name}}", err=rel(got, ref), shape=list(got.shape), compiled=comp, applies=grad_off,
        applies_with_grad=grad_on)

# sampling a short chain with the head switched on and off under (CPU) bf16 autocast
head2 = dl.DiffLoss(16, 48, depth=2, width=64, num_sampling_steps="5").eval()
for p in head2.parameters():
    torch.nn.init.normal_(p, std=0.1)
head2.batched_modulation = True
z = torch.randn(8, 48)
samples = {{}}
for on in (False, True):
    head2.set_fused_blocks(on)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        samples[on] = head2.sample(z, temperature=1.0, cfg=2.0, generator=torch.Generator().manual_seed(0))
out("sample", err=rel(samples[True], samples[False]))
"""


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_under_interpreter(_RUNNER, timeout=600)


@pytest.mark.parametrize("dt", DTYPES)
def test_each_kernel_follows_the_eager_rounding_steps(interp, dt):
    r = interp[f"ops-{dt}"]
    assert r["h"] <= BOUND[dt] and r["y"] <= BOUND[dt], r
    assert r["dtypes"] == [str(DTYPES[dt])] * 2


@pytest.mark.parametrize("dt", DTYPES)
def test_fused_step_matches_the_module_path_and_compiles_whole(interp, dt):
    r = interp[f"step-{dt}"]
    assert 0 < r["err"] <= BOUND[dt] and r["shape"] == [10, 32], r  # > 0: the fused path ran
    assert r["compiled"] == [0.0, 0.0]  # one graph (fullgraph), dynamic rows, same bits
    assert r["applies"] and not r["applies_with_grad"]


def test_sampling_with_the_fused_head_stays_close(interp):
    assert interp["sample"]["err"] <= 5e-2, interp["sample"]


def test_off_by_default_and_the_graph_key_tells_the_paths_apart():
    from helpers_env import last_line_with

    code = "from maskar.nn.diffloss import DiffLoss; print(DiffLoss.fused_blocks)"
    for value, want in (("0", "False"), ("1", "True")):  # the switch is read at import: a fresh process
        assert last_line_with("MASKAR_HEAD_FUSED", value, code) == want
    head = dl.DiffLoss(16, 48, depth=2, width=64)
    assert head.fused_blocks is (os.environ.get("MASKAR_HEAD_FUSED", "0") == "1")
    before = head.graph_key()
    head.fused_blocks = not head.fused_blocks
    assert head.graph_key() != before
    x = torch.randn(4, 64)
    w = torch.randn(64 * 8, 64)
    assert not dl.fused_blocks_apply(x, (w, torch.zeros(64 * 8)))  # fp32 weights


def test_fused_flag_without_the_kernels_runs_the_module_path():
    head = dl.DiffLoss(16, 48, depth=2, width=32)
    net = head.net
    x, z = torch.randn(6, 16), torch.randn(6, 48)
    with torch.no_grad():
        c_emb, t_emb = net.cond_embed(z), net.time_embed(torch.full((1,), 2))
        mw = net.modulation_weights()
        assert torch.equal(net.forward_embedded(x, t_emb, c_emb, mw, fused=True),
                           net.forward_embedded(x, t_emb, c_emb, mw, fused=False))  # fp32: not applied


def _mod_call(ah, k=64, scale_col=64, weight_dtype=torch.float16, act="silu"):
    w = torch.randn(6, k).to(weight_dtype)
    return ah.modulated_linear(torch.randn(4, k), torch.randn(4, 2 * k), 0, scale_col, None, None, 1e-6,
                               w, torch.randn(6).to(weight_dtype), act)


@pytest.mark.parametrize(
    "call,match",
    [(lambda ah: _mod_call(ah, act="gelu"), "act: expect"),
     (lambda ah: _mod_call(ah, scale_col=96), "column 96"),
     (lambda ah: _mod_call(ah, weight_dtype=torch.float32), "fp16 / bf16"),
     (lambda ah: _mod_call(ah, k=48, scale_col=48), "multiple of 64"),
     (lambda ah: ah.gated_residual_linear(torch.randn(4, 64).half(), torch.randn(6, 64).half(),
                                          torch.randn(6).half(), torch.randn(4, 5), torch.randn(4, 16), 0),
      r"x \(M, N\)")],
)
def test_bad_inputs_are_named(call, match):
    ah = pytest.importorskip("maskar.kernels.adaln_mlp")
    with pytest.raises(ValueError, match=match):
        call(ah)


def test_kernels_compile_for_sm90():
    """Every candidate of both kernels, compiled for Hopper as its launch specialises it at MAR-B's
    head shapes: tensor-core dots, shared memory within the H200's; the first config (what a capture
    that precedes tuning takes) without register spills."""
    require_aot_compiler()
    from maskar.kernels import adaln_mlp as ah

    m, k = 128, 1024
    x, w, b = (torch.randn(shape, dtype=torch.bfloat16) for shape in ((m, k), (k, k), (k,)))
    mod = torch.randn(m, 3 * k, dtype=torch.bfloat16)
    for cfg in ah.CANDIDATES:
        ah.FORCE_CONFIG = cfg
        try:
            with compiles_as_launched() as found:
                ah.modulated_linear(x, mod, 0, k, torch.ones(k), torch.zeros(k), 1e-6, w, b, "silu")
                ah.gated_residual_linear(x, w, b, x, mod, 2 * k)
        except FileNotFoundError as e:
            pytest.skip(f"no CUDA toolchain in this Triton: {e}")
        finally:
            ah.FORCE_CONFIG = None
        assert [name for name, _ in found] == ["_modulated_linear", "_gated_residual_linear"]
        for name, c in found:
            assert "mma" in c.asm["ptx"] and c.metadata.shared <= 232448, (name, cfg)
            usage = resource_usage(c)
            if cfg == ah.CANDIDATES[0]:
                assert usage is None or usage["STACK"] == 0, (name, cfg, usage)


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("rows", [128, 1000])
def test_gpu_mar_b_head_step_fused_against_the_compiled_module_path(rows):
    """MAR-B's head (width 1024, 6 blocks) under bf16 autocast: each kernel config of both ops
    within bf16 rounding of the eager steps; the fused step (compiled, in a CUDA graph) against
    the module path."""
    from maskar.kernels import adaln_mlp as ah

    torch.manual_seed(0)
    head = dl.DiffLoss(16, 768, depth=6, width=1024).cuda().eval()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.03)
    dl.load_fused_kernels()
    w = 1024
    x = torch.randn(rows, w, device="cuda").bfloat16()
    mod = torch.randn(rows, 20 * w, device="cuda").bfloat16()
    block = head.net.res_blocks[2]
    h_ref, y_ref = reference_block(x, mod, 6 * w, block, torch.bfloat16)
    lin1, lin2, ln = block.mlp[0], block.mlp[2], block.in_ln
    for cfg in ah.CANDIDATES:
        ah.FORCE_CONFIG = cfg
        try:
            h = ah.modulated_linear(x, mod, 6 * w, 7 * w, ln.weight, ln.bias, ln.eps,
                                    lin1.weight.bfloat16(), lin1.bias.bfloat16(), "silu")
            y = ah.gated_residual_linear(h_ref, lin2.weight.bfloat16(), lin2.bias.bfloat16(), x, mod, 8 * w)
        finally:
            ah.FORCE_CONFIG = None
        assert rel(h, h_ref) < 1.6e-2 and rel(y, y_ref) < 1.6e-2, (cfg, rel(h, h_ref), rel(y, y_ref))
    net = head.net
    xs, z = torch.randn(rows, 16, device="cuda"), torch.randn(rows, 768, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        c_emb, t_emb = net.cond_embed(z), net.time_embed(torch.full((1,), 5, device="cuda"))
        mw = net.modulation_weights(torch.bfloat16)
        ref = net.forward_embedded(xs, t_emb, c_emb, mw, fused=False)
        eager = net.forward_embedded(xs, t_emb, c_emb, mw, fused=True)  # tunes outside any capture
        f = torch.compile(lambda x: net.forward_embedded(x, t_emb, c_emb, mw, fused=True))
        compiled = f(xs)  # Inductor's SiLU around the ops may round differently from eager's
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            graphed = f(xs)
    g.replay()
    torch.cuda.synchronize()
    print(f"rows {rows}: fused vs module path rel max {rel(eager, ref):.2e}, compiled vs eager "
          f"{rel(compiled, eager):.2e}; tuned {ah.tuned_configs()}")
    assert rel(eager, ref) < 3e-2 and rel(compiled, eager) < 3e-2
    assert torch.equal(graphed, compiled)
