"""ATen operations that launch a kernel, per region of one VAR / HMAR sampling call, on the CPU.

In a CUDA-graph replay every operation is still one kernel of at least a few microseconds, so at
the small scales (a handful of tokens) a scale's time is about its operation count times that
floor. The count depends on the model's depth, the scale schedule, the refinement passes and the
row chunks, not on the width, so a narrow model of the same structure counts in seconds:

    .venv/bin/python scripts/sampling_op_counts.py hmar-d16 var-d16      # 256 px, B 64

prints, per model, the operations of each scale (s00 ... s09) and of the decode, then the
regions of the scales with refinement passes. Views and allocations are not counted (they launch
nothing). This counts the torch path the CPU runs (the GPU's fused q/k norm, GroupNorm and draw
make a few operations fewer; `modes=compiled` far fewer).
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The structure of the preset, at a width where the CPU runs a call in seconds.
NARROW = ["model.width=64", "model.heads=2", "model.tokenizer.ch=32", "model.num_classes=10"]


# Operations that launch no kernel: allocations and aliases (views are skipped by their schema).
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh"}  # fmt: skip


class _Count(TorchDispatchMode):
    """Counts the operations that would launch a kernel: not a view, not an allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
            self.n += 1
        return func(*args, **(kwargs or {}))


def count(preset: str, res: int = 256, batch: int = 64) -> OrderedDict[str, int]:
    """Operations per profiling region (``s03 blocks``, ``s02 refine1``, ``decode``, ...) of one call."""
    import maskar.models.var as var
    from maskar.bench.sample import _parse, build_case, case_overrides, sampling_knobs

    opts = _parse([])
    model, cfg = build_case(preset, case_overrides(preset, res, 2) + NARROW, torch.device("cpu"), "sdpa")
    knobs = sampling_knobs(model, cfg, opts)
    counter, marks = _Count(), []
    saved = var.mark
    var.mark = lambda device: counter.n  # each region's end: the operations so far
    model.profile_marks = marks
    try:
        with torch.no_grad(), counter:
            model.generate(torch.arange(batch) % 10, seed=0, **knobs)
    finally:
        var.mark, model.profile_marks = saved, None
    regions: OrderedDict[str, int] = OrderedDict()
    prev = 0
    for name, n in marks:
        regions[name] = regions.get(name, 0) + n - prev
        prev = n
    return regions


def per_scale(regions: OrderedDict[str, int]) -> OrderedDict[str, int]:
    out: OrderedDict[str, int] = OrderedDict()
    for name, n in regions.items():
        key = name.split(" ")[0]
        out[key] = out.get(key, 0) + n
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("presets", nargs="+", help="VAR / HMAR presets, e.g. hmar-d16 var-d16")
    ap.add_argument("--res", type=int, default=256, choices=(256, 512, 1024))
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args(argv)
    if a.batch < 1:
        print(f"sampling_op_counts: --batch: expected >= 1, got {a.batch}", file=sys.stderr)
        return 2
    for preset in a.presets:
        regions = count(preset, a.res, a.batch)
        scales = per_scale(regions)
        print(f"{preset} {a.res} px B {a.batch}: {sum(regions.values())} operations")
        print("  " + "  ".join(f"{k} {v}" for k, v in scales.items()))
        refined = {k.split(" ")[0] for k in regions if " refine" in k}
        for name, n in regions.items():
            if name.split(" ")[0] in refined:
                print(f"    {name}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
