"""Training-step benchmark of VAR and HMAR (stage 1 and 2) on random token pyramids.

    maskar bench train_step [models=hmar,var] [stage=1] [depth=16] [res=256] [batch=auto]
                            [compile=false,blocks] [ac=false] [rows=SPEC,...] [backend=auto]
                            [precision=bf16] [steps=25] [warmup=5] [check=true] [explain=false]
                            [profile=PATH] [json=PATH] [peak_tflops=auto] [tiny=false]
                            [device=auto] [compile_backend=inductor]
                            [parallel=none] [fsdp_param_dtype=auto] [offload=false] [baseline=PATH]

``models``, ``stage``, ``depth``, ``compile`` and ``backend`` (the attention backend) take
comma-separated lists; every combination is one row. ``rows`` lists the rows instead, each
``ARCH[-s2]/dDEPTH/MODE[/ac][/graph[/master]][/bBATCH][/attn-BACKEND]`` (e.g.
``hmar/d16/blocks,hmar-s2/d16/blocks,hmar/d30/blocks/ac,var/d16/false/attn-scales``). ``/graph``
times the whole step as ``train.cuda_graph=true`` runs it, captured once as a CUDA graph
(:func:`make_graph_step`; CUDA, one process, drop path and label dropout off; its check: the
graph's gradients against the same step without it, meaningful where the step draws no random
numbers, i.e. stage 1). ``/master`` with ``/graph``: as ``train.master_weights=true``, the
linears compute with bf16 copies that the AdamW pass writes (:mod:`maskar.train.master_weights`).

One step is what ``maskar train`` does per step: ``model.loss(batch)`` under autocast
(teacher-forcing inputs from the frozen tokenizer, label dropout, the fused head + weighted
cross-entropy), backward, gradient clipping at 2.0, AdamW (fused on CUDA; the trainer's decay /
no-decay groups). The batch is random token ids of the real shapes (the tokenizer's encoder is
not run, as with cached latents); the tokenizer is a narrow stand-in with the generator-facing
shapes of vae_ch160v4096z32 (vocab 4096, 32 channels). ``batch=auto``: 32 / 8 / 2 at 256 / 512
/ 1024 px, half that from depth 24 on.

The model surface is the trainer's: ``compile`` is ``train.compile`` (false | blocks | full) and
``ac`` is ``train.activation_checkpointing``, applied by the same functions
(:mod:`maskar.train.parallelize`). Before timing, a compiled row runs one step's loss and
gradients eagerly and compiled on the same weights and batch (drop path and label dropout off)
and prints their relative difference ('compile s' is that compiled call: Dynamo + Inductor +
autotuning); an eager row checks its attention backend's logits against the fp32 SDPA forward.
Time: CUDA events around each step, median of ``steps`` steps after ``warmup``. MFU = matmul
FLOPs of the step / step time / peak, the FLOPs from the model (``train_flops_per_sample``: 6 x
token-path weights x L for a stage-1 step). ``profile=PATH`` appends, per row, a torch.profiler
table of its step grouped by kernel class; ``explain=true`` prints ``torch._dynamo.explain`` of
the whole differentiable step (once per model and stage). ``tiny=true``: a CPU smoke run.

Several GPUs (``torchrun --nproc_per_node N -m maskar bench train_step parallel=ddp,fsdp2 ...``):
``parallel`` lists ``none`` (the model alone), ``ddp`` and ``fsdp2`` (the trainer's
``train.parallel``, applied by :mod:`maskar.train.parallelize` after checkpointing and compiling,
as the trainer does; ``fsdp_param_dtype`` and ``offload`` are ``train.fsdp_param_dtype`` and
``train.fsdp_cpu_offload``). ``fsdp2`` also runs on one process (a one-rank group: the cost of
the machinery, and of CPU offload). ``batch`` is per GPU (weak scaling: the global batch is N x
batch) and each rank draws its own batch. Before timing, a parallel row checks its first step's
gradients against one unsharded process on the whole global batch (eager, activation
checkpointing on to bound the memory; drop path and label dropout off): relative difference
printed. Each rank times its steps with CUDA events; a step's time is the slowest rank's, the
median over steps is reported; images/s = N x batch / step time; peak memory is the largest
rank's. ``baseline=PATH`` (the ``json=`` of a one-GPU run of the same rows) adds the scaling
efficiency: images/s on N GPUs / (N x images/s on one). Rank 0 prints and writes the JSON.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch._dynamo

from maskar.config import build
from maskar.nn import ffn_epilogue
from maskar.nn.attention import available_backends, set_backend
from maskar.train import distributed as D
from maskar.train import parallelize as P
from maskar.train.clipping import clip_and_step
from maskar.train.graph_step import GraphedStep, as_capturable, prepare_for_graph, set_lr
from maskar.train.master_weights import MasterWeights
from maskar.train.trainer import _LossCall, param_groups

DEFAULTS = {
    "models": "hmar,var", "stage": "1", "depth": "16", "res": 256, "batch": "auto", "compile": "false",
    "ac": False, "rows": "", "backend": "auto", "precision": "bf16", "steps": 25, "warmup": 5, "check": True,
    "explain": False, "profile": "", "json": "", "peak_tflops": "auto", "tiny": False, "device": "auto",
    "compile_backend": "inductor", "parallel": "none", "fsdp_param_dtype": "auto", "offload": False,
    "baseline": "",
}  # fmt: skip
LIST_KEYS = ("models", "stage", "depth", "compile", "backend", "parallel")
PARALLEL = ("none", "ddp", "fsdp2")
MFU_FORMULA = (
    "MFU = train_flops_per_sample * B / step time / peak; train_flops_per_sample = 6 * N_tok * L "
    "(N_tok = token-path weights: word_embed, per block qkv + proj + fc1 + fc2, head; the AdaLN "
    "projections act on one row per sample; attention not counted); stage 2: 4x the frozen base "
    "blocks (input gradients only) + 6x the mask blocks and mask head"
)


def _parse(argv: list[str]) -> dict:
    import yaml

    opts = dict(DEFAULTS)
    for item in argv:
        if "=" not in item:
            raise SystemExit(f"bench train_step: expected key=value, got {item!r}; keys: {sorted(DEFAULTS)}")
        k, v = item.split("=", 1)
        if k not in DEFAULTS:
            raise SystemExit(f"bench train_step: unknown key {k!r}; keys: {sorted(DEFAULTS)}")
        opts[k] = v if isinstance(DEFAULTS[k], str) else yaml.safe_load(v)
    for k in LIST_KEYS:
        opts[k] = [x.strip() for x in str(opts[k]).split(",") if x.strip()]
    for k in ("stage", "depth"):
        opts[k] = [str(_positive(k, v)) for v in opts[k]]
    _positive("steps", opts["steps"])
    _positive("warmup", opts["warmup"], minimum=0)
    if str(opts["batch"]) != "auto":
        _positive("batch", opts["batch"])
    opts["row_specs"] = [parse_row(r) for r in opts["rows"].split(",") if r.strip()] or [
        dict(arch=a, stage=int(s), depth=int(d), mode=c, ac=bool(opts["ac"]), batch=None, attn=b)
        for a in opts["models"] for s in opts["stage"] for d in opts["depth"] for c in opts["compile"]
        for b in opts["backend"] if a == "hmar" or int(s) == 1
    ]  # fmt: skip
    from maskar.nn.attention import BACKENDS

    if not opts["row_specs"]:
        raise SystemExit("bench train_step: no rows to run (stage 2 exists only for hmar)")
    from maskar.tokenizers.vqvae import PATCH_NUMS

    if not opts["tiny"] and _positive("res", opts["res"]) not in PATCH_NUMS:
        raise SystemExit(f"bench train_step: res: expected one of {sorted(PATCH_NUMS)}, got {opts['res']!r}")
    for r in opts["row_specs"]:
        if r["arch"] not in ("hmar", "var"):
            raise SystemExit(f"bench train_step: models: expected hmar or var, got {r['arch']!r}")
        if r["stage"] not in (1, 2) or (r["stage"] == 2 and r["arch"] != "hmar"):
            raise SystemExit(
                f"bench train_step: stage: expected 1 (or 2 for hmar), got {r['stage']} for {r['arch']}"
            )
        if r["mode"] not in ("false", "blocks", "full"):
            raise SystemExit(f"bench train_step: compile: expected false, blocks or full, got {r['mode']!r}")
        if r["attn"] is not None and r["attn"] not in BACKENDS:
            raise SystemExit(
                f"bench train_step: attention backend: expected one of {BACKENDS}, got {r['attn']!r}"
            )
    for par in opts["parallel"]:
        if par not in PARALLEL:
            raise SystemExit(f"bench train_step: parallel: expected a list of {PARALLEL}, got {par!r}")
    if opts["parallel"] != ["none"]:
        if opts["profile"]:
            raise SystemExit("bench train_step: profile= times one process; use it with parallel=none")
        if "fsdp2" in opts["parallel"] and any(r["mode"] == "full" for r in opts["row_specs"]):
            raise SystemExit(
                "bench train_step: compile=full is not supported with parallel=fsdp2; use blocks"
            )
    if opts["fsdp_param_dtype"] not in ("auto", "bf16", "fp32"):
        raise SystemExit(
            "bench train_step: fsdp_param_dtype: expected auto, bf16 or fp32, "
            f"got {opts['fsdp_param_dtype']!r}"
        )
    return opts


def parse_row(spec: str) -> dict:
    """``ARCH[-s2]/dDEPTH/MODE[/ac][/graph[/master]][/bBATCH][/attn-BACKEND]`` -> row settings."""
    parts = spec.strip().split("/")
    if len(parts) < 3 or not parts[1].startswith("d"):
        raise SystemExit(f"bench train_step: rows: expected ARCH[-s2]/dDEPTH/MODE[/...], got {spec!r}")
    arch, _, st = parts[0].partition("-s")
    stage, depth = _positive("rows: stage", st or 1), _positive("rows: depth", parts[1][1:])
    row = dict(arch=arch, stage=stage, depth=depth, mode=parts[2], ac=False, batch=None, attn=None,
               graph=False, master=False)  # fmt: skip
    for extra in parts[3:]:
        if extra == "ac":
            row["ac"] = True
        elif extra == "graph":
            row["graph"] = True
        elif extra == "master":
            row["master"] = True
        elif extra.startswith("attn-"):
            row["attn"] = extra[5:]
        elif extra.startswith("b"):
            row["batch"] = _positive("rows: batch", extra[1:])
        else:
            raise SystemExit(f"bench train_step: rows: unknown suffix {extra!r} in {spec!r}")
    if row["master"] and not row["graph"]:
        raise SystemExit(
            f"bench train_step: rows: /master needs /graph (train.master_weights lives in it): {spec!r}"
        )
    return row


def _positive(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or exit 2 naming it."""
    try:
        n = int(str(value))
    except ValueError:
        raise SystemExit(f"bench train_step: {name}: expected an integer, got {value!r}") from None
    if n < minimum:
        raise SystemExit(f"bench train_step: {name}: expected >= {minimum}, got {n}")
    return n


def default_batch(res: int, depth: int) -> int:
    b = {256: 32, 512: 8, 1024: 2}.get(res, 8)
    return max(1, b // 2) if depth >= 24 else b


def build_model(arch: str, stage: int, depth: int, opts: dict, device: torch.device):
    """Generator with the official transformer shapes and a small stand-in tokenizer."""
    from maskar.registry import get_model_spec
    from maskar.tokenizers.vqvae import PATCH_NUMS

    if opts["tiny"]:
        tok = dict(
            arch="vqvae",
            resolution=16,
            ch=16,
            ch_mult=[1, 2, 2],
            norm_groups=8,
            z_channels=8,
            vocab_size=64,
            patch_nums=[1, 2, 3, 4],
            enc_res_blocks=1,
            dec_res_blocks=1,
        )
        model = dict(depth=2, width=64, heads=2, drop_path_rate=0.1)
    else:
        res = int(opts["res"])
        # Generator-facing shapes of vae_ch160v4096z32 (vocab 4096, Cz 32, x16) with a narrow conv stack.
        tok = dict(
            arch="vqvae",
            resolution=res,
            ch=32,
            patch_nums=list(PATCH_NUMS[res]),
            enc_res_blocks=1,
            dec_res_blocks=1,
        )
        model = dict(depth=depth)
    if arch == "hmar":
        model.update(stage=stage, n_layers_train=1 if opts["tiny"] else max(1, depth // 2))
    elif stage != 1:
        raise SystemExit(f"bench train_step: stage {stage} exists only for hmar")
    spec = get_model_spec(arch)
    cfg = build(spec.config_cls, dict(arch=arch, tokenizer=tok, **model))
    with torch.device(device):  # initialise on the GPU directly (d30: 2B parameters)
        m = spec.build(cfg)
    m = m.to(device).train()
    # trainer: parameters no optimizer updates get no gradients
    trained = {id(p) for _, p in m.named_trainable_parameters()}
    for p in m.parameters():
        p.requires_grad_(id(p) in trained)
    return m


def random_batch(model, B: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "indices": torch.randint(0, model.vocab_size, (B, model.L), generator=g).to(device),
        "label": torch.randint(0, model.num_classes, (B,), generator=g).to(device),
    }


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


class _Deterministic:
    """Drop path and label dropout off for the compiled-vs-eager check (rates are buffers: no recompile)."""

    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        self.rates = [(m, m.rate.clone()) for m in self.model.modules() if hasattr(m, "rate")]
        for m, _ in self.rates:
            m.rate.zero_()
        self.cond_drop = self.model.cfg.cond_drop_rate
        self.model.cfg.cond_drop_rate = 0.0
        return self

    def __exit__(self, *exc) -> None:
        for m, r in self.rates:
            m.rate.copy_(r)
        self.model.cfg.cond_drop_rate = self.cond_drop


def loss_and_grads(model, params, batch, opts, device, loss_call=None) -> tuple[float, list[torch.Tensor]]:
    torch.manual_seed(123)  # the same stage-2 mask for both calls
    for p in params:
        p.grad = None
    with _autocast(device, opts["precision"]):
        loss = (loss_call or model.loss)(batch)["loss"]
    loss.backward()
    grads = [p.grad.detach().float().clone() for p in params]
    for p in params:
        p.grad = None
    return float(loss.detach()), grads


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
    den = torch.sqrt(sum((y**2).sum() for y in b))
    return float(num / den.clamp(min=1e-30))


def _adamw(model, lr: float | torch.Tensor, **kw) -> torch.optim.AdamW:
    """AdamW as the trainer builds it (decay / no-decay groups, betas 0.9 / 0.95)."""
    groups = param_groups(list(model.named_trainable_parameters()), 0.05, model.no_weight_decay_keywords())
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **kw)


def _loss_backward(loss_call, batch, opts, device) -> None:
    with _autocast(device, opts["precision"]):
        loss = loss_call(batch)["loss"]
    loss.backward()


def make_step(model, params, batch, opts, device, loss_call=None, info=None):
    """One training step; ``loss_call(batch)`` (default ``model.loss``) is the DDP / FSDP2 root.
    Sharded gradients are clipped as the trainer clips them (``maskar.train.distributed``)."""
    opt = _adamw(model, 1e-4, fused=device.type == "cuda" and not opts["offload"])
    loss_call = loss_call or model.loss

    def step() -> None:
        _loss_backward(loss_call, batch, opts, device)
        if info is not None and D.is_sharded(params[0]):
            D.clip_grad_norm(params, 2.0, info)
            opt.step()
        else:
            clip_and_step(opt, params, 2.0)  # as the trainer clips (maskar.train.clipping)
        opt.zero_grad(set_to_none=True)

    return step


def make_graph_step(model, params, batch, opts, device, check_grads: list[torch.Tensor] | None = None,
                    master: bool = False):
    """The trainer's ``train.cuda_graph`` step (:class:`maskar.train.graph_step.GraphedStep`:
    three eager warm-up steps on a side stream, then one capture and one replay per step, the batch
    copied into the capture's buffers, AdamW ``capturable``) on this row's model and batch; returns
    (step, grad check). Call it, and time it, inside ``_Deterministic``: the check needs a step
    without random draws. ``check_grads`` (the same step's gradients without a graph, on the same
    weights and batch): the warm-up and the first replay run at learning rate 0, so the weights do
    not move, and the graph's own gradient buffers after that replay are compared with them; the
    rate is 1e-4 from then on. ``master``: with bf16 working copies of the linears
    (``train.master_weights``); their gradients are the copies'."""
    if device.type != "cuda":
        raise ValueError("the graph suffix needs a CUDA device")
    problem = prepare_for_graph(model)  # as the trainer does (HMAR stage 2: mask draws on the GPU)
    if problem is not None:
        raise ValueError(f"the graph suffix: {problem}")
    opt = _adamw(model, 0.0 if check_grads is not None else 1e-4, fused=True)
    mw = None
    if master:
        as_capturable(opt, device)
        mw = MasterWeights(model, opt)
    graphed = GraphedStep(model.loss, opt, params, 2.0, lambda: _autocast(device, opts["precision"]), device,
                          master=mw)  # fmt: skip
    rel = None
    if check_grads is not None:
        for _ in range(graphed.warmup + 1):  # the eager warm-up steps, then the capture and its replay
            graphed(batch)
        grads = [mw.grad(p) if mw is not None else p.grad for p in params]
        rel = rel_diff([g.detach().float() for g in grads], check_grads)
        set_lr(opt, 1e-4)
    return lambda: graphed(batch), rel


def time_steps(
    step, opts: dict, device: torch.device, info: D.DistInfo | None = None
) -> tuple[float, float, float, float]:
    """(median step ms, back-to-back ms per step, peak memory GB, first call s incl. compile /
    autotune).

    The median times each step alone: the host waits for it to finish before launching the
    next, so a step also pays the launch latency before its first kernel. Back to back, the
    same number of steps run as a training loop runs them (the host launching ahead, one
    wait at the end); their mean is the steady-state step time `maskar train` logs.
    Several ranks: a step takes as long as its slowest rank; the peak is the largest rank's.
    """
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(int(opts["warmup"])):
        step()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
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
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else float("nan")
    _sync(device)
    t = time.perf_counter()
    for _ in range(int(opts["steps"])):
        step()
    _sync(device)
    b2b = (time.perf_counter() - t) * 1e3 / int(opts["steps"])
    if info is not None and info.distributed:
        every = D.all_gather_objects(info, (times, peak, first, b2b))
        times = [max(per_rank) for per_rank in zip(*(t for t, _, _, _ in every))]
        peak = max(p for _, p, _, _ in every)
        first = max(f for _, _, f, _ in every)
        b2b = max(b for _, _, _, b in every)
    return statistics.median(times), b2b, peak, first


# ----------------------------------------------------------------------------- profile

# Kernel name -> class, first match wins (cuBLAS / CUTLASS GEMMs, the block-sparse kernels,
# Inductor's fused kernels named after the ops they fuse, the fused AdamW and clipping).
CATEGORIES = (
    ("attention", ("_attn_fwd", "_attn_bwd", "flash", "fmha", "attention")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "sm80_", "cublas", "_mm_", "matmul")),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach", "norm_kernel", "lpnorm", "clip")),
    ("cross-entropy", ("logsumexp", "softmax", "log_softmax", "nll", "argmax", "scatter", "gather")),
    ("norms", ("layer_norm", "native_layer_norm", "var_mean", "rsqrt", "normalize", "linalg_vector_norm",
               "_qk_norm")),
)


def categorize(name: str) -> str:
    """The class of a kernel. Inductor names a fused kernel after its ops joined by ``_``
    (``triton_poi_fused_clamp_min_div_exp_...``), so its keys are matched as whole tokens: a
    substring test filed the q/k-norm backward (``..._exp_expand_...``) under cross-entropy."""
    low = name.lower()
    inductor = low.startswith(("triton_", "cpp_fused"))
    padded = f"_{low}_"
    for cat, keys in CATEGORIES:
        if any((f"_{k.strip('_')}_" in padded) if inductor else (k in low) for k in keys):
            return cat
    return "other elementwise"


def profile_step(step, device: torch.device, path: str, title: str, n: int = 3) -> str:
    """Profile ``n`` steps; append kernel time per class, per step, and the top kernels to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    cuda = device.type == "cuda"
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2)) if cuda else (None, None)
    with profile(activities=acts) as prof:
        if start is not None:
            start.record()
        for _ in range(n):
            step()
        if end is not None:
            end.record()
        _sync(device)
    wall_ms = start.elapsed_time(end) / n if start is not None else float("nan")
    kernels = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if cuda and "CUDA" not in str(getattr(e, "device_type", "CUDA")):
            continue  # the CPU-side op events: their device time is their kernels' (counted once, below)
        if "#" in e.key:  # a record_function range (``Optimizer.step#AdamW.step``), not a kernel
            continue
        if t and t > 0:
            kernels.append((e.key, t / 1e3 / n, e.count // n))
    kernels.sort(key=lambda k: -k[1])
    by_cat: dict[str, float] = {}
    for name, ms, _ in kernels:
        by_cat[categorize(name)] = by_cat.get(categorize(name), 0.0) + ms
    busy = sum(by_cat.values())
    lines = [f"== {title}", f"{n} steps profiled: step {wall_ms:.2f} ms (CUDA events), kernels {busy:.2f} ms"]
    lines.append(f"{'class':<20} {'ms/step':>9} {'% of step':>9}")
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cat:<20} {ms:>9.2f} {100 * ms / wall_ms:>8.1f}%")
    idle = wall_ms - busy
    lines.append(f"{'idle (no kernel)':<20} {idle:>9.2f} {100 * idle / wall_ms:>8.1f}%")
    lines.append("")
    lines.append(f"top kernels: {'ms/step':>9} {'calls':>6} class / name")
    for name, ms, calls in kernels[:40]:
        lines.append(f"  {ms:>9.3f} {calls:>6}  {categorize(name)} / {name[:150]}")
    text = "\n".join(lines)
    with open(path, "a") as f:
        f.write(text + "\n\n")
    return text


# ----------------------------------------------------------------------------- explain


def explain_step(model, batch, opts, device) -> str:
    """``torch._dynamo.explain`` of the whole differentiable step (what compile=full compiles)."""
    import torch._dynamo

    torch.manual_seed(0)
    with torch.no_grad():
        indices = model.batch_indices(batch)
        x_in = model.tokenizer.teacher_forcing_input(indices).float()
        target = torch.cat(indices, dim=1)
    labels = batch["label"]
    with _autocast(device, opts["precision"]):
        if getattr(model, "stage", 1) == 2:
            x_own = model.tokenizer.own_residual_input(indices).float()
            masked = model.sample_train_mask(labels.shape[0], device).expand(labels.shape[0], -1)
            ex = torch._dynamo.explain(model.masked_loss)(labels, x_in, x_own, masked, target)
        else:
            ex = torch._dynamo.explain(model.next_scale_loss)(labels, x_in, target)
    torch._dynamo.reset()
    reasons = [str(getattr(r, "reason", r)).splitlines()[0] for r in ex.break_reasons]
    return f"graphs {ex.graph_count}, graph breaks {ex.graph_break_count}, ops {ex.op_count}" + (
        f", break reasons: {reasons}" if reasons else ""
    )


# ----------------------------------------------------------------------------- main


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def parallel_reference(
    model, params, B: int, world: int, opts: dict, device: torch.device
) -> list[torch.Tensor]:
    """Gradients (on the CPU) of the unsharded model on the global batch (every rank's batch), eager,
    with activation checkpointing to bound the memory (it does not change the gradients)."""
    parts = [random_batch(model, B, device, seed=r) for r in range(world)]
    whole = {k: torch.cat([b[k] for b in parts]) for k in parts[0]}
    blocks = P.repeated_blocks(model)
    before = [getattr(b, "checkpoint", None) for b in blocks]
    if blocks and all(c is not None for c in before):
        P.apply_activation_checkpointing(model)
    with _Deterministic(model):
        _, grads = loss_and_grads(model, params, whole, opts, device)
    for b, c in zip(blocks, before):
        if c is not None:
            b.checkpoint = c
    return [g.cpu() for g in grads]


def wrap_parallel(model, parallel: str, info: D.DistInfo, opts: dict):
    """The trainer's root (``model.loss`` behind a ``forward``) under DDP or FSDP2."""
    root = _LossCall(model)
    if parallel == "ddp":
        return P.apply_ddp(root, info, find_unused_parameters=False)
    amp = (
        None
        if opts["precision"] == "fp32"
        else torch.float16
        if opts["precision"] == "fp16"
        else torch.bfloat16
    )
    dtype = P.fsdp_param_dtype(opts["fsdp_param_dtype"], amp)
    return P.apply_fsdp(root, model, info, dtype, cpu_offload=bool(opts["offload"]))


def run_row(
    spec: dict,
    opts: dict,
    device: torch.device,
    peak: float | None,
    explain: bool,
    info: D.DistInfo | None = None,
    parallel: str = "none",
) -> dict:
    arch, stage, depth, mode = spec["arch"], spec["stage"], spec["depth"], spec["mode"]
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    # Every row compiles the same code objects (a block's forward, head_loss) under new guards:
    # start from empty caches so earlier rows never count towards Dynamo's recompile limit.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(arch, stage, depth, opts, device)
    res = 16 if opts["tiny"] else int(opts["res"])
    B = spec["batch"] or (default_batch(res, depth) if opts["batch"] == "auto" else int(opts["batch"]))
    backend = spec.get("attn") or opts["backend"][0]
    set_backend(model, backend)
    params = [p for _, p in model.named_trainable_parameters()]
    batch = random_batch(model, B, device, seed=rank)  # each rank its own data
    row = {"model": f"{arch}-d{model.depth}" if not opts["tiny"] else f"{arch}-tiny", "stage": stage,
           "res": res, "batch": B, "L": model.L, "compile": mode, "ac": spec["ac"], "attn": backend,
           "params_M": sum(p.numel() for p in params) / 1e6, "parallel": parallel, "world": world,
           "global_batch": world * B}  # fmt: skip
    if explain:
        row["explain"] = explain_step(model, batch, opts, device)
        print(f"  explain {row['model']} stage {stage}: {row['explain']}")
    check = bool(opts["check"])
    fallbacks = ffn_epilogue.FALLBACKS
    if parallel != "none" and check:
        grads_ref = parallel_reference(model, params, B, world, opts, device)
    if spec["ac"]:
        P.apply_activation_checkpointing(model)
    if mode == "false" and parallel == "none":
        row["check"] = f"max|dlogit| {check_backend(model, backend, device, opts['precision']):.2e}"
    elif check and parallel == "none":
        with _Deterministic(model):
            loss_e, grads_e = loss_and_grads(model, params, batch, opts, device)
    graphs_before = _dynamo_graphs()
    if mode != "false":
        P.apply_compile(model, mode, opts["compile_backend"])
        if check and parallel == "none":
            t0 = time.perf_counter()
            with _Deterministic(model):
                loss_c, grads_c = loss_and_grads(model, params, batch, opts, device)
            _sync(device)
            row["compile_s"] = time.perf_counter() - t0
            row["loss_rel"] = abs(loss_c - loss_e) / max(abs(loss_e), 1e-30)
            row["grad_rel"] = rel_diff(grads_c, grads_e)
            row["check"] = f"loss rel {row['loss_rel']:.1e}, grad rel {row['grad_rel']:.1e}"
            del grads_e, grads_c
    loss_call = None
    if parallel != "none":
        root = wrap_parallel(model, parallel, info, opts)
        params = [p for _, p in model.named_trainable_parameters()]  # sharded (DTensors) under FSDP2
        loss_call = functools.partial(root, fn="loss")
        if check:
            t0 = time.perf_counter()
            with _Deterministic(model):
                _, grads_p = loss_and_grads(model, params, batch, opts, device, loss_call)
            _sync(device)
            row["compile_s"] = time.perf_counter() - t0
            row["grad_rel"] = rel_diff([D.full_tensor(g).cpu() for g in grads_p], grads_ref)
            row["check"] = f"grad rel {row['grad_rel']:.1e} vs 1 process on the global batch"
            del grads_p, grads_ref
    if spec.get("graph"):
        if parallel != "none":
            raise ValueError("the graph suffix runs on one process (parallel=none)")
        with _Deterministic(model):  # drop path and label dropout off while capturing and timing
            grads_ref = None
            if check:  # the same step without the graph: the reference of the graph's gradients
                _, grads_ref = loss_and_grads(model, params, batch, opts, device)
            if device.type == "cuda":  # (make_graph_step refuses other devices)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            master = spec.get("master", False)
            step, rel = make_graph_step(model, params, batch, opts, device, grads_ref, master)
            row["capture_s"] = time.perf_counter() - t0
            # replays allocate nothing: the graph's pool (activations, gradients) is allocated
            # while capturing, so the step's peak is the capture's
            capture_peak = torch.cuda.max_memory_allocated(device) / 1e9
            del grads_ref
            ms, b2b_ms, peak_gb, first = time_steps(step, opts, device, info)
            peak_gb = max(peak_gb, capture_peak)
        if rel is not None:
            row["graph_grad_rel"] = rel
            row["check"] = f"{row.get('check', '')}; graph grads rel {rel:.1e}".lstrip("; ")
        row["compile"] = f"{mode}+g" + ("m" if spec.get("master") else "")
    else:
        step = make_step(model, params, batch, opts, device, loss_call, info)
        ms, b2b_ms, peak_gb, first = time_steps(step, opts, device, info)
    graphs = _dynamo_graphs() - graphs_before
    row.update(step_ms=ms, b2b_ms=b2b_ms, peak_gb=peak_gb, first_s=first, graphs=graphs)
    if ffn_epilogue.FALLBACKS > fallbacks:  # MASKAR_FFN_EPILOGUE's calls that ran torch's code
        row["ffn_fallbacks"] = ffn_epilogue.FALLBACKS - fallbacks
        row["check"] = f"{row.get('check', '')}; FFN epilogue fell back {row['ffn_fallbacks']}x".lstrip("; ")
    row["images_s"] = world * B / ms * 1e3
    row["tokens_s"] = world * B * model.L / ms * 1e3
    row["tflops"] = model.train_flops_per_sample() * B / ms / 1e9  # per GPU
    row["mfu"] = row["tflops"] / peak if peak else float("nan")
    if opts["profile"]:
        title = f"{row['model']} stage {stage} {res} px B {B} compile={mode} ac={spec['ac']} attn={backend}"
        row["profile"] = profile_step(step, device, opts["profile"], title)
    del step, model, params, batch, loss_call
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


HEADER = (f"{'model':<9} {'st':>2} {'res':>4} {'B':>3} {'L':>5} {'compile':<7} {'ac':<2} {'attn':<6} "
          f"{'par':<5} {'N':>2} {'params':>7} {'step ms':>8} {'b2b ms':>7} {'img/s':>7} {'eff':>6} "
          f"{'tok/s':>8} {'TFLOP/s':>7} {'MFU':>6} {'peak GB':>7} {'compile s':>9} {'first s':>7} "
          f"{'graphs':>6}  check")  # fmt: skip


def format_row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] == r["mfu"] else "-"
    eff = f"{100 * r['scaling_eff']:.1f}%" if "scaling_eff" in r else "-"
    return (f"{r['model']:<9} {r['stage']:>2} {r['res']:>4} {r['batch']:>3} {r['L']:>5} {r['compile']:<7} "
            f"{'y' if r['ac'] else 'n':<2} {r['attn']:<6} {r.get('parallel', 'none'):<5} "
            f"{r.get('world', 1):>2} {r['params_M']:>6.0f}M {r['step_ms']:>8.1f} "
            f"{r.get('b2b_ms', float('nan')):>7.1f} {r['images_s']:>7.1f} "
            f"{eff:>6} {r['tokens_s']:>8.0f} {r['tflops']:>7.1f} {mfu:>6} {r['peak_gb']:>7.2f} "
            f"{r.get('compile_s', float('nan')):>9.1f} {r['first_s']:>7.1f} {r['graphs']:>6}  "
            f"{r.get('check', '')}")  # fmt: skip


def _row_key(r: dict) -> tuple:
    return (r["model"], r["stage"], r["res"], r["batch"], r["compile"], bool(r["ac"]), r["attn"])


def load_baseline(path: str) -> dict[tuple, dict]:
    """The plain one-GPU rows (``parallel=none``) of an earlier ``json=`` file, by model / stage / res /
    batch / compile / ac / attn."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(
            f"bench train_step: baseline={path!r} is not a json= file of this benchmark ({e})"
        ) from None
    return {_row_key(r): r for r in rows if "error" not in r and r.get("parallel", "none") == "none"}


def main(argv: list[str] | None = None) -> int:
    opts = _parse(list(argv or []))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and "none" in opts["parallel"]:
        raise SystemExit(
            f"bench train_step: {world} processes (torchrun) time parallel rows only; give parallel=ddp,fsdp2"
        )
    dev_name = opts["device"]
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    from maskar.config_base import ConfigError
    from maskar.nn.attention import check_backend

    if any(r.get("graph") for r in opts["row_specs"]) and not dev_name.startswith("cuda"):  # before any model
        raise SystemExit(f"bench train_step: rows: /graph needs a CUDA device, got {dev_name}")
    for attn in sorted({r["attn"] or opts["backend"][0] for r in opts["row_specs"]}):
        try:  # a backend not installed here stops before any model is built
            check_backend(attn, torch.device(dev_name))
        except ConfigError as e:
            raise SystemExit(f"bench train_step: {e}") from None
    info = None
    if opts["parallel"] != ["none"]:
        info = D.init_distributed(dev_name, need_group=True)  # one rank still gets a group (FSDP2)
        device = info.device
    else:
        device = torch.device(dev_name)
    try:
        # Rank 0 reports; the other ranks only take part in the steps and collectives.
        quiet = info is not None and not info.is_main
        with contextlib.redirect_stdout(open(os.devnull, "w")) if quiet else contextlib.nullcontext():
            return _run(opts, argv, device, info)
    finally:
        if info is not None:
            D.shutdown_distributed()


def _run(opts: dict, argv: list[str] | None, device: torch.device, info: D.DistInfo | None) -> int:
    if device.type == "cpu" and opts["precision"] == "fp16":
        opts["precision"] = "bf16"
    peak = P.peak_tflops(device, 0.0 if opts["peak_tflops"] == "auto" else float(opts["peak_tflops"]))
    baseline = load_baseline(opts["baseline"]) if opts["baseline"] else {}
    print(f"command: maskar bench train_step {' '.join(argv or [])}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "-"
    world = info.world_size if info is not None else 1
    print(f"device {gpu} | torch {torch.__version__} | triton {tv} | cuda {torch.version.cuda or '-'}")
    print(f"attention backends available: {available_backends()} (using {opts['backend']})")
    print(f"peak for MFU: {peak} TFLOP/s; {MFU_FORMULA}")
    if info is not None:
        print(
            f"{world} process(es), {opts['parallel']}: batch {opts['batch']} per GPU; img/s = {world} x "
            "batch / step time (slowest rank per step, median over steps); TFLOP/s and MFU per GPU; "
            f"eff = img/s / ({world} x the one-GPU img/s of baseline={opts['baseline'] or '-'}); "
            "peak GB: the largest rank's"
        )
    print(HEADER)
    print("-" * len(HEADER))
    meta = {"device": gpu, "torch": torch.__version__, "triton": tv, "peak_tflops": peak,
            "argv": list(argv or []), "mfu_formula": MFU_FORMULA, "world": world}  # fmt: skip
    rows: list[dict] = []
    main_rank = info is None or info.is_main

    def save() -> None:  # after every row, so a run cut short keeps what it measured
        if opts["json"] and main_rank:
            Path(opts["json"]).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))

    explained = set()
    for spec in opts["row_specs"]:
        for parallel in opts["parallel"]:
            attn = spec.get("attn") or opts["backend"][0]
            name = f"{spec['arch']}-s{spec['stage']} d{spec['depth']} {spec['mode']} ac={spec['ac']} {attn}"
            name += f" {parallel}"
            key = (spec["arch"], spec["stage"])
            explain = bool(opts["explain"]) and key not in explained
            explained.add(key)
            try:
                r = run_row(spec, opts, device, peak, explain, info, parallel)
            except Exception as e:  # noqa: BLE001 - report and continue with the next row
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                print(f"{name}: failed: {type(e).__name__}: {msg}", flush=True)
                rows.append({"row": name, "error": f"{type(e).__name__}: {msg}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save()
                continue
            base = baseline.get(_row_key(r))
            if base is not None:
                r["scaling_eff"] = r["images_s"] / (r["world"] * base["images_s"])
                r["baseline_images_s"] = base["images_s"]
            rows.append(r)
            save()
            print(format_row(r), flush=True)
    print(f"precision {opts['precision']}, median of {opts['steps']} steps after {opts['warmup']} warm-up "
          "(first step call timed apart: 'first s'); step = loss (fused head + weighted CE) + bwd + clip "
          "+ AdamW; 'graphs': Dynamo graphs compiled for the row (recompiles would add to it)")  # fmt: skip
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
