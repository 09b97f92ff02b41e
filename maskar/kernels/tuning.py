"""Choosing a Triton kernel's config by timing it: shared by the ops' tuners.

Each op keeps its own ``{key: config}`` choices and a log per key; a key is timed once (its
first call outside a CUDA-graph capture), each candidate's first launch compiling it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def time_ms(launch: Callable[[], object], rounds: int = 5, per_round: int = 8) -> float:
    """Median over rounds of the mean time of back-to-back launches (keeps host gaps out)."""
    launch()  # compiles
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_round):
            launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per_round)
    return sorted(times)[len(times) // 2]


def pick_fastest(
    key: tuple, candidates: Sequence[Any], launch_with: Callable[[Any], object], tuned: dict, log: dict,
    what: str, timer: Callable[[Callable[[], object]], float] = time_ms,
) -> Any:  # fmt: skip
    """Time every candidate once for ``key``, record the fastest in ``tuned[key]`` and
    ``log[key]`` = {chosen, candidates: [(config, ms or the error's name)], seconds}. A candidate
    that fails (out of shared memory or registers, a compile error) is skipped."""
    t0 = time.perf_counter()
    best, times = None, []
    for c in candidates:
        try:
            t = timer(lambda c=c: launch_with(c))
        except Exception as e:  # noqa: BLE001 - any failure rules the candidate out
            times.append((c, type(e).__name__))
            continue
        times.append((c, t))
        if best is None or t < best[0]:
            best = (t, c)
    if best is None:
        raise RuntimeError(f"{what}: no kernel config ran for {key}")
    tuned[key] = best[1]
    log[key] = {"chosen": best[1], "candidates": times, "seconds": time.perf_counter() - t0}
    return best[1]


class Tuner:
    """One op's choices: ``choose`` returns the forced config (tests), the interpreter's, the
    config tuned for ``key`` before, the ``fallback`` inside a CUDA-graph capture (nothing is
    timed there), or else times ``fallback`` and the candidates now and keeps the fastest."""

    def __init__(self, what: str):
        self.what = what
        self.tuned: dict[tuple, Any] = {}
        self.log: dict[tuple, dict] = {}

    def configs(self) -> dict[tuple, Any]:
        """The configs chosen so far (benchmarks print them)."""
        return dict(self.tuned)

    def history(self) -> dict[tuple, dict]:
        """Per tuned key: the chosen config, (config, ms or the error's name) per candidate, seconds."""
        return {k: dict(v) for k, v in self.log.items()}

    def choose(
        self, key: tuple, candidates: Sequence[Any], launch_with: Callable[[Any], object], fallback: Any,
        forced: Any = None, interpret: Any = None,
    ) -> Any:  # fmt: skip
        if forced is not None:
            return forced
        if interpret is not None:
            return interpret
        cfg = self.tuned.get(key)
        if cfg is not None:
            return cfg
        if torch.cuda.is_current_stream_capturing():
            return fallback
        candidates = [fallback, *candidates]  # the fallback always runs, so there is a fastest
        return pick_fastest(key, candidates, launch_with, self.tuned, self.log, self.what, time_ms)
