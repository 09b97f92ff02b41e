"""Where one CASMAR sampling call's time goes, part by part (issue 15's profile, in pieces).

Times each piece of a CASMAR-B sampling call on its own, at the batch the sampler runs it
(B images with CFG = 2B rows), bf16 autocast, random weights, CUDA-event medians:

- ``dit_step``: one guided DiT-head step (``GlobalDiffLoss.step_cfg``) on the whole 16 x 16
  grid, eager and ``torch.compile``d, with its FLOPs (so the achieved TFLOP/s of the head);
- ``dit_chain``: one whole RePaint chain of the DiT head (``refine_num_sampling_steps``
  steps) as the sampler runs it (CUDA graph on / off);
- ``mlp_step``: one guided step of the stage-1 MLP head at the scaffold's row count;
- ``stage1`` / ``stage2``: ``sample_scaffold`` and ``sample_refine`` as ``sample_tokens``
  calls them.

    python -m maskar bench casmar_parts                     # CASMAR-B, B 64, on the GPU
    python -m maskar bench casmar_parts --preset casmar-tiny --device cpu --batch 2 --reps 1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import maskar.bench.flops  # noqa: F401  (formulas for the fused ops)
from maskar.bench import masked_sampling as ms
from maskar.bench.kernel_time import kernel_ms_per_call
from maskar.nn.attention import set_backend
from maskar.nn.diffusion import space_timesteps

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    return ms.measure(fn, ms.timer(device), warmup, reps)[0]


def _flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max, mean) of |a - b| / max |b| (float32)."""
    d = (a.float() - b.float()).abs()
    ref = b.float().abs().max().clamp(min=1e-30)
    return float(d.max() / ref), float(d.mean() / ref)


def _print_top_kernels(
    name: str, fn: Callable[[], object], rows: dict, calls: int = 10, top: int = 14
) -> None:
    """GPU time per kernel name over ``calls`` calls of fn (torch.profiler), per call, largest first."""
    per = kernel_ms_per_call(fn, calls)
    total = sum(per.values())
    print(f"  {name}: kernel time per call {total:.3f} ms; top kernels (ms per call):")
    for k, v in list(per.items())[:top]:
        print(f"    {v:8.4f}  {k[:100]}")
    rows.setdefault(name, {})["kernels_ms_per_call"] = dict(list(per.items())[:40])


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (tests parse documented commands with it)."""
    ap = argparse.ArgumentParser(
        prog="maskar bench casmar_parts", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    ap.add_argument("--preset", default="casmar-b")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--batch", type=int, default=64, help="images (CFG doubles the rows)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per piece")
    ap.add_argument("--cfg", type=float, default=2.5)
    ap.add_argument("--re-cfg", type=float, default=2.7)
    ap.add_argument("--compile", default="on", choices=("on", "off"), help="also time the compiled DiT step")
    ap.add_argument("--modes", default="", help="comma-separated torch.compile modes to time too")
    ap.add_argument("--compare-steps", default="50", help="DiT steps of the stage-2 token comparisons")
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--json", default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.batch < 1 or args.reps < 1:
        ap.error(f"--batch / --reps: expected >= 1, got {args.batch} / {args.reps}")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in COMPILE_MODES]
    if bad:
        ap.error(f"--modes: expected names from {COMPILE_MODES}, got {bad[0]!r}")
    try:
        space_timesteps(1000, str(args.compare_steps))
    except ValueError as e:
        ap.error(f"--compare-steps: {e}")
    device = ms.pick_device(args.device)
    ns = argparse.Namespace(preset=args.preset, precision="bf16", attention_backend="auto")
    cfg, model, precision = ms.build(ns, device)
    if cfg.model.arch != "casmar":
        ap.error(f"--preset {args.preset}: a {cfg.model.arch} model, expected casmar")
    head = model.cond_diffloss
    net = head.net
    b2 = 2 * args.batch
    h, w = net.grid
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b2, net.in_channels, h, w, device=device, generator=gen)
    z = torch.randn(b2, net.c_embedder.proj.in_channels, h, w, device=device, generator=gen)
    t = torch.full((b2,), 500, device=device, dtype=torch.long)
    rows: dict[str, dict] = {}
    print(
        f"casmar_parts: {args.preset}, B {args.batch} ({b2} rows with CFG), {precision}, "
        f"{ms.device_name(device)}, torch {torch.__version__}"
    )

    def report(name: str, ms_: float, flops: int | None = None, note: str = "") -> None:
        row = {"ms": ms_, "flops": flops}
        line = f"{name:28s} {ms_:10.3f} ms"
        if flops:
            tfs = flops / ms_ / 1e9
            row["tflops_per_s"] = tfs
            line += f"  {flops / 1e12:8.3f} TFLOP  {tfs:7.1f} TFLOP/s"
            if args.peak_tflops:
                line += (
                    f" ({tfs / args.peak_tflops:.1%} of peak, floor {flops / args.peak_tflops / 1e9:.3f} ms)"
                )
        rows[name] = row
        print(line + (f"  {note}" if note else ""), flush=True)
        save()

    def save() -> None:  # after every piece: a time limit keeps what was measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"preset": args.preset, "batch": args.batch, "rows": rows}, f, indent=1)

    with torch.no_grad(), ms.autocast(device, precision):
        cond = head.embed(z)
        scale = args.cfg

        def dit_step() -> object:
            return head.step_cfg(x, t, cond, None, scale)

        f_dit = _flops(dit_step)
        report("dit_step eager", _median_ms(dit_step, device, 2, args.reps), f_dit)
        set_backend(model, "sdpa")
        report("dit_step eager, PSA sdpa", _median_ms(dit_step, device, 2, args.reps), f_dit)
        set_backend(model, "auto")
        if args.compile == "on":
            step_c = torch.compile(head.step_cfg)
            scale_t = torch.tensor(scale, device=device)

            def dit_step_c() -> object:
                return step_c(x, t, cond, None, scale_t)

            report("dit_step compiled", _median_ms(dit_step_c, device, 3, args.reps), f_dit)
            rel = _rel(dit_step_c(), dit_step())
            print(f"  compiled vs eager output ({precision}): rel max {rel[0]:.2e}, rel mean {rel[1]:.2e}")
            rows["dit_step compiled"]["vs_eager"] = rel
            with torch.autocast(device.type, enabled=False):  # the same comparison in float32
                rel32 = _rel(dit_step_c(), dit_step())
            print(f"  compiled vs eager output (fp32): rel max {rel32[0]:.2e}, rel mean {rel32[1]:.2e}")
            rows["dit_step compiled"]["vs_eager_fp32"] = rel32
            if device.type == "cuda":
                _print_top_kernels("dit_step compiled", dit_step_c, rows)

        # the pieces of one DiT step, eager
        blk = net.blocks[0]
        tokens = net.x_embedder(x) + net.pos_embed.to(x.dtype)
        c = cond + net.t_embedder(t)[:, None, :]
        report(
            "  block 0",
            _median_ms(lambda: blk(tokens, c, (h, w), cond), device, 2, args.reps),
            _flops(lambda: blk(tokens, c, (h, w), cond)),
        )
        report(
            "  block 0 adaLN linear",
            _median_ms(lambda: blk.adaLN_modulation(c), device, 2, args.reps),
            _flops(lambda: blk.adaLN_modulation(c)),
        )
        hn = blk.norm1(tokens).to(torch.bfloat16) if device.type == "cuda" else blk.norm1(tokens)
        report(
            "  block 0 attention",
            _median_ms(lambda: blk.attn(hn, (h, w), cond), device, 2, args.reps),
            _flops(lambda: blk.attn(hn, (h, w), cond)),
        )
        report(
            "  block 0 mlp",
            _median_ms(lambda: blk.mlp(hn), device, 2, args.reps),
            _flops(lambda: blk.mlp(hn)),
        )
        report("  block 0 norm1", _median_ms(lambda: blk.norm1(tokens), device, 2, args.reps))

        # one whole chain, as one refinement step runs it
        known = torch.zeros(b2, net.in_channels, h, w, device=device)
        known_mask = torch.zeros(b2, 1, h, w, dtype=torch.bool, device=device)
        known_mask[:, :, ::2] = True
        steps = str(cfg.sample.refine_num_sampling_steps)
        for graph in (True, False) if device.type == "cuda" else (False,):

            def chain(graph: bool = graph) -> object:
                return head.sample(
                    z,
                    1.0,
                    args.cfg,
                    num_sampling_steps=steps,
                    generator=gen,
                    known=known,
                    known_mask=known_mask,
                    cuda_graph=graph,
                )

            n_steps = head.gen_diffusion(steps).num_timesteps
            report(
                f"dit_chain {n_steps} steps, graph {'on' if graph else 'off'}",
                _median_ms(chain, device, 1, max(1, min(args.reps, 2))),
                f_dit * n_steps,
            )

        # stage 1 MLP head, one guided step at the scaffold's rows (B x S)
        mlp = model.diffloss
        s = model.scaffold_len
        zr = torch.randn(b2 * s, mlp.net.cond_embed.in_features, device=device, generator=gen)
        xr = torch.randn(b2 * s, mlp.net.in_channels, device=device, generator=gen)
        tr = torch.full((b2 * s,), 50, device=device, dtype=torch.long)
        cr = mlp.embed(zr)
        report(
            f"mlp_step ({b2 * s} rows)",
            _median_ms(lambda: mlp.step_cfg(xr, tr, cr, None, args.re_cfg), device, 2, args.reps),
            _flops(lambda: mlp.step_cfg(xr, tr, cr, None, args.re_cfg)),
        )

        labels = torch.arange(args.batch, device=device) % model.num_classes
        kw1 = dict(
            num_iter=4 * model.cfg.cond_scale,
            cfg=args.re_cfg,
            num_sampling_steps=str(cfg.sample.num_sampling_steps),
        )
        out: dict = {}

        def stage1() -> object:
            g = torch.Generator(device=device).manual_seed(1)
            out["s1"] = model.sample_scaffold(labels, generator=g, **kw1)
            return out["s1"]

        report("stage1 (sample_scaffold)", _median_ms(stage1, device, 1, 1))
        _, small_z, predicted = out["s1"]

        def stage2() -> object:
            g = torch.Generator(device=device).manual_seed(2)
            return model.sample_refine(
                labels, small_z, predicted, num_iter=4, cfg=args.cfg, num_sampling_steps=steps, generator=g
            )

        report("stage2 (sample_refine)", _median_ms(stage2, device, 1, 1))

        # How far a rounding-level change moves stage 2's tokens (same scaffold, same seed,
        # --compare-steps DiT steps): PSA through SDPA instead of the kernel, and the compiled
        # DiT step; the sampler is chaotic (SAMS picks masks from the drawn tokens), so both
        # are the scale against which "compiled equals eager to rounding" is read.
        def refine(cmp_steps: str = args.compare_steps) -> torch.Tensor:
            g = torch.Generator(device=device).manual_seed(3)
            return model.sample_refine(
                labels,
                small_z,
                predicted,
                num_iter=4,
                cfg=args.cfg,
                num_sampling_steps=cmp_steps,
                generator=g,
            ).float()

        base = refine()
        again = refine()
        set_backend(model, "sdpa")
        via_sdpa = refine()
        set_backend(model, "auto")
        cmp = {"repeat": _rel(again, base), "psa_sdpa": _rel(via_sdpa, base)}
        if args.compile == "on":
            head.compile_sampler()
            cmp["compiled_head"] = _rel(refine(), base)
            head._compiled = None
        for name, (mx, mean) in cmp.items():
            print(
                f"stage2 tokens, {name} vs eager ({args.compare_steps} DiT steps): "
                f"rel max {mx:.3g}, mean {mean:.3g}"
            )
        rows["stage2_token_changes"] = {k: list(v) for k, v in cmp.items()}
        # other compile modes last: max-autotune may take minutes
        for mode in modes if args.compile == "on" else []:
            step_m = torch.compile(head.step_cfg, mode=mode)

            def dit_step_m(step_m=step_m) -> object:
                return step_m(x, t, cond, None, scale_t)

            report(f"dit_step compiled {mode}", _median_ms(dit_step_m, device, 3, args.reps), f_dit)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
