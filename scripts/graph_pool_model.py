"""How much memory a next-scale sampler's CUDA-graph pool reserves, modelled on the CPU.

Two parts:

1. ``trace``: one eager ``model.generate`` of a VAR / HMAR preset on the ``meta`` device (shapes
   only, seconds even for 1024 px), recording every tensor allocation and free in order. CUDA's
   bf16 autocast does not exist on ``meta``, so it is emulated at the aten level: the matmuls and
   convolutions get bf16 copies of their float inputs, the norms and softmaxes float32 ones, as
   autocast's cast lists do. The attention call is replaced by an output of its size (what the
   fused kernels allocate); the noise of the categorical draws is tagged ("noise"), so that its
   share can be reported (the graphs draw it inside the pool, one transient (rows, V) tensor per
   draw, so a replay counts it; it used to live in a static buffer outside the pool).
2. ``Pool``: a model of PyTorch's CUDA caching allocator for one pool and one stream (512 B
   rounding; blocks of at most 1 MiB from 2 MiB segments; larger requests from 20 MiB segments
   below 10 MiB and from segments rounded to 2 MiB above; best fit; a split when more than the
   small size is left; neighbours merged on free; a new segment when nothing fits). Replaying a
   trace through it gives the segments the graphs' pool ends up holding, with and without one
   reserved segment of the live peak allocated first (what ``maskar.models.scale_graphs`` does).

    .venv/bin/python scripts/graph_pool_model.py hmar-d16:1024:8 var-d16:1024:8 hmar-d16:256:64 var-d16:256:64

What it leaves out: Inductor's fusions (``compile_sampler``: fewer, not larger, temporaries),
cuBLAS / cuDNN workspaces, and the default pool (weights, the returned images).
Since 2026-12-05 it runs what the GPU runs by default where that differs from the CPU: the fused
GroupNorm + SiLU (one output) and the one-kernel draw (ids out, no temporaries). Its figures are
the pool's, to be compared with the ``memory_by_pool`` line of ``maskar bench sample`` on a GPU.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(n: int) -> int:
    return MIN_BLOCK if n < MIN_BLOCK else -(-n // MIN_BLOCK) * MIN_BLOCK


def segment_size(n: int) -> int:
    if n <= SMALL_SIZE:
        return SMALL_BUFFER
    if n < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-n // ROUND_LARGE) * ROUND_LARGE


class Pool:
    """Segments and free blocks of one allocator pool (see the module docstring for the rules)."""

    def __init__(self) -> None:
        self.free: dict[bool, list[tuple[int, int, int]]] = {
            True: [],
            False: [],
        }  # small? -> (size, seg, off)
        self.segments: list[dict[int, list]] = []  # per segment: offset -> [size, in use]
        self.reserved = 0

    def add_segment(self, n: int, small: bool = False) -> None:
        self.segments.append({0: [n, False]})
        self.reserved += n
        bisect.insort(self.free[small], (n, len(self.segments) - 1, 0))

    def malloc(self, n: int) -> tuple[bool, int, int]:
        n = round_size(n)
        small = n <= SMALL_SIZE
        free = self.free[small]
        i = bisect.bisect_left(free, (n, -1, -1))
        if i == len(free):
            self.add_segment(segment_size(n), small)
            i = bisect.bisect_left(free, (n, -1, -1))
        size, seg, off = free.pop(i)
        blocks, rest = self.segments[seg], size - n
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:
            blocks[off] = [n, True]
            blocks[off + n] = [rest, False]
            bisect.insort(free, (rest, seg, off + n))
        else:
            blocks[off] = [size, True]
        return small, seg, off

    def release(self, handle: tuple[bool, int, int]) -> None:
        small, seg, off = handle
        blocks, free = self.segments[seg], self.free[small]
        size = blocks[off][0]
        after = off + size
        if after in blocks and not blocks[after][1]:
            free.remove((blocks[after][0], seg, after))
            size += blocks.pop(after)[0]
        before = next((o for o, (s, _) in blocks.items() if o + s == off), None)
        if before is not None and not blocks[before][1]:
            free.remove((blocks[before][0], seg, before))
            size += blocks[before][0]
            del blocks[off]
            off = before
        blocks[off] = [size, False]
        bisect.insort(free, (size, seg, off))


def replay(events: list, reserve: int = 0, skip: tuple[str, ...] = ()) -> dict[str, int]:
    """Run a trace through a fresh pool: the pool's reserved bytes and the live peak. Allocations
    tagged with a name in ``skip`` are left out (``skip=("noise",)``: the pool as it was while
    the noise lived outside it)."""
    pool, handles, sizes, live, peak = Pool(), {}, {}, 0, 0
    if reserve:
        pool.add_segment(reserve)
    for k, (n, tag) in enumerate(events):
        if n >= 0:
            if n == 0 or tag in skip:
                continue
            handles[k], sizes[k] = pool.malloc(n), round_size(n)
            live += sizes[k]
            peak = max(peak, live)
        elif (j := -n - 1) in handles:
            pool.release(handles.pop(j))
            live -= sizes.pop(j)
    return {"reserved": pool.reserved, "peak": peak, "left": live}


# --- the trace -------------------------------------------------------------------------------

_aten = torch.ops.aten
_LOW = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten.convolution.default,
}
_HIGH = {_aten.native_layer_norm.default, _aten._softmax.default, _aten._log_softmax.default,
         _aten.native_group_norm.default}  # fmt: skip


class _Tracer(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[list] = []
        self.live: dict[int, int] = {}
        self.autocast = [True]
        self.tag: str | None = None

    def record(self, t: torch.Tensor, tag: str) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        k = len(self.events)
        self.live[key] = k
        self.events.append([st.nbytes(), self.tag or tag])
        weakref.finalize(
            st, lambda k=k, key=key: (self.events.append([-k - 1, ""]), self.live.pop(key, None))
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten._local_scalar_dense.default:
            return 0  # a host read of a meta tensor: the values do not matter for sizes
        if self.autocast[-1] and (func in _LOW or func in _HIGH):
            want = torch.bfloat16 if func in _LOW else torch.float32

            def cast(x):
                if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != want:
                    y = x.to(want)
                    self.record(y, "autocast")
                    return y
                return x

            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        inputs = {
            x.untyped_storage()._cdata for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if (
                isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs
            ):  # views are not allocations
                self.record(t, func.__name__)
        return out


def trace(preset: str, res: int, batch: int) -> list[list]:
    """Allocation events of one eager bf16 sampling call: [bytes, op] or [-(k + 1), ''] (free of k)."""
    import maskar.models.scale_graphs as scale_graphs
    import maskar.models.var as var
    import maskar.nn.sampling as sampling
    import maskar.tokenizers.common as common
    from maskar.bench.sample import _parse, build_case, case_overrides, sampling_knobs

    opts = _parse([])
    model, cfg = build_case(
        preset, case_overrides(preset, res, int(opts["hmar_stage"])), torch.device("meta"), "sdpa"
    )
    model.cast_linears_(torch.bfloat16)  # what maskar sample does
    model.decode_precision = "bf16"
    knobs = sampling_knobs(model, cfg, opts)
    tracer = _Tracer()

    real_autocast = torch.autocast

    class MetaAutocast(contextlib.ContextDecorator):
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            self.real = (
                None if device_type == "meta" else real_autocast(device_type, dtype=dtype, enabled=enabled)
            )
            self.enabled = enabled

        def __enter__(self):
            if self.real is not None:
                return self.real.__enter__()
            tracer.autocast.append(self.enabled)
            return self

        def __exit__(self, *exc):
            if self.real is not None:
                return self.real.__exit__(*exc)
            tracer.autocast.pop()
            return False

    def attention(q, k, v, *args, **kwargs):
        dtype = torch.bfloat16 if tracer.autocast[-1] else q.dtype
        return torch.empty(*q.shape[:-1], v.shape[-1], dtype=dtype, device=q.device)

    noise_call = scale_graphs.NoiseSource.__call__

    def tagged_noise(self, rows):
        tracer.tag = "noise"
        try:
            return noise_call(self, rows)
        finally:
            tracer.tag = None

    class FusedGroupNorm:  # the CUDA op's one output (the torch path makes two: norm, SiLU)
        @staticmethod
        def supports(x, *args, **kwargs):
            return True

        @staticmethod
        def group_norm_act(x, *args, nchw_out=False, **kwargs):
            return torch.empty(x.shape, dtype=x.dtype, device=x.device) if nchw_out else torch.empty_like(x)

    class KernelDraw:  # the one-kernel draw reads logits and noise and writes the ids alone
        @staticmethod
        def supports(x, noise, uncond=None):
            return True

        @staticmethod
        def draw(x, noise, *args, **kwargs):
            return torch.empty(x.shape[0], dtype=torch.long, device=x.device)

    patches = [
        (torch, "autocast", MetaAutocast),
        (F, "scaled_dot_product_attention", attention),
        (var, "make_generator", lambda seed, device: None),
        (scale_graphs.NoiseSource, "__call__", tagged_noise),
        (common, "_group_norm_kernel", FusedGroupNorm),
        (sampling, "_categorical", lambda: KernelDraw if model.sampler == "triton" else None),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        labels = torch.arange(batch, device="meta") % model.num_classes
        with torch.no_grad(), tracer:
            images = model.generate(labels, seed=0, **knobs)
            del images
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    return tracer.events


def _case_problem(case: str) -> str | None:
    """Why ``case`` (preset:resolution:batch) cannot be traced, or None."""
    from maskar.config import load_config
    from maskar.config_base import ConfigError
    from maskar.tokenizers.vqvae import PATCH_NUMS

    parts = case.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[2]) < 1:
        return "expected preset:resolution:batch with a positive batch, e.g. hmar-d16:1024:8"
    preset, res = parts[0], int(parts[1])
    try:
        cfg = load_config(preset)
    except ConfigError as e:
        return str(e)
    if cfg.model.arch not in ("var", "hmar"):
        return f"preset {preset} is a {cfg.model.arch} model; the graphs' pool is VAR / HMAR sampling's"
    if res != int(cfg.model.tokenizer.resolution) and res not in PATCH_NUMS:
        native = cfg.model.tokenizer.resolution
        return f"resolution {res}: expected the preset's {native} or one of {sorted(PATCH_NUMS)}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", nargs="+", help="preset:resolution:batch, e.g. hmar-d16:1024:8")
    ap.add_argument(
        "--margin", type=float, default=None, help="reserve = live peak x margin (default: the runner's)"
    )
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    from maskar.models.scale_graphs import RESERVE_MARGIN, reserve_size

    margin = RESERVE_MARGIN if a.margin is None else a.margin
    if margin < 1:
        print(f"graph_pool_model: --margin {margin}: expected >= 1", file=sys.stderr)
        return 2
    cases = []
    for case in a.cases:  # every case checked before the first trace
        problem = _case_problem(case)
        if problem:
            print(f"graph_pool_model: case {case!r}: {problem}", file=sys.stderr)
            return 2
        preset, res, batch = case.split(":")
        cases.append((case, preset, int(res), int(batch)))
    rows = []
    print(f"{'case':<22} {'live peak GB':>12} {'pool GB':>8} {'reserved first GB':>18} {'pool GB then':>13}")
    for case, preset, res, batch in cases:
        events = trace(preset, res, batch)
        plain = replay(events)
        reserve = reserve_size(plain["peak"], margin)
        reserved = replay(events, reserve=reserve)
        noise = max((n for n, tag in events if tag == "noise"), default=0)
        row = {"case": case, "peak_gb": plain["peak"] / 1e9, "pool_gb": plain["reserved"] / 1e9,
               "reserve_gb": reserve / 1e9, "pool_reserved_first_gb": reserved["reserved"] / 1e9,
               "largest_noise_draw_gb": noise / 1e9, "events": len(events), "margin": margin}  # fmt: skip
        rows.append(row)
        print(f"{case:<22} {row['peak_gb']:12.2f} {row['pool_gb']:8.2f} {row['reserve_gb']:18.2f} "
              f"{row['pool_reserved_first_gb']:13.2f}")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
