"""The top-k / top-p draw alone on the GPU: the torch path (``sample_from_logits(method="fused")``)
against the one-kernel draw (``maskar.kernels.categorical``) at each launch config.

    python scripts/gpu/sampler_speed.py [--json out.json]

Shapes: the sampler's calls at VAR / HMAR-d16 (vocabulary 4096, k 900, p 0.96, bf16 guided logits,
float32 Exp(1) noise): 8192 rows (``SAMPLE_ROWS``, every chunk of the large scales), 2048 and 128
rows (small scales). Time: median of 50 CUDA-event timings after 5 warm-up calls, the noise drawn
once. Floor: the bytes the kernel must move (logits, noise, ids) at this GPU's measured
device-to-device copy bandwidth. Each config's ids are checked against the torch path's on the
same noise (the share of equal draws; they differ only at float32 rounding of the nucleus
boundary, tests/test_categorical_kernel.py).
"""

from __future__ import annotations

import argparse
import json

import torch

from maskar.bench.attention import time_ms as _time_ms
from maskar.kernels import categorical
from maskar.nn.sampling import exponential_noise, sample_from_logits

CONFIGS = [categorical.CatConfig(1, w) for w in (2, 4, 8, 16)]


def time_ms(fn, reps: int = 50, warmup: int = 5) -> float:
    return _time_ms(fn, reps, warmup)


def copy_gbps() -> float:
    x = torch.empty(1 << 28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), reps=20)
    return 2 * x.numel() * 4 / ms / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    bw = copy_gbps()
    print(f"device {torch.cuda.get_device_name()} | copy {bw:.0f} GB/s | torch {torch.__version__}")
    print(f"{'rows':>6} {'path':<22} {'ms':>8} {'floor ms':>9} {'GB/s':>7} {'same draws':>10}")
    out = {"copy_gbps": bw, "rows": []}
    V, k, p = 4096, 900, 0.96
    g = torch.Generator(device="cuda").manual_seed(0)
    for R in (8192, 2048, 128):
        x = (torch.randn(R, V, device="cuda", generator=g) * 3).bfloat16()
        noise = exponential_noise(R, V, g, "cuda")
        moved = R * V * (x.element_size() + 4) + R * 8
        floor = moved / bw / 1e6
        ref = sample_from_logits(x, k, p, noise=noise, method="fused")
        ms = time_ms(lambda x=x, noise=noise: sample_from_logits(x, k, p, noise=noise, method="fused"))
        rows = [("torch fused", ms, 1.0)]
        for cfg in CONFIGS:
            categorical.FORCE_CONFIG = cfg
            try:
                same = float((categorical.draw(x, noise, k, p) == ref).float().mean())
                ms = time_ms(lambda x=x, noise=noise: categorical.draw(x, noise, k, p))
            finally:
                categorical.FORCE_CONFIG = None
            rows.append((f"kernel warps {cfg.num_warps}", ms, same))
        for name, ms, same in rows:
            print(f"{R:>6} {name:<22} {ms:>8.3f} {floor:>9.3f} {moved / ms / 1e6:>7.0f} {same:>10.5f}")
            out["rows"].append(dict(rows=R, path=name, ms=ms, floor_ms=floor, same_draws=same))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
