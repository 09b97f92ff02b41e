"""The fused GroupNorm's tile sizes for channels-last input, swept at the calls of a channels-last
bf16 decode (`MASKAR_DECODE_CHANNELS_LAST=1`), and the compiled decode with the winners.

Why: with the channels-last decode kept channels-last (2026-12-06), the norm took 22.8 ms of a
256 px B 64 decode on an H100 against 13.1 ms on the same calls in NCHW (`_gn_stats` 12.3 against
4.9 ms). Its channels-last tiles (64 channels x 64 pixels, 8 tiles a statistics program) were never
tuned. Per call shape of the decode (recorded at the op's launch), every config of the grid below
is checked against the default's output (the same statistics up to summation order: max difference
within 1% of the largest output)
and timed (stats + finalize + apply, median of 5 rounds of 10 back-to-back calls); the sum over one
decode is printed for the default, the per-shape best and the NCHW default on the same shapes.
Then the compiled channels-last decode (`MASKAR_GN_CONV_BIAS` on) with the rule before
MASKAR_GN_CB_FAST, with the default configs and with the per-shape winners, GPU kernel time by
group, and its wall time.

OUT=/tmp/out python3 scripts/gpu/gn_cl_sweep.py   (about 3 min on an H100); SWEEP_BLOCK_C, SWEEP_TILE,
SWEEP_CHUNK_TILES, SWEEP_WARPS, SWEEP_SUMS (0 / 1: the statistics kernel's per-lane shifted sums,
GNConfig.sums), SWEEP_CB_FAST (0 / 1: the channel blocks on the grid's first axis), SWEEP_STAGES
(the statistics loop's num_stages) (comma-separated) and SWEEP_MIN_ELEMENTS narrow it; SWEEP_CASE
(default 256x64; 1024x8) picks the decode whose calls are swept; SWEEP_DECODES (comma-separated
labels of the compiled decodes timed after it: "previous rule", "default configs", "with the
largest maps' tiles", "swept configs", "with the conv_out kernel" (the default configs and the
3-channel output conv as one Triton kernel, MASKAR_CONV_OUT_KERNEL's path); default all) the
decodes. (A per-lane Welford scheme,
swept with it on 2026-12-06, did no better and is gone: docs/kernels.md.)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time

import torch

import maskar.kernels.group_norm as gn
from maskar.bench.decode import d16_tokenizer_config, group_kernels
from maskar.bench.kernel_time import kernel_ms_per_call
from maskar.kernels import conv3x3_narrow
from maskar.kernels.tuning import time_ms
from maskar.models.var import CompiledDecoder, decode_in_chunks
from maskar.registry import build_model
from maskar.tokenizers import common, vqvae

OUT = os.environ.get("OUT", "/tmp/out")
dev = torch.device("cuda")
vqvae.BF16_CHANNELS_LAST = True
common.NORM_TAKES_CONV_BIAS = True
# SWEEP_CASE=1024x8: the calls of a 1024 px B 8 decode (one image a chunk) instead of 256 px B 64
res, batch = (int(v) for v in os.environ.get("SWEEP_CASE", "256x64").split("x"))
torch.manual_seed(0)
with torch.device(dev):
    tok = build_model(d16_tokenizer_config(res)).eval()
g = torch.Generator(device=dev).manual_seed(0)
ids = [torch.randint(0, tok.vocab_size, (batch, p * p), device=dev, generator=g) for p in tok.patch_nums]
fhat = tok.indices_to_fhat(ids)

# the calls of one decode: (shape, silu, with x_bias, channels-last) -> count
calls: dict = {}
real = gn._forward


def record(x, w, b, G, eps, silu, xb=None, nchw_out=False):
    key = (tuple(x.shape), bool(silu), xb is not None, gn._is_channels_last(x))
    calls[key] = calls.get(key, 0) + 1
    return real(x, w, b, G, eps, silu, xb, nchw_out)


gn._forward = record
with torch.no_grad():
    decode_in_chunks(tok, fhat, res, "bf16")
gn._forward = real
print("calls of one decode:", {f"{'x'.join(map(str, k[0]))} silu={k[1]} xb={k[2]} cl={k[3]}": n
                               for k, n in calls.items()}, flush=True)  # fmt: skip


def _ints(name: str, default: str) -> list[int]:
    """A comma-separated list from the environment (a smaller grid when device time is short)."""
    return [int(v) for v in os.environ.get(f"SWEEP_{name}", default).split(",")]


MIN_ELEMENTS = int(os.environ.get("SWEEP_MIN_ELEMENTS", "0"))  # sweep only calls at least this big
_AXES = (_ints("BLOCK_C", "32,64,128,256"), _ints("TILE", "2048,4096,8192"), _ints("CHUNK_TILES", "4,8,16"),
         _ints("WARPS", "4,8"), _ints("SUMS", "0,1"), _ints("CB_FAST", "0"),
         _ints("STAGES", "1"))  # fmt: skip
GRID = [gn.GNConfig(bc, tile // bc, ct, nw, bool(sums), bool(cbf), st)
        for bc, tile, ct, nw, sums, cbf, st in itertools.product(*_AXES)
        if tile // bc >= 8]  # fmt: skip


def timed(x, w, b, xb, silu, cfg) -> tuple[float, torch.Tensor]:
    gn.FORCE_CONFIG = cfg
    try:
        fn = lambda: gn.group_norm_act(x, w, b, 32, 1e-6, silu, x_bias=xb)  # noqa: E731
        y = fn()
        return time_ms(fn, rounds=5, per_round=10), y
    finally:
        gn.FORCE_CONFIG = None


rows, best = [], {}
t0 = time.time()
for (shape, silu, has_xb, cl), n in sorted(
    calls.items(), key=lambda kv: -kv[1] * torch.Size(kv[0][0]).numel()
):
    N, C, H, W = shape
    if N * C * H * W < MIN_ELEMENTS:
        continue
    x = torch.randn(shape, device=dev).mul_(3).add_(1).to(torch.bfloat16)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, device=dev).bfloat16(), torch.randn(C, device=dev).bfloat16()
    xb = torch.randn(C, device=dev).bfloat16() if has_xb else None
    default_cfg = gn._config(C, H * W, cl, has_xb)
    base_ms, ref = timed(x, w, b, xb, silu, default_cfg)
    nchw_ms, _ = timed(x.contiguous(), w, b, xb, silu, gn._config(C, H * W, False, has_xb))
    cands = []
    for cfg in GRID:
        if cfg.block_c > max(32, 2 ** (C - 1).bit_length()):
            continue
        try:
            ms, y = timed(x, w, b, xb, silu, cfg)
        except Exception as e:  # a config the compiler rejects (registers, shared memory)
            print(f"  {cfg}: {type(e).__name__}", flush=True)
            continue
        err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())  # bf16 ulps at the top
        cands.append((ms, cfg, err))
    ok = [c for c in cands if c[2] <= 1e-2]
    if not ok:
        print(f"{'x'.join(map(str, shape))}: no config ran and agreed with the default", flush=True)
        continue
    ms_best, cfg_best, err_best = min(ok, key=lambda c: c[0])
    best[(C, H * W, cl, has_xb)] = cfg_best
    bytes_floor = 3 * x.numel() * 2  # read twice, write once
    row = {"shape": shape, "silu": silu, "x_bias": has_xb, "channels_last": cl, "calls": n,
           "default": dataclasses.asdict(default_cfg),
           "default_ms": base_ms, "nchw_default_ms": nchw_ms, "best": dataclasses.asdict(cfg_best),
           "best_ms": ms_best,
           "best_err": err_best, "floor_ms_at_3.35TB": bytes_floor / 3.35e12 * 1e3,
           "rejected_or_off": len(GRID) - len(ok),
           "candidates": [[dataclasses.asdict(c), m, e] for m, c, e in cands]}  # fmt: skip
    rows.append(row)
    print(f"{'x'.join(map(str, shape)):<16} silu={int(silu)} xb={int(has_xb)} x{n:<3} "
          f"default {base_ms:.3f} ms, "
          f"NCHW {nchw_ms:.3f}, best {ms_best:.3f} {cfg_best} (max diff {err_best:.1e}), floor "
          f"{row['floor_ms_at_3.35TB']:.3f}  [{time.time() - t0:.0f}s]", flush=True)  # fmt: skip
for key in ("default_ms", "nchw_default_ms", "best_ms"):
    print(f"sum over one decode, {key}: {sum(r[key] * r['calls'] for r in rows):.2f} ms", flush=True)

# the compiled channels-last decode with the default configs, then with the winners
summary = {"sweep": rows}
os.makedirs(OUT, exist_ok=True)


def dump() -> None:
    with open(os.path.join(OUT, "gn_cl_sweep.json"), "w") as f:
        json.dump({"case": f"{res}x{batch}", **summary}, f, indent=1, default=str)


dump()  # the sweep kept if the compiled decodes below run out of time
real_config = gn._config


def tuned_config(C, HW, channels_last, x_bias=False):
    return best.get((C, HW, channels_last, x_bias)) or real_config(C, HW, channels_last, x_bias)


def previous_config(C, HW, channels_last, x_bias=False):
    """The rule before MASKAR_GN_CB_FAST (2026-12-06)."""
    saved, gn.CB_FAST = gn.CB_FAST, False
    try:
        return real_config(C, HW, channels_last, x_bias)
    finally:
        gn.CB_FAST = saved


def wide_maps_config(C, HW, channels_last, x_bias=False):
    """The default rule with the largest maps' narrower tiles (WIDE_MAPS_MIN_ELEMENTS = WIDE_MAPS_TRIAL)."""
    saved, gn.WIDE_MAPS_MIN_ELEMENTS = gn.WIDE_MAPS_MIN_ELEMENTS, gn.WIDE_MAPS_TRIAL
    try:
        return real_config(C, HW, channels_last, x_bias)
    finally:
        gn.WIDE_MAPS_MIN_ELEMENTS = saved


LABELS = {"previous rule": previous_config, "default configs": real_config,
          "with the largest maps' tiles": wide_maps_config, "swept configs": tuned_config,
          "with the conv_out kernel": real_config}  # fmt: skip
for label in os.environ.get("SWEEP_DECODES", ",".join(LABELS)).split(","):
    cfg_fn = LABELS[label]
    gn._config = cfg_fn
    # the decoders' 3-channel output conv as one Triton kernel (MASKAR_CONV_OUT_KERNEL's path)
    common._conv_out_kernel = conv3x3_narrow if label == "with the conv_out kernel" else None
    try:
        torch._dynamo.reset()
        dec = CompiledDecoder(tok)
        with torch.no_grad():
            fn = lambda d=dec: decode_in_chunks(d, fhat, res, "bf16")  # noqa: E731
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(7):
                t = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
            ms = sorted(times)[3]
            per = kernel_ms_per_call(fn, calls=2)
        groups = group_kernels(per)
        summary[label] = {"ms": ms, "times_ms": times, "kernel_groups_ms": groups,
                          "kernels_top_ms": dict(list(per.items())[:12])}  # fmt: skip
        print(f"compiled channels-last decode (conv bias in the norm), {label}: {ms:.1f} ms wall "
              "(median of 7), "
              f"GPU kernels {sum(groups.values()):.1f} ms: "
              + ", ".join(f"{k} {v:.1f}" for k, v in groups.items()), flush=True)  # fmt: skip
    finally:
        gn._config = real_config
        common._conv_out_kernel = None
    dump()
sys.exit(0)
