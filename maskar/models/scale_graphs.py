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

Without a GPU, ``ScaleGraphRunner(..., capture=False)`` runs the same bodies on the same static
buffers eagerly: tests compare its tokens with the eager loop's.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict

import torch
from torch import Tensor

from maskar.nn.sampling import exponential_noise


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
        return torch.ones(rows, self.vocab, device=self.device)


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
        self.noise = self._record_plan(model)
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

    def _record_plan(self, model) -> StaticNoise:
        """Run the eager loop once with recording noise (also the capture's warm-up)."""
        rec = _RecordingNoise(model.vocab_size, self.device)
        marks, model.profile_marks = model.profile_marks, None
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
        finally:
            model.profile_marks = marks
        return StaticNoise(rec.plan, model.vocab_size, self.device)

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
