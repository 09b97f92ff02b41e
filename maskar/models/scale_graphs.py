"""CUDA graphs for next-scale sampling (VAR, HMAR): one graph per scale, replayed per call.

Every scale of a next-scale sampler has static shapes: the scale's tokens (and, for VAR, the
KV cache up to it), the number of refinement passes and the token counts they re-sample are
fixed by the batch size and the sampling knobs. So one generation is captured per
(model, batch, knobs) as K graphs, one per scale (next-scale pass, draw, refinement passes,
f_hat update), plus one for decoding, and replayed on every later call. Replays remove the
per-kernel launch cost that dominates the small scales (~400 kernels per transformer pass).
A key is captured at its second call: a one-off call (the last, smaller batch of a run)
stays eager instead of paying a capture.

The sampler's randomness is one (rows, V) tensor of Exp(1) draws per categorical draw
(:func:`maskar.nn.sampling.exponential_noise`). A graph cannot read the caller's
``torch.Generator``, so each runner owns a generator (``ScaleGraphRunner.gen``) registered with
every graph before its capture (``CUDAGraph.register_generator_state``): the draws are captured
inside the graphs, and each replay reads the generator's seed and offset and advances the offset
by the graph's whole increment, as the eager calls would (CUDA's graph-safe Philox state).
``generate`` copies the caller's generator state (the device's default generator without one)
into the runner's before the first replay and back after the last scale, so a call gives the
eager loop's tokens and leaves the caller's generator where the eager loop would. Each draw is a
transient tensor of the pool, freed after the draw, so the noise costs one draw's (rows, V) at
a time (on the large scales one head / sampler chunk's, ``SAMPLE_ROWS`` rows), counted in the
warm-up's live peak. (The draws used to be made on the host side, into one
static buffer before each replay: for memory, since that buffer held every draw of the largest
scale in a segment of its own, 0.54 GB at HMAR-d16 1024 px B 8.)

The graphs of one runner share one memory pool and are captured in the order they replay, so
memory freed inside one (a scale's activations, VAR's KV cache after the last scale) is reused
by the next; what crosses graphs (class embeddings, f_hat, the next input, each scale's ids) is
held by the runner's :class:`~maskar.models.var.ScaleState`.

Reuse alone does not keep the pool small: the caching allocator adds a segment whenever no free
block fits a request, and a sampler's tensors grow scale by scale, so every scale adds segments
that the later, larger scales and the decoder cannot use whole. Replaying the allocations of
HMAR-d16 at 1024 px B 8 through a model of the allocator (``scripts/graph_pool_model.py``) gives
4.6 GB of segments for 1.45 GB ever live at once (the noise draws included). So the capture
first allocates and frees one block the size of the eager warm-up's live peak: the pool starts as
one segment that every later request splits and every free merges back into (1.8 GB in the same
model).
``MASKAR_GRAPH_POOL_RESERVE=0`` captures without it.

Without a GPU, ``ScaleGraphRunner(..., capture=False)`` runs the same bodies on the same static
buffers eagerly, with the same generator hand-over: tests compare its tokens with the eager loop's.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from maskar import env
from maskar.nn.graph_cache import LruGraphCache
from maskar.nn.sampling import exponential_noise

# Reserve the graphs' pool as one segment of the warm-up's live peak (module docstring).
RESERVE_POOL = bool(env.switch("MASKAR_GRAPH_POOL_RESERVE"))


# Headroom over the measured peak: the captured allocations are the warm-up's, but a best-fit
# split can leave a hole a later request does not fit (then the pool grows by a segment anyway:
# on the H200, 2026-12-05, HMAR-d16 at 1024 px B 8 still added one of 0.67 GB at 1.02; 1.25
# removes it there but would add a quarter of VAR's 12 GB peak). MASKAR_GRAPH_POOL_MARGIN
# overrides it (read at import, maskar.env), so a run can sweep it.
RESERVE_MARGIN = env.margin()
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
        # A whole (rows, V) tensor, as a real draw allocates: under capture each draw is a
        # transient block of the graphs' pool, so the warm-up's live peak (the pool's
        # reservation) must count it. Ones, not Exp(1) draws: the warm-up's tokens do not matter.
        return torch.ones(rows, self.vocab, device=self.device)


class PlannedNoise:
    """The runner's randomness: fresh (rows, V) Exp(1) draws from ``generator`` (the runner's own),
    checked against the warm-up's plan.

    ``plan[si]`` lists the rows of the draws of scale si in call order. The captured graphs hold
    exactly these draws (their sizes fix the generator's offset increments), so a body that asks
    for another draw would give other random numbers than the eager loop: an error.
    """

    def __init__(
        self, plan: list[list[int]], vocab: int, generator: torch.Generator, device: torch.device
    ) -> None:
        self.plan, self.vocab, self.generator, self.device = plan, vocab, generator, device
        self.si, self.k = 0, 0

    def begin(self, si: int) -> None:
        self.si, self.k = si, 0

    def __call__(self, rows: int) -> Tensor:
        draws = self.plan[self.si]
        if self.k >= len(draws) or draws[self.k] != rows:
            raise RuntimeError(
                f"sampling graph: scale {self.si} asked for draw {self.k} of {rows} rows; the recorded "
                f"plan is {draws}"
            )
        self.k += 1
        return exponential_noise(rows, self.vocab, self.generator, self.device)


def default_generator(device: torch.device) -> torch.Generator:
    """The generator ``exponential_(generator=None)`` draws from on ``device``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    if device.type == "cpu":
        return torch.default_generator
    raise ValueError(f"sampling graphs: no default generator for device {device}")


class ScaleGraphRunner:
    """One generation of ``batch`` samples with fixed knobs, as per-scale graphs over static buffers."""

    def __init__(self, model, batch: int, args, refine_kw: dict, precision: str, capture: bool) -> None:
        import dataclasses

        self.batch = batch
        self.args = dataclasses.replace(args, generator=None)  # randomness comes from self.gen
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
        # The draws' generator: the graphs read its state at each replay (module docstring);
        # generate() hands the caller's state over to it and back.
        self.gen = torch.Generator(device=self.device)
        self.noise = PlannedNoise(self.plan, model.vocab_size, self.gen, self.device)
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
                # Before the capture (it cannot be done during one): the graph's draws take their
                # seed and offset from self.gen at each replay and advance its offset.
                graph.register_generator_state(self.gen)
                # thread_local: another thread's CUDA calls (a writer thread) cannot break it
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    if si == 0 and self.reserve_bytes:
                        # An allocation only, no kernel, freed at once: the segment every
                        # allocation of the graphs splits (module docstring).
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

    def generate(
        self, model, labels: Tensor, generator: torch.Generator | None, out_indices: list[Tensor] | None
    ) -> Tensor:
        """Images (B, C, H, W) float32 for ``labels`` (B,), with the randomness of ``generator``
        (the device's default generator when None), which advances as the eager loop's would."""
        self.labels.copy_(labels)
        marks = model.profile_marks
        if marks is not None:  # the host's work before the first replay (the GPU idles through it)
            marks.append(("prep", mark(self.device)))
        source = generator if generator is not None else default_generator(self.device)
        self.gen.set_state(source.get_state())
        for si in range(self.num_scales):
            if self.capture:
                self.graphs[si].replay()
            else:
                self._scale_body(model, si)
            if marks is not None:
                marks.append((f"s{si:02d} graph", mark(self.device)))
        # Each replay advanced self.gen by its graph's draws: the caller's generator continues from
        # there, as after the eager loop (the decoder draws nothing).
        source.set_state(self.gen.get_state())
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


class GraphCache(LruGraphCache):
    """A model's captured runners (LRU). A key is captured at its second call."""

    def __init__(self, max_entries: int = 2) -> None:
        super().__init__(max_entries)
        self.seen: set[tuple] = set()  # keys called once

    def clear(self) -> None:
        super().clear()
        self.seen.clear()

    def runner(self, model, batch: int, args, refine_kw: dict, precision: str) -> ScaleGraphRunner | None:
        """The captured runner for this call, capturing it on first use (None if capture failed)."""
        weights = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
        dev = model.lvl_1L.device
        key = (
            batch, args.cfg, args.cfg_schedule, args.temperature, args.top_k, args.top_p, args.sampler,
            _freeze(refine_kw), precision, torch.is_autocast_enabled(dev.type),
            torch.get_autocast_dtype(dev.type), torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        )  # fmt: skip
        found = self.lookup(weights, key)
        if found is not None:
            return found
        if key not in self.seen:  # a one-off call (the last, smaller batch of a run) stays eager
            self.seen.add(key)
            return None
        while len(self.entries) >= self.max_entries:  # free the old pool before capturing a new one
            self.entries.popitem(last=False)
        try:
            runner = ScaleGraphRunner(model, batch, args, refine_kw, precision, capture=True)
        except Exception as e:  # noqa: BLE001 - any capture failure means: sample eagerly
            self.capture_failed(type(model).__name__, e, stacklevel=3)
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
