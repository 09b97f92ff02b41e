"""Training-step benchmark of VAR-d16 and HMAR-d16 at 256 px on random tokens.

    maskar bench train_step [batch=32] [depth=16] [backend=auto] [precision=bf16] [steps=50] [warmup=10]
                            [models=var,hmar] [compile=false] [res=256] [tiny=false] [device=auto]

One step = forward (teacher forcing) + weighted cross-entropy + backward + grad clipping
(2.0) + AdamW step (fused on CUDA), under autocast. Inputs are random: token ids for the
targets and random VAE-space features for the teacher-forcing inputs (same shapes as the
tokenizer's output, so the transformer does exactly the work of a real step; the frozen
tokenizer is not timed). ``backend`` may list several (``backend=sdpa,flex,auto``); each
model x backend is checked against the fp32 SDPA forward before it is timed.

Reports the median step time over ``steps`` (CUDA events after ``warmup`` steps) and the peak
allocated memory. ``tiny=true`` shrinks everything for a CPU smoke run.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch
import torch.nn.functional as F

from maskar.config import build
from maskar.nn.attention import available_backends, set_backend

DEFAULTS = {
    "batch": 32, "depth": 16, "backend": "auto", "precision": "bf16", "steps": 50, "warmup": 10,
    "models": "var,hmar", "compile": False, "res": 256, "tiny": False, "device": "auto",
}  # fmt: skip


def _parse(argv: list[str]) -> dict:
    import yaml

    opts = dict(DEFAULTS)
    for item in argv:
        if "=" not in item:
            raise SystemExit(f"bench train_step: expected key=value, got {item!r}; keys: {sorted(DEFAULTS)}")
        k, v = item.split("=", 1)
        if k not in DEFAULTS:
            raise SystemExit(f"bench train_step: unknown key {k!r}; keys: {sorted(DEFAULTS)}")
        opts[k] = yaml.safe_load(v) if not isinstance(DEFAULTS[k], str) else v
    return opts


def build_model(arch: str, opts: dict, device: torch.device):
    """Generator with the official transformer shapes and a small stand-in tokenizer (not timed)."""
    from maskar.registry import get_model_spec
    from maskar.tokenizers.vqvae import PATCH_NUMS

    if opts["tiny"]:
        tok = dict(arch="vqvae", resolution=16, ch=16, ch_mult=[1, 2, 2], norm_groups=8, z_channels=8,
                   vocab_size=64, patch_nums=[1, 2, 3, 4], enc_res_blocks=1, dec_res_blocks=1)
        model = dict(depth=2, width=64, heads=2)
    else:
        res = int(opts["res"])
        # Generator-facing shapes of vae_ch160v4096z32 (vocab 4096, Cz 32, x16) with a narrow conv stack.
        tok = dict(arch="vqvae", resolution=res, ch=32, patch_nums=list(PATCH_NUMS[res]), enc_res_blocks=1,
                   dec_res_blocks=1)
        model = dict(depth=int(opts["depth"]))
    spec = get_model_spec(arch)
    cfg = build(spec.config_cls, dict(arch=arch, tokenizer=tok, **model))
    with torch.device(device):  # initialise on the GPU directly (d16: 310M parameters)
        model = spec.build(cfg)
    return model.to(device).train()


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def check_backend(model, backend: str, device: torch.device, precision: str) -> float:
    """Max |logit difference| of ``backend`` (benchmark precision) vs fp32 SDPA on a fresh random input."""
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(1)
    labels = torch.randint(0, model.num_classes, (2,), generator=g).to(device)
    x = torch.randn(2, model.L - 1, model.z_channels, generator=g).to(device)
    with torch.no_grad():
        set_backend(model, "sdpa")
        ref = model(labels, x)
        set_backend(model, backend)
        with _autocast(device, precision):
            got = model(labels, x)
    model.train()
    return (got - ref).abs().max().item()


def time_steps(model, opts: dict, device: torch.device) -> tuple[float, float, float]:
    """(median step ms, peak memory GB, first-step s incl. compile/autotune)."""
    B = int(opts["batch"])
    params = [p for _, p in model.named_trainable_parameters()]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)
    fwd = torch.compile(model) if opts["compile"] else model
    g = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(0, model.num_classes, (B,), generator=g).to(device)
    x_in = torch.randn(B, model.L - 1, model.z_channels, generator=g).to(device)  # teacher-forcing input
    target = torch.randint(0, model.vocab_size, (B, model.L), generator=g).to(device)
    weight = model.loss_weight

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, opts["precision"]):
            logits = fwd(labels, x_in)  # (B, L, V) float32
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        loss = (ce * weight).sum(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(int(opts["warmup"])):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(int(opts["steps"])):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    return statistics.median(times), peak, first


def main(argv: list[str] | None = None) -> int:
    opts = _parse(list(argv or []))
    dev_name = opts["device"]
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_name)
    if device.type == "cpu" and opts["precision"] == "fp16":
        opts["precision"] = "bf16"
    print(f"command: maskar bench train_step {' '.join(argv or [])}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "-"
    print(f"device {gpu} | torch {torch.__version__} | triton {tv} | cuda {torch.version.cuda or '-'}")
    print(f"attention backends available: {available_backends()}")
    header = f"{'model':<10} {'backend':<8} {'batch':>5} {'L':>5} {'params':>9} {'step ms':>9} " \
             f"{'peak GB':>8} {'first s':>8} {'max|dlogit|':>11}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for arch in [a.strip() for a in str(opts["models"]).split(",") if a.strip()]:
        torch.manual_seed(0)
        model = build_model(arch, opts, device)
        name = f"{arch}-d{model.depth}" if not opts["tiny"] else f"{arch}-tiny"
        n = sum(p.numel() for _, p in model.named_trainable_parameters()) / 1e6
        for backend in [b.strip() for b in str(opts["backend"]).split(",") if b.strip()]:
            try:
                err = check_backend(model, backend, device, opts["precision"])
                ms, peak, first = time_steps(model, opts, device)
            except Exception as e:  # noqa: BLE001 - report and continue with the next variant
                print(f"{name:<10} {backend:<8} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"{name:<10} {backend:<8} {opts['batch']:>5} {model.L:>5} {n:>8.1f}M {ms:>9.1f} "
                  f"{peak:>8.2f} {first:>8.1f} {err:>11.2e}")  # fmt: skip
        del model
    print(f"precision {opts['precision']}, median of {opts['steps']} steps after {opts['warmup']} warm-up; "
          "step = fwd + weighted CE + bwd + clip + AdamW")  # fmt: skip
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
