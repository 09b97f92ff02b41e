"""``x + gate * (h @ w.T + b)`` with the rows' LayerNorm statistics in one kernel
(maskar.kernels.gated_residual) against the module path's steps.

The reference rounds the matmul output to the compute dtype (what the separate matmul stores)
and does the rest in float64; the statistics are compared with ``torch.var_mean`` of the float64
result. CPU: TRITON_INTERPRET=1 in one subprocess; the GPU test holds CASMAR-B's shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_aot import compiles_as_launched, require_aot_compiler, resource_usage, tensor_core_ops
from helpers_interpreter import run_under_interpreter
from test_adaln_mlp import DTYPES, rel

gpu = pytest.mark.gpu


def reference(h, w, b, x, gate, eps):
    y = F.linear(h.double(), w.double(), b.double()).to(h.dtype).double()
    out = x.double() + gate.double() * y
    var, mean = torch.var_mean(out, dim=-1, correction=0)
    return out, mean, torch.rsqrt(var + eps)


_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
from test_gated_residual import DTYPES, reference, rel
from maskar.kernels import gated_residual as gr
from maskar.kernels.linear_act import MMConfig

def out(case, **kw):
    print("RESULT " + json.dumps(dict(case=case, **kw)), flush=True)

torch.manual_seed(0)
# rows the tile does not divide, K not a multiple of the block; four column chunks, or one
M, C, K = 37, 64, 40
for name, dt in DTYPES.items():
    h = torch.randn(M, K).to(dt)
    w, b = (0.2 * torch.randn(C, K)).to(dt), (0.2 * torch.randn(C)).to(dt)
    x = 5 + 3 * torch.randn(M, C)  # off-centre: the statistics' combination is tested
    gate = torch.randn(M, C).to(dt)
    o_ref, m_ref, r_ref = reference(h, w, b, x, gate, 1e-6)
    configs = {{"chunks": MMConfig(16, 16, 16, 1, 4, 1), "one-chunk": MMConfig(16, 64, 32, 1, 4, 1),
               "unfused": gr.UNFUSED}}
    for label, cfg in configs.items():
        gr.FORCE_CONFIG = cfg
        o, m, r = gr.gated_residual_stats(h, w, b, x, gate, 1e-6)
        out(f"op-{{name}}-{{label}}", out=rel(o, o_ref), mean=rel(m, m_ref), rstd=rel(r, r_ref),
            dtypes=[str(t.dtype) for t in (o, m, r)])
    gr.FORCE_CONFIG = None
"""


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_under_interpreter(_RUNNER, timeout=600)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("label", ["chunks", "one-chunk", "unfused"])
def test_op_follows_the_module_path(interp, dt, label):
    r = interp[f"op-{dt}-{label}"]
    # out: the matmul's own rounding may differ by one ulp of y (fp32 sums in another order)
    bound = {"fp16": 2e-3, "bf16": 2e-2}[dt]
    assert r["out"] <= bound and r["mean"] <= bound and r["rstd"] <= bound, r
    assert r["dtypes"] == ["torch.float32"] * 3


@pytest.mark.parametrize(
    "args,match",
    [(lambda: (torch.randn(4, 8).half(), torch.randn(6, 8).half(), torch.randn(6).half(), torch.randn(4, 4),
               torch.randn(4, 4).half()), r"w \(4, K\)"),
     (lambda: (torch.randn(4, 8).half(), torch.randn(4, 8).half(), torch.randn(4).half(),
               torch.randn(4, 4).half(), torch.randn(4, 4).half()), "float32 residual"),
     (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.randn(4), torch.randn(4, 4), torch.randn(4, 4)),
      "fp16 / bf16")],
)
def test_bad_inputs_are_named(args, match):
    gr = pytest.importorskip("maskar.kernels.gated_residual")
    with pytest.raises(ValueError, match=match):
        gr.gated_residual_stats(*args(), 1e-6)


def test_kernel_compiles_for_sm90():
    """Every candidate, compiled for Hopper as launched at CASMAR-B's out_proj and fc2 (32,768
    rows, width 512, K 512 / 2,048): tensor-core dots, shared memory within the H200's, no spills."""
    require_aot_compiler()
    from maskar.kernels import gated_residual as gr

    m, c = 32768, 512
    x = torch.randn(m, c)
    gate = torch.randn(m, c, dtype=torch.bfloat16)
    b = torch.randn(c, dtype=torch.bfloat16)
    for k in (512, 2048):
        h, w = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(c, k, dtype=torch.bfloat16)
        for cfg in gr.CANDIDATES:
            gr.FORCE_CONFIG = cfg
            try:
                with compiles_as_launched() as found:
                    gr.gated_residual_stats(h, w, b, x, gate, 1e-6)
            except FileNotFoundError as e:
                pytest.skip(f"no CUDA toolchain in this Triton: {e}")
            finally:
                gr.FORCE_CONFIG = None
            ((name, comp),) = found
            assert "mma" in comp.asm["ptx"] and comp.metadata.shared <= 232448, (name, cfg, k)
            # tiles of 64 rows and more use wgmma with A from shared memory (not registers)
            tc = tensor_core_ops(comp)
            assert tc["wgmma_reg_a"] == 0 and (tc["wgmma"] > 0 or cfg.block_m < 64), (name, cfg, k, tc)
            usage = resource_usage(comp)
            assert usage is None or usage["STACK"] == 0, (name, cfg, k, usage)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_op_at_casmar_b_shapes():
    """Every candidate at CASMAR-B's out_proj and fc2 shapes in bf16 against the float64
    reference; the tuned op and its tuning times."""
    from maskar.kernels import gated_residual as gr

    torch.manual_seed(0)
    m, c = 32768, 512
    x = 2 + torch.randn(m, c, device="cuda")
    gate = torch.randn(m, c, device="cuda").bfloat16()
    b = (0.05 * torch.randn(c, device="cuda")).bfloat16()
    for k in (512, 2048):
        h = torch.randn(m, k, device="cuda").bfloat16()
        w = (0.05 * torch.randn(c, k, device="cuda")).bfloat16()
        o_ref, m_ref, r_ref = reference(h, w, b, x, gate, 1e-6)
        for cfg in [gr.UNFUSED, *gr.CANDIDATES]:
            gr.FORCE_CONFIG = cfg
            try:
                o, mean, rstd = gr.gated_residual_stats(h, w, b, x, gate, 1e-6)
            finally:
                gr.FORCE_CONFIG = None
            errs = rel(o, o_ref), rel(mean, m_ref), rel(rstd, r_ref)
            print(f"K {k} {cfg}: out / mean / rstd rel {errs[0]:.1e} / {errs[1]:.1e} / {errs[2]:.1e}")
            assert max(errs) <= 5e-3, (k, cfg, errs)
        gr.gated_residual_stats(h, w, b, x, gate, 1e-6)
    print("tuned:", gr.tuning_log())
