"""MAR end-to-end benchmark: sampling throughput and training step time (random weights).

Sampling = ``MAR.generate`` (all AR iterations, the diffusion head's respaced steps, CFG,
then the KL decoder), images/s = batch / median wall time. Training = one optimizer step
(forward + backward + grad clip + AdamW) on cached posterior moments, and on images (the
frozen VAE encoder included). Times are medians of CUDA-event timings after warm-up;
peak memory is reported per case.

    python -m maskar bench mar                              # MAR-B, 256 px, batch 64, bf16
    python -m maskar bench mar --num-iters 64,256 --cfg 2.9 --train-batch 64
    python -m maskar bench mar --preset mar-tiny --device cpu --batch 4 --train-batch 4   # smoke test
    python -m maskar bench mar --num-iters 64,256 --train-batch 0 --cuda-graph both  # graphs on vs off

``--cuda-graph on`` (default) lets the diffusion head replay its sampling chain as CUDA
graphs (GPU only; captured in the warm-up run); ``off`` samples eagerly; ``both`` times both.
``--train-batch 0`` (or ``--skip-train``) skips the training step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable

import torch

from maskar.config import load_config
from maskar.registry import build_model


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Returns a function timing one call in ms (CUDA events on GPU, perf_counter on CPU)."""

    def time_cuda(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def time_cpu(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return time_cuda if device.type == "cuda" else time_cpu


def _measure(fn: Callable[[], object], timer, warmup: int, reps: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = [timer(fn) for _ in range(reps)]
    return statistics.median(times), times


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _peak_gb(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _optimizer(model: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 0.02) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "diffloss" in name else decay).append(p)
    fused = next(model.parameters()).is_cuda
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="maskar bench mar", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mar-b")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--batch", type=int, default=64, help="sampling batch (images; CFG doubles the rows)")
    ap.add_argument("--num-iters", default="64,256", help="comma-separated AR iteration counts")
    ap.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the preset's sample.cfg)")
    ap.add_argument("--num-sampling-steps", default=None, help="diffusion steps (default: the preset's)")
    ap.add_argument("--sample-reps", type=int, default=3)
    ap.add_argument(
        "--train-batch", type=int, default=64, help="per-GPU training batch (official: 64; 0 = no training)"
    )
    ap.add_argument("--train-reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-sample", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument(
        "--compile-head", action="store_true", help="torch.compile the diffusion head for sampling"
    )
    ap.add_argument(
        "--cuda-graph",
        default="on",
        choices=("on", "off", "both"),
        help="CUDA graphs for the diffusion head's sampling chain (GPU only)",
    )
    ap.add_argument("--sample-warmup", type=int, default=1, help="untimed sampling runs per case")
    args = ap.parse_args(argv)
    if args.train_batch < 0:
        ap.error(f"--train-batch: expected >= 0, got {args.train_batch}")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if device.type == "cpu" and args.device == "auto":
        print("maskar bench mar: no CUDA GPU; running on CPU (use a tiny preset)", file=sys.stderr)
    precision = args.precision if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = load_config(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    from maskar.nn.attention import set_backend

    set_backend(model, args.attention_backend)
    if args.compile_head:
        model.diffloss.compile_sampler()
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tokenizer."))
    cfg_scale = cfg.sample.cfg if args.cfg is None else args.cfg
    steps = cfg.sample.num_sampling_steps if args.num_sampling_steps is None else args.num_sampling_steps
    timer = _timer(device)

    print("command: python -m maskar bench mar " + " ".join(sys.argv[1:] if argv is None else argv))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {gpu}  torch {torch.__version__}  CUDA {torch.version.cuda}  precision {precision}")
    print(
        f"model: {args.preset} ({n_params / 1e6:.1f}M params without the tokenizer), {model.image_size} px, "
        f"{model.seq_len} tokens, random weights, attention {args.attention_backend}"
        + (", compiled diffusion head (compile time in the warm-up run)" if args.compile_head else "")
    )
    rows = []
    if not args.skip_sample:
        model.eval()
        labels = torch.arange(args.batch, device=device) % model.num_classes
        graph_modes = {"on": [True], "off": [False], "both": [True, False]}[args.cuda_graph]
        if device.type != "cuda":
            graph_modes = [False]  # the graph path is GPU-only; CPU always samples eagerly
        cases = [(n, g) for n in (int(x) for x in args.num_iters.split(",")) for g in graph_modes]
        for num_iter, graphs in cases:
            _reset_peak(device)

            def run(num_iter: int = num_iter, graphs: bool = graphs) -> None:
                with torch.no_grad(), _autocast(device, precision):
                    model.generate(
                        labels,
                        seed=0,
                        num_iter=num_iter,
                        cfg=cfg_scale,
                        num_sampling_steps=steps,
                        cuda_graph=graphs,
                    )

            med, times = _measure(run, timer, warmup=args.sample_warmup, reps=args.sample_reps)
            graph_note = f" graphs={'on' if graphs else 'off'}" if device.type == "cuda" else ""
            rows.append(
                (
                    f"sample num_iter={num_iter} cfg={cfg_scale} steps={steps} B={args.batch}{graph_note}",
                    f"{med:.0f} ms",
                    f"{args.batch / (med / 1e3):.2f} img/s",
                    _peak_gb(device),
                    f"min {min(times):.0f} / max {max(times):.0f} ms, n={len(times)}",
                )
            )
            print(" | ".join(rows[-1]), flush=True)
        if device.type == "cuda":
            print(f"diffusion-head CUDA graphs captured: {model.diffloss._graphs.captures}", flush=True)
    if not args.skip_train and args.train_batch > 0:
        model.train()
        opt = _optimizer(model)
        b = args.train_batch
        c = model.token_channels // cfg.model.patch_size**2
        h = model.seq_h * cfg.model.patch_size
        moments = torch.randn(b, 2 * c, h, h, device=device)
        moments[:, c:] = -4.0  # small posterior std, like real KL-16 moments
        labels = torch.randint(0, model.num_classes, (b,), device=device)
        images = (
            torch.rand(b, model.image_channels, model.image_size, model.image_size, device=device) * 2 - 1
        )
        batches = {
            "cached latents": {"moments": moments, "moments_flip": moments.flip(-1), "label": labels},
            "images (VAE encode)": {"image": images, "label": labels},
        }
        for name, batch in batches.items():
            _reset_peak(device)

            def step(batch: dict = batch) -> None:
                with _autocast(device, precision):
                    loss = model.loss(batch)["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            med, times = _measure(step, timer, warmup=args.warmup, reps=args.train_reps)
            rows.append(
                (
                    f"train step ({name}) B={b}, mul={model.diffusion_batch_mul}",
                    f"{med:.1f} ms",
                    f"{b / (med / 1e3):.0f} img/s",
                    _peak_gb(device),
                    f"min {min(times):.1f} / max {max(times):.1f} ms, n={len(times)}",
                )
            )
            print(" | ".join(rows[-1]), flush=True)

    print()
    print("| case | median | throughput | peak GB | spread |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
