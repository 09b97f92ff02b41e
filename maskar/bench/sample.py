"""Sampling benchmark of VAR-d16 and HMAR-d16: one class-conditional batch, tokens to pixels.

    maskar bench sample [models=var-d16,hmar-d16] [cases=256x64,1024x8] [modes=fast] [precision=bf16]
                        [reps=5] [warmup=1] [backend=auto] [cfg=1.5] [top_k=900] [top_p=0.96]
                        [schedule=preset] [hmar_stage=2] [check=true] [seed=0] [tf32=false]
                        [profile=false] [agree=false] [large_n=0] [device=auto] [json=PATH]
                        [compile_mode=default]   (the compiled modes' torch.compile mode; or
                                                  max-autotune-no-cudagraphs)
                        [sampler=]               (every row's top-k / top-p draw: fused, reference
                                                  or triton; empty: the mode's)
                        [compile_decoder=false]  (compiled modes: the VQ-VAE decode compiled too)
                        [fresh_compile=true]     (torch._dynamo.reset() before each model: its
                                                  compiled rows run code compiled for it)

One timed call = ``model.generate(labels, **knobs)`` under the precision's autocast, exactly
what ``maskar sample`` runs per batch: every scale (VAR with its KV cache; HMAR one scale at
a time plus its masked-refinement passes), CFG on the doubled batch, top-k / top-p sampling
and the frozen VQ-VAE decoding the final f_hat to pixels. The uint8 conversion and the copy to
the host are not timed. Weights are random (the official init), built from the presets:
``var-d16`` and ``hmar-d16`` with ``model.stage=2`` (``hmar_stage``), so HMAR holds its mask
branch (467.7M parameters, as the released model) and refines with the schedule of the preset's
sample config (``schedule=preset``; official default where it sets none) or the official
``benchmark/inference.py`` tables (``schedule=official_bench``). Resolutions other than the
preset's override ``model.tokenizer.resolution`` / ``patch_nums`` with the official tables
(1024 px: 1,2,3,4,5,7,9,12,16,21,27,36,48,64; there is no 1024 px d16 preset). Sampling knobs
follow the official benchmark's: cfg 1.5, top_k 900, top_p 0.96, for both models. The table has
no column for the official code: a peer figure belongs beside ours only when measured on the
same GPU in the same run (docs/benchmarks.md gives the official code's separate measurement).

``modes`` (comma-separated) picks the sampling path, one row each, on the same model:
``fast`` (the default path: per-scale CUDA graphs on a GPU, the one-kernel top-k / top-p draw,
the VQ-VAE decoded in bf16 under bf16 autocast), ``compiled`` (fast with each block's work
around its attention compiled, ``model.compile_sampler()``; list it last), ``fast-w16`` /
``compiled-w16`` (the same after ``model.cast_linears_()``: the linears stored in the autocast
dtype once, as ``maskar sample`` runs on CUDA; irreversible, so last), ``eager`` (fast without
CUDA graphs) and
``legacy`` (the path before issue 14: no graphs, the reference sort-based filter, the fp32
decoder in 32 x 256^2-pixel chunks; the KV cache is the static one of the fast path).

Before timing, each row is checked: the same seed twice gives identical tokens and images,
images are finite and in [-1, 1], token ids are in the codebook, the public ``generate``
returns the same images as the checked run, and the per-scale conditional logits of the
sampling path (VAR: KV cache; HMAR: one scale alone) match a teacher-forced forward on the
sampled tokens of two samples (relative max difference). The first call (CUDA/cuDNN
initialisation, allocator growth; a CUDA-graph key is captured at its second call) is reported
apart as ``first s``; the determinism repeat and ``warmup`` public calls are not timed; ``ms`` is
the median of ``reps`` calls (CUDA events on GPU, wall clock on CPU). Memory: ``alloc GB`` is
``torch.cuda.max_memory_allocated`` over the timed calls and ``rsv GB`` the reserved maximum
(``max_memory_reserved`` after emptying the cache; it includes the CUDA graphs' memory pools,
which replays use without allocating, so it is the honest figure for ``fast``), weights
included, GB = 1e9 bytes. ``floor`` = the call's FLOPs (counted with FlopCounterMode on one
eager call: linears, attention, convolutions) / 790 TFLOP/s, the H200's dense bf16 matmul peak.

Several models in one call with a compiled mode: ``fresh_compile=true`` (the default) resets
Dynamo before each model, so each compiles its own code (its ``first s`` includes that compile).
Without it a later model reuses the code compiled for the first (same structure, no recompile) and
timed no faster than its uncompiled rows: VAR-d16 after HMAR-d16 on an H200 (2026-12-03/04:
compiled 292.8 against fast 291.9 ms at 256 px B 64, while HMAR gained 33 ms), and whichever model
ran second on an H100 (2026-12-05: 1.33-1.40x slower per scale in the graphs, 1.15x in the
compiled decode). Why the reused code runs slower is not established; ``fresh_compile=false``
reproduces it.

``profile=true`` adds, per row, the GPU time of each region of one call (CUDA events at region
ends: the host's preparation before the first scale, ``prep``, during which the GPU idles; every
scale's transformer blocks, head, sampling ops, refinement passes and f_hat update,
then the decoder; with graphs, one figure per scale) and, for the eager paths, the kernel-busy
time from torch.profiler, so idle = span - busy. ``agree=true`` compares, for ``fast`` rows in
bf16, the same seeds in fp32: token agreement per scale (free-running), the agreement of draws
from bf16 and fp32 logits on the same (fp32) context with the same noise, the image PSNR, and
the PSNR of the bf16 decode of the fp32 tokens against their fp32 decode. ``large_n=N`` runs
``maskar.sampling.generate`` (the ``maskar sample`` / ``maskar eval`` pipeline, writing an npz
while it samples) for N HMAR images at the first HMAR case (with the d16 defaults: 256 px,
B 64) and reports its images/s against that row's single-batch figure.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
import traceback
from typing import Any

import torch

from maskar.config import load_config
from maskar.models.var import DEFAULT_SAMPLER
from maskar.nn.sampling import SAMPLERS
from maskar.sampling import autocast_for, low_precision_dtype, sampling_kwargs

DEFAULTS = {
    "models": "var-d16,hmar-d16", "cases": "256x64,1024x8", "modes": "fast", "precision": "bf16", "reps": 5,
    "warmup": 1, "backend": "auto", "cfg": 1.5, "top_k": 900, "top_p": 0.96, "schedule": "preset",
    "hmar_stage": 2, "check": True, "seed": 0, "tf32": False, "profile": False, "agree": False,
    "large_n": 0, "device": "auto", "json": "", "compile_mode": "default", "sampler": "",
    "compile_decoder": False, "fresh_compile": True,
}  # fmt: skip

# Model attributes of each sampling path (maskar.models.var.NextScaleModel).
MODES = {
    "fast": {"cuda_graphs": True, "sampler": DEFAULT_SAMPLER, "decode_precision": "auto"},
    "eager": {"cuda_graphs": False, "sampler": DEFAULT_SAMPLER, "decode_precision": "auto"},
    "legacy": {"cuda_graphs": False, "sampler": "reference", "decode_precision": "fp32"},
    # fast + torch.compile of each block's work around its attention (model.compile_sampler());
    # compiling cannot be undone, so rows of this mode run after the model's other modes
    "compiled": {"cuda_graphs": True, "sampler": DEFAULT_SAMPLER, "decode_precision": "auto"},
}
# "-w16": the same path after model.cast_linears_() (the linears stored in the autocast dtype once,
# as `maskar sample` does on CUDA under bf16 / fp16); irreversible like compiling, so those rows
# run last: fast-w16 then compiled-w16, or compiled then compiled-w16
MODES |= {f"{name}-w16": attrs for name, attrs in MODES.items() if name in ("fast", "compiled")}
_IRREVERSIBLE_AFTER = {"compiled": {"compiled-w16"}, "fast-w16": {"compiled-w16"}, "compiled-w16": set()}

PEAK_TFLOPS = 790.0  # H200 dense bf16 matmul, measured (docs/protocol.md)

# Mask schedules of the official benchmark/inference.py (reference hmar_var.md §4.5).
OFFICIAL_BENCH_SCHEDULES = {
    (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): [[1], [1, 3], [1, 3, 5], [16], [25], [36], [64], [100], [169], [256]],
    (1, 2, 3, 4, 6, 9, 13, 18, 24, 32):
        [[1], [1, 3], [1, 1, 2, 5], [5, 11], [36], [81], [169], [324], [576], [1024]],
    (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64):
        [[1], [1, 3], [1, 1, 2, 5], [3, 5, 8], [25], [49], [81], [144], [256], [441], [729], [1296], [2304],
         [4096]],
}  # fmt: skip

ROW_FIELDS = (
    "model", "preset", "mode", "res", "batch", "precision", "backend", "L", "params_m", "ms", "images_per_s",
    "peak_gb", "peak_reserved_gb", "first_s", "times_ms", "tflop", "floor_ms", "memory_floor_gb",
    "deterministic", "tf_rel_diff", "check_ok", "refine_passes", "mask_schedule", "overrides", "sampler",
)  # fmt: skip

# Relative max |logit difference| allowed between the sampling path and teacher forcing.
TF_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}


def _parse(argv: list[str]) -> dict[str, Any]:
    import yaml

    opts = dict(DEFAULTS)
    for item in argv:
        if "=" not in item:
            raise SystemExit(f"bench sample: expected key=value, got {item!r}; keys: {sorted(DEFAULTS)}")
        k, v = item.split("=", 1)
        if k not in DEFAULTS:
            raise SystemExit(f"bench sample: unknown key {k!r}; keys: {sorted(DEFAULTS)}")
        opts[k] = yaml.safe_load(v) if not isinstance(DEFAULTS[k], str) else v
    if opts["precision"] not in TF_TOLERANCE:
        raise SystemExit(f"bench sample: precision: expected bf16, fp16 or fp32, got {opts['precision']!r}")
    if opts["schedule"] not in ("preset", "official_bench"):
        raise SystemExit(
            f"bench sample: schedule: expected preset or official_bench, got {opts['schedule']!r}"
        )
    if int(opts["reps"]) < 1:
        raise SystemExit(f"bench sample: reps: expected an integer >= 1, got {opts['reps']!r}")
    modes = [m.strip() for m in str(opts["modes"]).split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"bench sample: modes: expected names from {sorted(MODES)}, got {opts['modes']!r}")
    for i, m in enumerate(modes):
        allowed = _IRREVERSIBLE_AFTER.get(m)
        if allowed is not None and any(later not in allowed for later in modes[i + 1 :]):
            raise SystemExit(
                f"bench sample: modes: {m} cannot be undone on a model, so only "
                f"{sorted(allowed) or 'nothing'} may follow it; got {opts['modes']!r}"
            )
    if opts["precision"] == "fp32" and any(m.endswith("-w16") for m in modes):
        raise SystemExit(
            f"bench sample: modes: the -w16 modes need precision bf16 or fp16, got {opts['precision']}"
        )
    if opts["compile_mode"] not in ("default", "max-autotune-no-cudagraphs"):
        raise SystemExit(
            "bench sample: compile_mode: expected default or max-autotune-no-cudagraphs, "
            f"got {opts['compile_mode']!r}"
        )
    if int(opts["large_n"]) < 0:
        raise SystemExit(f"bench sample: large_n: expected an integer >= 0, got {opts['large_n']!r}")
    for key in ("compile_decoder", "fresh_compile"):
        if not isinstance(opts[key], bool):
            raise SystemExit(f"bench sample: {key}: expected true or false, got {opts[key]!r}")
    if opts["sampler"] and opts["sampler"] not in SAMPLERS:
        raise SystemExit(
            f"bench sample: sampler: expected one of {list(SAMPLERS)} (or empty), got {opts['sampler']!r}"
        )
    return opts


def parse_cases(spec: str, what: str = "bench sample") -> list[tuple[int, int]]:
    """``"256x64,1024x8"`` -> [(256, 64), (1024, 8)] (resolution x batch); ``what`` names the
    command in the error."""
    out = []
    for item in (s.strip() for s in str(spec).split(",") if s.strip()):
        try:
            res, batch = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(
                f"{what}: cases: expected RESxBATCH items such as 256x64, got {item!r}"
            ) from None
        if res < 1 or batch < 1:
            raise SystemExit(f"{what}: cases: resolution and batch must be >= 1, got {item!r}")
        out.append((res, batch))
    return out


def case_overrides(preset: str, res: int, hmar_stage: int) -> list[str]:
    """Overrides for ``res`` (official patch_nums where it differs from the preset's) and HMAR's stage."""
    from maskar.tokenizers.vqvae import PATCH_NUMS

    base = load_config(preset)
    if base.model.arch not in ("var", "hmar"):
        raise SystemExit(
            f"bench sample: models: VAR / HMAR presets only (`maskar bench mar` / `bench casmar` "
            f"time the others), got {preset} ({base.model.arch})"
        )
    over = []
    if base.model.arch == "hmar" and int(hmar_stage) != base.model.stage:
        over.append(f"model.stage={int(hmar_stage)}")
    if int(base.model.tokenizer.resolution) != res:
        if res not in PATCH_NUMS:
            raise SystemExit(
                f"bench sample: preset {preset} is {base.model.tokenizer.resolution} px; other resolutions "
                f"need an official patch schedule ({sorted(PATCH_NUMS)}), got {res}"
            )
        pn = ",".join(str(p) for p in PATCH_NUMS[res])
        over += [
            f"model.tokenizer.resolution={res}",
            f"model.tokenizer.patch_nums=[{pn}]",
            f"data.resolution={res}",
        ]
    return over


def build_case(preset: str, overrides: list[str], device: torch.device, backend: str):
    """(model in eval mode on ``device`` with random official-init weights, resolved config)."""
    from maskar.nn.attention import set_backend
    from maskar.registry import build_model

    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly (d16 + VQ-VAE)
        model = build_model(cfg.model)
    model = model.to(device).eval()
    set_backend(model, backend)
    return model, cfg


def sampling_knobs(model, cfg, opts: dict[str, Any]) -> dict[str, Any]:
    """The preset's sample config with the options' cfg / top_k / top_p and the chosen mask schedule."""
    knobs = sampling_kwargs(cfg.sample)
    knobs.pop("seed", None)
    knobs.pop("compile", None)  # the bench compiles per mode (modes=compiled*), not per config
    knobs.update(cfg=float(opts["cfg"]), top_k=int(opts["top_k"]), top_p=float(opts["top_p"]))
    if "mask_schedule" in knobs and opts["schedule"] == "official_bench":
        table = OFFICIAL_BENCH_SCHEDULES.get(tuple(model.patch_nums))
        if table is None:
            raise SystemExit(
                f"bench sample: schedule=official_bench has no table for patch_nums {list(model.patch_nums)}"
            )
        knobs["mask_schedule"] = [list(s) for s in table]
    return knobs


def generate_with_tokens(model, labels: torch.Tensor, seed: int, knobs: dict[str, Any]):
    """What ``model.generate`` does, also returning the final token ids of every scale.

    Returns images (B, C, H, W) and a list of (B, pn^2) int64 tensors.
    """
    knobs = dict(knobs)
    core = {k: knobs.pop(k) for k in ("cfg", "cfg_schedule", "temperature", "top_k", "top_p")}
    labels = model._check_labels(labels)
    args = model._sampling_args(
        core["cfg"],
        core["cfg_schedule"],
        core["temperature"],
        core["top_k"],
        core["top_p"],
        seed,
        labels.device,
    )
    tokens: list[torch.Tensor] = []
    images = model._autoregress(
        labels, args, out_indices=tokens, **model._refine_options(knobs, editing=False)
    )
    return images, tokens


def teacher_forced_rel_diff(model, labels, tokens, knobs: dict[str, Any], autocast) -> float:
    """max |sampling-path logits - teacher-forced logits| / max |teacher-forced logits| on 2 samples."""
    from maskar.models.var import no_autocast

    n = min(2, labels.shape[0])
    gt = [t[:n] for t in tokens]
    keep = [torch.ones_like(t, dtype=torch.bool) for t in gt]  # force every sampled token
    lab = labels[:n]
    with torch.no_grad():
        with no_autocast(lab.device):
            x_in = model.tokenizer.teacher_forcing_input(gt).float()  # (n, L-1, Cz)
        with autocast:
            want = model(lab, x_in).float()  # (n, L, V)
            args = model._sampling_args(
                knobs["cfg"], knobs["cfg_schedule"], knobs["temperature"], knobs["top_k"], knobs["top_p"], 0,
                lab.device,
            )  # fmt: skip
            collected: list[torch.Tensor] = []
            model._autoregress(lab, args, gt, keep, collect=collected)
    got = torch.cat(collected, dim=1)
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolved_schedule(knobs: dict[str, Any], model) -> list[list[int]] | None:
    """The mask schedule HMAR will refine with (None for VAR or when refinement is off)."""
    if (
        "mask_schedule" not in knobs
        or not getattr(model, "has_mask_head", False)
        or knobs.get("refine") is False
    ):
        return None
    return model._refine_options({"mask_schedule": knobs["mask_schedule"]}, editing=False)["schedule"]


def refine_passes(schedule: list[list[int]] | None, patch_nums) -> int:
    """Refinement forward passes per generation: one per schedule entry after the first (pn > 1)."""
    if schedule is None:
        return 0
    return sum(len(s) - 1 for s, pn in zip(schedule, patch_nums) if pn > 1)


def dynamo_stats() -> dict[str, int]:
    """Graphs Dynamo compiled so far in this process, and how often a function hit its recompile
    limit (past it that function runs eagerly: a compiled row would then time eager code)."""
    from torch._dynamo.utils import counters

    hits = sum(n for k, n in counters["unimplemented"].items() if "recompile limit" in k.lower())
    return {"graphs": int(counters["stats"]["unique_graphs"]), "recompile_limit_hits": int(hits)}


def set_mode(
    model, mode: str, precision: str = "bf16", compile_mode: str = "default", compile_decoder: bool = False
) -> None:
    """Switch ``model`` to one of MODES (and drop CUDA graphs captured under another)."""
    for name, value in MODES[mode].items():
        setattr(model, name, value)
    base, w16 = mode.removesuffix("-w16"), mode.endswith("-w16")
    if base == "compiled" and not getattr(model, "_sampler_compiled", False):
        model.compile_sampler(decoder=compile_decoder, mode=compile_mode)
    elif base != "compiled" and getattr(model, "_sampler_compiled", False):
        raise SystemExit(f"bench sample: mode {mode} after compiled on one model (put compiled last)")
    if w16:
        model.cast_linears_(low_precision_dtype(precision))
    elif getattr(model, "_linears_dtype", None) is not None:
        raise SystemExit(f"bench sample: mode {mode} after a -w16 mode on one model (put -w16 modes last)")
    model._graphs.clear()


def count_flops(model, call) -> float:
    """FLOPs of one eager ``call`` (linears, attention, convolutions), graphs off while counting."""
    from torch.utils.flop_counter import FlopCounterMode

    import maskar.bench.flops  # noqa: F401  (formulas for the fused ops)

    graphs, model.cuda_graphs = model.cuda_graphs, False
    try:
        with FlopCounterMode(display=False) as fc:
            call()
    finally:
        model.cuda_graphs = graphs
    return float(fc.get_total_flops())


def memory_by_pool(segments: list[dict]) -> dict[str, float]:
    """GB reserved and in use, split into the caching allocator's default pool and the CUDA graphs'
    private pools, from ``torch.cuda.memory_snapshot()``'s segments: where a graph path's reserved
    memory goes (the graphs' pools are held between calls; replays allocate nothing)."""
    out = {"default_reserved": 0.0, "default_in_use": 0.0, "graphs_reserved": 0.0, "graphs_in_use": 0.0}
    sizes: dict[str, list[float]] = {"default": [], "graphs": []}
    for seg in segments:
        kind = "default" if tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0) else "graphs"
        out[f"{kind}_reserved"] += seg["total_size"] / 1e9
        out[f"{kind}_in_use"] += seg["allocated_size"] / 1e9
        sizes[kind].append(seg["total_size"] / 1e9)
    # segment counts and the largest segments: how whole a pool is (scripts/graph_pool_model.py)
    for kind, got in sizes.items():
        out[f"{kind}_segments"] = len(got)
        out[f"{kind}_largest_gb"] = sorted(got, reverse=True)[:4]
    return out


def memory_floor_gb(model, batch: int, precision: str) -> float:
    """Weights as stored (fp32; the linears bf16 after cast_linears_) plus VAR's KV cache at the
    last scale: what any call must hold."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = 0
    if model.uses_kv_cache:
        elem = 4 if precision == "fp32" else 2
        cache = 2 * len(model.blocks) * 2 * batch * model.L * model.C * elem  # k and v, [cond; null]
    return (weights + cache) / 1e9


def run_case(
    preset: str,
    res: int,
    batch: int,
    opts: dict[str, Any],
    device: torch.device,
    mode: str | None = None,
    built=None,
):
    """Check then time one (preset, resolution, batch, mode). Returns (row dict, images of the last
    timed call). ``built``: a (model, cfg, overrides) from an earlier mode of the same case."""
    mode = mode or str(opts["modes"]).split(",")[0].strip()
    if built is None:
        overrides = case_overrides(preset, res, int(opts["hmar_stage"]))
        model, cfg = build_case(preset, overrides, device, str(opts["backend"]))
    else:
        model, cfg, overrides = built
    set_mode(model, mode, str(opts["precision"]), str(opts["compile_mode"]), bool(opts["compile_decoder"]))
    if opts.get("sampler"):
        model.sampler = str(opts["sampler"])
    knobs = sampling_knobs(model, cfg, opts)
    precision, seed = str(opts["precision"]), int(opts["seed"])
    labels = torch.arange(batch, device=device) % model.num_classes  # (B,) int64

    def public_call() -> torch.Tensor:
        with torch.no_grad(), autocast_for(device, precision):
            return model.generate(labels, seed=seed, **knobs)

    def checked_call():
        with torch.no_grad(), autocast_for(device, precision):
            return generate_with_tokens(model, labels, seed, knobs)

    _sync(device)
    t0 = time.perf_counter()
    img_a, tok_a = checked_call()
    _sync(device)
    first_s = time.perf_counter() - t0
    img_b, tok_b = checked_call()  # determinism repeat, doubles as a warm-up (captures CUDA graphs)
    deterministic = all(torch.equal(a, b) for a, b in zip(tok_a, tok_b)) and torch.equal(img_a, img_b)
    finite = bool(torch.isfinite(img_a).all()) and img_a.min().item() >= -1.0 and img_a.max().item() <= 1.0
    in_vocab = all(int(t.min()) >= 0 and int(t.max()) < model.vocab_size for t in tok_a)
    shape_ok = tuple(img_a.shape) == (batch, model.image_channels, model.image_size, model.image_size)
    tf = None
    if opts["check"]:
        tf = teacher_forced_rel_diff(model, labels, tok_a, knobs, autocast_for(device, precision))
    del img_b, tok_b
    # The checked results wait on the host: kept on the GPU, their blocks would pin the cached
    # segments of the eager first call, and the reserved figure below would count them.
    img_a, tok_a = img_a.cpu(), [t.cpu() for t in tok_a]
    for _ in range(int(opts["warmup"])):
        public_call()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    out = img_a
    for _ in range(int(opts["reps"])):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = public_call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            out = public_call()
            times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) / 1e9 if cuda else None
    pools = memory_by_pool(torch.cuda.memory_snapshot()) if cuda else None
    same_as_public = torch.equal(out.cpu(), img_a)  # the timed path produced the checked images
    tf_ok = tf is None or tf <= TF_TOLERANCE[precision]
    check_ok = deterministic and finite and in_vocab and shape_ok and same_as_public and tf_ok
    flops = count_flops(model, public_call)

    ms = statistics.median(times)
    schedule = resolved_schedule(knobs, model)
    arch = cfg.model.arch
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tokenizer.")) / 1e6
    row = {
        "model": f"{arch}-d{model.depth}", "preset": preset, "mode": mode, "res": int(model.image_size),
        "batch": batch, "precision": precision, "backend": str(opts["backend"]), "sampler": model.sampler,
        "L": int(model.L),
        "params_m": round(n_params, 1), "ms": ms, "images_per_s": batch / (ms / 1e3), "peak_gb": peak,
        "peak_reserved_gb": reserved, "first_s": first_s, "times_ms": times, "tflop": flops / 1e12,
        "floor_ms": flops / (PEAK_TFLOPS * 1e12) * 1e3,
        "memory_floor_gb": memory_floor_gb(model, batch, precision),
        "deterministic": deterministic, "tf_rel_diff": tf, "check_ok": check_ok,
        "refine_passes": refine_passes(schedule, model.patch_nums), "mask_schedule": schedule,
        "overrides": overrides, "graph_captures": model._graphs.captures, "memory_by_pool": pools,
    }  # fmt: skip
    if not check_ok:
        row["check_failures"] = [
            name for name, ok in [
                ("determinism", deterministic), ("finite/range", finite), ("token ids", in_vocab),
                ("image shape", shape_ok), ("public generate == checked run", same_as_public),
                (f"teacher forcing (rel diff {tf} > {TF_TOLERANCE[precision]})", tf_ok),
            ] if not ok
        ]  # fmt: skip
    if mode.startswith("compiled"):
        row["dynamo"] = dynamo_stats()
    if opts["profile"]:
        row["profile"] = _guarded(lambda: profile_call(model, public_call, device))
    if opts["agree"] and mode == "fast" and precision != "fp32":
        row["agree"] = _guarded(lambda: precision_agreement(model, labels, seed, knobs, precision, device))
    return row, out


def _guarded(fn):
    """A diagnostic must not cost the timing rows: report its error instead."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


# ----------------------------------------------------------------------------- profile


# prep: the host's work before the first scale (argument checks, the graph lookup), GPU idle
REGION_KINDS = ("prep", "blocks", "head", "sample", "refine", "update", "graph", "decode")


def _region_kind(name: str) -> str:
    last = name.split()[-1]
    if name.startswith("decode"):
        return "decode"
    return "refine" if last.startswith("refine") else last


def _elapsed_ms(a, b) -> float:
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3


def region_times(model, call, device: torch.device) -> dict[str, Any]:
    """GPU time between consecutive region ends of one call: per scale and per kind (ms)."""
    from maskar.models.scale_graphs import mark

    marks: list = []
    _sync(device)
    start = mark(device)
    model.profile_marks = marks
    try:
        call()
    finally:
        model.profile_marks = None
    end = mark(device)
    _sync(device)
    per_kind = dict.fromkeys(REGION_KINDS, 0.0)
    per_scale: dict[str, float] = {}
    prev = start
    for name, stamp in marks:
        ms = _elapsed_ms(prev, stamp)
        prev = stamp
        per_kind[_region_kind(name)] += ms
        if name.startswith("s") and name[1:3].isdigit():
            per_scale[name[:3]] = per_scale.get(name[:3], 0.0) + ms
    per_kind["after"] = _elapsed_ms(prev, end)  # the image copy out of the graph, float cast
    return {"span_ms": _elapsed_ms(start, end), "per_kind_ms": per_kind, "per_scale_ms": per_scale}


def kernel_busy(model, call, device: torch.device) -> dict[str, Any]:
    """torch.profiler: kernel time in total and per region kind (ms), for an eager call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model.profile_marks = []  # regions open record_function ranges
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            _sync(device)
    finally:
        model.profile_marks = None

    def dev_total(e) -> float:
        return float(getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0))

    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    busy = sum(dev_total(e) for e in events if e.cpu_parent is None) / 1e3
    per_kind = dict.fromkeys(REGION_KINDS, 0.0)
    for e in events:
        if e.name.startswith(("s", "decode")) and (e.name.startswith("decode") or e.name[1:3].isdigit()):
            kind = _region_kind(e.name)
            if kind in per_kind:
                per_kind[kind] += dev_total(e) / 1e3
    top = sorted(
        ((k.key, getattr(k, "self_device_time_total", 0.0) / 1e3) for k in prof.key_averages()),
        key=lambda kv: -kv[1],
    )[:12]
    return {"busy_ms": busy, "busy_per_kind_ms": per_kind, "top_ops_ms": top}


# Kernel-name groups of one call on the row's own path (graph replays included: CUPTI records the
# kernels inside a CUDA graph one by one), first match wins. cuDNN names its attention kernels
# ``..._sdpa_..._flash_fprop_...`` and its convolutions ``..._xmma_fprop_implicit_gemm_...``, and
# Inductor names its kernels after the ops they fuse (``triton_poi_fused_..._convolution_...``):
# attention first, then Inductor's kernels, then the convolutions, the matmuls last.
KERNEL_GROUPS = (
    ("attention", ("fmha", "flash", "attention", "_attn_fwd", "sdpa")),
    ("inductor kernels", ("triton_",)),
    ("decoder convolutions", ("fprop", "conv")),
    ("layout transposes", ("nchwtonhwc", "nhwctonchw")),
    ("fused group norm", ("_gn_stats", "_gn_finalize", "_gn_apply")),
    ("q/k norm", ("_qk_norm",)),
    ("draw (top-k / top-p)", ("_categorical", "sort", "topk", "multinomial", "cumsum")),
    ("matmuls", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas")),
)


def group_kernels(per_kernel: dict[str, float]) -> dict[str, float]:
    """ms per group of :data:`KERNEL_GROUPS` (the rest under ``other``), by kernel name."""
    from maskar.bench.kernel_time import group_by_name

    return group_by_name(per_kernel, KERNEL_GROUPS)


def profile_call(model, call, device: torch.device) -> dict[str, Any]:
    """Region times of one call on this row's path, and on CUDA its GPU kernel time by kernel
    group (:data:`KERNEL_GROUPS`) with the longest kernels; for graph rows also the region times
    of the eager path with kernel-busy times, so the idle share of the eager path is known."""
    out = {"regions": region_times(model, call, device)}
    if device.type == "cuda":
        from maskar.bench.kernel_time import kernel_ms_per_call

        per = kernel_ms_per_call(call, calls=1)
        out["kernels"] = {"groups_ms": group_kernels(per), "top_ms": dict(list(per.items())[:15])}
    graphs, model.cuda_graphs = model.cuda_graphs, False
    try:
        if graphs and device.type == "cuda":
            out["eager_regions"] = region_times(model, call, device)
        if device.type == "cuda":
            busy = kernel_busy(model, call, device)
            eager = out.get("eager_regions", out["regions"])
            busy["idle_ms"] = eager["span_ms"] - busy["busy_ms"]
            out["eager_busy"] = busy
    finally:
        model.cuda_graphs = graphs
    return out


def format_profile(r: dict[str, Any]) -> list[str]:
    prof = r.get("profile")
    if not prof:
        return []
    tag = f"  profile {r['model']} {r['res']}x{r['batch']} {r['mode']}"
    if "error" in prof:
        return [f"{tag}: {prof['error']}"]
    lines = []
    for key, label in (("regions", "this path"), ("eager_regions", "same code, no graphs")):
        reg = prof.get(key)
        if not reg:
            continue
        kinds = " ".join(f"{k} {v:.1f}" for k, v in reg["per_kind_ms"].items() if v >= 0.05)
        lines.append(f"{tag} [{label}]: span {reg['span_ms']:.1f} ms = {kinds}")
        scales = " ".join(f"{k} {v:.1f}" for k, v in reg["per_scale_ms"].items())
        lines.append(f"      per scale ms: {scales}")
    kern = prof.get("kernels")
    if kern:
        groups = ", ".join(f"{g} {ms:.1f}" for g, ms in kern["groups_ms"].items() if ms >= 0.05)
        lines.append(f"      GPU kernels of this path {sum(kern['groups_ms'].values()):.1f} ms: {groups}")
        for name, ms in list(kern["top_ms"].items())[:10]:
            lines.append(f"        {ms:8.2f} ms  {name[:110]}")
    busy = prof.get("eager_busy")
    if busy:
        kinds = " ".join(f"{k} {v:.1f}" for k, v in busy["busy_per_kind_ms"].items() if v >= 0.05)
        lines.append(
            f"      eager kernels busy {busy['busy_ms']:.1f} ms, idle {busy['idle_ms']:.1f} ms; "
            f"busy by region: {kinds}"
        )
        top = "; ".join(f"{k} {v:.1f}" for k, v in busy["top_ops_ms"][:8])
        lines.append(f"      top ops (self GPU ms): {top}")
    return lines


# ----------------------------------------------------------------------------- bf16 against fp32


def precision_agreement(model, labels, seed: int, knobs: dict[str, Any], precision: str, device) -> dict:
    """The same seeds in ``precision`` and in fp32: how far the bf16 path is from the fp32 one."""
    if getattr(model, "_linears_dtype", None) is not None:
        return {"skipped": "the linears are stored in low precision (a -w16 mode): no fp32 reference"}
    from maskar.models.var import no_autocast
    from maskar.nn.sampling import exponential_noise, sample_from_logits

    def run(prec):
        with torch.no_grad(), autocast_for(device, prec):
            return generate_with_tokens(model, labels, seed, knobs)

    img_b, tok_b = run(precision)
    img_f, tok_f = run("fp32")
    free = [(a == b).float().mean().item() for a, b in zip(tok_b, tok_f)]

    # Same context (the fp32 tokens, forced), same noise: do bf16 and fp32 logits draw alike?
    keep = [torch.ones_like(t, dtype=torch.bool) for t in tok_f]
    logits = {}
    for prec in (precision, "fp32"):
        collected: list[torch.Tensor] = []
        with torch.no_grad(), autocast_for(device, prec):
            args = model._sampling_args(
                knobs["cfg"], knobs["cfg_schedule"], knobs["temperature"], knobs["top_k"], knobs["top_p"],
                seed, labels.device,
            )  # fmt: skip
            model._autoregress(labels, args, tok_f, keep, collect=collected)
        logits[prec] = collected
    g = torch.Generator(device=device).manual_seed(seed)
    same_draw, same_argmax, n = 0.0, 0.0, 0
    for lb, lf in zip(logits[precision], logits["fp32"]):
        noise = exponential_noise(lb.shape[0] * lb.shape[1], lb.shape[2], g, device)
        db = sample_from_logits(lb, knobs["top_k"], knobs["top_p"], knobs["temperature"], noise=noise)
        df = sample_from_logits(lf, knobs["top_k"], knobs["top_p"], knobs["temperature"], noise=noise)
        same_draw += (db == df).float().sum().item()
        same_argmax += (lb.argmax(-1) == lf.argmax(-1)).float().sum().item()
        n += db.numel()
    with torch.no_grad(), no_autocast(device):
        fhat = model.tokenizer.indices_to_fhat(tok_f)
        dec32 = model.decode(fhat, "fp32")
        dec16 = model.decode(fhat, "bf16")

    def psnr(a, b) -> float:
        mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
        return (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).mean().item()

    all_b, all_f = torch.cat([t.flatten() for t in tok_b]), torch.cat([t.flatten() for t in tok_f])
    return {
        "token_agreement": (all_b == all_f).float().mean().item(),
        "token_agreement_per_scale": free,
        "same_context_draw_agreement": same_draw / n,
        "same_context_argmax_agreement": same_argmax / n,
        "image_psnr_db": psnr(img_b, img_f),
        "image_max_abs": (img_b - img_f).abs().max().item(),
        "decode_only_psnr_db": psnr(dec16, dec32),
        "decode_only_max_abs": (dec16 - dec32).abs().max().item(),
    }


def format_agree(r: dict[str, Any]) -> list[str]:
    a = r.get("agree")
    if not a:
        return []
    tag = f"  bf16 vs fp32 {r['model']} {r['res']}x{r['batch']}"
    if "error" in a or "skipped" in a:
        return [f"{tag}: {a.get('error') or a['skipped']}"]
    per = " ".join(f"{x:.3f}" for x in a["token_agreement_per_scale"])
    return [
        f"{tag}: tokens {100 * a['token_agreement']:.1f}% equal (per scale {per}); same-context draws "
        f"{100 * a['same_context_draw_agreement']:.2f}%, "
        f"argmax {100 * a['same_context_argmax_agreement']:.2f}%; "
        f"images PSNR {a['image_psnr_db']:.1f} dB (max |d| {a['image_max_abs']:.2f}); decoder alone "
        f"{a['decode_only_psnr_db']:.1f} dB (max |d| {a['decode_only_max_abs']:.3f})"
    ]


# ----------------------------------------------------------------------------- large N


def large_n_run(model, cfg, batch: int, n: int, opts: dict[str, Any], device) -> dict[str, Any]:
    """``maskar.sampling.generate`` of n images (the sample / eval pipeline) with an npz written as
    it goes (to a temporary directory, deleted after); wall-clock images/s."""
    import dataclasses

    from maskar import sampling

    set_mode(model, "fast-w16" if getattr(model, "_linears_dtype", None) is not None else "fast")
    sample = dataclasses.replace(
        cfg.sample, cfg=float(opts["cfg"]), top_k=int(opts["top_k"]), top_p=float(opts["top_p"]),
        seed=int(opts["seed"]),
    )  # fmt: skip
    knobs = sampling_knobs(model, cfg, opts)
    if "mask_schedule" in knobs:
        sample = dataclasses.replace(sample, mask_schedule=knobs["mask_schedule"])
    run_cfg = dataclasses.replace(cfg, sample=sample)
    classes = list(range(model.num_classes))
    per_class = max(1, math.ceil(n / len(classes)))
    classes = classes[: math.ceil(n / per_class)]
    total = len(classes) * per_class
    order = [c for c in classes for _ in range(per_class)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "samples.npz")
        _sync(device)
        t0 = time.perf_counter()
        images, _ = sampling.generate(
            model, run_cfg, classes, per_class, batch, str(opts["precision"]),
            [sampling.NpzStream(path, total, order)],
        )  # fmt: skip
        _sync(device)
        wall = time.perf_counter() - t0
        size = os.path.getsize(path)
    return {
        "images": total, "batch": batch, "wall_s": wall, "images_per_s": total / wall, "npz_gb": size / 1e9,
        "batches": math.ceil(total / batch), "shape": list(images.shape),
    }


# ----------------------------------------------------------------------------- table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def format_pools(p: dict[str, float]) -> str:
    return (f"  memory after the timed calls: default pool {p['default_reserved']:.2f} GB reserved "
            f"({p['default_in_use']:.2f} in use), the CUDA graphs' pools {p['graphs_reserved']:.2f} GB "
            f"({p['graphs_in_use']:.2f} in use) in {p.get('graphs_segments', '?')} segments, the largest "
            f"{', '.join(f'{g:.2f}' for g in p.get('graphs_largest_gb', []))} GB")


def format_row(r: dict[str, Any]) -> str:
    check = "ok" if r["check_ok"] else "FAIL"
    return (
        f"{r['model']:<9} {r['mode']:<12} {r['res']:>5} {r['batch']:>5} {r['precision']:>5} {r['L']:>5} "
        f"{r['params_m']:>7.1f}M {r['ms']:>9.1f} {_fmt(r['floor_ms'], '.1f', 7)} {r['images_per_s']:>7.1f} "
        f"{_fmt(r['peak_gb'], '.2f', 8)} {_fmt(r['peak_reserved_gb'], '.2f', 7)} "
        f"{_fmt(r['memory_floor_gb'], '.2f', 7)} {r['first_s']:>7.2f} {r['refine_passes']:>6} "
        f"{_fmt(r['tf_rel_diff'], '.1e', 8)} {check:>5}"
    )


HEADER = (
    f"{'model':<9} {'mode':<12} {'res':>5} {'batch':>5} {'prec':>5} {'L':>5} {'params':>8} {'ms/batch':>9} "
    f"{'floor':>7} {'img/s':>7} {'alloc GB':>8} {'rsv GB':>7} {'mem fl':>7} {'first s':>7} {'refine':>6} "
    f"{'tf diff':>8} {'check':>5}"
)


def _find(rows, model: str, res: int, mode: str = "fast"):
    return next((r for r in rows if r["model"] == model and r["res"] == res and r["mode"] == mode), None)


def target_lines(rows: list[dict[str, Any]], large: dict[str, Any] | None) -> list[str]:
    """The issue's targets against this run's rows (those that are present)."""
    out = []

    def peak(r):
        return r["peak_reserved_gb"] if r["peak_reserved_gb"] is not None else r["peak_gb"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    h256, v256 = _find(rows, "hmar-d16", 256), _find(rows, "var-d16", 256)
    h1k, v1k = _find(rows, "hmar-d16", 1024), _find(rows, "var-d16", 1024)
    if h256:
        ok = h256["ms"] <= 150 and (peak(h256) or 0) <= 6
        out.append(
            f"HMAR-d16 256 px B {h256['batch']}: {h256['ms']:.1f} ms (target <= 150, "
            f"floor {h256['floor_ms']:.1f}), "
            f"peak {_fmt(peak(h256), '.2f', 0)} GB reserved (target <= 6): {verdict(ok)}"
        )
    if v256:
        out.append(
            f"VAR-d16 256 px B {v256['batch']}: {v256['ms']:.1f} ms (target <= 130, "
            f"floor {v256['floor_ms']:.1f}): "
            f"{verdict(v256['ms'] <= 130)}"
        )
    if h1k and v1k:
        speed, mem = v1k["ms"] / h1k["ms"], (peak(v1k) or 0) / max(peak(h1k) or 1e-9, 1e-9)
        ok = speed >= 1.75 and mem >= 3 and h1k["ms"] <= 400
        out.append(
            f"HMAR-d16 1024 px B {h1k['batch']}: {h1k['ms']:.1f} ms (target <= 400, "
            f"floor {h1k['floor_ms']:.1f}); VAR-d16 {v1k['ms']:.1f} ms -> {speed:.2f}x faster "
            f"(target >= 1.75); peak {_fmt(peak(h1k), '.2f', 0)} "
            f"vs {_fmt(peak(v1k), '.2f', 0)} GB -> {mem:.2f}x less (target >= 3): {verdict(ok)}"
        )
    if large and h256 and "error" not in large and large["batch"] == h256["batch"]:
        frac = large["images_per_s"] / h256["images_per_s"]
        out.append(
            f"{large['images']}-sample run (pipeline, npz {large['npz_gb']:.2f} GB): "
            f"{large['images_per_s']:.1f} img/s = {100 * frac:.1f}% of the single-batch "
            f"{h256['images_per_s']:.1f} img/s (target >= 90%): "
            f"{verdict(frac >= 0.9)}"
        )
    elif large:
        out.append(f"large-N run: {large}")
    return out


def main(argv: list[str] | None = None) -> int:
    from maskar.models import scale_graphs
    from maskar.nn import attention_cudnn

    argv = list(argv or [])
    opts = _parse(argv)
    dev_name = opts["device"]
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_name)
    from maskar.config_base import ConfigError
    from maskar.nn.attention import check_backend

    try:  # a backend not installed here (or CPU-incapable on the CPU) stops before any model is built
        check_backend(str(opts["backend"]), device)
        # as do an unknown preset, a bad case or a resolution without an official schedule
        presets = [m.strip() for m in str(opts["models"]).split(",") if m.strip()]
        cases = parse_cases(opts["cases"])
        for preset in presets:
            for res, _ in cases:
                case_overrides(preset, res, int(opts["hmar_stage"]))
    except ConfigError as e:
        raise SystemExit(f"bench sample: {e}") from None
    if device.type == "cuda" and opts["tf32"]:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"command: maskar bench sample {' '.join(argv)}")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {gpu} | torch {torch.__version__} | cuda {torch.version.cuda or '-'} | "
        f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32} cudnn {torch.backends.cudnn.allow_tf32} | "
        f"graph pool reserved first {scale_graphs.RESERVE_POOL} (MASKAR_GRAPH_POOL_RESERVE) | "
        f"dense attention cuDNN first {attention_cudnn.ENABLED} (MASKAR_SDPA_CUDNN)"
    )
    modes = [m.strip() for m in str(opts["modes"]).split(",") if m.strip()]
    print(
        f"precision {opts['precision']}, modes {','.join(modes)}, backend {opts['backend']}, "
        f"cfg {opts['cfg']}, sampler {opts['sampler'] or 'per mode'}, "
        f"compiled decoder {opts['compile_decoder']} (compiled modes), "
        f"fresh compile {opts['fresh_compile']}, "
        f"top_k {opts['top_k']}, top_p {opts['top_p']}, HMAR stage {opts['hmar_stage']}, "
        f"schedule {opts['schedule']}, median of {opts['reps']} after the determinism repeat + "
        f"{opts['warmup']} warm-up; floor = counted FLOPs / {PEAK_TFLOPS:.0f} TFLOP/s; "
        "mem fl = weights + KV cache"
    )
    print(HEADER)
    print("-" * len(HEADER))
    rows, failed, large = [], False, None
    for preset in presets:
        for res, batch in cases:
            built = None
            for mode in modes:
                try:
                    if built is None:
                        if opts["fresh_compile"] and any(m.startswith("compiled") for m in modes):
                            # A model compiled after another in one process reused the first
                            # one's compiled code and timed like its uncompiled rows (H200,
                            # 2026-12-03/04; H100, 2026-12-05): each model compiles afresh.
                            torch._dynamo.reset()
                        overrides = case_overrides(preset, res, int(opts["hmar_stage"]))
                        built = (*build_case(preset, overrides, device, str(opts["backend"])), overrides)
                    row, _ = run_case(preset, res, batch, opts, device, mode, built)
                except (RuntimeError, ValueError) as e:  # e.g. out of memory: report, go on
                    failed = True
                    msg = str(e).splitlines()[0][:140] if str(e) else ""
                    what = f"{preset:<9} {mode:<12} {res:>5} {batch:>5}"
                    print(f"{what} failed: {type(e).__name__}: {msg}", flush=True)
                    traceback.print_exc()  # the whole cause on stderr; the table goes on
                    row = None
                if device.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
                if row is None:
                    continue
                row.update(
                    device=gpu, torch=torch.__version__, graph_pool_reserve=scale_graphs.RESERVE_POOL,
                    sdpa_cudnn_first=attention_cudnn.ENABLED,
                )  # fmt: skip
                rows.append(row)
                failed |= not row["check_ok"]
                print(format_row(row), flush=True)
                if row.get("memory_by_pool"):
                    print(format_pools(row["memory_by_pool"]), flush=True)
                for line in format_profile(row) + format_agree(row):
                    print(line, flush=True)
                if not row["check_ok"]:
                    print(f"  check failed: {'; '.join(row['check_failures'])}")
                if "dynamo" in row:
                    graphs, hits = row["dynamo"]["graphs"], row["dynamo"]["recompile_limit_hits"]
                    note = " (some calls ran eagerly)" if hits else ""
                    print(f"  dynamo so far: {graphs} graphs, recompile limit hit {hits}x{note}", flush=True)
                if opts["json"]:  # rewritten after every row, so a run cut short keeps its rows
                    with open(opts["json"], "w") as f:
                        json.dump({"rows": rows, "large_n": large}, f, indent=1)
            is_hmar = built is not None and built[1].model.arch == "hmar"
            if int(opts["large_n"]) and is_hmar and large is None and "fast" in modes:
                model, cfg, _ = built
                n = int(opts["large_n"])
                large = _guarded(lambda m=model, c=cfg, b=batch, n=n: large_n_run(m, c, b, n, opts, device))
                print(f"  large-N: {large}", flush=True)
                if opts["json"]:
                    with open(opts["json"], "w") as f:
                        json.dump({"rows": rows, "large_n": large}, f, indent=1)
            built = None
            if device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
    for r in rows:
        if (r["refine_passes"] or r["overrides"]) and r["mode"] == modes[0]:
            what = f"  {r['model']} {r['res']} px"
            print(f"{what}: overrides {r['overrides']}; mask schedule {r['mask_schedule']}")
    lines = target_lines(rows, large)
    if lines:
        print("targets (issue 14, this run):")
        for line in lines:
            print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
