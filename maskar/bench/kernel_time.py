"""GPU kernel time of a call, by kernel name (torch.profiler / CUPTI), for telling a call's
kernel time from its wall time: a call whose per-call median exceeds its kernel time is
host-bound (launches, autograd, allocation) rather than GPU-bound."""

from __future__ import annotations

from collections.abc import Callable

import torch


def kernel_ms_per_call(fn: Callable[[], object], calls: int = 10) -> dict[str, float]:
    """ms of GPU kernel time per call of ``fn``, by kernel name, over ``calls`` calls after one
    untimed call (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for ev in prof.profiler.kineto_results.events():
        if ev.device_type() == torch.autograd.DeviceType.CUDA:
            per[ev.name()] = per.get(ev.name(), 0.0) + (ev.end_ns() - ev.start_ns()) / 1e6 / calls
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


Groups = tuple[tuple[str, tuple[str, ...]], ...]


def group_of(name: str, groups: Groups) -> str:
    """The first group of ``groups`` ((name, lower-case substrings)) whose substring is in the
    kernel's name, else ``other``."""
    low = name.lower()
    return next((g for g, keys in groups if any(k in low for k in keys)), "other")


def group_by_name(per_kernel: dict[str, float], groups: Groups) -> dict[str, float]:
    """ms per group of ``groups`` (first match wins; the rest under ``other``), from ms per
    kernel name."""
    out = dict.fromkeys([g for g, _ in groups] + ["other"], 0.0)
    for name, ms in per_kernel.items():
        out[group_of(name, groups)] += ms
    return out
