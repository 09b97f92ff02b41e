"""The few-output-channel 3x3 convolution kernel (maskar.kernels.conv3x3_narrow) against F.conv2d:
under the Triton interpreter on the CPU (one subprocess), compiled for sm90, inside a tiny bf16
decode, and on a GPU at the decoders' conv_out shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_aot import compiles_as_launched, require_aot_compiler, resource_usage, tensor_core_ops
from helpers_interpreter import run_under_interpreter

# (name, N, C, H, W, CO, dtype, channels_last): tails in every axis (C past a multiple of 32, W
# past the interpreter's 16-pixel segments), one pixel, 1 / 3 / 16 output channels
INTERPRET_CASES = [
    ("nchw-bf16", 2, 40, 9, 37, 3, "bf16", False),
    ("cl-bf16-c160", 1, 160, 5, 20, 3, "bf16", True),
    ("cl-fp16-co16", 3, 33, 4, 17, 16, "fp16", True),
    ("nchw-fp16-one-pixel", 1, 8, 1, 1, 1, "fp16", False),
    ("cl-bf16-one-row", 2, 64, 1, 40, 3, "bf16", True),
]

_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
import test_conv3x3_narrow as T
from maskar.kernels import conv3x3_narrow as K
assert K._INTERPRET
g = torch.Generator().manual_seed(0)
for name, N, C, H, W, CO, dn, cl in T.INTERPRET_CASES:
    x, w, b = T.make_inputs(N, C, H, W, CO, dn, cl, g)
    assert K.applies(x, w, b)
    got = K.conv3x3_narrow(x, w, b)
    print("RESULT " + json.dumps(dict(case=name, shape=list(got.shape), contiguous=got.is_contiguous(),
          dtype=str(got.dtype), err=T.error_in_ulps(got, x, w, b))), flush=True)

# a tiny bf16 decode with the kernel in conv_out, channels-last and NCHW, against the decode without it
from test_group_norm_kernel import tiny_vqvae
from maskar.tokenizers import common, vqvae
m = tiny_vqvae()
common._group_norm_kernel = None  # the norms in torch: only the conv is interpreted (minutes otherwise)
fhat = torch.randn(2, m.z_channels, m.latent_side, m.latent_side, generator=g)
for cl in (False, True):
    vqvae.BF16_CHANNELS_LAST = cl
    with torch.no_grad():
        common._conv_out_kernel = None
        want = m.fhat_to_img(fhat, "bf16")
        common._conv_out_kernel = K
        calls, real = [], K.conv3x3_narrow
        K.conv3x3_narrow = lambda *a: calls.append(1) or real(*a)
        got = m.fhat_to_img(fhat, "bf16")
        K.conv3x3_narrow = real
        exact = m.fhat_to_img(fhat, "fp32")
    print("RESULT " + json.dumps(dict(case=f"decode-{{'cl' if cl else 'nchw'}}", calls=len(calls),
          diff=float((got - want).abs().max()), err=float((got - exact).abs().max()),
          ref_err=float((want - exact).abs().max()))), flush=True)
"""

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(N, C, H, W, CO, dtype, channels_last, g, device="cpu"):
    """x ~ N(0, 1), weight ~ N(0, 1/(9C)), bias ~ N(0, 0.1), in ``dtype`` ("bf16" / "fp16" or a dtype)."""
    dt = DTYPES.get(dtype, dtype)
    x = torch.randn(N, C, H, W, generator=g).to(dt)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    w = (torch.randn(CO, C, 3, 3, generator=g) / (9 * C) ** 0.5).to(dt)
    b = (torch.randn(CO, generator=g) * 0.1).to(dt)
    return x.to(device), w.to(device), b.to(device)


def error_in_ulps(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    """The largest |got - exact| in units of got's dtype rounding at the output's largest magnitude,
    exact = the float64 convolution of the same (rounded) inputs: an accumulation in float32 and
    one rounding give well under 1; a wrong tap, channel or pixel gives hundreds."""
    exact = F.conv2d(x.double(), w.double(), b.double(), 1, 1)
    return float((got.double() - exact).abs().max() / (exact.abs().max() * torch.finfo(got.dtype).eps))


@pytest.fixture(scope="module")
def interp():
    return run_under_interpreter(_RUNNER, timeout=600)


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_CASES])
def test_kernel_matches_the_float64_convolution_interpreted(interp, case):
    name, N, C, H, W, CO, dn, cl = next(c for c in INTERPRET_CASES if c[0] == case)
    r = interp[case]
    assert r["shape"] == [N, CO, H, W] and r["contiguous"] and r["dtype"] == str(DTYPES[dn]), r
    assert r["err"] <= 1.0, r


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_decoder_takes_the_kernel_and_decodes_as_before(interp, layout):
    """A tiny bf16 decode with the kernel in conv_out: called once, as close to the fp32 decode as
    the decode without it (both round at every layer; the kernel rounds its output once)."""
    r = interp[f"decode-{layout}"]
    assert r["calls"] == 1, r
    assert r["diff"] <= 2 ** -6, r  # one or two bf16 roundings of outputs in [-1, 1]
    assert r["err"] <= 1.25 * r["ref_err"] + 2 ** -8, r


def test_applies_only_to_what_the_kernel_computes(monkeypatch):
    from maskar.kernels import conv3x3_narrow as K

    g = torch.Generator().manual_seed(0)
    x, w, b = make_inputs(1, 8, 4, 4, 3, "bf16", False, g)
    assert not K.applies(x, w, b)  # the CPU without the interpreter: torch
    out = K.conv3x3_narrow(x, w, b)
    assert out.is_contiguous() and torch.equal(out, F.conv2d(x, w, b, 1, 1))
    monkeypatch.setattr(K, "_INTERPRET", True)  # the checks other than the device
    assert K.applies(x, w, b)
    assert not K.applies(x.float(), w.float(), b.float())  # fp32: torch
    assert not K.applies(x, w[:, :, :2], b)  # not 3x3
    assert not K.applies(x, torch.cat([w] * 6), torch.cat([b] * 6))  # 18 output channels
    assert not K.applies(x, w, None)
    assert not K.applies(x, w.float(), b)
    with torch.enable_grad():
        assert not K.applies(x.requires_grad_(), w, b)


def test_op_is_opaque_with_a_fake_shape():
    from maskar.kernels import conv3x3_narrow as K

    g = torch.Generator().manual_seed(0)
    x, w, b = make_inputs(2, 8, 5, 6, 3, "bf16", True, g)
    torch.library.opcheck(K.conv3x3_narrow_op, (x, w, b))
    compiled = torch.compile(lambda x: K.conv3x3_narrow_op(x, w, b), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), F.conv2d(x, w, b, 1, 1))


def test_switch_loads_the_kernel_into_the_decoder():
    """MASKAR_CONV_OUT_KERNEL (read when a decoder is built; on by default, off with 0)."""
    from helpers_env import last_line_with

    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'tests'); from test_group_norm_kernel import tiny_vqvae; "
            "from maskar.tokenizers import common; tiny_vqvae(); "
            "print(common._conv_out_kernel is not None)")  # fmt: skip
    for value, want in ((None, "True"), ("0", "False"), ("1", "True")):
        assert last_line_with("MASKAR_CONV_OUT_KERNEL", value, code) == want


def test_compiles_for_sm90_on_tensor_cores_without_spills():
    require_aot_compiler()
    from maskar.kernels import conv3x3_narrow as K

    g = torch.Generator().manual_seed(0)
    for cl in (False, True):
        x, w, b = make_inputs(1, 160, 4, 256, 3, "bf16", cl, g)
        with compiles_as_launched() as found:
            K._run(x, w, b, 128)  # as conv3x3_narrow launches it on a GPU
        assert [name for name, _ in found] == ["_conv3x3_narrow"]
        usage = resource_usage(found[0][1])
        if usage is not None:
            assert usage["STACK"] == 0, usage
        ops = tensor_core_ops(found[0][1])
        assert ops["wgmma"] + ops["mma"] > 0, ops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 160, 1024, 1024), (8, 160, 256, 256), (4, 128, 64, 72)])
def test_kernel_against_cudnn_gpu(shape, channels_last):
    """The decoders' conv_out shapes on a GPU: within one rounding of the float64 convolution, as
    cuDNN's; and the time of both, printed."""
    from maskar.bench.attention import time_ms
    from maskar.kernels import conv3x3_narrow as K

    g = torch.Generator().manual_seed(0)
    x, w, b = make_inputs(*shape, 3, torch.bfloat16, channels_last, g, device="cuda")
    assert K.applies(x, w, b)
    got = K.conv3x3_narrow(x, w, b)
    ref = F.conv2d(x.contiguous(), w, b, 1, 1)
    e_got, e_ref = error_in_ulps(got, x, w, b), error_in_ulps(ref, x, w, b)
    ms_k = time_ms(lambda: K.conv3x3_narrow(x, w, b), 20, 3)
    ms_c = time_ms(lambda: F.conv2d(x, w, b, 1, 1), 20, 3)
    print(f"\nconv3x3 narrow {shape} channels_last={channels_last}: kernel {ms_k:.3f} ms "
          f"(err {e_got:.2f} ulp), cuDNN {ms_c:.3f} ms (err {e_ref:.2f} ulp)")
    assert e_got <= 1.0, (e_got, e_ref)
