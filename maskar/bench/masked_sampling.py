"""Sampling speed of MAR and CASMAR: images/s, achieved TFLOP/s, peak memory, decode apart.

What is timed is one ``model.sample_tokens`` call for a batch (tokens only: every AR
iteration, both stages for CASMAR, every diffusion step, CFG); the KL decode of those tokens
is timed on its own. Times are medians of CUDA-event timings after warm-up (the warm-up call
captures the CUDA graphs). FLOPs come from :mod:`maskar.bench.sampler_flops` with the token
counts of the sampler's first call (traced; every call uses the same seed). Achieved
TFLOP/s = FLOPs / median time; ``--peak-tflops`` (790 = the H200's
measured bf16 matmul peak, docs/protocol.md) gives the floor and the share of it.

Options shared by ``maskar bench mar`` and ``maskar bench casmar``:
``--cuda-graph on|off|both`` (diffusion heads replayed as CUDA graphs, GPU only; with ``both``
the two paths' tokens are also compared, same seed), ``--profile`` (one more call under
torch.profiler: GPU time per phase, idle time, top kernels), ``--json FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from maskar.bench import sampler_flops as sf
from maskar.bench.kernel_time import group_of
from maskar.config import load_config
from maskar.nn.sampling import SamplingTrace
from maskar.registry import build_model
from maskar.sampling import low_precision_dtype

# ----------------------------------------------------------------------------- timing


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
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


def measure(fn: Callable[[], object], time_one, warmup: int, reps: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = [time_one(fn) for _ in range(reps)]
    return statistics.median(times), times


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if dev.type == "cpu":
            print("no CUDA GPU; running on CPU (use a tiny preset)", file=sys.stderr)
        return dev
    return torch.device(name)


# ----------------------------------------------------------------------------- the sampler under test


def set_graphs(model: torch.nn.Module, on: bool) -> None:
    """The CUDA-graph switch of every diffusion head (MAR: one, CASMAR: two)."""
    for name in ("diffloss", "cond_diffloss"):
        head = getattr(model, name, None)
        if head is not None:
            head.cuda_graph = on


def graph_captures(model: torch.nn.Module) -> dict[str, int]:
    return {n: getattr(model, n)._graphs.captures for n in ("diffloss", "cond_diffloss") if hasattr(model, n)}


@dataclass
class Sampler:
    """One sampler configuration: how to call it, how to decode, what it costs."""

    model: torch.nn.Module
    kwargs: dict[str, Any]  # sample_tokens keywords (without generator)
    label: str
    flops_of: Callable[[SamplingTrace], dict[str, int]]  # a traced call's FLOP parts
    flops: dict[str, int] | None = None  # of the first call (traced), the same seed every call

    @property
    def is_casmar(self) -> bool:
        return hasattr(self.model, "cond_diffloss")

    def tokens(self, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """One sampling call (the first one is traced, for the FLOP count)."""
        g = torch.Generator(device=labels.device).manual_seed(seed)
        trace = SamplingTrace() if self.flops is None else None
        out = self.model.sample_tokens(labels, generator=g, trace=trace, **self.kwargs)
        if trace is not None:
            self.flops = self.flops_of(trace)
        return out[0] if self.is_casmar else out

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.is_casmar:
            latent = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, m.seq_h, m.seq_w)
        else:
            latent = m.unpatchify(tokens)
        return m.tokenizer.decode(latent.float())


def mar_sampler(model: torch.nn.Module, batch: int, num_iter: int, cfg: float, steps: str) -> Sampler:
    kwargs = dict(num_iter=num_iter, cfg=cfg, num_sampling_steps=steps)
    head_steps = model.diffloss.gen_diffusion(steps).num_timesteps

    def flops_of(trace: SamplingTrace) -> dict[str, int]:
        return sf.mar_sampling(model, batch, cfg != 1.0, head_steps, sf.mar_counts(trace))

    return Sampler(model, kwargs, f"num_iter={num_iter} cfg={cfg} steps={steps}", flops_of)


def casmar_sampler(
    model: torch.nn.Module,
    batch: int,
    num_iter: int,
    cfg: float,
    re_cfg: float,
    steps: str,
    refine_steps: str,
    scaffold_num_iter: int = 0,
) -> Sampler:
    kwargs = dict(
        num_iter=num_iter,
        cfg=cfg,
        re_cfg=re_cfg,
        num_sampling_steps=steps,
        refine_num_sampling_steps=refine_steps,
        scaffold_num_iter=scaffold_num_iter,
    )
    steps1 = scaffold_num_iter or 4 * model.cfg.cond_scale
    t1 = model.diffloss.gen_diffusion(steps).num_timesteps
    t2 = model.cond_diffloss.gen_diffusion(refine_steps).num_timesteps

    def flops_of(trace: SamplingTrace) -> dict[str, int]:
        stage1, stage2 = sf.casmar_counts(trace)
        return sf.casmar_sampling(
            model,
            batch,
            re_cfg != 1.0,
            cfg != 1.0,
            t1,
            t2,
            stage1,
            stage2,
            steps1,
            num_iter,
        )

    label = f"num_iter={num_iter} ({steps1} scaffold) cfg={cfg} re_cfg={re_cfg} steps={steps}/{refine_steps}"
    return Sampler(model, kwargs, label, flops_of)


# ----------------------------------------------------------------------------- profile


# GPU-side records that are not kernel work: the ranges' GPU annotations and CUPTI's overhead
# records (by activity type, and by name where a torch lacks activity_type()): "Command Buffer
# Full" is the host blocked on a full launch queue, filed as device time (bench sample's eager
# "busy" counted it: more busy than wall in its 2026-12-03 legacy rows). Memcpy / memset count.
_NOT_KERNELS = ("gpu_user_annotation", "overhead")
_CUPTI_OVERHEAD = frozenset(
    ("Driver Compiler", "Buffer Flush", "Instrumentation", "Resource", "Runtime Triggered Module Loading",
     "Lazy Function Loading", "Command Buffer Full", "Activity Buffer Request", "UVM Activity Init")
)  # fmt: skip


class _Ranges:
    """Profiler ranges around a model's sampling phases (instance attributes, removed after)."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync  # finish a range's GPU work before it closes (kernels then lie inside it)
        self.scope: list[str] = []
        self.saved: list[tuple[Any, str]] = []
        self.names: set[str] = set()

    def wrap(self, obj: Any, attr: str, name: str, scope: bool = False) -> None:
        if obj is None or not hasattr(obj, attr):
            return
        orig = getattr(obj, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            full = "/".join([*self.scope, name])
            self.names.add(full)
            with torch.profiler.record_function(full):
                if scope:
                    self.scope.append(name)
                try:
                    out = orig(*args, **kwargs)
                    if self.sync:
                        torch.cuda.synchronize()
                    return out
                finally:
                    if scope:
                        self.scope.pop()

        setattr(obj, attr, wrapper)
        self.saved.append((obj, attr))

    def restore(self) -> None:
        for obj, attr in reversed(self.saved):
            delattr(obj, attr)
        self.saved.clear()


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy


def _innermost_range(ranges: list[tuple[int, int, str]]) -> tuple[list[int], list[str | None]]:
    """Properly nested (start, end, name) ranges as a step function: ``names[i]`` is the innermost
    range open from ``times[i]`` on (None: none), so ``bisect_right(times, t) - 1`` finds it."""
    times: list[int] = []
    names: list[str | None] = []
    stack: list[tuple[int, str]] = []
    for start, end, name in sorted(ranges, key=lambda r: (r[0], -r[1])):
        while stack and stack[-1][0] <= start:
            times.append(stack.pop()[0])
            names.append(stack[-1][1] if stack else None)
        stack.append((end, name))
        times.append(start)
        names.append(name)
    while stack:
        times.append(stack.pop()[0])
        names.append(stack[-1][1] if stack else None)
    return times, names


def _phase_key(name: str | None, all_names: set[str]) -> str:
    """Where a range's own time is filed: ``X/other`` when X has sub-ranges, the top range's
    (and any time outside every range) under "outside the phases"."""
    if name is None or name == "sampling":
        return "outside the phases"
    return f"{name}/other" if any(n.startswith(name + "/") for n in all_names) else name


def _kernel_time_by_phase(
    spans: list[tuple[int, int, str]],
    op_start: dict[int, int],
    kernels: list[tuple[int, int, str, int]],
    names: set[str],
    unlinked_by_start: bool = False,
    group: Callable[[str], str] | None = None,
) -> dict[str, float]:
    """ms of kernel time per phase key: each kernel (start, end, name, linked op id; ns) goes to the
    innermost range of ``spans`` open when its linked CPU-side op started. A kernel linked to no
    op (those of CUDA-graph replays) goes, with ``unlinked_by_start``, to the range open when it
    started on the GPU (right when every range synchronises before it closes), else under
    "unattributed kernels". With ``group`` (kernel name -> group) the keys are
    "phase / group"."""
    from bisect import bisect_right

    times, inner = _innermost_range(spans)
    out: dict[str, float] = {}
    for start, end, name, linked in kernels:
        t = op_start.get(linked, start if unlinked_by_start else None)
        if t is None:
            where = "unattributed kernels"
        else:
            i = bisect_right(times, t) - 1
            where = _phase_key(inner[i] if i >= 0 else None, names)
        if group is not None:
            where = f"{where} / {group(name)}"
        out[where] = out.get(where, 0.0) + (end - start) / 1e6
    return out


def _idle_by_phase(
    spans: list[tuple[int, int, str]], kernels: list[tuple[int, int, str, int]], names: set[str],
    start: int, end: int,
) -> dict[str, float]:
    """ms of GPU idle per phase key: every gap in the union of the kernels' intervals within
    [start, end] (ns) goes to the innermost range open when the gap began (host work there kept
    the GPU waiting: a synchronisation, launches slower than the kernels, Python between calls)."""
    from bisect import bisect_right

    times, inner = _innermost_range(spans)
    out: dict[str, float] = {}

    def gap(a: int, b: int) -> None:
        if b > a:
            i = bisect_right(times, a) - 1
            where = _phase_key(inner[i] if i >= 0 else None, names)
            out[where] = out.get(where, 0.0) + (b - a) / 1e6

    cursor = start
    for s, e, _, _ in sorted(kernels):
        gap(cursor, min(s, end))
        cursor = max(cursor, e)
        if cursor >= end:
            break
    gap(cursor, end)
    return out


def _activity(event: Any) -> str:
    kind = getattr(event, "activity_type", None)
    return kind() if callable(kind) else ""


# Kernel-name groups of a masked sampler's call (first match wins; the rest under ``other``):
# attention first (PSA's ``_na_fwd``; cuDNN's ``..._sdpa_..._flash_...`` kernels also carry
# ``sm90``), then Inductor's fused elementwise kernels, then the matmuls.
KERNEL_GROUPS = (
    ("attention", ("_na_fwd", "sdpa", "flash", "fmha", "attention")),
    ("inductor kernels", ("triton_",)),
    ("matmuls", ("nvjet", "gemm", "cutlass", "cublas", "xmma", "sm90_", "sm80_")),
)


def profile_call(
    sampler: Sampler, labels: torch.Tensor, device: torch.device, precision: str
) -> dict[str, Any]:
    """One sampling call under torch.profiler: time per phase (exclusive; GPU kernel time on CUDA,
    CPU time on the CPU), and on CUDA the GPU idle time (wall - union of kernels, and by the phase
    in which each gap began) and top kernels.

    The profiler's raw (C++) events are read directly: ``prof.events()`` builds a Python
    FunctionEvent tree (~80 us per event on a slow CPU) and one graphed CASMAR-B / MAR-B call
    runs hundreds of thousands of kernels (the 2026-12-03 H200 run's profiles never finished
    within their time limits; this is the likely cause). A kernel is filed under the innermost
    phase range open when the CPU-side op it is linked to started; the kernels of CUDA-graph
    replays are linked to none (the 2026-12-03 profiles filed 77-86% of the GPU time as
    "unattributed"), so on the GPU every range synchronises before it closes and those kernels
    go to the range open when they started. The synchronisation costs the profiled call some
    wall time (idle), not kernel time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    m = sampler.model
    on_gpu = device.type == "cuda"
    ranges = _Ranges(sync=on_gpu)
    ranges.wrap(m, "sample_scaffold", "stage1", scope=True)
    ranges.wrap(m, "sample_refine", "stage2", scope=True)
    ranges.wrap(m, "forward_encoder", "transformer")
    ranges.wrap(m, "forward_decoder", "transformer")
    ranges.wrap(m.diffloss, "sample", "mlp_head")
    ranges.wrap(getattr(m, "cond_diffloss", None), "sample", "dit_head")
    ranges.wrap(m, "_sams", "saliency")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    time_one = timer(device)
    try:
        with profile(activities=activities) as prof:
            with torch.profiler.record_function("sampling"), autocast(device, precision), torch.no_grad():
                wall = time_one(lambda: sampler.tokens(labels))
    finally:
        ranges.restore()
    names = ranges.names | {"sampling"}
    spans: list[tuple[int, int, str]] = []  # the phase ranges (CPU side)
    op_start: dict[int, int] = {}  # correlation id of every CPU-side op / range -> its start (ns)
    kernels: list[tuple[int, int, str, int]] = []  # (start, end, name, linked op) on the GPU
    host_waits = 0  # the host waiting for one stream: what a read of a GPU value (.item(), a
    # count, a boolean gather) costs; the phase ranges' own syncs are device-wide, not counted
    for ev in prof.profiler.kineto_results.events():
        name, kind = ev.name(), ev.device_type()
        if kind == DeviceType.CPU and name == "cudaStreamSynchronize":
            host_waits += 1
        if kind == DeviceType.CPU:
            if ev.linked_correlation_id() == 0:  # an op or a range (runtime calls are linked)
                op_start[ev.correlation_id()] = ev.start_ns()
            if name in names:
                spans.append((ev.start_ns(), ev.start_ns() + ev.duration_ns(), name))
        elif kind == DeviceType.CUDA and name not in names and name not in _CUPTI_OVERHEAD:
            if _activity(ev) in _NOT_KERNELS:
                continue
            start = ev.start_ns()
            kernels.append((start, start + ev.duration_ns(), name, ev.linked_correlation_id()))
    exclusive: dict[str, float] = {}
    by_group: dict[str, float] = {}
    if on_gpu:  # one walk over the kernels: each phase's time is the sum of its groups
        by_group = _kernel_time_by_phase(spans, op_start, kernels, names, unlinked_by_start=True,
                                         group=lambda name: group_of(name, KERNEL_GROUPS))  # fmt: skip
        for key, ms in by_group.items():
            phase = key.rpartition(" / ")[0]
            exclusive[phase] = exclusive.get(phase, 0.0) + ms
    else:
        totals: dict[str, float] = {}
        for start, end, name in spans:
            totals[name] = totals.get(name, 0.0) + (end - start) / 1e6
        for name, t in totals.items():
            parent = "" if name == "sampling" else name + "/"
            children = [
                c for c in totals if c != "sampling" and c.startswith(parent) and "/" not in c[len(parent) :]
            ]
            exclusive[_phase_key(name, names)] = t - sum(totals[c] for c in children)
    by_name: dict[str, float] = {}
    for start, end, name, _ in kernels:
        by_name[name] = by_name.get(name, 0.0) + (end - start) / 1e6
    busy = _union_us([(s, e) for s, e, _, _ in kernels]) / 1e6
    top = [sp for sp in spans if sp[2] == "sampling"]
    idle_by_phase = (
        _idle_by_phase(spans, kernels, names, top[0][0], top[0][1]) if on_gpu and kernels and top else {}
    )
    return {
        "clock": "GPU" if on_gpu else "CPU",
        "wall_ms": wall,
        "busy_ms": busy if kernels else None,
        "kernel_ms": sum(by_name.values()),
        "idle_ms": wall - busy if kernels else None,
        "idle_by_phase_ms": dict(sorted(idle_by_phase.items(), key=lambda kv: -kv[1])),
        "phases_ms": dict(sorted(exclusive.items())),
        "phase_groups_ms": dict(sorted(by_group.items())),
        "top_kernels_ms": sorted(by_name.items(), key=lambda kv: -kv[1])[:15],
        "kernels": len(kernels),
        "host_waits": host_waits if on_gpu else None,
    }


def print_profile(tag: str, prof: dict[str, Any]) -> None:
    wall = prof["wall_ms"]
    clock = prof["clock"]
    print(f"\nprofile of one call, {tag}")
    print(f"({clock} ms under torch.profiler; wall {wall:.0f} ms, profiler overhead included)")
    print(f"| phase | {clock} ms | share of wall |")
    print("|---|---|---|")
    for name, ms in prof["phases_ms"].items():
        print(f"| {name} | {ms:.1f} | {ms / wall:.1%} |")
    if prof["idle_ms"] is not None:
        print(
            f"| GPU idle (wall - union of kernels) | {prof['idle_ms']:.1f} | {prof['idle_ms'] / wall:.1%} |"
        )
        waits = prof.get("host_waits")
        print(f"({prof['kernels']} kernels, busy {prof['busy_ms']:.1f} ms; the host waited on a stream "
              f"{'-' if waits is None else waits} times: reads of GPU values)")
        idle = prof.get("idle_by_phase_ms") or {}
        if idle:  # where the GPU waited: the range open when each gap between kernels began
            print("GPU idle by phase (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in idle.items()))
    groups = {k: v for k, v in (prof.get("phase_groups_ms") or {}).items() if v >= 1.0}
    if groups:  # what each phase's kernel time is made of
        print("GPU ms by phase and kernel group: " + ", ".join(f"{k} {v:.1f}" for k, v in groups.items()))
    if prof["top_kernels_ms"]:
        print("top kernels (GPU ms):")
    for name, ms in prof["top_kernels_ms"]:
        print(f"  {ms:9.1f}  {name[:110]}")


# ----------------------------------------------------------------------------- cases


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    scale = max(1.0, b.float().abs().max().item())
    d = (a.float() - b.float()).abs() / scale
    return d.max().item(), d.mean().item()


def variants(args: argparse.Namespace, device: torch.device) -> list[tuple[bool, bool]]:
    """(graphs, compiled) cases in run order: uncompiled first (compiling cannot be undone),
    graphs before eager (the eager case then needs no warm-up of its own); with both switches
    on ``both``, the eager case runs uncompiled only. ``--profile`` runs after the uncompiled
    cases, before the first compile."""
    graph_modes = {"on": [True], "off": [False], "both": [True, False]}[args.cuda_graph]
    choice = args.compile if args.compile != "auto" else ("on" if device.type == "cuda" else "off")
    compile_modes = {"on": [True], "off": [False], "both": [False, True]}[choice]
    if device.type != "cuda":
        graph_modes = [False]  # the graph path is GPU-only; CPU always samples eagerly
    return [(g, c) for c in compile_modes for g in graph_modes if not (c and not g and len(graph_modes) > 1)]


def run_cases(
    samplers: list[Sampler],
    args: argparse.Namespace,
    device: torch.device,
    precision: str,
    meta: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Time every sampler in every (graphs, compiled) variant; print one line per case. Each
    variant's tokens are compared with the sampler's first variant (same seed). The rows go to
    ``args.json`` (with ``meta``) after every case, so a run cut short keeps what it measured."""
    time_one = timer(device)
    rows: list[dict[str, Any]] = []
    reference: dict[int, tuple[str, torch.Tensor]] = {}
    compiled = False
    for graphs, compile_now in variants(args, device):
        if compile_now and not compiled:
            if args.profile and rows:  # after the uncompiled rows, before a compile that may overrun
                profile_first(samplers[0], rows, args, device, precision, meta)
            for model in {id(s.model): s.model for s in samplers}.values():
                modes = {"block_mode": args.compile_mode, "head_mode": args.head_compile_mode}
                model.compile_sampler(backend=args.compile_backend, **modes)
            compiled = True
        for i, sampler in enumerate(samplers):
            model = sampler.model
            labels = torch.arange(args.batch, device=device) % model.num_classes
            set_graphs(model, graphs)
            reset_peak(device)
            result: dict[str, torch.Tensor] = {}

            def run(result: dict = result, sampler: Sampler = sampler, labels: torch.Tensor = labels) -> None:
                with torch.no_grad(), autocast(device, precision):
                    result["tokens"] = sampler.tokens(labels)

            # warm up the first case of a sampler, and every graph / compiled case (capture, compile)
            warm = args.sample_warmup if (graphs or compiled or i not in reference) else 0
            first_ms = [time_one(run) for _ in range(warm)]
            reps = args.sample_reps if graphs or device.type != "cuda" else max(1, args.eager_reps)
            med, times = measure(run, time_one, 0, reps)
            tokens = result["tokens"]
            flops = sampler.flops
            with torch.no_grad(), autocast(device, precision):
                dec, _ = measure(lambda t=tokens, s=sampler: s.decode(t), time_one, 1, 3)
            row = {
                "case": sampler.label,
                "graphs": graphs if device.type == "cuda" else None,
                "compiled": compiled,
                "batch": args.batch,
                "median_ms": med,
                "times_ms": times,
                "warmup_ms": first_ms,
                "images_per_s": args.batch / (med / 1e3),
                "flops": flops,
                "tflops_per_s": flops["total"] / (med / 1e3) / 1e12,
                "decode_ms": dec,
                "peak_gb": peak_gb(device),
                "captures": graph_captures(model) if device.type == "cuda" else {},
            }
            if args.peak_tflops and device.type == "cuda":
                row["share_of_peak"] = row["tflops_per_s"] / args.peak_tflops
                row["floor_images_per_s"] = args.batch / (flops["total"] / (args.peak_tflops * 1e12))
            rows.append(row)
            print(format_row(row), flush=True)
            if i not in reference:
                reference[i] = (variant_name(row), tokens)
            else:
                name, ref = reference[i]
                mx, mean = _rel_diff(tokens, ref)
                exact = torch.equal(tokens, ref)
                row["vs_first_variant"] = {"variant": name, "exact": exact, "rel_max": mx, "rel_mean": mean}
                print(f"  tokens vs {name} (same seed): exact {exact}, rel max {mx:.3g}, rel mean {mean:.3g}")
            write_json(args.json, rows, meta or {})
    if args.profile and not any("profile" in r for r in rows):  # a single variant
        profile_first(samplers[0], rows, args, device, precision, meta)
    for sampler in samplers:
        set_graphs(sampler.model, True)
    return rows


def profile_first(
    sampler: Sampler,
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    device: torch.device,
    precision: str,
    meta: dict[str, Any] | None,
) -> None:
    """Profile one more call of ``sampler`` in its first variant (graphs where they were on)."""
    first = next(r for r in rows if r["case"] == sampler.label)
    set_graphs(sampler.model, bool(first["graphs"]))
    labels = torch.arange(args.batch, device=device) % sampler.model.num_classes
    try:
        first["profile"] = profile_call(sampler, labels, device, precision)
    except Exception as e:  # noqa: BLE001 - a profiler failure must not cost the variants after it
        first["profile"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"\nprofile of one call, {sampler.label}: failed ({first['profile']['error']})", flush=True)
    else:
        print_profile(f"{sampler.label} ({variant_name(first)})", first["profile"])
        busy = first["profile"].get("busy_ms")
        if busy is not None:
            # the profiler slows the host, not the kernels: the timed calls' median minus the
            # profiled call's kernel time estimates the GPU idle of an unprofiled call
            est = first["median_ms"] - busy
            first["profile"]["idle_unprofiled_est_ms"] = est
            print(f"GPU idle without the profiler, estimated: median {first['median_ms']:.0f} ms - kernels "
                  f"{busy:.0f} ms = {est:.0f} ms ({est / first['median_ms']:.1%})")
    write_json(args.json, rows, meta or {})


def variant_name(row: dict[str, Any]) -> str:
    return ("graphs" if row["graphs"] else "eager") + ("+compiled" if row["compiled"] else "")


def format_row(row: dict[str, Any]) -> str:
    graphs = f" [{variant_name(row)}]"
    peak = "-" if row["peak_gb"] is None else f"{row['peak_gb']:.1f}"
    share = f" ({row['share_of_peak']:.0%} of peak)" if "share_of_peak" in row else ""
    t = row["times_ms"]
    return " | ".join(
        [
            f"sample {row['case']} B={row['batch']}{graphs}",
            f"{row['median_ms']:.0f} ms",
            f"{row['images_per_s']:.2f} img/s",
            f"{row['flops']['total'] / 1e15:.4g} PFLOP, {row['tflops_per_s']:.4g} TFLOP/s{share}",
            f"decode {row['decode_ms']:.0f} ms",
            peak,
            f"min {min(t):.0f} / max {max(t):.0f} ms, n={len(t)}",
        ]
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print("| case | tokens ms | images/s | PFLOP | TFLOP/s | floor img/s | decode ms | peak GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "flops" not in r:
            continue
        graphs = f", {variant_name(r)}"
        floor = f"{r['floor_images_per_s']:.1f}" if "floor_images_per_s" in r else "-"
        share = f" ({r['share_of_peak']:.0%})" if "share_of_peak" in r else ""
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        print(
            f"| {r['case']}, B {r['batch']}{graphs} | {r['median_ms']:.0f} | {r['images_per_s']:.2f} | "
            f"{r['flops']['total'] / 1e15:.4g} | {r['tflops_per_s']:.4g}{share} | {floor} | "
            f"{r['decode_ms']:.0f} | {peak} |"
        )
    parts = {tuple(r["flops"]) for r in rows if "flops" in r}
    for keys in parts:
        r = next(r for r in rows if "flops" in r and tuple(r["flops"]) == keys)
        split = ", ".join(f"{k} {v / 1e15:.4g}" for k, v in r["flops"].items() if k != "total")
        print(f"FLOPs of {r['case']} (PFLOP, counted from its first call's trace): {split}")


# ----------------------------------------------------------------------------- command line


def add_common_args(ap: argparse.ArgumentParser, preset: str) -> None:
    ap.add_argument("--preset", default=preset)
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--batch", type=int, default=64, help="images per call (CFG doubles the rows)")
    ap.add_argument(
        "--num-sampling-steps", default=None, help="MLP-head diffusion steps (default: the preset's)"
    )
    ap.add_argument("--sample-reps", type=int, default=3, help="timed calls per case")
    ap.add_argument("--sample-warmup", type=int, default=1, help="untimed calls per case (captures graphs)")
    ap.add_argument(
        "--eager-reps", type=int, default=1, help="timed calls of the eager case (--cuda-graph both)"
    )
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument(
        "--cuda-graph",
        default="on",
        choices=("on", "off", "both"),
        help="CUDA graphs for the diffusion heads' chains (GPU only); both: time both and compare tokens",
    )
    ap.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off", "both"),
        help="torch.compile the transformer blocks and the heads' steps (model.compile_sampler()); "
        "auto = on on CUDA, as sampling's default",
    )
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: tests)")
    ap.add_argument(
        "--linears",
        default="fp32",
        choices=("fp32", "low"),
        help="low: the generator's linears stored in the autocast dtype first (model.cast_linears_(), "
        "as maskar sample does on CUDA); fp32: as model.generate leaves them",
    )
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "max-autotune-no-cudagraphs"),
        help="torch.compile mode of the transformer blocks",
    )
    ap.add_argument(
        "--head-compile-mode",
        default="default",
        choices=("default", "max-autotune-no-cudagraphs"),
        help="torch.compile mode of the diffusion heads' network steps (the posterior keeps the default)",
    )
    ap.add_argument(
        "--linear-act",
        default="env",
        choices=("env", "on", "off"),
        help="the MLPs' fc1 + GELU through the Triton op with the GELU in the matmul's epilogue "
        "(maskar.kernels.linear_act; tuned per shape against cuBLAS + the separate GELU); env: as "
        "MASKAR_LINEAR_ACT says (off unless 1)",
    )
    ap.add_argument(
        "--time-table",
        default="auto",
        choices=("auto", "on", "off"),
        help="the MLP head's per-step time embedding read from a table (DiffLoss.time_table; auto: on CUDA)",
    )
    ap.add_argument(
        "--fused-head",
        default="env",
        choices=("env", "on", "off"),
        help="the MLP head's residual blocks as two Triton kernels each (DiffLoss.fused_blocks, "
        "maskar.kernels.adaln_mlp); env: as MASKAR_HEAD_FUSED says (off unless 1)",
    )
    ap.add_argument(
        "--defer-adds",
        default="on",
        choices=("on", "off"),
        help="compiled sampling: each block's last residual add fused into the next block's graph "
        "(model.defer_residual_adds; off: the add ends each block)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="profile one more call of the first sampler, first variant"
    )
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="matmul peak for the floor (0 = none)")
    ap.add_argument("--json", default=None, help="write the rows to this file")


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch", "sample_reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.sample_warmup < 0 or args.peak_tflops < 0:
        ap.error("--sample-warmup and --peak-tflops: expected >= 0")


def build(args: argparse.Namespace, device: torch.device) -> tuple[Any, torch.nn.Module, str]:
    """(config, model on device in eval mode, precision) for ``args.preset``."""
    from maskar.nn.attention import set_backend

    precision = args.precision if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = load_config(args.preset)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    set_backend(model, args.attention_backend)
    apply_linears(model, getattr(args, "linears", "fp32"), precision)
    apply_switches(model, args)
    return cfg, model, precision


def apply_switches(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """``--linear-act`` (process-wide), ``--defer-adds`` (the model), ``--fused-head`` and
    ``--time-table`` (every head); ``env`` / ``auto`` leave them as they are."""
    from maskar.nn import linear_gelu

    if getattr(args, "linear_act", "env") != "env":
        linear_gelu.enable_triton(args.linear_act == "on")
    model.defer_residual_adds = getattr(args, "defer_adds", "on") == "on"
    fused = getattr(args, "fused_head", "env")
    if fused != "env":
        for m in model.modules():
            if hasattr(m, "set_fused_blocks"):
                m.set_fused_blocks(fused == "on")
    table = getattr(args, "time_table", "auto")
    for m in model.modules():
        if hasattr(type(m), "time_table"):
            m.time_table = {"auto": "auto", "on": True, "off": False}[table]


def switches(model: torch.nn.Module) -> dict[str, Any]:
    """What the sampler runs with, for the header and the JSON."""
    from maskar.nn import linear_gelu

    tables = sorted({str(m.time_table) for m in model.modules() if hasattr(type(m), "time_table")})
    # per tanh-GELU MLP: its default or MASKAR_FUSED_GELU's override (maskar.nn.linear_gelu)
    epilogue = sorted({linear_gelu.epilogue_on(m.gelu_epilogue) for m in model.modules()
                       if hasattr(m, "gelu_epilogue") and getattr(m.act, "approximate", "") == "tanh"})
    fused = sorted({bool(m.fused_blocks) for m in model.modules() if hasattr(m, "fused_blocks")})
    out = {"linear_act": linear_gelu.TRITON and linear_gelu._kernel is not None,
           "fused_gelu_cublaslt": epilogue, "time_table": ",".join(tables) or "-",
           "defer_adds": getattr(model, "defer_residual_adds", None),
           "fused_head": fused}
    if hasattr(model, "cond_diffloss"):  # CASMAR's DiT blocks (MASKAR_DIT_* switches, _PSA_QKV)
        from maskar.models.casmar import DiTBlock
        from maskar.nn.proximal_attention import ProximalAttention2D

        on_cuda = next(model.parameters()).is_cuda
        out.update(dit_modulate_kernel=DiTBlock.modulate_kernel, dit_residual_kernel=DiTBlock.residual_kernel,
                   psa_fused_qkv=ProximalAttention2D.uses_fused_qkv(on_cuda),
                   dit_low_residual=DiTBlock.low_residual)
    return out


def apply_linears(model: torch.nn.Module, linears: str, precision: str) -> None:
    """``--linears low``: the generator's linears stored in the autocast dtype (fp32 runs: none)."""
    if linears == "low" and precision != "fp32":
        model.cast_linears_(low_precision_dtype(precision))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def print_header(name: str, argv: list[str] | None, model: torch.nn.Module, args, device, precision) -> None:
    print(f"command: python -m maskar bench {name} " + " ".join(sys.argv[1:] if argv is None else argv))
    versions = f"torch {torch.__version__}  CUDA {torch.version.cuda}"
    print(f"device: {device_name(device)}  {versions}  precision {precision}")
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("tokenizer."))
    print(
        f"model: {args.preset} ({n_params / 1e6:.1f}M params without the tokenizer), {model.image_size} px, "
        f"{model.seq_len} tokens, random weights, attention {args.attention_backend}; "
        f"timed: sample_tokens (tokens only), decode apart"
    )
    print("switches: " + ", ".join(f"{k} {v}" for k, v in switches(model).items()))


def write_json(path: str | None, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


# ----------------------------------------------------------------------------- targets (issue 15)


def best_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fastest variant of every sampling case, by case label."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "flops" in r and (r["case"] not in best or r["images_per_s"] > best[r["case"]]["images_per_s"]):
            best[r["case"]] = r
    return best


def print_targets(paths: list[str]) -> None:
    """The sampling targets against the rows of ``--json`` files of bench mar / bench casmar."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            print(f"(no rows in {path})")
            continue
        rows += [dict(r, preset=data["meta"]["preset"]) for r in data["rows"]]
    best = best_rows(rows)

    def find(preset: str, prefix: str) -> dict[str, Any] | None:
        return next(
            (r for r in best.values() if r["preset"] == preset and r["case"].startswith(prefix)), None
        )

    cas = find("casmar-b", "num_iter=4 ")
    mar64, mar256 = find("mar-b", "num_iter=64 "), find("mar-b", "num_iter=256 ")
    print("\n| target | measured (fastest variant) | met |")
    print("|---|---|---|")

    def line(name: str, row: dict[str, Any] | None, goal: float) -> None:
        if row is None:
            print(f"| {name} | not measured | - |")
            return
        ips = row["images_per_s"]
        share = f", {row['share_of_peak']:.0%} of peak" if "share_of_peak" in row else ""
        tf = f"{row['tflops_per_s']:.0f} TFLOP/s{share}, {variant_name(row)}"
        print(f"| {name} >= {goal:g} img/s | {ips:.2f} img/s ({tf}) | {'yes' if ips >= goal else 'NO'} |")

    line("CASMAR-B, official settings", cas, 11.0)
    line("MAR-B num_iter 64", mar64, 20.0)
    line("MAR-B num_iter 256", mar256, 6.0)
    if cas and mar256:
        ratio = cas["images_per_s"] / mar256["images_per_s"]
        print(f"| CASMAR-B / MAR-B num_iter 256 >= 1.8 | {ratio:.2f} | {'yes' if ratio >= 1.8 else 'NO'} |")
    for r in rows:
        cmp = r.get("vs_first_variant")
        if cmp:
            print(
                f"| tokens {r['preset']} {r['case'].split(' cfg')[0]}: {variant_name(r)} vs {cmp['variant']} "
                f"| exact {cmp['exact']}, rel max {cmp['rel_max']:.2g} | - |"
            )


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main` (tests parse documented commands with it)."""
    ap = argparse.ArgumentParser(
        prog="maskar bench masked_sampling", description=main.__doc__.splitlines()[0], allow_abbrev=False
    )
    ap.add_argument("files", nargs="+")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``maskar bench masked_sampling FILE.json ...``: the sampling targets (issue 15) against
    the ``--json`` rows of ``maskar bench mar`` / ``maskar bench casmar``."""
    files = build_parser().parse_args(argv).files
    if not any(os.path.isfile(f) for f in files):  # one missing file of several is reported inline
        raise SystemExit(f"bench masked_sampling: no such --json file: {', '.join(files)}")
    print_targets(files)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
