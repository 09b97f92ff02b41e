"""CUDA graphs for next-scale sampling (VAR, HMAR): one graph per scale, replayed per call.

Every scale of a next-scale sampler has static shapes: the scale's tokens (and, for VAR, the
KV cache up to it), the number of refinement passes and the token counts they re-sample are
fixed by the batch size and the sampling knobs. So one generation is captured per
(model, batch, knobs) as K graphs, one per scale (next-scale pass, draw, refinement passes,
f_hat update), plus one for decoding, and replayed on every later call. Replays remove the
per-kernel launch cost that dominates the small scales (~400 kernels per transformer pass).
A key is captured at its second call: a one-off call (the last, smaller batch of a run)
stays eager instead of paying a capture.

What a graph cannot do is draw random numbers from the caller's ``torch.Generator``. The
sampler's randomness is one (rows, V) tensor of Exp(1) draws per categorical draw
(:func:`maskar.nn.sampling.exponential_noise`); :class:`StaticNoise` draws them with the
generator into static buffers just before each scale's replay, in the order the eager loop
draws them, so the graphs give the eager loop's tokens for the same seed.

The graphs of one runner share one memory pool and are captured in the order they replay, so
memory freed inside one (a scale's activations, VAR's KV cache after the last scale) is reused
by the next; what crosses graphs (class embeddings, f_hat, the next input, each scale's ids) is
held by the runner's :class:`~maskar.models.var.ScaleState`.

Reuse alone does not keep the pool small: the caching allocator adds a segment whenever no free
block fits a request, and a sampler's tensors grow scale by scale, so every scale adds segments
that the later, larger scales and the decoder cannot use whole. Replaying the allocations of
HMAR-d16 at 1024 px B 8 through a model of the allocator (``scripts/graph_pool_model.py``) gives
5.6 GB of segments for 1.9 GB ever live at once. So the capture first allocates and frees one
block the size of the eager warm-up's live peak: the pool starts as one segment that every
later request splits and every free merges back into (2.2 GB in the same model).
``MASKAR_GRAPH_POOL_RESERVE=0`` captures without it.

Without a GPU, ``ScaleGraphRunner(..., capture=False)`` runs the same bodies on the same static
buffers eagerly: tests compare its tokens with the eager loop's.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict

import torch
from torch import Tensor

from maskar.nn.sampling import exponential_noise

# Reserve the graphs' pool as one segment of the warm-up's live peak (module docstring).
RESERVE_POOL = os.environ.get("MASKAR_GRAPH_POOL_RESERVE", "1") != "0"


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 1.0:  # also catches nan
        raise ValueError(f"MASKAR_GRAPH_POOL_MARGIN: expected a number >= 1, got {text!r}")
    return value


# Headroom over the measured peak: the captured allocations are the warm-up's, but a best-fit
# split can leave a hole a later request does not fit (then the pool grows by a segment anyway:
# on the H200, 2026-12-05, HMAR-d16 at 1024 px B 8 still added one of 0.67 GB at 1.02).
# MASKAR_GRAPH_POOL_MARGIN overrides it (read at import), so a run can sweep it.
RESERVE_MARGIN = _margin(os.environ.get("MASKAR_GRAPH_POOL_MARGIN", "1.02"))
_SEGMENT_ROUND = 2 << 20  # the allocator rounds large segments to 2 MiB


def reserve_size(peak_bytes: int, margin: float | None = None) -> int:
    """Bytes to reserve for a measured live peak: the peak with headroom (``RESERVE_MARGIN``
    unless given), in whole 2 MiB."""
    want = int(peak_bytes * (RESERVE_MARGIN if margin is None else margin))
    return -(-want // _SEGMENT_ROUND) * _SEGMENT_ROUND if want > 0 else 0


def mark(device: torch.device):
    """A timestamp for profiling: a recorded CUDA event on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


class NoiseSource:
    """The eager sampler's randomness: fresh (rows, V) Exp(1) draws from ``generator``."""

    def __init__(self, vocab: int, generator: torch.Generator | None, device: torch.device) -> None:
        self.vocab, self.generator, self.device = vocab, generator, device

    def __call__(self, rows: int) -> Tensor:
        return exponential_noise(rows, self.vocab, self.generator, self.device)


class _RecordingNoise:
    """Warm-up noise (ones: no generator is touched) that records the rows of every draw per scale."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device
        self.plan: list[list[int]] = []

    def begin(self, si: int) -> None:
        assert si == len(self.plan)
        self.plan.append([])

    def __call__(self, rows: int) -> Tensor:
        self.plan[-1].append(int(rows))
        # A stride-0 view: under capture the noise is a view of StaticNoise's buffer, a segment
        # of its own, so the warm-up's live peak (the pool's reservation) must not count it.
        return torch.ones(1, self.vocab, device=self.device).expand(rows, self.vocab)


class StaticNoise:
    """Static (rows, V) noise views, one per draw of each scale, filled before the scale runs.

    ``plan[si]`` lists the rows of the draws of scale si in call order. The scales share one
    buffer (a scale's draws are consumed before the next scale's are drawn).
    """

    def __init__(self, plan: list[list[int]], vocab: int, device: torch.device) -> None:
        self.plan = plan
        rows = max((sum(p) for p in plan), default=0)
        self.buf = torch.empty(rows * vocab, device=device)  # float32
        self.views: list[list[Tensor]] = []
        for draws in plan:
            views, off = [], 0
            for r in draws:
                views.append(self.buf[off * vocab : (off + r) * vocab].view(r, vocab))
                off += r
            self.views.append(views)
        self.si, self.k = 0, 0

    def begin(self, si: int) -> None:
        self.si, self.k = si, 0

    def __call__(self, rows: int) -> Tensor:
        views = self.views[self.si]
        if self.k >= len(views) or views[self.k].shape[0] != rows:
            raise RuntimeError(
                f"sampling graph: scale {self.si} asked for draw {self.k} of {rows} rows; the recorded "
                f"plan is {self.plan[self.si]}"
            )
        self.k += 1
        return views[self.k - 1]

    def fill(self, si: int, generator: torch.Generator | None) -> None:
        """Draw scale si's noise exactly as :class:`NoiseSource` would (same calls, same order)."""
        for view in self.views[si]:
            view.exponential_(generator=generator)


class ScaleGraphRunner:
    """One generation of ``batch`` samples with fixed knobs, as per-scale graphs over static buffers."""

    def __init__(self, model, batch: int, args, refine_kw: dict, precision: str, capture: bool) -> None:
        import dataclasses

        self.batch = batch
        self.args = dataclasses.replace(args, generator=None)  # randomness comes from StaticNoise
        self.refine_kw = dict(refine_kw)
        self.precision = precision
        self.capture = capture
        self.device = model.lvl_1L.device
        self.num_scales = len(model.patch_nums)
        self.labels = torch.zeros(batch, dtype=torch.long, device=self.device)
        # Warm-up and capture run on one side stream (lazy cuBLAS / cuDNN set-up happens there first).
        self.stream = torch.cuda.Stream(self.device) if capture else None
        self.reserve_bytes = 0  # set by _record_plan when capturing with RESERVE_POOL
        self.plan = self._record_plan(model)
        # Reserving, the noise buffer is allocated inside the graphs' pool (see _capture).
        in_pool = capture and RESERVE_POOL
        self.noise = None if in_pool else StaticNoise(self.plan, model.vocab_size, self.device)
        self.state = None
        self.images: Tensor | None = None
        self.graphs: list[torch.cuda.CUDAGraph] = []
        if capture:
            self._capture(model)

    # The bodies: exactly what the graphs hold.

    def _scale_body(self, model, si: int) -> None:
        if si == 0:
            self.state = model._start(self.labels)
        self.noise.begin(si)
        model._scale_step(si, self.state, self.args, self.noise, **self.refine_kw)
        if si == self.num_scales - 1:
            self.state.caches = None  # VAR's KV cache: its memory goes to the decoder's graph

    def _decode_body(self, model) -> None:
        self.images = model.decode(self.state.f_hat, self.precision)

    def _record_plan(self, model) -> list[list[int]]:
        """Run the eager loop once with recording noise (also the capture's warm-up)."""
        rec = _RecordingNoise(model.vocab_size, self.device)
        marks, model.profile_marks = model.profile_marks, None
        measure = self.capture and RESERVE_POOL
        if measure:
            # The device's peak statistics are reset here: there is no other way to read the peak
            # of one stretch of work (docs/var_hmar.md says so).
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        try:
            with _SideStream(self.device, self.stream):
                st = model._start(self.labels)
                for si in range(self.num_scales):
                    rec.begin(si)
                    model._scale_step(si, st, self.args, rec, **self.refine_kw)
                st.caches = None
                if self.capture:  # warm the decoder's kernels (cuDNN, cuBLAS) off the capture too
                    model.decode(st.f_hat, self.precision)
            del st
            if measure:
                torch.cuda.synchronize(self.device)
                self.reserve_bytes = reserve_size(torch.cuda.max_memory_allocated(self.device) - base)
        finally:
            model.profile_marks = marks
        return rec.plan

    def _capture(self, model) -> None:
        dev, stream = self.device, self.stream
        pool = torch.cuda.graph_pool_handle()
        marks, model.profile_marks = model.profile_marks, None
        # Autocast caches the low-precision copies of weights that require grad: one made before
        # the capture would be referenced by the graphs and freed later, so the cache is emptied
        # before the first capture; copies made inside (graph 0) live in the pool. Emptied after.
        torch.clear_autocast_cache()
        stream.wait_stream(torch.cuda.current_stream(dev))
        try:
            for si in range(self.num_scales):
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA calls (a writer thread) cannot break it
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    if si == 0 and self.noise is None:
                        # Allocations only, no kernels. The noise buffer (filled between replays)
                        # gets a segment of its own in the pool; made before the capture, it took
                        # a block of a segment the warm-up had cached, which it then kept from
                        # being released. Then the reservation, freed at once: the segment every
                        # allocation of the graphs splits.
                        self.noise = StaticNoise(self.plan, model.vocab_size, dev)
                        if self.reserve_bytes:
                            torch.empty(self.reserve_bytes, dtype=torch.uint8, device=dev)
                    self._scale_body(model, si)
                self.graphs.append(graph)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                self._decode_body(model)
            self.graphs.append(graph)
        finally:
            torch.clear_autocast_cache()
            model.profile_marks = marks
        torch.cuda.current_stream(dev).wait_stream(stream)

    def generate(self, model, labels: Tensor, generator, out_indices: list[Tensor] | None) -> Tensor:
        """Images (B, C, H, W) float32 for ``labels`` (B,), with the randomness of ``generator``."""
        self.labels.copy_(labels)
        marks = model.profile_marks
        if marks is not None:  # the host's work before the first replay (the GPU idles through it)
            marks.append(("prep", mark(self.device)))
        for si in range(self.num_scales):
            self.noise.fill(si, generator)
            if self.capture:
                self.graphs[si].replay()
            else:
                self._scale_body(model, si)
            if marks is not None:
                marks.append((f"s{si:02d} graph", mark(self.device)))
        if self.capture:
            self.graphs[-1].replay()
        else:
            self._decode_body(model)
        if marks is not None:
            marks.append(("decode graph", mark(self.device)))
        if out_indices is not None:
            out_indices.extend(t.clone() for t in self.state.tokens)
        return self.images.clone()


class _SideStream:
    """Run a block on ``stream`` ordered after the current stream (nothing when it is None)."""

    def __init__(self, device: torch.device, stream) -> None:
        self.device, self.stream = device, stream
        self._ctx = None

    def __enter__(self):
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.stream is not None:
            self._ctx.__exit__(*exc)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return False


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class GraphCache:
    """A model's captured runners (LRU); copies and pickles as an empty cache (graphs cannot be)."""

    def __init__(self, max_entries: int = 2) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, ScaleGraphRunner] = OrderedDict()
        self.weights: tuple = ()  # addresses of the tensors the graphs read
        self.failed = False  # a capture failed: sample eagerly from then on
        self.captures = 0
        self.seen: set[tuple] = set()  # keys called once: captured at their second call

    def clear(self) -> None:
        """Drop every graph and its memory pool."""
        self.entries.clear()
        self.seen.clear()

    def __deepcopy__(self, memo: dict) -> GraphCache:
        return GraphCache(self.max_entries)

    def __getstate__(self) -> dict:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])

    def runner(self, model, batch: int, args, refine_kw: dict, precision: str) -> ScaleGraphRunner | None:
        """The captured runner for this call, capturing it on first use (None if capture failed)."""
        weights = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
        if weights != self.weights:  # weights moved or were replaced: the graphs read old memory
            self.clear()
            self.weights = weights
        dev = model.lvl_1L.device
        key = (
            batch, args.cfg, args.cfg_schedule, args.temperature, args.top_k, args.top_p, args.sampler,
            _freeze(refine_kw), precision, torch.is_autocast_enabled(dev.type),
            torch.get_autocast_dtype(dev.type), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        )  # fmt: skip
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            return found
        if key not in self.seen:  # a one-off call (the last, smaller batch of a run) stays eager
            self.seen.add(key)
            return None
        while len(self.entries) >= self.max_entries:  # free the old pool before capturing a new one
            self.entries.popitem(last=False)
        try:
            runner = ScaleGraphRunner(model, batch, args, refine_kw, precision, capture=True)
        except Exception as e:  # noqa: BLE001 - any capture failure means: sample eagerly
            self.failed = True
            self.clear()
            warnings.warn(
                f"{type(model).__name__}: CUDA-graph capture failed ({type(e).__name__}: {e}); "
                "sampling eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        self.captures += 1
        self.entries[key] = runner
        return runner


def graphs_usable(model, device: torch.device) -> bool:
    """Plain generation on a GPU in inference mode, graphs switched on and not failed before."""
    return (
        device.type == "cuda"
        and model.cuda_graphs
        and not model.training
        and not model._graphs.failed
        and not torch.cuda.is_current_stream_capturing()
    )
