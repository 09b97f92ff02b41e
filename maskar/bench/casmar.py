"""CASMAR sampling benchmark: images/s, achieved TFLOP/s, peak memory, decode apart (random weights).

One ``CASMAR.sample_tokens`` call per batch: 4 x cond_scale scaffold steps with the MLP head,
then ``num_iter`` refinement steps, each a transformer pass plus the DiT head's whole
RePaint chain. Defaults are the README evaluation settings of CASMAR-B (num_iter 4, cfg 2.5,
re_cfg 2.7, 100 / 250 head steps), batch 64, bf16 autocast. See
:mod:`maskar.bench.masked_sampling` for what is timed and how FLOPs are counted.

    python -m maskar bench casmar                                  # CASMAR-B, B 64, graphs on
    python -m maskar bench casmar --cuda-graph both --profile      # + eager, token equality, profile
    python -m maskar bench casmar --preset casmar-h --num-iters 12 # CASMAR-H at its num_iter
    python -m maskar bench casmar --preset casmar-tiny --device cpu --batch 2   # smoke test
"""

from __future__ import annotations

import argparse

from maskar.bench import masked_sampling as ms


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (tests parse documented commands with it)."""
    ap = argparse.ArgumentParser(
        prog="maskar bench casmar", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    ms.add_common_args(ap, "casmar-b")
    ap.add_argument("--num-iters", default="4", help="comma-separated refinement step counts")
    ap.add_argument("--cfg", type=float, default=2.5, help="stage-2 guidance (README eval: 2.5)")
    ap.add_argument("--re-cfg", type=float, default=2.7, help="stage-1 guidance (README eval: 2.7)")
    ap.add_argument(
        "--refine-num-sampling-steps", default=None, help="DiT-head steps (default: the preset's)"
    )
    ap.add_argument("--scaffold-num-iter", type=int, default=0, help="stage-1 steps (0 = 4 x cond_scale)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    ms.check_args(ap, args)
    try:
        num_iters = [int(x) for x in args.num_iters.split(",")]
    except ValueError:
        ap.error(f"--num-iters: expected comma-separated integers, got {args.num_iters!r}")
    if min(num_iters) < 1 or args.scaffold_num_iter < 0:
        ap.error("--num-iters: expected >= 1; --scaffold-num-iter: expected >= 0")
    device = ms.pick_device(args.device)
    cfg, model, precision = ms.build(args, device)
    if cfg.model.arch != "casmar":
        ap.error(f"--preset {args.preset}: a {cfg.model.arch} model, expected casmar (use bench mar)")
    steps = str(cfg.sample.num_sampling_steps if args.num_sampling_steps is None else args.num_sampling_steps)
    refine = args.refine_num_sampling_steps or cfg.sample.refine_num_sampling_steps
    meta = {"preset": args.preset, "precision": precision, "device": ms.device_name(device)}
    meta.update(ms.switches(model))
    ms.print_header("casmar", argv, model, args, device, precision)
    samplers = [
        ms.casmar_sampler(
            model, args.batch, n, args.cfg, args.re_cfg, steps, str(refine), args.scaffold_num_iter
        )
        for n in num_iters
    ]
    rows = ms.run_cases(samplers, args, device, precision, meta)
    ms.print_table(rows)
    ms.write_json(args.json, rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
