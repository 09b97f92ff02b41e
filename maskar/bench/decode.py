"""VQ-VAE decoder precision: bf16 against fp32 on real tokens, and decoding speed per precision.

    maskar bench decode [ckpt=checkpoints/hmar-fmnist] [split=test] [limit=0] [batch=500] [root=DIR]
                        [quality=true] [speed=false] [cases=256x64,1024x8] [reps=5] [device=auto] [json=PATH]
                        [variants=fp32-strict,fp32,bf16] [convs=false] [profile=false]

**Quality** (``quality=true``, the default): the tokenizer of ``ckpt`` (a generator checkpoint
holding its tokenizer, or a tokenizer checkpoint) encodes ``split`` (default the held-out test
split) of its own dataset in fp32 (``limit`` images, 0 = all), read from ``root`` (default: the
checkpoint's ``data.root``; a machine without the installed data can point it at any folder of
the IDX files, e.g. ``root=.carry/fmnist split=train``: the train split as
``scripts/quality_collect.sh prepare`` packs it, images .xz and labels .gz); the final f_hat of
those real token pyramids is decoded in fp32 and in bf16
(``MultiScaleVQVAE.fhat_to_img(precision=...)``). Printed: PSNR of the bf16 decode against the
fp32 decode (mean and worst per image, and over all pixels; images in [-1, 1], peak-to-peak 2),
max |difference|, the share of uint8 pixel values that change once both are written as 8-bit
images and the largest such change, and each decode's PSNR against the original images (the
tokenizer's own error, for scale).

**Speed** (``speed=true``, meant for a GPU): the d16 tokenizer (``vae_ch160v4096z32``, random
official init; at 1024 px the official 1024 px schedule) decodes the f_hat of random token
pyramids of B images, chunked as sampling does (``maskar.models.var.decode_in_chunks``), in
each of the ``variants``: ``fp32-strict`` (TF32 off; always run first, the reference),
``fp32`` (cuDNN as configured: it allows TF32 by default), ``bf16`` (NCHW, on CUDA the fused
GroupNorm+SiLU of ``maskar.kernels.group_norm``: the sampling path's decode until 2026-12-06;
since then it is ``bf16-cl-gnbias``, below), ``bf16-torch-gn`` (bf16 with
torch's group norm and SiLU: the decode before that kernel) and ``bf16-cl`` (``bf16`` in
channels-last memory, ``vqvae.BF16_CHANNELS_LAST``) and ``bf16-autotuned`` (``bf16`` with cuDNN's
algorithm search, ``vqvae.BF16_CUDNN_BENCHMARK = True``; every other variant takes cuDNN's
heuristic choice) and ``bf16-subpixel`` (``bf16`` with each Upsample's nearest x2 + 3x3 conv as
one 2x2 convolution with 4x the channels, ``common.SUBPIXEL_UPSAMPLE``: 19% of the decoder's
FLOPs shrink by 5/9) and ``bf16-compiled`` / ``bf16-autotune`` (``bf16`` through
``torch.compile`` of ``fhat_to_img``, default mode / ``max-autotune-no-cudagraphs``: Inductor
fuses the residual adds, casts and upsampling around the convolutions, and in the second mode
also times its Triton convolution templates against cuDNN per shape; the compile and autotuning
happen in the warm-up call and are printed apart) and ``bf16-cl-compiled`` (``bf16-compiled``
traced in channels-last memory: Inductor's layout optimisation already hands cuDNN channels-last
tensors, but the fused GroupNorm, an opaque op, keeps the layout it was traced with, so an NCHW
trace may pay a layout copy on each side of every norm; measured: it does not) and
``bf16-torch-gn-compiled`` (``bf16-compiled`` with torch's group norm, which Inductor can fuse
with the bias add before it and the SiLU after it, where the fused kernel is opaque to it), and
``bf16-gnbias`` / ``bf16-cl-gnbias`` / ``bf16-gnbias-compiled`` / ``bf16-cl-gnbias-compiled`` (the
same with each ResnetBlock's conv1 bias added inside the fused norm after it,
``common.NORM_TAKES_CONV_BIAS``).
Each variant: median of ``reps`` CUDA-event timings after one warm-up, peak allocated memory
of the decode alone (GB = 1e9 B), PSNR against ``fp32-strict`` and, for variants listed after
``bf16-torch-gn``, against it (new against old decode). Floors: FLOPs / 790 TFLOP/s (bf16) and
/ 395 TFLOP/s (TF32), the H200's dense matmul peaks. ``profile=true`` (CUDA): one more decode of
each variant under the profiler, its GPU kernel time grouped (convolutions, cuDNN's layout
transposes, the fused GroupNorm, Inductor's kernels, other) and its ten longest kernels: where a
variant's time goes.

**Convolutions** (``convs=true``): every distinct convolution shape of the d16 decoder at each
case's resolution, on one decode chunk's images in bf16 (what the sampling path runs), timed on
its own (``F.conv2d``, NCHW and channels-last, median of ``reps`` after a warm-up): ms a call,
calls per decode, TFLOP/s, and each shape's share of the decode's convolution time. Which shape to
write a kernel for, if any: 54% of the decoder's FLOPs are its 160 -> 160 3x3 convolutions at the
top resolution. cuDNN's Hopper kernels tile the output channels by 128 (``tilesize128x128x64`` in
the profile), so 160 of them fill 62.5% of two tiles; for output widths that are not a multiple of
128, two channels-last variants say whether that waste is what costs: ``split`` (the multiple of
128 and the rest as two convolutions, back to back, outputs apart) and, for widths off a multiple
of 64, ``pad64`` (the output channels zero-padded to one); their TFLOP/s count the useful FLOPs
only.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, NamedTuple

import torch

DEFAULTS = {
    "ckpt": "checkpoints/hmar-fmnist", "split": "test", "limit": 0, "batch": 500, "root": "",
    "quality": True, "speed": False,
    "cases": "256x64,1024x8", "reps": 5, "device": "auto", "json": "",
    "variants": "fp32-strict,fp32,bf16,bf16-cl-gnbias",
    "convs": False, "profile": False,
}  # fmt: skip


class Variant(NamedTuple):
    """One way of decoding, as ``bench decode`` times it."""

    precision: str
    tf32: bool | None = None  # TF32 for cuDNN (None: as configured)
    fused_norm: bool = True  # the fused GroupNorm(+SiLU) kernel
    channels_last: bool = False  # bf16 in channels-last memory
    autotune: bool = False  # cuDNN's algorithm search for the bf16 convolutions
    subpixel: bool = False  # the Upsample convs as one 2x2 sub-pixel conv
    compile_mode: str | None = None  # torch.compile mode of fhat_to_img (None: eager)
    norm_conv_bias: bool = False  # the fused norm adds conv1's bias (common.NORM_TAKES_CONV_BIAS)


VARIANTS = {
    "fp32-strict": Variant("fp32", tf32=False),
    "fp32": Variant("fp32"),
    "bf16": Variant("bf16"),
    "bf16-torch-gn": Variant("bf16", fused_norm=False),
    "bf16-cl": Variant("bf16", channels_last=True),
    "bf16-autotuned": Variant("bf16", autotune=True),
    "bf16-subpixel": Variant("bf16", subpixel=True),
    "bf16-gnbias": Variant("bf16", norm_conv_bias=True),
    "bf16-cl-gnbias": Variant("bf16", channels_last=True, norm_conv_bias=True),
    "bf16-compiled": Variant("bf16", compile_mode="default"),
    "bf16-autotune": Variant("bf16", compile_mode="max-autotune-no-cudagraphs"),
    "bf16-cl-compiled": Variant("bf16", channels_last=True, compile_mode="default"),
    "bf16-torch-gn-compiled": Variant("bf16", fused_norm=False, compile_mode="default"),
    "bf16-gnbias-compiled": Variant("bf16", compile_mode="default", norm_conv_bias=True),
    "bf16-cl-gnbias-compiled": Variant(
        "bf16", channels_last=True, compile_mode="default", norm_conv_bias=True
    ),
}

# Kernel-name groups of ``profile=true``, first match wins (cuDNN's / CUTLASS's Hopper convolution
# kernels are named after their implicit GEMM; its NCHW <-> NHWC transposes after the layouts).
KERNEL_GROUPS = (
    ("layout transposes", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("fused group norm", ("_gn_stats", "_gn_finalize", "_gn_apply")),
    ("attention", ("fmha", "flash", "attention")),
    ("inductor conv templates", ("triton_tem",)),
    ("inductor kernels", ("triton_",)),  # its pointwise / reduction kernels (names list the fused ops)
    ("convolutions", ("conv", "fprop", "implicit", "xmma", "cutlass", "gemm", "sm90", "cudnn")),
)


def group_kernels(per_kernel: dict[str, float]) -> dict[str, float]:
    """ms per group of :data:`KERNEL_GROUPS` (the rest under ``other``), by kernel name."""
    from maskar.bench.kernel_time import group_by_name

    return group_by_name(per_kernel, KERNEL_GROUPS)


PEAK_TFLOPS = {"bf16": 790.0, "tf32": 395.0}


def _parse(argv: list[str]) -> dict[str, Any]:
    import yaml

    opts = dict(DEFAULTS)
    for item in argv:
        k, sep, v = item.partition("=")
        if not sep or k not in DEFAULTS:
            raise SystemExit(f"bench decode: expected key=value, key in {sorted(DEFAULTS)}; got {item!r}")
        opts[k] = v if isinstance(DEFAULTS[k], str) else yaml.safe_load(v)
    return opts


def _variants(spec: str) -> list[str]:
    """The speed variants to run, ``fp32-strict`` (the PSNR reference) first."""
    names = [v.strip() for v in str(spec).split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise SystemExit(f"bench decode: variants: expected names from {list(VARIANTS)}, got {spec!r}")
    return ["fp32-strict"] + [v for v in dict.fromkeys(names) if v != "fp32-strict"]


def load_tokenizer(ckpt: str, device: torch.device):
    """(the multi-scale VQ-VAE of a generator or tokenizer checkpoint, its data config)."""
    from maskar.checkpoint import load_model

    model, cfg = load_model(ckpt, device="cpu")
    tok = getattr(model, "tokenizer", model)
    if getattr(getattr(tok, "cfg", None), "arch", None) != "vqvae":
        raise SystemExit(f"bench decode: {ckpt!r} holds no multi-scale VQ-VAE (vqvae) tokenizer")
    return tok.to(device).eval(), cfg.data


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB of images in [-1, 1] (peak-to-peak 2); inf where equal."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def quality(opts: dict[str, Any], device: torch.device) -> dict[str, Any]:
    import dataclasses

    from maskar.data import build_dataset

    tok, data_cfg = load_tokenizer(str(opts["ckpt"]), device)
    limit = int(opts["limit"]) or None
    root = str(opts["root"]) or data_cfg.root
    ds = build_dataset(
        dataclasses.replace(data_cfg, root=root, split=str(opts["split"]), limit=limit, hflip=False)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=int(opts["batch"]), shuffle=False)
    ref, f32, b16 = [], [], []
    for batch in loader:
        img = batch["image"].to(device).float()
        fhat = tok.indices_to_fhat(tok.img_to_indices(img))  # real token pyramids, fp32
        ref.append(img.cpu())
        f32.append(tok.fhat_to_img(fhat, precision="fp32").cpu())
        b16.append(tok.fhat_to_img(fhat, precision="bf16").cpu())
    ref, f32, b16 = torch.cat(ref), torch.cat(f32), torch.cat(b16)
    per = psnr_per_image(b16, f32)
    u32, u16 = to_uint8(f32), to_uint8(b16)
    du = (u32.int() - u16.int()).abs()
    mse_all = (b16 - f32).pow(2).mean()
    return {
        "ckpt": str(opts["ckpt"]), "root": root, "split": str(opts["split"]), "images": int(ref.shape[0]),
        "image_shape": list(ref.shape[1:]),
        "psnr_bf16_vs_fp32_mean": per.mean().item(), "psnr_bf16_vs_fp32_min": per.min().item(),
        "psnr_bf16_vs_fp32_all": (10 * torch.log10(4.0 / mse_all)).item(),
        "max_abs_diff": (b16 - f32).abs().max().item(),
        "uint8_changed_frac": (du > 0).float().mean().item(), "uint8_max_change": int(du.max()),
        "psnr_fp32_vs_original": psnr_per_image(f32, ref).mean().item(),
        "psnr_bf16_vs_original": psnr_per_image(b16, ref).mean().item(),
        "device": str(device), "torch": torch.__version__,
    }  # fmt: skip


def _time(fn, reps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up (cuDNN algorithm choice, allocator growth)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), out


def d16_tokenizer_config(res: int):
    """The d16 models' VQ-VAE config at ``res`` px (the official schedule; other sides: a smoke run)."""
    import dataclasses

    from maskar.config import load_config
    from maskar.tokenizers.vqvae import PATCH_NUMS

    base = load_config("var-d16").model.tokenizer
    return dataclasses.replace(
        base, resolution=res, patch_nums=PATCH_NUMS.get(res, tuple(sorted({1, res // 16})))
    )


@torch.no_grad()
def speed(opts: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    from torch.utils.flop_counter import FlopCounterMode

    import maskar.bench.flops  # noqa: F401  (formulas for the fused ops)
    from maskar.bench.sample import parse_cases
    from maskar.registry import build_model

    variants = _variants(opts["variants"])
    rows = []
    for res, batch in parse_cases(opts["cases"], "bench decode"):
        cfg = d16_tokenizer_config(res)
        torch.manual_seed(0)
        with torch.device(device):
            tok = build_model(cfg).eval()
        g = torch.Generator(device=device).manual_seed(0)
        ids = [
            torch.randint(0, tok.vocab_size, (batch, p * p), device=device, generator=g)
            for p in tok.patch_nums
        ]
        fhat = tok.indices_to_fhat(ids)
        with FlopCounterMode(display=False) as fc:
            tok.fhat_to_img(fhat[:1])
        flops = fc.get_total_flops() * batch
        ref = old = None
        for name in variants:
            ms, img, peak, first_s, kernels = _time_decode(
                tok, fhat, res, VARIANTS[name], int(opts["reps"]), device, bool(opts["profile"])
            )
            if ref is None:
                ref = img
            per = psnr_per_image(img, ref)
            vs_old = psnr_per_image(img, old) if old is not None else None
            if name == "bf16-torch-gn":
                old = img
            precision = VARIANTS[name].precision
            peak_tf = PEAK_TFLOPS["bf16" if precision == "bf16" else "tf32"]
            rows.append({
                "res": res, "batch": batch, "variant": name, "ms": ms, "decode_peak_gb": peak,
                "first_s": first_s, "tflop": flops / 1e12, "floor_ms": flops / (peak_tf * 1e12) * 1e3,
                "psnr_vs_fp32_strict_mean": per.mean().item(), "psnr_vs_fp32_strict_min": per.min().item(),
            })  # fmt: skip
            if vs_old is not None:
                rows[-1]["psnr_vs_bf16_torch_gn_mean"] = vs_old.mean().item()
                rows[-1]["psnr_vs_bf16_torch_gn_min"] = vs_old.min().item()
            if kernels is not None:
                rows[-1]["kernel_groups_ms"] = group_kernels(kernels)
                rows[-1]["kernels_top_ms"] = dict(list(kernels.items())[:10])
            print(
                f"{res:>5} {batch:>5} {name:<16} {ms:>9.1f} {_fmt(peak, '.2f', 8)} {flops / 1e12:>7.1f} "
                f"{rows[-1]['floor_ms']:>8.1f} {per.mean().item():>8.1f} {per.min().item():>8.1f} "
                f"{_fmt(None if vs_old is None else vs_old.mean().item(), '.1f', 9)} {first_s:>8.1f}",
                flush=True,
            )
            if kernels is not None:
                _print_kernels(name, rows[-1]["kernel_groups_ms"], rows[-1]["kernels_top_ms"])
        del tok, fhat, ref, img
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _print_kernels(name: str, groups: dict[str, float], top: dict[str, float]) -> None:
    total = sum(groups.values())
    parts = ", ".join(f"{g} {ms:.1f}" for g, ms in groups.items())
    print(f"      {name}: GPU kernels {total:.1f} ms a decode: {parts}", flush=True)
    for kname, ms in top.items():
        print(f"        {ms:8.2f} ms  {kname[:110]}", flush=True)


def _decoder_convs(tok, z: torch.Tensor):
    """Counter of (input shape, weight shape, padding) -> calls of one decode of z (meta tensors)."""
    from collections import Counter

    import torch.nn.functional as F

    shapes: Counter = Counter()
    real = F.conv2d

    def record(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        pad = padding if isinstance(padding, int) else tuple(padding)
        shapes[(tuple(x.shape), tuple(w.shape), pad)] += 1
        return real(x, w, b, stride, padding, dilation, groups)

    F.conv2d = record
    try:
        tok.decoder(tok.post_quant_conv(z))
    finally:
        F.conv2d = real
    return shapes


@torch.no_grad()
def conv_shapes(opts: dict[str, Any], device: torch.device) -> list[dict[str, Any]]:
    """Every distinct convolution of the d16 decoder per case, timed alone in bf16 (NCHW, NHWC)."""
    import torch.nn.functional as F

    from maskar.bench.sample import parse_cases
    from maskar.models.var import DECODE_PIXELS_BF16
    from maskar.registry import build_model

    rows = []
    for res, batch in parse_cases(opts["cases"], "bench decode"):
        cfg = d16_tokenizer_config(res)
        with torch.device("meta"):
            tok = build_model(cfg).eval()
        chunk = max(1, min(batch, DECODE_PIXELS_BF16 // (res * res)))
        side = res // int(tok.downsample)
        shapes = _decoder_convs(tok, torch.empty(chunk, int(tok.z_channels), side, side, device="meta"))
        total_ms = 0.0
        case_rows = []
        for (xs, ws, pad), calls in shapes.items():
            x = torch.randn(xs, device=device, dtype=torch.bfloat16)
            w = torch.randn(ws, device=device, dtype=torch.bfloat16) * 0.05
            b = torch.zeros(ws[0], device=device, dtype=torch.bfloat16)
            flop = 2 * xs[0] * ws[0] * ws[1] * ws[2] * ws[3] * xs[2] * xs[3]  # stride 1, "same" padding
            row = {"res": res, "chunk": chunk, "input": list(xs), "weight": list(ws), "calls_per_decode":
                   calls * -(-batch // chunk), "gflop_per_call": flop / 1e9}  # fmt: skip
            for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
                xl, wl = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
                ms, _ = _time(
                    lambda xl=xl, wl=wl, b=b, pad=pad: F.conv2d(xl, wl, b, 1, pad), int(opts["reps"]), device
                )
                row[f"{layout}_ms"] = ms
                row[f"{layout}_tflops"] = _tflops(flop, ms)
            cout = ws[0]
            if cout > 128 and cout % 128:  # cuDNN's 128-wide output tiles run partly empty
                xl = x.contiguous(memory_format=torch.channels_last)
                head = (cout // 128) * 128
                w1, w2 = (t.contiguous(memory_format=torch.channels_last) for t in (w[:head], w[head:]))
                ms, _ = _time(
                    lambda xl=xl, w1=w1, w2=w2, b=b, pad=pad, head=head: (
                        F.conv2d(xl, w1, b[:head], 1, pad), F.conv2d(xl, w2, b[head:], 1, pad)
                    )[0],
                    int(opts["reps"]), device,
                )  # fmt: skip
                row["split_ms"], row["split_tflops"] = ms, _tflops(flop, ms)
                if cout % 64:
                    padded = -(-cout // 64) * 64
                    wp = torch.zeros((padded, *ws[1:]), device=device, dtype=w.dtype)
                    wp[:cout] = w
                    wp = wp.contiguous(memory_format=torch.channels_last)
                    bp = torch.zeros(padded, device=device, dtype=b.dtype)
                    conv = lambda xl=xl, wp=wp, bp=bp, pad=pad: F.conv2d(xl, wp, bp, 1, pad)  # noqa: E731
                    ms, _ = _time(conv, int(opts["reps"]), device)
                    row["pad64_ms"], row["pad64_tflops"] = ms, _tflops(flop, ms)
            total_ms += row["calls_per_decode"] * row["nchw_ms"]
            case_rows.append(row)
            del x, w, b
        for row in sorted(case_rows, key=lambda r: -r["calls_per_decode"] * r["nchw_ms"]):
            row["share_of_conv_ms"] = (
                row["calls_per_decode"] * row["nchw_ms"] / total_ms if total_ms else None
            )
            rows.append(row)
            weight = f"{row['weight'][1]}->{row['weight'][0]} k{row['weight'][2]}"
            print(
                f"{res:>5} {batch:>5} {str(row['input']):<22} {weight:<18} {row['calls_per_decode']:>5} "
                f"{row['nchw_ms']:>8.3f} {_fmt(row['nchw_tflops'], '.0f', 7)} {row['nhwc_ms']:>8.3f} "
                f"{_fmt(row['nhwc_tflops'], '.0f', 7)} {row['share_of_conv_ms']:>7.1%}"
                f"{_fmt(row.get('split_ms'), '.3f', 9)} {_fmt(row.get('split_tflops'), '.0f', 7)}"
                f"{_fmt(row.get('pad64_ms'), '.3f', 9)} {_fmt(row.get('pad64_tflops'), '.0f', 7)}",
                flush=True,
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time_decode(
    tok, fhat, res: int, v: Variant, reps: int, device: torch.device, profile: bool = False
):  # fmt: skip
    """(median ms, images, peak GB above what was allocated before, seconds of the first call:
    compiling and autotuning included, GPU ms by kernel name of one more decode when ``profile``
    on CUDA else None) of the chunked decode."""
    from maskar.models.var import CompiledDecoder, decode_in_chunks
    from maskar.tokenizers import common, vqvae

    try:
        from maskar.kernels import group_norm
    except ImportError:  # no Triton: the torch norm is all there is
        group_norm = None
    # (module, attribute, the variant's value): set for this variant, restored after it
    flags = [(vqvae, "BF16_CHANNELS_LAST", v.channels_last), (vqvae, "BF16_CUDNN_BENCHMARK", v.autotune),
             (common, "SUBPIXEL_UPSAMPLE", v.subpixel), (common, "NORM_TAKES_CONV_BIAS", v.norm_conv_bias)]
    if group_norm:
        flags.append((group_norm, "ENABLED", v.fused_norm))
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in flags]
    allow = torch.backends.cudnn.allow_tf32 if v.tf32 is None else v.tf32
    precision, compile_mode = v.precision, v.compile_mode
    try:
        for mod, name, value in flags:
            setattr(mod, name, value)
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=allow):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            decoder = tok if compile_mode is None else CompiledDecoder(tok, mode=compile_mode)
            t0 = time.perf_counter()
            decode_in_chunks(decoder, fhat, res, precision)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_s = time.perf_counter() - t0
            ms, img = _time(lambda: decode_in_chunks(decoder, fhat, res, precision), reps, device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 1e9 if device.type == "cuda" else None
            kernels = None
            if profile and device.type == "cuda":
                from maskar.bench.kernel_time import kernel_ms_per_call

                kernels = kernel_ms_per_call(lambda: decode_in_chunks(decoder, fhat, res, precision), calls=2)
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
    return ms, img, peak, first_s, kernels


def _tflops(flop: float, ms: float) -> float | None:
    return flop / (ms * 1e9) if ms > 0 else None


def _fmt(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def main(argv: list[str] | None = None) -> int:
    opts = _parse(list(argv or []))
    _variants(opts["variants"])  # a bad name fails now, not after the quality pass
    from maskar.bench.sample import parse_cases

    parse_cases(opts["cases"], "bench decode")  # so does a bad case
    name = str(opts["device"])
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    print(f"command: maskar bench decode {' '.join(argv or [])}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {gpu} | torch {torch.__version__} | cudnn tf32 {torch.backends.cudnn.allow_tf32}")
    out: dict[str, Any]
    if not opts["quality"]:
        out = {"quality": {"error": "skipped (quality=false)"}}
        print("quality: skipped (quality=false)")
    else:
        try:
            out = {"quality": quality(opts, device)}
        except Exception as e:  # noqa: BLE001 - e.g. the dataset is not installed here: still time the decoder
            out = {"quality": {"error": f"{type(e).__name__}: {e}"}}
            print(f"quality: not measured ({out['quality']['error']})")
    q = out["quality"]
    if "error" not in q:
        print(
            f"quality ({q['ckpt']}, {q['split']} split of {q['root']}, {q['images']} images "
            f"{q['image_shape']}): "
            f"bf16 vs fp32 decode PSNR mean {q['psnr_bf16_vs_fp32_mean']:.1f} dB, worst image "
            f"{q['psnr_bf16_vs_fp32_min']:.1f} dB, all pixels {q['psnr_bf16_vs_fp32_all']:.1f} dB; "
            f"max |diff| {q['max_abs_diff']:.2e}; uint8 values changed "
            f"{100 * q['uint8_changed_frac']:.3f}% (max {q['uint8_max_change']}); vs the originals: "
            f"fp32 {q['psnr_fp32_vs_original']:.2f} dB, bf16 {q['psnr_bf16_vs_original']:.2f} dB"
        )
    if opts["speed"]:
        print(
            f"{'res':>5} {'batch':>5} {'variant':<16} {'ms':>9} {'peak GB':>8} {'TFLOP':>7} {'floor':>8} "
            f"{'PSNR':>8} {'min':>8} {'vs old gn':>9} {'first s':>8}"
        )
        out["speed"] = speed(opts, device)
    if opts["convs"]:
        print(
            f"{'res':>5} {'batch':>5} {'input (chunk)':<22} {'weight':<18} {'calls':>5} {'NCHW ms':>8} "
            f"{'TFLOP/s':>7} {'NHWC ms':>8} {'TFLOP/s':>7} {'share':>7} {'split ms':>8} {'TFLOP/s':>7} "
            f"{'pad64 ms':>8} {'TFLOP/s':>7}"
        )
        out["convs"] = conv_shapes(opts, device)
    if opts["json"]:
        with open(str(opts["json"]), "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
