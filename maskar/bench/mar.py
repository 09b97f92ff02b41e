"""MAR end-to-end benchmark: sampling throughput and training step time (random weights).

Sampling = one ``MAR.sample_tokens`` call per batch (all AR iterations, the diffusion head's
respaced steps, CFG; tokens only), with the KL decode timed apart; images/s = batch / median
time, achieved TFLOP/s from the FLOP model (:mod:`maskar.bench.masked_sampling`). Training =
one optimizer step (forward + backward + grad clip + AdamW) on cached posterior moments, and
on images (the frozen VAE encoder included). Times are medians of CUDA-event timings after
warm-up; peak memory is reported per case.

    python -m maskar bench mar                              # MAR-B, 256 px, batch 64, bf16
    python -m maskar bench mar --num-iters 64,256 --cfg 2.9 --train-batch 64
    python -m maskar bench mar --preset mar-tiny --device cpu --batch 4 --train-batch 4   # smoke test
    python -m maskar bench mar --num-iters 64 --train-batch 0 --cuda-graph both --profile

``--cuda-graph on`` (default) lets the diffusion head replay its sampling chain as CUDA
graphs (GPU only; captured in the warm-up run); ``off`` samples eagerly; ``both`` times both
and compares their tokens. ``--train-batch 0`` (or ``--skip-train``) skips the training step.
"""

from __future__ import annotations

import argparse

import torch

from maskar.bench import masked_sampling as ms


def _optimizer(model: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 0.02) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "diffloss" in name else decay).append(p)
    fused = next(model.parameters()).is_cuda
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


def train_rows(model, cfg, args, device: torch.device, precision: str) -> list[dict]:
    model.train()
    opt = _optimizer(model)
    b = args.train_batch
    c = model.token_channels // cfg.model.patch_size**2
    h = model.seq_h * cfg.model.patch_size
    moments = torch.randn(b, 2 * c, h, h, device=device)
    moments[:, c:] = -4.0  # small posterior std, like real KL-16 moments
    labels = torch.randint(0, model.num_classes, (b,), device=device)
    images = torch.rand(b, model.image_channels, model.image_size, model.image_size, device=device) * 2 - 1
    batches = {
        "cached latents": {"moments": moments, "moments_flip": moments.flip(-1), "label": labels},
        "images (VAE encode)": {"image": images, "label": labels},
    }
    rows, time_one = [], ms.timer(device)
    for name, batch in batches.items():
        ms.reset_peak(device)

        def step(batch: dict = batch) -> None:
            with ms.autocast(device, precision):
                loss = model.loss(batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        med, times = ms.measure(step, time_one, warmup=args.warmup, reps=args.train_reps)
        peak = ms.peak_gb(device)
        row = {"case": f"train step ({name}) B={b}, mul={model.diffusion_batch_mul}", "median_ms": med}
        row.update(images_per_s=b / (med / 1e3), peak_gb=peak, times_ms=times)
        rows.append(row)
        print(
            " | ".join(
                [
                    row["case"],
                    f"{med:.1f} ms",
                    f"{b / (med / 1e3):.0f} img/s",
                    "-" if peak is None else f"{peak:.1f}",
                    f"min {min(times):.1f} / max {max(times):.1f} ms, n={len(times)}",
                ]
            ),
            flush=True,
        )
    model.eval()
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (tests parse documented commands with it)."""
    ap = argparse.ArgumentParser(
        prog="maskar bench mar", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    ms.add_common_args(ap, "mar-b")
    ap.add_argument("--num-iters", default="64,256", help="comma-separated AR iteration counts")
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the preset's sample.cfg)")
    ap.add_argument(
        "--train-batch", type=int, default=64, help="per-GPU training batch (official: 64; 0 = no training)"
    )
    ap.add_argument("--train-reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps")
    ap.add_argument("--skip-sample", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument(
        "--compile-head", action="store_true", help="torch.compile the diffusion head for sampling"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    ms.check_args(ap, args)
    if args.train_batch < 0:
        ap.error(f"--train-batch: expected >= 0, got {args.train_batch}")
    if args.linears == "low" and args.train_batch > 0 and not args.skip_train:
        ap.error("--linears low: the training rows need the fp32 weights; use --train-batch 0 / --skip-train")
    try:
        num_iters = [int(x) for x in args.num_iters.split(",")]
    except ValueError:
        ap.error(f"--num-iters: expected comma-separated integers, got {args.num_iters!r}")
    if min(num_iters) < 1:
        ap.error(f"--num-iters: expected >= 1, got {args.num_iters!r}")
    device = ms.pick_device(args.device)
    cfg, model, precision = ms.build(args, device)
    if cfg.model.arch != "mar":
        ap.error(
            f"--preset {args.preset}: a {cfg.model.arch} model, expected mar (use bench {cfg.model.arch})"
        )
    if args.compile_head:
        model.diffloss.compile_sampler()
    cfg_scale = cfg.sample.cfg if args.cfg is None else args.cfg
    steps = str(cfg.sample.num_sampling_steps if args.num_sampling_steps is None else args.num_sampling_steps)
    meta = {"preset": args.preset, "precision": precision, "device": ms.device_name(device)}
    meta.update(ms.switches(model))
    ms.print_header("mar", argv, model, args, device, precision)
    if args.compile_head:
        print("compiled diffusion head (compile time in the warm-up run)")
    rows = []
    if not args.skip_sample:
        samplers = [ms.mar_sampler(model, args.batch, n, cfg_scale, steps) for n in num_iters]
        rows += ms.run_cases(samplers, args, device, precision, meta)
    if not args.skip_train and args.train_batch > 0:
        rows += train_rows(model, cfg, args, device, precision)
    ms.print_table(rows)
    for r in rows:
        if "flops" not in r:  # training steps
            peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f} GB"
            print(f"| {r['case']} | {r['median_ms']:.1f} ms | {r['images_per_s']:.0f} img/s | {peak} |")
    ms.write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
