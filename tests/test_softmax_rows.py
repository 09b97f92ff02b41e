"""The row softmax kernel of the wide-head attention (maskar.kernels.softmax_rows) against torch's
softmax then cast: under the Triton interpreter on the CPU (one subprocess), on a GPU at the VQ-VAE's
1024 px score shape, and inside the wide-head op."""

from __future__ import annotations

import pytest
import torch
from helpers_interpreter import run_under_interpreter

# (name, rows, L, dtype): rows of every length class, the one-pass path and the looped one
# (the interpreter loops in steps of 8), tails off a power of two.
INTERPRET_CASES = [
    ("one-pass-bf16", 6, 50, "bf16"),
    ("one-pass-fp16", 5, 64, "fp16"),
    ("one-pass-one-column", 4, 1, "bf16"),
    ("looped-bf16", 3, 9000, "bf16"),
    ("looped-fp32", 2, 8200, "fp32"),
]

_RUNNER = r"""
import json, sys, torch
import maskar.kernels.softmax_rows as sr
assert sr._INTERPRET
D = {{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}}
sys.path.insert(0, {tests_dir!r})
import test_softmax_rows as T
g = torch.Generator().manual_seed(0)
for name, rows, L, dn in T.INTERPRET_CASES:
    s = torch.randn(rows, L, generator=g) * 40 + 7  # large logits: exp must be taken off the max
    dtype = D[dn]
    got = sr.softmax_rows(s, 0.04, dtype)
    exact = torch.softmax(s.double() * 0.04, -1)
    ref = sr.reference(s, 0.04, dtype)
    print("RESULT " + json.dumps({{"case": name, "dtype": str(got.dtype), "shape": list(got.shape),
          "err": T.ulps(got, exact, dtype), "ref_err": T.ulps(ref, exact, dtype),
          "row_sums": float((got.double().sum(-1) - 1).abs().max())}}), flush=True)
# through the wide-head op with the kernel switched on
from maskar.tokenizers import wide_attention as wa
wa.SOFTMAX_KERNEL = True
q, k, v = (torch.randn(2, 40, 272, generator=g).bfloat16() for _ in range(3))
calls = []
real = sr.softmax_rows
sr.softmax_rows = lambda *a: calls.append(1) or real(*a)
got = wa.wide_head_attention(q, k, v, 272 ** -0.5)
sr.softmax_rows = real
want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
err = float((got.float() - want).abs().max() / want.abs().max())
print("RESULT " + json.dumps({{"case": "wide-op", "kernel_calls": len(calls), "err": err}}), flush=True)
"""


def ulps(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The largest error in units of ``dtype``'s rounding at each element's magnitude (1.0: within
    one ulp of the exact value; 0.5: correctly rounded)."""
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    ulp = exact.abs().clamp_min(tiny) * eps
    return float(((got.double() - exact).abs() / ulp).max())


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(_RUNNER, timeout=600)


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_CASES])
def test_kernel_matches_the_exact_softmax_interpreted(interpreted, case):
    r = interpreted[case]
    dn = case.rsplit("-", 1)[-1]
    assert r["dtype"] == {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32",
                          "column": "torch.bfloat16"}[dn]  # fmt: skip
    # one rounding to the output dtype (0.5 ulp; the interpreter's cast may truncate: up to 1 ulp)
    # plus float32 arithmetic: within one ulp, as torch
    limit = 64.0 if dn == "fp32" else 1.0  # in float32 the exp's own error shows, in ulps of fp32
    assert r["err"] <= limit, r
    assert r["ref_err"] <= limit, r
    assert r["row_sums"] < 2e-2, r


def test_wide_op_takes_the_kernel_and_matches_sdpa_interpreted(interpreted):
    r = interpreted["wide-op"]
    assert r["kernel_calls"] == 1, r
    assert r["err"] < 2e-2, r


def test_cpu_without_the_interpreter_runs_the_torch_code():
    pytest.importorskip("triton")
    from maskar.kernels import softmax_rows as sr

    s = torch.randn(3, 70) * 10
    assert not sr.applies(s)
    assert torch.equal(sr.softmax_rows(s, 0.3, torch.bfloat16), torch.softmax(s * 0.3, -1).bfloat16())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("L", [4096, 256, 16384])
def test_gpu_kernel_matches_torch(L):
    """The VQ-VAE's score rows at 1024 px (64 x 64 positions), 256 px, and a row long enough to loop."""
    from maskar.kernels import softmax_rows as sr

    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(2, min(L, 4096), L, generator=g, device="cuda") * 30
    got = sr.softmax_rows(s, 640**-0.5, torch.bfloat16)
    ref = sr.reference(s, 640**-0.5, torch.bfloat16)
    exact = torch.softmax(s.double() * 640**-0.5, -1)
    e_got, e_ref = ulps(got, exact, torch.bfloat16), ulps(ref, exact, torch.bfloat16)
    differ = float((got != ref).float().mean())
    print(f"softmax rows L={L}: max error {e_got:.2f} bf16 ulps (torch {e_ref:.2f}), {differ:.2e} differ")
    assert e_got <= 1.0 and differ < 1e-3


@pytest.mark.parametrize("one_pass,block", [(True, 4096), (True, 256), (False, 4096)])
def test_kernel_compiles_for_sm90(one_pass, block):
    """What the interpreter cannot catch (globals the compiler refuses, shared memory): the kernel
    compiled for an H100 / H200 with real tile sizes."""
    from helpers_aot import compile_for_target, require_aot_compiler

    require_aot_compiler()
    from maskar.kernels import softmax_rows as sr

    types = {"S": "*fp32", "P": "*bf16", "L": "i32", "scale": "fp32"}
    try:
        compiled = compile_for_target(sr._softmax_rows, types, {"BLOCK": block, "ONE_PASS": one_pass},
                                      max(1, min(8, block // 512)), 1)  # fmt: skip
    except FileNotFoundError as e:  # no ptxas in this Triton build
        pytest.skip(f"no CUDA toolchain in this Triton: {e}")
    assert len(compiled.asm["cubin"]) > 0
