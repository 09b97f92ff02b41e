#!/usr/bin/env bash
# The fused GroupNorm(+SiLU) of the VQ-VAE decoder (maskar.kernels.group_norm; docs/kernels.md) on one
# H200: checked, then timed alone and inside the decoder. About 1.5 minutes; hard limits 90 + 150 + 150 s
# (6.5 minutes). Produces in $OUT (5 files):
#   gpu_tests.txt      pytest -m gpu tests/test_group_norm_kernel.py: the kernel against the float64 truth
#                      and the torch code at the d16 decoder's shapes (bf16 / fp16, NCHW / channels-last),
#                      a small decoder with vs without it, CUDA-graph replay and torch.compile bit for bit
#   norm.txt / .json   the norm alone at every (shape, SiLU) call one chunked decode makes (recorded from
#                      the decoder: 256 px B 64 in chunks of 8 images, 1024 px B 8 one image at a time):
#                      the check at the biggest shapes first, then ms per call of torch (F.group_norm +
#                      F.silu) and of the fused op on NCHW and on channels-last input, GB/s counted as
#                      3 x the tensor's bytes (read twice, write once: the fused op's floor) against
#                      4.3 TB/s, and the sum over one decode; then a tile-size sweep at the biggest shapes
#   decode.txt / .json `maskar bench decode speed=true` at 256 px B 64 and 1024 px B 8, variants
#                      fp32-strict, bf16-torch-gn (the decode before the kernel), bf16 (now), bf16-cl
#                      (channels-last): ms, peak GB, PSNR against fp32 and of the new against the old decode
# A summary is printed last. Run from the repository root: OUT=/tmp/out scripts/gpu/bench_decode_norm.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"

el "1. GPU tests"
timeout 90 python3 -m pytest -q -rf -m gpu -p no:cacheprovider tests/test_group_norm_kernel.py \
    > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?"

el "2. the norm alone: check, then torch vs fused at the decoder's calls, then a tile sweep"
timeout 150 python3 - "$OUT/norm.json" <<'EOF' 2>&1 | tee "$OUT/norm.txt"
import dataclasses, json, statistics, sys, torch
sys.path.insert(0, "tests")
from test_group_norm_kernel import EPS, check_call
import maskar.kernels.group_norm as gn
from maskar.bench.attention import time_back_to_back_ms
from maskar.config import load_config
from maskar.models.var import decode_in_chunks
from maskar.registry import build_model
from maskar.tokenizers.vqvae import PATCH_NUMS

dev, BW = torch.device("cuda"), 4.3e12
out = {"check": [], "calls": [], "totals": [], "sweep": []}

def ms(fn, reps=7, inner=5):  # median over reps of the mean of `inner` back-to-back calls
    return time_back_to_back_ms(fn, n=inner, rounds=reps)

def decoder_calls(res, batch):
    """{(shape, silu): calls} of one chunked bf16 decode, recorded at the fused op's launch."""
    cfg = dataclasses.replace(load_config("var-d16").model.tokenizer, resolution=res, patch_nums=PATCH_NUMS[res])
    with torch.device(dev):
        tok = build_model(cfg).eval()
    fhat = torch.randn(batch, tok.z_channels, tok.latent_side, tok.latent_side, device=dev)
    seen, real = {}, gn._forward
    def rec(x, w, b, G, eps, silu):
        seen[(tuple(x.shape), silu)] = seen.get((tuple(x.shape), silu), 0) + 1
        return real(x, w, b, G, eps, silu)
    gn._forward = rec
    try:
        with torch.no_grad():
            decode_in_chunks(tok, fhat, res, "bf16")
    finally:
        gn._forward = real
    del tok, fhat
    torch.cuda.empty_cache()
    return seen

# check at the biggest call shapes first (float64 truth on the GPU; <= 1 passes)
for shape in ((1, 160, 1024, 1024), (8, 160, 256, 256)):
    for cl in (False, True):
        r = check_call(gn.group_norm_act, *shape, 32, torch.bfloat16, cl, True, device="cuda")
        ok = r["excess"] <= 1 and r["finite"] and r["same_layout"]
        out["check"].append({"shape": shape, "channels_last": cl, **r, "pass": ok})
        print(f"check {'x'.join(map(str, shape))} {'CL' if cl else 'NCHW'} bf16 silu: error / bound "
              f"{r['excess']:.2f} (torch's own {r['torch_excess']:.2f}), layout kept {r['same_layout']} "
              f"-> {'PASS' if ok else 'FAIL'}", flush=True)
        torch.cuda.empty_cache()

print(f"{'case':<9} {'shape':<18} {'silu':<5} {'n':>3} {'torch ms':>9} {'fused ms':>9} {'CL ms':>8} "
      f"{'x':>6} {'fused GB/s':>10} {'% 4.3T':>7}")
biggest = {}
for res, batch in ((256, 64), (1024, 8)):
    calls = decoder_calls(res, batch)
    tot = {"torch": 0.0, "fused": 0.0, "cl": 0.0}
    for (shape, silu), n in sorted(calls.items(), key=lambda kv: -torch.Size(kv[0][0]).numel()):
        G = 32
        x = torch.randn(shape, device=dev).mul_(3).add_(1).to(torch.bfloat16)
        w = torch.randn(shape[1], device=dev, dtype=torch.bfloat16)
        b = torch.randn(shape[1], device=dev, dtype=torch.bfloat16)
        xcl = x.contiguous(memory_format=torch.channels_last)
        t_torch = ms(lambda: gn.reference(x, w, b, G, EPS, silu))
        t_fused = ms(lambda: gn.group_norm_act(x, w, b, G, EPS, silu))
        t_cl = ms(lambda: gn.group_norm_act(xcl, w, b, G, EPS, silu))
        gbs = 3 * x.numel() * 2 / (t_fused * 1e-3) / 1e9
        for k, t in (("torch", t_torch), ("fused", t_fused), ("cl", t_cl)):
            tot[k] += n * t
        case = f"{res}x{batch}"
        out["calls"].append({"case": case, "shape": shape, "silu": silu, "calls": n, "torch_ms": t_torch,
                             "fused_ms": t_fused, "fused_cl_ms": t_cl, "fused_gbs": gbs})
        print(f"{case:<9} {'x'.join(map(str, shape)):<18} {str(silu):<5} {n:>3} {t_torch:>9.3f} {t_fused:>9.3f} "
              f"{t_cl:>8.3f} {t_torch / t_fused:>6.1f} {gbs:>10.0f} {100 * gbs * 1e9 / BW:>6.0f}%", flush=True)
        biggest.setdefault(case, shape)
        del x, xcl
    out["totals"].append({"case": f"{res}x{batch}", **tot})
    print(f"TOTAL norms of one {res} px B {batch} decode: torch {tot['torch']:.1f} ms, fused {tot['fused']:.1f} ms "
          f"(x{tot['torch'] / tot['fused']:.1f}), fused channels-last {tot['cl']:.1f} ms", flush=True)
    torch.cuda.empty_cache()

# tile sweep at the biggest shapes (the defaults are a guess: memory-bound, 4096-element tiles)
C = gn.GNConfig
sweeps = {
    False: [C(4096 // bp, bp, ct, w) for bp, ct, w in ((1024, 8, 4), (2048, 4, 4), (2048, 8, 4), (2048, 16, 4),
                                                         (4096, 8, 4), (4096, 8, 8), (2048, 8, 8))]
           + [C(4, 2048, 8, 8), C(2, 4096, 4, 8)],
    True: [C(bc, 4096 // bc, ct, w) for bc, ct, w in ((32, 8, 4), (64, 8, 4), (64, 4, 4), (64, 16, 4), (128, 8, 4))]
          + [C(64, 128, 8, 8)],
}
for case, shape in biggest.items():
    x = torch.randn(shape, device=dev).to(torch.bfloat16)
    w = torch.randn(shape[1], device=dev, dtype=torch.bfloat16)
    b = torch.randn(shape[1], device=dev, dtype=torch.bfloat16)
    for cl in (False, True):
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        default = gn._config(shape[1], shape[2] * shape[3], cl)
        res_ = []
        for cfg in sweeps[cl]:
            gn.FORCE_CONFIG = cfg
            try:
                t = ms(lambda: gn.group_norm_act(xi, w, b, 32, EPS, True))
            except Exception as e:  # a config the compiler refuses
                print(f"sweep {case} {cfg}: {type(e).__name__}", flush=True)
                continue
            finally:
                gn.FORCE_CONFIG = None
            res_.append((t, cfg))
            out["sweep"].append({"case": case, "channels_last": cl, "config": dataclasses.asdict(cfg), "ms": t,
                                 "default": cfg == default})
        t_best, best = min(res_, key=lambda r: r[0])
        t_def = next((t for t, c in res_ if c == default), float("nan"))
        gbs = 3 * x.numel() * 2 / (t_best * 1e-3) / 1e9
        print(f"sweep {case} {'x'.join(map(str, shape))} {'CL' if cl else 'NCHW'}: default {default} {t_def:.3f} ms; "
              f"best {best} {t_best:.3f} ms = {gbs:.0f} GB/s ({100 * gbs * 1e9 / BW:.0f}% of 4.3 TB/s)", flush=True)
    del x
    torch.cuda.empty_cache()
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
EOF
echo "norm rc=$?"

el "3. the decoder: old (torch norm) vs new (fused), NCHW and channels-last"
timeout 150 python3 -m maskar bench decode quality=false speed=true cases=256x64,1024x8 \
    variants=fp32-strict,bf16-torch-gn,bf16,bf16-cl json="$OUT/decode.json" > "$OUT/decode.txt" 2>&1
echo "decode rc=$?"

el "=== summary ==="
tail -n 1 "$OUT/gpu_tests.txt"
grep -E "^check|^TOTAL|^sweep" "$OUT/norm.txt"
grep -E "^quality|^ +res|^ +(256|1024) " "$OUT/decode.txt"
