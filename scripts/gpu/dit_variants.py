"""CASMAR-B's DiT chain (one refinement step's diffusion loop, compiled step, CUDA graph) in the
opt-in layouts of the step: row chunks (``GlobalDiffLoss.step_chunks``) and the adaLN
projection split in halves (``DiTBlock.split_adaln``); then the 256 px VQ-VAE decode with
larger chunks (``maskar.models.var.DECODE_PIXELS_BF16``). Prints ms per chain and per step, and
each variant's largest difference from the first (k 1, no split) on the same draws.

Run from the repository root on a GPU:
    python scripts/gpu/dit_variants.py --steps 100 --variants 1:0,2:0,4:0,8:0,1:1,4:1 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", default="100", help="DiT respacing of the timed chain")
    ap.add_argument("--variants", default="1:0,2:0,4:0,8:0,1:1,4:1", help="chunks:split pairs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode-chunks", default="8,16,32,64", help="images per 256 px decode chunk")
    ap.add_argument("--preset", default="casmar-b")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (no graphs, no compile)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    variants = [tuple(int(v) for v in p.split(":")) for p in args.variants.split(",") if p]
    import torch._dynamo

    torch._dynamo.config.automatic_dynamic_shapes = False  # one static compile per row count, as sampling
    torch._dynamo.config.cache_size_limit = 32

    from maskar.bench import decode
    from maskar.bench import masked_sampling as ms
    from maskar.models.casmar import DiTBlock, GlobalDiffLoss

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    ns = argparse.Namespace(
        preset=args.preset, precision="bf16" if cuda else "fp32", attention_backend="auto"
    )
    cfg, model, precision = ms.build(ns, device)
    if cuda:
        model.cast_linears_(torch.bfloat16)
        model.compile_sampler()
    head = model.cond_diffloss
    net = head.net
    b2 = 2 * args.batch
    h, w = net.grid
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(b2, net.c_embedder.proj.in_channels, h, w, device=device, generator=g)
    known = torch.randn(args.batch, net.in_channels, h, w, device=device, generator=g)
    known = torch.cat([known, known])
    keep = torch.rand(args.batch, 1, h, w, device=device, generator=g) < 0.5
    keep = torch.cat([keep, keep])
    n_steps = head.gen_diffusion(args.steps).num_timesteps
    rows, ref = [], None
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{args.preset} DiT chain, B {args.batch} ({b2} rows), {n_steps} steps, {name}")
    for chunks, split in variants:
        GlobalDiffLoss.step_chunks = chunks
        DiTBlock.split_adaln = bool(split)

        def chain() -> torch.Tensor:
            return head.sample(
                z,
                1.0,
                2.5,
                num_sampling_steps=args.steps,
                generator=torch.Generator(device=device).manual_seed(1),
                known=known,
                known_mask=keep,
                cuda_graph=cuda,
            )

        with torch.no_grad(), ms.autocast(device, precision):
            chain()  # compile, capture; _time warms up once more
            ms_, out = decode._time(chain, args.reps, device)
        if ref is None:
            ref = out
        diff = (out - ref).abs().max().item()
        rows.append(
            {
                "chunks": chunks,
                "split_adaln": bool(split),
                "chain_ms": ms_,
                "step_ms": ms_ / n_steps,
                "max_abs_diff_vs_first": diff,
            }
        )
        print(
            f"chunks {chunks} split_adaln {bool(split)!s:5}: chain {ms_:8.1f} ms, "
            f"{ms_ / n_steps:6.3f} ms/step; max |diff| vs first {diff:.3e}",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"dit": rows}, f, indent=1)
    GlobalDiffLoss.step_chunks, DiTBlock.split_adaln = 1, False
    model = head = net = None  # free the GPU memory before the decoder
    if not cuda:
        return 0
    torch.cuda.empty_cache()

    from maskar.models import var

    dec = []
    for n in [int(v) for v in args.decode_chunks.split(",") if v]:
        var.DECODE_PIXELS_BF16 = n * 256 * 256
        print(f"decode chunk {n} images (256 px B 64):", flush=True)
        opts = dict(decode.DEFAULTS, quality=False, speed=True, cases="256x64", variants="bf16", reps=5)
        for r in decode.speed(opts, device):
            if r["variant"] == "bf16":
                dec.append({"chunk_images": n, **r})
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"dit": rows, "decode": dec}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
