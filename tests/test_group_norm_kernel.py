"""The fused GroupNorm(+SiLU) of the tokenizer decoder (maskar.kernels.group_norm) against torch.

The reference is the torch code the decoder runs everywhere else (F.group_norm, then F.silu)
and, for the error bound, the same computed in float64 from the same (rounded) input. On the
CPU the Triton kernels run under TRITON_INTERPRET=1 in ONE subprocess (the variable must be
set before triton is imported); the parametrised tests read its results. GPU tests are
marked ``gpu``.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from helpers_aot import compile_source, require_aot_compiler
from helpers_interpreter import run_under_interpreter

from maskar.config import build
from maskar.tokenizers.vqvae import MultiScaleVQVAE, VQVAEConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
EPS = 1e-6


def make_inputs(
    N: int, C: int, H: int, W: int, dtype, channels_last: bool, seed: int = 0, offset: float = 2.0,
    device="cpu",
):  # fmt: skip
    """x with a per-channel offset (mean far from 0: the variance must not cancel) and spread, and
    an affine weight / bias with some negative and near-zero gains."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, device=device)
    x = x * torch.rand(1, C, 1, 1, generator=g, device=device).add(0.5) * 3
    x = x + offset * torch.randn(1, C, 1, 1, generator=g, device=device)
    w = torch.randn(C, generator=g, device=device)
    w[0] = 1e-3
    b = torch.randn(C, generator=g, device=device)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w.to(dtype), b.to(dtype)


def truth(x, w, b, groups: int, silu: bool):
    """(y, bound scale) in float64 from the same rounded inputs; the scale is (|x| + |mean|) * rstd
    * |gamma| + |beta| per element, what the fp32 arithmetic's errors are relative to."""
    x64, w64, b64 = x.double(), w.double(), b.double()
    N, C = x.shape[:2]
    xg = x64.reshape(N, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    rstd = (xg.var(-1, unbiased=False, keepdim=True) + EPS).rsqrt()
    xhat = ((xg - mean) * rstd).reshape(x.shape)
    a = (xg.abs() + mean.abs()) * rstd
    y = xhat * w64.view(1, C, 1, 1) + b64.view(1, C, 1, 1)
    scale = a.reshape(x.shape) * w64.abs().view(1, C, 1, 1) + b64.abs().view(1, C, 1, 1)
    if silu:
        y = y * torch.sigmoid(y)  # |silu'| <= 1.1: the scale carries over
    return y, scale


def excess(got, x, w, b, groups: int, silu: bool, ulps: float = 2.0, rel: float = 1e-5, x_bias=None) -> float:
    """Largest |got - truth| / (ulps units in the last place of x's dtype at |truth| + rel * scale);
    <= 1 passes. ``x_bias``: the truth of the norm of x + x_bias (per channel, exact in float64)."""
    xs = x if x_bias is None else x.double() + x_bias.double().view(1, -1, 1, 1)
    y, scale = truth(xs, w, b, groups, silu)
    ulp = torch.exp2(torch.floor(torch.log2(y.abs().clamp_min(1e-30))) - MANTISSA[x.dtype])
    return float(((got.double() - y).abs() / (ulps * ulp + rel * scale + 1e-30)).max())


def check_call(fn, N, C, H, W, G, dtype, channels_last, silu, seed=0, offset=2.0, device="cpu") -> dict:
    """fn(x, w, b, G, eps, silu) vs the float64 truth, with torch's own same-dtype result as the
    bound's sanity check; layout, dtype, finiteness."""
    x, w, b = make_inputs(N, C, H, W, dtype, channels_last, seed, offset, device)
    from maskar.kernels.group_norm import reference

    got = fn(x, w, b, G, EPS, silu)
    ref = reference(x, w, b, G, EPS, silu)
    return {  # float64 on x's device (a GPU's float64 is fast; the decoder's shapes are big)
        "excess": excess(got, x, w, b, G, silu),
        "torch_excess": excess(ref, x, w, b, G, silu),
        "same_layout": got.stride() == x.stride()
        and got.dtype == x.dtype
        and tuple(got.shape) == tuple(x.shape),
        "finite": bool(torch.isfinite(got).all()),
    }


def check_call_x_bias(
    fn, N, C, H, W, G, dtype, channels_last, bias_scale: float, seed=0, device="cpu"
) -> dict:
    """fn(x, w, b, G, eps, True, x_bias=...) vs the float64 norm of x + x_bias: a convolution's
    bias the norm adds (``bias_scale`` large: a masked-off element that took it would move the
    tile means far off)."""
    x, w, b = make_inputs(N, C, H, W, dtype, channels_last, seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    xb = (torch.randn(C, generator=g) * bias_scale).to(dtype).to(device)
    got = fn(x, w, b, G, EPS, True, x_bias=xb)
    return {
        "excess": excess(got, x, w, b, G, True, x_bias=xb),
        "torch_excess": 0.0,  # no torch counterpart rounds once: the float64 bound alone
        "same_layout": got.stride() == x.stride()
        and got.dtype == x.dtype
        and tuple(got.shape) == tuple(x.shape),
        "finite": bool(torch.isfinite(got).all()),
    }


# (name, N, C, H, W, groups, dtype, channels_last, bias scale): tails in every direction, as above.
X_BIAS_CASES = [
    ("xbias-bf16-nchw", 2, 12, 5, 7, 4, "bf16", False, 3.0),
    ("xbias-bf16-cl", 2, 12, 5, 7, 4, "bf16", True, 3.0),
    ("xbias-fp32-nchw-odd", 2, 15, 7, 9, 5, "fp32", False, 50.0),
    ("xbias-fp32-cl-odd", 1, 15, 11, 9, 3, "fp32", True, 50.0),
]


def tiny_vqvae(seed: int = 0, **kw) -> MultiScaleVQVAE:
    """A small tokenizer whose decoder has every norm kind: res blocks (norm + SiLU), the width
    change's shortcut, attention (norm without SiLU), norm_out; 16 channels in 4 groups."""
    base = dict(
        resolution=16, ch=8, ch_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=2, norm_groups=4,
        z_channels=4, vocab_size=32, patch_nums=(1, 2, 4, 8), dead_code_steps=0,
    )  # fmt: skip
    base.update(kw)
    torch.manual_seed(seed)
    m = MultiScaleVQVAE(build(VQVAEConfig, base, "model")).eval()
    with torch.no_grad():  # norms that are not the identity at init
        for mod in m.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
    return m


def decoder_vs_torch(
    m: MultiScaleVQVAE, precision: str, channels_last: bool, B: int = 2, device="cpu"
) -> dict:
    """fhat_to_img with the fused op (as dispatched; launches counted) vs with the torch code
    (ENABLED False), and both against the torch fp32 decode: relative errors, fused calls."""
    import maskar.kernels.group_norm as gn
    import maskar.tokenizers.vqvae as vq

    g = torch.Generator(device=device).manual_seed(3)
    fhat = torch.randn(B, m.z_channels, m.latent_side, m.latent_side, generator=g, device=device)
    calls = []
    real = gn._forward

    xbias_calls = []

    def counting(x, *a):
        calls.append(_is_cl(x))
        xbias_calls.append(len(a) > 5 and a[5] is not None)
        return real(x, *a)

    out = {}
    saved = (gn.ENABLED, gn._forward, vq.BF16_CHANNELS_LAST)
    try:
        gn._forward = counting
        vq.BF16_CHANNELS_LAST = channels_last
        for name, enabled, prec in (
            ("fused", True, precision),
            ("torch", False, precision),
            ("fp32", False, "fp32"),
        ):
            gn.ENABLED = enabled
            with torch.no_grad():
                out[name] = m.fhat_to_img(fhat, prec).double()
    finally:
        gn.ENABLED, gn._forward, vq.BF16_CHANNELS_LAST = saved
    n_norms = sum(isinstance(mod, torch.nn.GroupNorm) for mod in m.decoder.modules())
    return {
        "rel": _rel(out["fused"], out["torch"]),
        "fused_vs_fp32": _rel(out["fused"], out["fp32"]),
        "torch_vs_fp32": _rel(out["torch"], out["fp32"]),
        "calls": len(calls),
        "norms": n_norms,
        "channels_last_calls": sum(calls),
        "x_bias_calls": sum(xbias_calls),  # norms that added a conv's bias (of the fused decode)
        "res_blocks": sum(type(mod).__name__ == "ResnetBlock" for mod in m.decoder.modules()),
        "contiguous_out": out["fused"].is_contiguous(),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _is_cl(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- CPU: Triton interpreter

# (name, N, C, H, W, groups, dtype, channels_last, silu, per-channel offset). The interpreter
# config (2 channels x 8 pixels per tile, 2 tiles per statistics program) makes every one of
# these several tiles, chunks and channel blocks, with tails: odd H x W, C not a multiple of
# the channel block, one pixel (H = W = 1), one channel per group, a large offset.
INTERPRET_CASES = [
    (f"{dn}-{'cl' if cl else 'nchw'}-{'silu' if s else 'norm'}", 2, 12, 5, 7, 4, dn, cl, s, 2.0)
    for dn in ("fp32", "bf16")
    for cl in (False, True)
    for s in (True, False)
] + [
    ("fp16-nchw-silu", 2, 12, 5, 7, 4, "fp16", False, True, 2.0),
    ("fp16-cl-silu", 3, 10, 3, 9, 5, "fp16", True, True, 2.0),
    ("bf16-nchw-odd", 2, 15, 7, 9, 5, "bf16", False, True, 2.0),
    ("bf16-cl-odd", 1, 15, 11, 9, 3, "bf16", True, True, 2.0),
    ("fp32-one-pixel", 3, 9, 1, 1, 3, "fp32", False, True, 2.0),
    ("fp32-one-channel-per-group", 2, 6, 4, 5, 6, "fp32", False, False, 2.0),
    ("fp32-offset-1e3", 2, 8, 6, 6, 2, "fp32", True, True, 1000.0),
    ("bf16-offset-1e2", 2, 8, 6, 6, 2, "bf16", False, True, 100.0),
]

_RUNNER = r"""
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
import test_group_norm_kernel as T
import maskar.kernels.group_norm as gn
from maskar.tokenizers import common
assert gn._INTERPRET
common.NORM_TAKES_CONV_BIAS = False  # the cases below choose it (on by default)
torch.manual_seed(0)
for name, N, C, H, W, G, dn, cl, silu, off in T.INTERPRET_CASES:
    r = T.check_call(gn.group_norm_act, N, C, H, W, G, T.DTYPES[dn], cl, silu, offset=off)
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
for name, N, C, H, W, G, dn, cl, scale in T.X_BIAS_CASES:
    r = T.check_call_x_bias(gn.group_norm_act, N, C, H, W, G, T.DTYPES[dn], cl, scale)
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
# a channels-last x written out NCHW (the decoder's last norm): contiguous y, the same values
for name, N, C, H, W, G in (("nchw-out", 2, 12, 5, 7, 4), ("nchw-out-odd", 1, 15, 11, 9, 3)):
    x, w, b = T.make_inputs(N, C, H, W, torch.bfloat16, True)
    y = gn.group_norm_act(x, w, b, G, 1e-6, True, nchw_out=True)
    y_cl = gn.group_norm_act(x, w, b, G, 1e-6, True)
    print("RESULT " + json.dumps({{"case": name, "contiguous": y.is_contiguous(),
          "same_values": torch.equal(y, y_cl)}}), flush=True)
# the same call twice: the same bits (no atomics)
x, w, b = T.make_inputs(2, 12, 5, 7, torch.bfloat16, False)
same = torch.equal(gn.group_norm_act(x, w, b, 4, 1e-6, True), gn.group_norm_act(x, w, b, 4, 1e-6, True))
print("RESULT " + json.dumps({{"case": "deterministic", "same": same}}), flush=True)
# a non-dense x (what a flexible layout may hand the op): y laid out as empty_like(x), as the fake says
x, w, b = T.make_inputs(2, 12, 5, 9, torch.bfloat16, True)
xs = x[..., 1:8]
y = gn.group_norm_act_op(xs, w, b, 4, 1e-6, True)
ref = gn.reference(xs.float(), w.float(), b.float(), 4, 1e-6, True)
dense_in = xs.is_contiguous(memory_format=torch.channels_last)
print("RESULT " + json.dumps({{"case": "non-dense", "dense_in": dense_in,
      "strides": list(y.stride()), "fake_strides": list(torch.empty_like(xs).stride()),
      "err": (y.float() - ref).abs().max().item()}}), flush=True)
# the GPU's tile sizes too, at shapes with two statistics chunks and a tail
gn._INTERPRET = False
cfg_nchw, cfg_cl = gn._config(4, 136 * 136, False), gn._config(24, 33 * 37, True)
gn._INTERPRET = True
for name, cfg, args in (("gpu-config-nchw", cfg_nchw, (1, 4, 136, 136, 2, torch.bfloat16, False, True)),
                        ("gpu-config-cl", cfg_cl, (2, 24, 33, 37, 8, torch.bfloat16, True, True))):
    gn.FORCE_CONFIG = cfg
    r = T.check_call(gn.group_norm_act, *args)
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
gn.FORCE_CONFIG = None
# the statistics kernel's per-lane shifted sums (GNConfig.sums): tails, x_bias, a mean 10^3 off zero
gn.FORCE_CONFIG = gn.GNConfig(2, 8, 2, 1, sums=True)
for name, args in (("sums-bf16-nchw", (2, 12, 5, 7, 4, torch.bfloat16, False, True)),
                   ("sums-bf16-cl-odd", (1, 15, 11, 9, 3, torch.bfloat16, True, True)),
                   ("sums-fp32-offset-1e3", (2, 8, 6, 6, 2, torch.float32, True, True))):
    off = 1000.0 if "1e3" in name else 2.0
    r = T.check_call(gn.group_norm_act, *args, offset=off)
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
r = T.check_call_x_bias(gn.group_norm_act, 2, 15, 7, 9, 5, torch.float32, True, 50.0)
print("RESULT " + json.dumps({{"case": "sums-xbias-fp32-cl", **r}}), flush=True)
# the channel blocks on the grid's first axis (GNConfig.cb_fast), with either statistics scheme
for sums in (False, True):
    gn.FORCE_CONFIG = gn.GNConfig(2, 8, 2, 1, sums=sums, cb_fast=True, stages=2)
    for name, args in (("cbfast-bf16-nchw", (2, 12, 5, 7, 4, torch.bfloat16, False, True)),
                       ("cbfast-bf16-cl-odd", (1, 15, 11, 9, 3, torch.bfloat16, True, True))):
        r = T.check_call(gn.group_norm_act, *args)
        print("RESULT " + json.dumps({{"case": name + ("-sums" if sums else ""), **r}}), flush=True)
    r = T.check_call_x_bias(gn.group_norm_act, 2, 15, 7, 9, 5, torch.float32, True, 50.0)
    name = "cbfast-xbias-fp32-cl" + ("-sums" if sums else "")
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
gn.FORCE_CONFIG = None
# a residual block's sum made by the statistics pass (sum_norm_act): tails, both layouts, the
# shifted sums and the channel-blocks-first grid, without x_bias, fp32
for name, cfg, (N, C, H, W, G, dt, cl, has_xb) in (
    ("sum-bf16-nchw", None, (2, 12, 5, 7, 4, torch.bfloat16, False, True)),
    ("sum-bf16-cl-odd", None, (1, 15, 11, 9, 3, torch.bfloat16, True, True)),
    ("sum-bf16-cl-sums-cbfast", gn.GNConfig(2, 8, 2, 1, sums=True, cb_fast=True),
     (2, 15, 7, 9, 5, torch.bfloat16, True, True)),
    ("sum-fp32-nchw-sums-no-bias", gn.GNConfig(2, 8, 2, 1, sums=True),
     (2, 12, 5, 7, 4, torch.float32, False, False)),
):
    gn.FORCE_CONFIG = cfg
    x, w, b = T.make_inputs(N, C, H, W, dt, cl)
    r, _, _ = T.make_inputs(N, C, H, W, dt, cl, seed=5, offset=5.0)
    xb = (torch.randn(C) * 3).to(dt) if has_xb else None
    s_, y_ = gn.sum_norm_act(x, xb, r, w, b, G, 1e-6, True)
    v = x.float() + (0.0 if xb is None else xb.float().view(1, -1, 1, 1))
    want_s = (v + r.float()).to(dt)
    # in ulps of s (the interpreter's cast to bf16 may truncate where the GPU's rounds to nearest)
    ulp = torch.exp2(torch.floor(torch.log2(want_s.double().abs().clamp_min(1e-30))) - T.MANTISSA[dt])
    s_ulps = float(((s_.double() - want_s.double()).abs() / ulp).max())
    print("RESULT " + json.dumps({{"case": name, "s_ulps": s_ulps,
          "s_layout": s_.stride() == x.stride(), "y_layout": y_.stride() == x.stride(),
          "excess": T.excess(y_, s_, w, b, G, True), "finite": bool(torch.isfinite(y_).all())}}), flush=True)
gn.FORCE_CONFIG = None
# through the custom op as torch.compile calls it (kernels interpreted)
f = torch.compile(gn.group_norm_act, backend="aot_eager", fullgraph=True)
r = T.check_call(f, 2, 12, 5, 7, 4, torch.bfloat16, True, True)
print("RESULT " + json.dumps({{"case": "compiled", **r}}), flush=True)
# the whole decoder: fp32 and bf16, NCHW and channels-last
m = T.tiny_vqvae()
gn.FORCE_CONFIG = gn.GNConfig(4, 32, 2, 1)  # the tile logic is covered above; fewer interpreted programs
for prec in ("fp32", "bf16"):
    for cl in (False, True):
        if prec == "fp32" and cl:
            continue  # BF16_CHANNELS_LAST only switches the bf16 decode
        r = T.decoder_vs_torch(m, prec, cl, B=1)
        name = f"decoder-{{prec}}-{{'cl' if cl else 'nchw'}}"
        print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
# the decoder with each ResnetBlock's conv1 bias added by the norm after it (MASKAR_GN_CONV_BIAS)
common.NORM_TAKES_CONV_BIAS = True
for cl in (False, True):
    r = T.decoder_vs_torch(m, "bf16", cl, B=1)
    name = f"decoder-bf16-{{'cl' if cl else 'nchw'}}-gnbias"
    print("RESULT " + json.dumps({{"case": name, **r}}), flush=True)
# the decoder with the residual sums made by the next norm (MASKAR_GN_RESIDUAL), conv bias on
common.NORM_TAKES_CONV_BIAS = True
for cl in (False, True):
    import maskar.tokenizers.vqvae as vq
    vq.BF16_CHANNELS_LAST = cl
    g = torch.Generator().manual_seed(3)
    fhat = torch.randn(1, m.z_channels, m.latent_side, m.latent_side, generator=g)
    sums = []
    real_stats = gn._stats
    gn._stats = lambda x, xb, r, *a: sums.append(r is not None) or real_stats(x, xb, r, *a)
    with torch.no_grad():
        common.NORM_TAKES_RESIDUAL = True
        on = m.fhat_to_img(fhat, "bf16").double()
        common.NORM_TAKES_RESIDUAL = False
        off = m.fhat_to_img(fhat, "bf16").double()
        fp32 = m.fhat_to_img(fhat, "fp32").double()
    gn._stats = real_stats
    vq.BF16_CHANNELS_LAST = False
    print("RESULT " + json.dumps({{"case": f"decoder-residual-{{'cl' if cl else 'nchw'}}",
          "sum_calls": sum(sums), "on_vs_fp32": T._rel(on, fp32), "off_vs_fp32": T._rel(off, fp32),
          "on_vs_off": T._rel(on, off)}}), flush=True)
common.NORM_TAKES_CONV_BIAS = False
"""


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    pytest.importorskip("triton")
    return run_under_interpreter(_RUNNER, timeout=900)


def _check(r: dict, torch_within: float | None = 2.0) -> None:
    assert r["finite"] and r["same_layout"], r
    if torch_within is not None:  # the bound is meaningful: torch (rounding twice) is within 2x of it
        assert r["torch_excess"] <= torch_within, r
    assert r["excess"] <= 1.0, r


@pytest.mark.parametrize("case", [c[0] for c in INTERPRET_CASES])
def test_kernel_matches_torch_interpreted(interpreter_results, case):
    _check(interpreter_results[case])


@pytest.mark.parametrize("case", [c[0] for c in X_BIAS_CASES])
def test_kernel_adds_x_bias_before_the_norm_interpreted(interpreter_results, case):
    _check(interpreter_results[case], torch_within=None)


@pytest.mark.parametrize(
    "case", ["sums-bf16-nchw", "sums-bf16-cl-odd", "sums-fp32-offset-1e3", "sums-xbias-fp32-cl"]
)
def test_shifted_sums_statistics_interpreted(interpreter_results, case):
    """GNConfig.sums: per-lane sums of x - shift and its square, reduced once per program."""
    _check(interpreter_results[case], torch_within=None if "xbias" in case else 2.0)


@pytest.mark.parametrize(
    "case",
    [f"cbfast-{c}{s}" for c in ("bf16-nchw", "bf16-cl-odd", "xbias-fp32-cl") for s in ("", "-sums")],
)
def test_channel_blocks_first_grid_interpreted(interpreter_results, case):
    """GNConfig.cb_fast: the grid's axes swapped (the chunk count read from the other axis)."""
    _check(interpreter_results[case], torch_within=None if "xbias" in case else 2.0)


@pytest.mark.parametrize(
    "case", ["sum-bf16-nchw", "sum-bf16-cl-odd", "sum-bf16-cl-sums-cbfast", "sum-fp32-nchw-sums-no-bias"]
)
def test_sum_norm_act_sums_in_the_statistics_pass_interpreted(interpreter_results, case):
    """sum_norm_act: s = x + x_bias + residual rounded once (within one ulp: the interpreter's
    cast; bit for bit on the GPU), y the norm of s as stored."""
    r = interpreter_results[case]
    assert r["s_ulps"] <= 1.0 and r["s_layout"] and r["y_layout"] and r["finite"], r
    assert r["excess"] <= 1.0, r


@pytest.mark.parametrize("case", ["decoder-residual-nchw", "decoder-residual-cl"])
def test_decoder_with_residual_sums_in_the_norm_interpreted(interpreter_results, case):
    """MASKAR_GN_RESIDUAL: the tiny decoder's blocks that feed a norm leave their sums to it (at
    full resolution block 0 into block 1, block 1 into norm_out; the lower level's blocks feed its
    attention), and the images stay as close to the fp32 decode as without it."""
    r = interpreter_results[case]
    assert r["sum_calls"] == 2, r
    assert r["on_vs_fp32"] <= 1.5 * r["off_vs_fp32"] + 1e-3, r
    assert r["on_vs_off"] < 2e-2, r


@pytest.mark.parametrize("case", ["gpu-config-nchw", "gpu-config-cl", "compiled"])
def test_gpu_tile_sizes_and_compiled_op_interpreted(interpreter_results, case):
    _check(interpreter_results[case])


def test_op_lays_out_a_non_dense_input_as_its_fake_says_interpreted(interpreter_results):
    r = interpreter_results["non-dense"]
    assert not r["dense_in"] and r["strides"] == r["fake_strides"], r
    assert r["err"] < 0.05, r  # bf16 output


def test_flexible_layout_switch_tags_the_op():
    """MASKAR_GN_FLEXIBLE_LAYOUT=1 (read at import) declares the op's layout flexible for
    Inductor; unset, the op keeps torch's default (the strides it was traced with)."""
    from helpers_env import last_line_with

    pytest.importorskip("triton")
    code = ("import torch, maskar.kernels.group_norm as gn; "
            "print(torch.Tag.flexible_layout in torch.ops.maskar.group_norm_act.default.tags)")  # fmt: skip
    for value, want in (("1", "True"), (None, "False")):
        assert last_line_with("MASKAR_GN_FLEXIBLE_LAYOUT", value, code) == want


@pytest.mark.parametrize("case", ["nchw-out", "nchw-out-odd"])
def test_kernel_writes_a_channels_last_input_out_nchw_interpreted(interpreter_results, case):
    r = interpreter_results[case]
    assert r["contiguous"] and r["same_values"], r


def test_kernel_is_deterministic_interpreted(interpreter_results):
    assert interpreter_results["deterministic"]["same"]


@pytest.mark.parametrize(
    "case",
    [
        "decoder-fp32-nchw",
        "decoder-bf16-nchw",
        "decoder-bf16-cl",
        "decoder-bf16-nchw-gnbias",
        "decoder-bf16-cl-gnbias",
    ],
)
def test_decoder_with_the_kernel_matches_torch_decoder_interpreted(interpreter_results, case):
    r = interpreter_results[case]
    assert r["calls"] == r["norms"] > 0, r  # every norm of the decoder took the kernel
    assert r["channels_last_calls"] == (r["calls"] if "-cl" in case else 0), r
    # with MASKAR_GN_CONV_BIAS every ResnetBlock's second norm took its conv1's bias
    assert r["x_bias_calls"] == (r["res_blocks"] if case.endswith("-gnbias") else 0), r
    assert r["contiguous_out"], r
    if "fp32" in case:
        assert r["rel"] < 1e-5, r  # reduction order only
    else:  # bf16: as close to the fp32 decode as the torch bf16 decode is (rounding differences only)
        assert r["fused_vs_fp32"] < 1.25 * r["torch_vs_fp32"], r


# ----------------------------------------------------------------------------- CPU: the op's reference


@pytest.fixture
def cpu_reference(monkeypatch):
    """Route the decoder's CPU norms to the custom op's reference body (a GPU run: to the kernels)."""
    gn = pytest.importorskip("maskar.kernels.group_norm")
    if gn._INTERPRET:
        pytest.skip("interpreter enabled in this process")
    monkeypatch.setattr(gn, "CPU_REFERENCE", True)
    return gn


def test_opcheck(cpu_reference):
    for cl in (False, True):
        x, w, b = make_inputs(2, 8, 3, 5, torch.float32, cl)
        for silu in (True, False):
            torch.library.opcheck(cpu_reference.group_norm_act_op, (x, w, b, 4, EPS, silu))


def test_op_reference_is_the_torch_code_bit_for_bit(cpu_reference):
    for cl in (False, True):
        x, w, b = make_inputs(2, 8, 3, 5, torch.bfloat16, cl)
        got = cpu_reference.group_norm_act(x, w, b, 4, EPS, True)
        assert torch.equal(got, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, w, b, EPS)))
        assert got.stride() == x.stride()


def test_opcheck_with_x_bias(cpu_reference):
    for cl in (False, True):
        x, w, b = make_inputs(2, 8, 3, 5, torch.bfloat16, cl)
        torch.library.opcheck(cpu_reference.group_norm_act_op, (x, w, b, 4, EPS, True, torch.randn(8)))


def test_op_reference_with_x_bias_rounds_once(cpu_reference):
    """The reference of x + x_bias: sum and norm in float32, one rounding to x's dtype."""
    x, w, b = make_inputs(2, 8, 3, 5, torch.bfloat16, True)
    xb = torch.randn(8).to(torch.bfloat16) * 4
    got = cpu_reference.group_norm_act(x, w, b, 4, EPS, True, x_bias=xb)
    xs = x.float() + xb.float().view(1, -1, 1, 1)
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(xs, 4, w.float(), b.float(), EPS))
    assert torch.equal(got, want.to(torch.bfloat16)) and got.stride() == x.stride()
    with pytest.raises(ValueError, match="x_bias of C values|x_bias"):
        cpu_reference.group_norm_act(x, w, b, 4, EPS, True, x_bias=torch.ones(3))


def test_conv_bias_switch_leaves_paths_without_the_fused_norm_bit_for_bit(monkeypatch):
    """MASKAR_GN_CONV_BIAS changes only the fused-norm path: the CPU decode (fp32 and bf16, the torch
    norm) and the training forward stay the same bits."""
    from maskar.tokenizers import common

    m = tiny_vqvae()
    fhat = torch.randn(2, m.z_channels, m.latent_side, m.latent_side)
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    monkeypatch.setattr(common, "NORM_TAKES_CONV_BIAS", False)
    with torch.no_grad():
        want = [m.fhat_to_img(fhat), m.fhat_to_img(fhat, "bf16")]
    want_train = m(img)
    monkeypatch.setattr(common, "NORM_TAKES_CONV_BIAS", True)
    with torch.no_grad():
        got = [m.fhat_to_img(fhat), m.fhat_to_img(fhat, "bf16")]
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert torch.equal(m(img), want_train)


def test_conv_bias_switch_is_read_at_import():
    """MASKAR_GN_CONV_BIAS (read at import): the conv bias in the norm, on unless 0."""
    from helpers_env import last_line_with

    code = "import maskar.tokenizers.common as c; print(c.NORM_TAKES_CONV_BIAS)"
    for value, want in (("1", "True"), (None, "True"), ("0", "False")):
        assert last_line_with("MASKAR_GN_CONV_BIAS", value, code) == want


def test_decoder_with_conv_bias_in_the_norm_compiles_to_the_eager_images(cpu_reference, monkeypatch):
    """With MASKAR_GN_CONV_BIAS the traced decode holds one op call with the conv's bias per
    ResnetBlock (the convolution before it has none) and compiles to the eager images (aot_eager)."""
    from maskar.tokenizers import common

    monkeypatch.setattr(common, "NORM_TAKES_CONV_BIAS", True)
    m = tiny_vqvae()
    fhat = torch.randn(2, m.z_channels, m.latent_side, m.latent_side)
    with torch.no_grad():
        want = m.fhat_to_img(fhat, precision="bf16")
    got, graphs = _compiled_decode(m, fhat)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ops = [n for g in graphs for n in g.graph.nodes if "group_norm_act" in str(n.target)]
    with_bias = [n for n in ops if len(n.args) > 6 and n.args[6] is not None]
    blocks = sum(type(mod).__name__ == "ResnetBlock" for mod in m.decoder.modules())
    assert len(ops) == sum(isinstance(mod, torch.nn.GroupNorm) for mod in m.decoder.modules())
    assert len(with_bias) == blocks > 0
    _assert_fed_by_a_conv_without_bias(with_bias)


def _compiled_decode(m, fhat) -> tuple[torch.Tensor, list]:
    """The bf16 decode of ``fhat`` compiled whole (no graph break allowed), and the traced graphs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m.fhat_to_img, backend=backend, fullgraph=True)(fhat, precision="bf16")
    torch._dynamo.reset()
    return got, graphs


def _assert_fed_by_a_conv_without_bias(nodes) -> None:
    for n in nodes:  # the first argument straight from a convolution that left its bias to the op
        conv = n.args[0]
        no_bias = len(conv.args) < 3 or conv.args[2] is None
        assert "conv2d" in str(conv.target) and no_bias, conv.format_node()


def test_opcheck_sum_stats_and_apply(cpu_reference):
    gn = cpu_reference
    for cl in (False, True):
        x, w, b = make_inputs(2, 8, 3, 5, torch.float32, cl)
        r, _, _ = make_inputs(2, 8, 3, 5, torch.float32, cl, seed=4)
        for xb in (None, torch.randn(8)):
            torch.library.opcheck(gn.group_norm_sum_stats_op, (x, xb, r, 4, EPS))
        s, stats = gn.group_norm_sum_stats_op(x, None, r, 4, EPS)
        for silu, nchw_out in ((True, False), (False, True)):
            torch.library.opcheck(gn.group_norm_apply_op, (s, stats, w, b, silu, nchw_out))


def test_sum_norm_act_reference_is_the_norm_of_the_sum(cpu_reference):
    """The ops' CPU bodies: s rounded once from the float32 sum, y = the torch norm of s (to the
    rounding of the statistics), x's layout; a bad shape is refused by name."""
    gn = cpu_reference
    for cl in (False, True):
        x, w, b = make_inputs(2, 8, 3, 5, torch.bfloat16, cl)
        r, _, _ = make_inputs(2, 8, 3, 5, torch.bfloat16, cl, seed=4)
        xb = torch.randn(8).bfloat16()
        s, y = gn.sum_norm_act(x, xb, r, w, b, 4, EPS, True)
        assert torch.equal(s, (x.float() + xb.float().view(1, -1, 1, 1) + r.float()).bfloat16())
        assert s.stride() == x.stride() and y.stride() == x.stride()
        torch.testing.assert_close(y, gn.reference(s, w, b, 4, EPS, True), rtol=0, atol=2 ** -6)
    with pytest.raises(ValueError, match="residual"):
        gn.sum_norm_act(x, xb, r[:1], w, b, 4, EPS, True)
    s, y = gn.sum_norm_act(x[:0], xb, r[:0], w, b, 4, EPS, True)  # an empty batch: empty results
    assert s.shape == y.shape == (0, 8, 3, 5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_decoder_with_residual_sums_compiles_to_the_eager_images(cpu_reference, monkeypatch, channels_last):
    """MASKAR_GN_RESIDUAL: the traced decode has one sum-and-statistics op per block that feeds a
    norm, fed by a convolution without its bias, no graph break, and the eager images (aot_eager);
    the images are the switch-off decode's to the rounding of the sums."""
    from maskar.tokenizers import common, vqvae

    monkeypatch.setattr(common, "NORM_TAKES_CONV_BIAS", True)
    monkeypatch.setattr(vqvae, "BF16_CHANNELS_LAST", channels_last)
    m = tiny_vqvae()
    fhat = torch.randn(2, m.z_channels, m.latent_side, m.latent_side)
    with torch.no_grad():
        off = m.fhat_to_img(fhat, precision="bf16")
        monkeypatch.setattr(common, "NORM_TAKES_RESIDUAL", True)
        want = m.fhat_to_img(fhat, precision="bf16")
    got, graphs = _compiled_decode(m, fhat)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (want.float() - off.float()).abs().max() < 0.05
    sums = [n for g in graphs for n in g.graph.nodes if "group_norm_sum_stats" in str(n.target)]
    assert len(sums) == 2
    _assert_fed_by_a_conv_without_bias(sums)


def test_decoder_traces_the_op_without_graph_break(cpu_reference):
    m = tiny_vqvae()
    fhat = torch.randn(2, m.z_channels, m.latent_side, m.latent_side)
    with torch.no_grad():
        want = m.fhat_to_img(fhat)
        torch._dynamo.reset()
        ex = torch._dynamo.explain(m.decoder)(fhat[:, :, :, :])
        assert ex.graph_break_count == 0, ex.break_reasons
        nodes = [
            n for g in ex.graphs for mod in g.modules() if hasattr(mod, "graph") for n in mod.graph.nodes
        ]
        assert sum("group_norm_act" in str(n.target) for n in nodes) == sum(
            isinstance(mod, torch.nn.GroupNorm) for mod in m.decoder.modules()
        )
        got = torch.compile(m.fhat_to_img, backend="aot_eager", fullgraph=True)(fhat)
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_channels_last_bf16_decode_compiles_to_the_eager_images(cpu_reference, monkeypatch):
    """`bench decode variants=bf16-cl-compiled`: the bf16 decode traced in channels-last memory
    hands the op channels-last tensors (no layout copies around it) and compiles to the eager
    images (aot_eager: the graph, not Inductor's kernels)."""
    from maskar.tokenizers import vqvae

    monkeypatch.setattr(vqvae, "BF16_CHANNELS_LAST", True)
    m = tiny_vqvae()
    fhat = torch.randn(2, m.z_channels, m.latent_side, m.latent_side)
    seen = []
    real = cpu_reference.group_norm_act_op

    def record(x, *args):
        seen.append(cpu_reference._is_channels_last(x))
        return real(x, *args)

    monkeypatch.setattr(cpu_reference, "group_norm_act_op", record)
    with torch.no_grad():
        want = m.fhat_to_img(fhat, precision="bf16")
        assert seen and all(seen)
        torch._dynamo.reset()
        got = torch.compile(m.fhat_to_img, backend="aot_eager", fullgraph=True)(fhat, precision="bf16")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "channels_last,conv_bias", [(False, False), (True, False), (False, True), (True, True)]
)
def test_gpu_inductor_decode_matches_eager(channels_last, conv_bias, monkeypatch):
    """The compiled decoder (`bench decode variants=bf16-compiled / bf16-cl-compiled /
    bf16-gnbias-compiled`, the sampler's compile_decoder) against the same bf16 decode run
    eagerly, on CUDA with Inductor: the same images up to bf16 rounding (fused kernels round at
    other points). With ``conv_bias`` (MASKAR_GN_CONV_BIAS) every norm takes the fused kernel, so
    the conv biases really move into it."""
    from maskar.tokenizers import common, vqvae

    monkeypatch.setattr(vqvae, "BF16_CHANNELS_LAST", channels_last)
    monkeypatch.setattr(common, "NORM_TAKES_CONV_BIAS", conv_bias)
    if conv_bias:
        gn = pytest.importorskip("maskar.kernels.group_norm")
        monkeypatch.setattr(gn, "TORCH_BELOW", 0)
        monkeypatch.setattr(gn, "TORCH_BELOW_MANY", 0)
    m = tiny_vqvae(ch=32, norm_groups=8, resolution=32, patch_nums=(1, 2, 4, 8, 16)).cuda()
    fhat = torch.randn(4, m.z_channels, m.latent_side, m.latent_side, device="cuda")
    with torch.no_grad():
        truth = m.fhat_to_img(fhat, precision="fp32")
        want = m.fhat_to_img(fhat, precision="bf16")
        torch._dynamo.reset()
        got = torch.compile(m.fhat_to_img, dynamic=False)(fhat, precision="bf16")
    torch._dynamo.reset()
    assert got.is_contiguous() and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=4e-2)
    # rounding differences only: as close to the fp32 decode as the eager bf16 decode is
    assert (got - truth).abs().mean() <= 1.25 * (want - truth).abs().mean()


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_decoder_runs_its_output_conv_in_nchw(channels_last, cpu_reference, monkeypatch):
    """Compiled (and only then), the 3-channel output conv is the opaque `maskar::conv2d_nchw`
    (Inductor keeps it NCHW) and the decode gives the eager images (aot_eager, bit for bit; the
    norms as the fused op's CPU body, as on the GPU: torch's own bf16 channels-last group norm
    rounds differently once decomposed on torch 2.14)."""
    from maskar.tokenizers import common, vqvae

    monkeypatch.setattr(vqvae, "BF16_CHANNELS_LAST", channels_last)
    m = tiny_vqvae()
    fhat = torch.randn(2, m.z_channels, m.latent_side, m.latent_side)
    calls = []
    real = common.conv2d_nchw

    def record(x, *args):
        calls.append(x.shape)
        return real(x, *args)

    monkeypatch.setattr(common, "conv2d_nchw", record)
    with torch.no_grad():
        want = m.fhat_to_img(fhat, precision="bf16")
        assert not calls  # eager: the plain module
        torch._dynamo.reset()
        got = torch.compile(m.fhat_to_img, backend="aot_eager", fullgraph=True)(fhat, precision="bf16")
    torch._dynamo.reset()
    # once, at trace time (which strides Dynamo's fake h has varies across torch versions; the
    # op copies to NCHW inside, and under Inductor it gets the traced strides)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_conv2d_nchw_op():
    from maskar.tokenizers.common import conv2d_nchw

    x = torch.randn(2, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, 8, 3, 3), torch.randn(3)
    torch.library.opcheck(conv2d_nchw, (x, w, b, 1))
    y = conv2d_nchw(x, w, b, 1)
    assert y.is_contiguous() and torch.equal(y, torch.nn.functional.conv2d(x.contiguous(), w, b, 1, 1))


def test_cpu_model_never_takes_the_op_by_default(monkeypatch):
    """The op is CUDA-only: CPU outputs (and every recorded fixture) run the torch code."""
    gn = pytest.importorskip("maskar.kernels.group_norm")
    if gn._INTERPRET:
        pytest.skip("interpreter enabled in this process")
    x, w, b = make_inputs(1, 8, 3, 3, torch.bfloat16, False)
    assert not gn.supports(x, w, b) and not gn.supports(x.float(), w.float(), b.float())

    def boom(*a, **k):
        raise AssertionError("the fused op ran on the CPU")

    monkeypatch.setattr(gn, "group_norm_act", boom)
    m = tiny_vqvae()
    fhat = torch.randn(1, m.z_channels, m.latent_side, m.latent_side)
    with torch.no_grad():
        m.fhat_to_img(fhat, "fp32")
        m.fhat_to_img(fhat, "bf16")


def test_decoder_on_the_meta_device_keeps_the_torch_code(cpu_reference):
    """Shape-only runs (meta tensors; autocast has no meta state to ask) never reach the op."""
    m = tiny_vqvae().to("meta")
    with torch.no_grad():
        out = m.decoder(torch.empty(2, m.z_channels, m.latent_side, m.latent_side, device="meta"))
    assert out.shape == (2, 3, 16, 16)


def test_supports_refuses_training_autocast_and_disabled(cpu_reference, monkeypatch):
    gn = cpu_reference
    x, w, b = make_inputs(1, 8, 3, 3, torch.float32, False)
    assert gn.supports(x, w, b)
    assert not gn.supports(x, w.requires_grad_(), b)  # a gradient is wanted: torch's norm has the backward
    with torch.no_grad():
        assert gn.supports(x, w, b)
    w.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gn.supports(x, w, b)  # autocast computes group norm in fp32: keep its dtype
    assert not gn.supports(x, None, b)  # affine only
    monkeypatch.setattr(gn, "ENABLED", False)
    assert not gn.supports(x, w, b)


# (N, C, H, W, groups, faster in PyTorch): the calls of a d16 decode timed on the H200 (2026-12-03)
MEASURED_CALLS = [
    (8, 160, 256, 256, 32, False), (8, 320, 128, 128, 32, False), (8, 160, 128, 128, 32, False),
    (8, 320, 64, 64, 32, False), (8, 640, 32, 32, 32, True), (8, 320, 32, 32, 32, True),
    (8, 640, 16, 16, 32, True), (1, 160, 1024, 1024, 32, False), (1, 320, 512, 512, 32, False),
    (1, 160, 512, 512, 32, False), (1, 320, 256, 256, 32, False), (1, 640, 128, 128, 32, False),
    (1, 320, 128, 128, 32, False), (1, 640, 64, 64, 32, True),
]  # fmt: skip


@pytest.mark.parametrize("case", MEASURED_CALLS, ids=lambda c: "x".join(map(str, c[:4])))
def test_cuda_routing_follows_the_measured_crossover(case):
    """On CUDA the decoder keeps PyTorch's norm exactly where it was the faster one on the H200."""
    gn = pytest.importorskip("maskar.kernels.group_norm")
    *shape, groups, torch_faster = case
    assert gn.torch_is_faster(tuple(shape), groups) is torch_faster
    # channels-last x always takes the fused op: PyTorch's CUDA norm would hand back NCHW
    assert gn.torch_is_faster(tuple(shape), groups, channels_last=True) is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_channels_last_decode_stays_channels_last_gpu(compiled, monkeypatch):
    """MASKAR_DECODE_CHANNELS_LAST on CUDA, with the real routing (small norms included): every
    convolution but the 3-channel output one reads channels-last memory (eagerly: no cuDNN
    transposes), and, traced, every norm is the fused op on channels-last tensors (Inductor then
    has no NCHW layout to convert to and from around the convolutions)."""
    from maskar.tokenizers import vqvae

    monkeypatch.setattr(vqvae, "BF16_CHANNELS_LAST", True)
    m = tiny_vqvae(ch=32, norm_groups=8, resolution=32, patch_nums=(1, 2, 4, 8, 16)).cuda()
    fhat = torch.randn(4, m.z_channels, m.latent_side, m.latent_side, device="cuda")
    convs = [mod for mod in m.decoder.modules() if isinstance(mod, torch.nn.Conv2d)]
    layouts = {}
    conv2d = torch.nn.functional.conv2d

    def recording(x, weight, *args, **kwargs):
        # F.conv2d, not a forward hook: a ResnetBlock's conv1 runs as F.conv2d with its bias left
        # to the norm after it (MASKAR_GN_CONV_BIAS), never through the module's forward. The
        # weight is the bf16 copy functional_call swaps in, so the module is found by identity.
        conv = next((c for c in convs if c.weight is weight), None)
        if conv is not None:
            layouts[conv] = _is_cl(x)
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
    # The 3-channel output conv runs as the Triton kernel where MASKAR_CONV_OUT_KERNEL (on by
    # default) loaded it, never through F.conv2d: record that call too.
    from maskar.tokenizers import common

    kernel = common._conv_out_kernel
    through_kernel = []
    if kernel is not None:
        narrow_op = kernel.conv3x3_narrow_op

        def recording_kernel(x, weight, bias):
            through_kernel.append(weight is m.decoder.conv_out.weight)
            return narrow_op(x, weight, bias)

        monkeypatch.setattr(kernel, "conv3x3_narrow_op", recording_kernel)
    with torch.no_grad():
        want = m.fhat_to_img(fhat, precision="bf16")
    monkeypatch.setattr(torch.nn.functional, "conv2d", conv2d)
    if kernel is not None:
        monkeypatch.setattr(kernel, "conv3x3_narrow_op", narrow_op)
        assert through_kernel == [True]
        assert set(layouts) == set(convs) - {m.decoder.conv_out}
    else:
        assert set(layouts) == set(convs)
    assert all(layouts[c] for c in convs if c is not m.decoder.conv_out and c.kernel_size != (1, 1)), layouts
    if compiled:
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)

        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(m.fhat_to_img, backend=backend, dynamic=False)(fhat, precision="bf16")
        torch._dynamo.reset()
        nodes = [n for g in graphs for n in g.graph.nodes]
        norms = [n for n in nodes if "group_norm_act" in str(n.target)]
        assert len(norms) == sum(isinstance(mod, torch.nn.GroupNorm) for mod in m.decoder.modules())
        assert not [n for n in nodes if "group_norm" in str(n.target) and n not in norms]
        torch.testing.assert_close(got, want, rtol=0, atol=4e-2)


def test_training_decoder_keeps_the_torch_path_and_its_gradients(cpu_reference):
    """With the op routed on the CPU, a decoder that needs gradients still runs (and differentiates)
    the torch code."""
    m = tiny_vqvae()
    fhat = torch.randn(1, m.z_channels, m.latent_side, m.latent_side)
    m.decoder(fhat).square().mean().backward()
    assert all(p.grad is not None for p in m.decoder.parameters())


def test_bad_inputs_are_refused_by_name():
    gn = pytest.importorskip("maskar.kernels.group_norm")
    w = torch.ones(6)
    with pytest.raises(ValueError, match="group_norm_act: expected x"):
        gn.group_norm_act(torch.zeros(1, 6, 4, 4), w, w, 4, EPS, True)  # 4 groups of 6 channels
    with pytest.raises(ValueError, match="weight"):
        gn.group_norm_act(torch.zeros(1, 6, 4, 4), torch.ones(3), w, 3, EPS, True)
    with pytest.raises(ValueError, match="group_norm_act: expected x"):
        gn.group_norm_act(torch.zeros(6, 4, 4), w, w, 3, EPS, True)


def test_channels_last_bf16_decode_equals_nchw_on_the_torch_path(monkeypatch):
    """BF16_CHANNELS_LAST changes the memory layout only: the torch path gives the same images."""
    import maskar.tokenizers.vqvae as vq

    m = tiny_vqvae()
    fhat = torch.randn(2, m.z_channels, m.latent_side, m.latent_side)
    with torch.no_grad():
        ref = m.fhat_to_img(fhat, "fp32").double()
        a = m.fhat_to_img(fhat, "bf16")
        monkeypatch.setattr(vq, "BF16_CHANNELS_LAST", True)
        b = m.fhat_to_img(fhat, "bf16")
    assert b.is_contiguous() and b.dtype == torch.float32
    # CPU conv kernels round differently per layout: as close to the fp32 decode as NCHW is
    assert _rel(b.double(), ref) < 1.25 * _rel(a.double(), ref)


# ----------------------------------------------------------------------------- AOT compile


def _compile_for(kernel, arch: int, dtype: str, consts: dict):
    """Compile one kernel for a CUDA target without a GPU (Triton ships ptxas), with the pointers
    and C / HW / chunk_p 16-divisible as the JIT specialises them for every decoder shape."""
    from triton.compiler import ASTSource

    fp = {"fp16": "*fp16", "bf16": "*bf16"}[dtype]
    pointers = {"X": fp, "XB": fp, "R": fp, "S": fp, "Y": fp, "W": fp, "B": fp}
    pointers.update(PART="*fp32", STATS="*fp32")
    types = {}
    for n in kernel.arg_names:
        types[n] = "constexpr" if n in consts else pointers.get(n, "fp32" if n == "eps" else "i32")
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
               if n in pointers or n in ("C", "HW", "chunk_p")}  # fmt: skip
    src = ASTSource(fn=kernel, signature=types, attrs=aligned,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})  # fmt: skip
    return compile_source(src, arch, 4, 1)


def test_shifted_sums_stats_loop_has_no_barrier_on_sm90():
    """The point of GNConfig.sums: on channels-last tiles the statistics loop reads 16-byte
    vectors and synchronises nothing (the default scheme reduces across the strided pixel axis
    through shared memory twice a tile)."""
    require_aot_compiler()
    import maskar.kernels.group_norm as gn

    cfg = gn._config(160, 256 * 256, True)
    tiles = dict(BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, CHANNELS_LAST=True, HAS_XB=True)
    try:
        flags = dict(CB_FAST=False, HAS_RES=False)
        ptx = {sums: _compile_for(gn._gn_stats, 90, "bf16", {**tiles, "SUMS": sums, **flags}).asm["ptx"]
               for sums in (False, True)}  # fmt: skip
    except FileNotFoundError as e:
        pytest.skip(f"no CUDA toolchain in this Triton: {e}")
    loops = {sums: _loop_bodies(code) for sums, code in ptx.items()}
    assert len(loops[True]) == 1 and "ld.global.v4" in loops[True][0], loops[True]
    assert "bar.sync" not in loops[True][0]
    assert any("bar.sync" in body for body in loops[False])  # what the scheme removes


def _loop_bodies(ptx: str) -> list[str]:
    """The PTX between each loop's label and its backward branch."""
    lines = ptx.split("\n")
    label = re.compile(r"^(\$L__BB\d+_\d+):")
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := label.match(line.strip()))}
    bodies = []
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            bodies.append("\n".join(lines[labels[m.group(1)] : i]))
    return bodies


@pytest.mark.parametrize(
    "arch,dtype,kernel,channels_last,x_bias",
    [(90, "bf16", "stats", False, False), (90, "bf16", "stats", True, False),
     (90, "bf16", "apply", False, False), (90, "bf16", "apply", True, False),
     (80, "fp16", "apply", False, False), (90, "bf16", "finalize", False, False),
     (90, "bf16", "stats", False, True), (90, "bf16", "apply", True, True),
     (90, "bf16", "apply", True, "nchw_out"), (90, "bf16", "stats", True, "cb_fast"),
     (90, "bf16", "apply", True, "cb_fast"), (90, "bf16", "stats", True, "residual")],
)  # fmt: skip
def test_kernels_compile_to_cubin_with_vector_loads(arch, dtype, kernel, channels_last, x_bias):
    """The interpreter does not compile: this catches what only the real compiler rejects, and that
    the decoder's shapes read and write 16-byte vectors (also with a conv's bias added, x_bias, and
    a channels-last x written out NCHW)."""
    nchw_out, cb_fast, has_res = x_bias == "nchw_out", x_bias == "cb_fast", x_bias == "residual"
    x_bias = x_bias is True or has_res  # the residual case: a block's conv2 bias and shortcut
    require_aot_compiler()
    import maskar.kernels.group_norm as gn

    cfg = gn._config(160, 1024 * 1024, channels_last)
    tiles = dict(BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, CHANNELS_LAST=channels_last, HAS_XB=x_bias)
    fn, consts = {
        "stats": (gn._gn_stats, {**tiles, "SUMS": has_res, "CB_FAST": cb_fast, "HAS_RES": has_res}),
        "apply": (gn._gn_apply, {**tiles, "SILU": True, "Y_CHANNELS_LAST": channels_last and not nchw_out,
                                 "CB_FAST": cb_fast}),
        "finalize": (gn._gn_finalize, {"BLOCK_F": 512}),
    }[kernel]
    try:
        compiled = _compile_for(fn, arch, dtype, consts)
    except FileNotFoundError as e:  # no ptxas in this Triton build
        pytest.skip(f"no CUDA toolchain in this Triton: {e}")
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    if kernel != "finalize":
        assert "ld.global.v4" in compiled.asm["ptx"]
    if kernel == "apply":
        assert "st.global.v4" in compiled.asm["ptx"]


# ----------------------------------------------------------------------------- GPU

# The decoder's real shapes (d16 tokenizer, ch 160, ch_mult 1 1 2 2 4), as the sampling path
# decodes them: 8 images per chunk at 256 px, one at 1024 px.
GPU_SHAPES = [(8, 160, 256, 256), (8, 640, 16, 16), (1, 160, 1024, 1024), (1, 320, 256, 256), (3, 96, 17, 33)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dname", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_torch_gpu(shape, dname, channels_last):
    import maskar.kernels.group_norm as gn

    N, C, H, W = shape
    r = check_call(gn.group_norm_act, N, C, H, W, 32, DTYPES[dname], channels_last, True, device="cuda")
    # No sanity check against torch here: its CUDA GroupNorm + SiLU in bf16 / fp16 lands 10-100x outside
    # the 2-ulp bound (H200, 2026-12-03: torch_excess 10-103 while the kernel's excess was <= 0.25), so
    # the bound's meaning rests on the CPU cases, where torch stays within 2x of it.
    _check(r, torch_within=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "shape", [GPU_SHAPES[0], GPU_SHAPES[1], GPU_SHAPES[4]], ids=lambda s: "x".join(map(str, s))
)
def test_kernel_adds_x_bias_gpu(shape, channels_last):
    """A conv's bias added inside the kernels (MASKAR_GN_CONV_BIAS) at the decoder's shapes."""
    import maskar.kernels.group_norm as gn

    N, C, H, W = shape
    _check(check_call_x_bias(gn.group_norm_act, N, C, H, W, 32, torch.bfloat16, channels_last, 3.0,
                             device="cuda"), torch_within=None)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("x_bias", [False, True])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shifted_sums_statistics_gpu(shape, x_bias, monkeypatch):
    """GNConfig.sums with the channels-last tiles the decoder runs, at its real shapes."""
    import maskar.kernels.group_norm as gn

    N, C, H, W = shape
    monkeypatch.setattr(gn, "FORCE_CONFIG", dataclasses.replace(gn._config(C, H * W, True), sums=True))
    if x_bias:
        r = check_call_x_bias(gn.group_norm_act, N, C, H, W, 32, torch.bfloat16, True, 3.0, device="cuda")
    else:
        r = check_call(gn.group_norm_act, N, C, H, W, 32, torch.bfloat16, True, True, offset=50.0,
                       device="cuda")  # fmt: skip
    _check(r, torch_within=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("conv_bias", [False, True])
def test_decoder_with_the_kernel_matches_torch_decoder_gpu(channels_last, conv_bias, monkeypatch):
    from maskar.tokenizers import common

    gn = pytest.importorskip("maskar.kernels.group_norm")
    monkeypatch.setattr(gn, "TORCH_BELOW", 0)  # every norm of this tiny decoder takes the kernel
    monkeypatch.setattr(gn, "TORCH_BELOW_MANY", 0)
    monkeypatch.setattr(common, "NORM_TAKES_CONV_BIAS", conv_bias)
    m = tiny_vqvae(ch=32, norm_groups=8, resolution=32, patch_nums=(1, 2, 4, 8, 16)).cuda()
    r = decoder_vs_torch(m, "bf16", channels_last, B=4, device="cuda")
    assert r["calls"] == r["norms"] > 0, r
    assert r["x_bias_calls"] == (r["res_blocks"] if conv_bias else 0), r
    assert r["fused_vs_fp32"] < 1.25 * r["torch_vs_fp32"], r


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "shape", [(1, 160, 1024, 1024), (8, 160, 256, 256), (1, 320, 256, 256), (3, 96, 17, 33)]
)
def test_sum_norm_act_gpu(shape):
    """The residual sum made by the statistics pass at the decoder's shapes (channels-last, the
    default rule's configs): s bit for bit the float32 sum rounded to nearest, y the norm of s."""
    gn = pytest.importorskip("maskar.kernels.group_norm")
    x, w, b = make_inputs(*shape, torch.bfloat16, True, device="cuda")
    r, _, _ = make_inputs(*shape, torch.bfloat16, True, seed=4, device="cuda")
    xb = torch.randn(shape[1], device="cuda").bfloat16()
    s, y = gn.sum_norm_act(x, xb, r, w, b, 32 if shape[1] % 32 == 0 else 8, EPS, True)
    want = (x.float() + xb.float().view(1, -1, 1, 1) + r.float()).bfloat16()
    assert torch.equal(s, want) and s.stride() == x.stride() and y.stride() == x.stride()
    assert excess(y, s, w, b, 32 if shape[1] % 32 == 0 else 8, True) <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels_last", [False, True])
def test_decoder_with_residual_sums_in_the_norm_gpu(channels_last, monkeypatch):
    """MASKAR_GN_RESIDUAL on a GPU: the bf16 decode as close to the fp32 one as with the switch off."""
    from maskar.tokenizers import common, vqvae

    gn = pytest.importorskip("maskar.kernels.group_norm")
    monkeypatch.setattr(gn, "TORCH_BELOW", 0)
    monkeypatch.setattr(gn, "TORCH_BELOW_MANY", 0)
    monkeypatch.setattr(common, "NORM_TAKES_CONV_BIAS", True)
    monkeypatch.setattr(vqvae, "BF16_CHANNELS_LAST", channels_last)
    m = tiny_vqvae(ch=32, norm_groups=8, resolution=32, patch_nums=(1, 2, 4, 8, 16)).cuda()
    fhat = torch.randn(4, m.z_channels, m.latent_side, m.latent_side, device="cuda")
    with torch.no_grad():
        fp32 = m.fhat_to_img(fhat, "fp32").double()
        off = m.fhat_to_img(fhat, "bf16").double()
        monkeypatch.setattr(common, "NORM_TAKES_RESIDUAL", True)
        on = m.fhat_to_img(fhat, "bf16").double()
    e_on, e_off = _rel(on, fp32), _rel(off, fp32)
    print(f"decode with residual sums in the norm: {e_on:.2e} from fp32 (off {e_off:.2e})")
    assert e_on < 1.25 * e_off + 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_in_a_cuda_graph_and_compiled_gpu():
    """Replayed from a CUDA graph (as the sampling path's decode graph) and traced by torch.compile:
    the same bits as the eager call."""
    import maskar.kernels.group_norm as gn

    x, w, b = make_inputs(2, 64, 32, 32, torch.bfloat16, False, device="cuda")
    want = gn.group_norm_act(x, w, b, 32, EPS, True)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gn.group_norm_act(static_x, w, b, 32, EPS, True)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gn.group_norm_act(static_x, w, b, 32, EPS, True)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    torch._dynamo.reset()
    f = torch.compile(lambda t: gn.group_norm_act(t, w, b, 32, EPS, True), fullgraph=True)
    assert torch.equal(f(x), want)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- bench decode


def test_bench_decode_times_old_and_new_norm_variants(tmp_path, capsys):
    """`maskar bench decode speed=true variants=...` runs fp32-strict first, then the listed
    variants, and compares the ones after bf16-torch-gn against it (CPU smoke run, 16 px)."""
    from maskar.bench import decode as bench_decode

    out = tmp_path / "d.json"
    argv = ["ckpt=none", "speed=true", "cases=16x1", "reps=1", "device=cpu",
            "variants=bf16-torch-gn,bf16,bf16-cl", f"json={out}"]  # fmt: skip
    assert bench_decode.main(argv) == 0
    rows = json.loads(out.read_text())["speed"]
    assert [r["variant"] for r in rows] == ["fp32-strict", "bf16-torch-gn", "bf16", "bf16-cl"]
    assert "psnr_vs_bf16_torch_gn_mean" not in rows[1]
    # on the CPU both bf16 variants run the torch norm: the same images
    assert rows[2]["psnr_vs_bf16_torch_gn_mean"] == float("inf")
    assert rows[3]["psnr_vs_bf16_torch_gn_mean"] > 35
    with pytest.raises(SystemExit, match="variants: expected names"):
        bench_decode.main(["speed=true", "variants=bf16,bf17"])


def test_bench_decode_compiled_variants_compile_fhat_to_img(tmp_path, monkeypatch):
    """bf16-compiled / bf16-autotune decode through torch.compile(fhat_to_img) in their mode (the
    compile itself is a GPU run's business: here a recorder stands in for torch.compile)."""
    from maskar.bench import decode as bench_decode

    modes = []

    def fake_compile(fn, mode=None, dynamic=None):
        modes.append((mode, dynamic))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "d.json"
    argv = ["ckpt=none", "speed=true", "cases=16x1", "reps=1", "device=cpu",
            "variants=bf16,bf16-compiled,bf16-autotune,bf16-cl-compiled,bf16-torch-gn-compiled",
            f"json={out}"]  # fmt: skip
    assert bench_decode.main(argv) == 0
    rows = json.loads(out.read_text())["speed"]
    assert [r["variant"] for r in rows] == ["fp32-strict", "bf16", "bf16-compiled", "bf16-autotune",
                                            "bf16-cl-compiled", "bf16-torch-gn-compiled"]  # fmt: skip
    assert modes == [("default", False), ("max-autotune-no-cudagraphs", False), ("default", False),
                     ("default", False)]  # fmt: skip
    # the compiled variants decode the same images as bf16 (the stand-in compiles nothing)
    assert rows[2]["psnr_vs_fp32_strict_mean"] == rows[1]["psnr_vs_fp32_strict_mean"]
    assert all(r["first_s"] >= 0 for r in rows)
    assert rows[4]["psnr_vs_fp32_strict_mean"] > 35  # channels-last: the same decode, other rounding
    assert all("kernel_groups_ms" not in r for r in rows)  # profile=false (and no CUDA here)


def test_bench_decode_groups_kernels_by_name():
    """profile=true's grouping: cuDNN's convolutions and transposes, the norm, Inductor, attention."""
    from maskar.bench.decode import group_kernels

    per = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": 5.0,
        "void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>": 1.0,
        "void nhwcToNchwKernel<float>": 0.5,
        "_gn_apply": 2.0, "_gn_stats": 1.0, "_gn_finalize": 0.1,
        "triton_poi_fused_add_convolution_0": 3.0,
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": 0.2,
        "elementwise_kernel": 0.7,
    }  # fmt: skip
    got = group_kernels(per)
    assert got == pytest.approx({"layout transposes": 1.5, "fused group norm": 3.1, "attention": 0.2,
                                 "inductor conv templates": 0.0, "inductor kernels": 3.0,
                                 "convolutions": 5.0, "other": 0.7})  # fmt: skip
    assert sum(got.values()) == pytest.approx(sum(per.values()))


def test_default_config_takes_shifted_sums_only_for_large_channels_last_images(monkeypatch):
    """The measured rule: per-lane shifted sums for channels-last images of >= 2^23 elements
    (the decoder's 160 x 256^2 calls won on an H100), the older statistics below and in NCHW."""
    import maskar.kernels.group_norm as gn

    monkeypatch.setattr(gn, "_INTERPRET", False)
    monkeypatch.setattr(gn, "FORCE_CONFIG", None)
    monkeypatch.setattr(gn, "CB_FAST", False)  # the rule before 2026-12-06's grid sweep
    assert gn._config(160, 256 * 256, True).sums
    assert not gn._config(320, 128 * 128, True).sums
    assert not gn._config(160, 256 * 256, False).sums
    assert gn._config(160, 256 * 256, True) == gn.GNConfig(64, 64, 8, 4, sums=True)


def test_wide_maps_switch_sets_the_threshold():
    """MASKAR_GN_WIDE_MAPS (read at import): the largest maps' tiles on by default, off with 0."""
    from helpers_env import last_line_with

    pytest.importorskip("triton")
    code = "import maskar.kernels.group_norm as gn; print(gn.WIDE_MAPS_MIN_ELEMENTS)"
    for value, want in ((None, str(1 << 27)), ("0", "None")):
        assert last_line_with("MASKAR_GN_WIDE_MAPS", value, code) == want


def test_default_config_puts_large_channels_last_calls_channel_blocks_first(monkeypatch):
    """MASKAR_GN_CB_FAST (on): channels-last images of >= 2^22 elements take 128 x 32 tiles, 16 a
    statistics program, the shifted sums and the channel blocks first; smaller ones and NCHW as
    before. MASKAR_GN_WIDE_MAPS (on): the largest maps in narrower tiles."""
    import maskar.kernels.group_norm as gn

    monkeypatch.setattr(gn, "_INTERPRET", False)
    monkeypatch.setattr(gn, "FORCE_CONFIG", None)
    monkeypatch.setattr(gn, "CB_FAST", True)
    assert gn.WIDE_MAPS_MIN_ELEMENTS == gn.WIDE_MAPS_TRIAL == 1 << 27  # the default
    monkeypatch.setattr(gn, "WIDE_MAPS_MIN_ELEMENTS", None)
    want = gn.GNConfig(128, 32, 16, 4, sums=True, cb_fast=True)
    assert gn._config(160, 512 * 512, True) == want
    assert gn._config(320, 128 * 128, True) == want
    assert gn._config(160, 1024 * 1024, True, True) == want
    # the largest maps (>= 2^27 elements: 160 x 1024^2) in narrower tiles, by whether x_bias is added
    monkeypatch.setattr(gn, "WIDE_MAPS_MIN_ELEMENTS", gn.WIDE_MAPS_TRIAL)
    assert gn._config(160, 1024 * 1024, True) == gn.GNConfig(32, 128, 16, 8, sums=True, cb_fast=True)
    assert gn._config(160, 1024 * 1024, True, True) == gn.GNConfig(64, 64, 16, 4, sums=True, cb_fast=True)
    assert gn._config(160, 512 * 512, True, True) == want
    assert gn._config(640, 64 * 64, True) == gn.GNConfig(64, 64, 8, 4)
    assert not gn._config(160, 1024 * 1024, False).cb_fast
    assert gn.CB_FAST_MIN_ELEMENTS == 1 << 22
