"""CUDA-graph replay of a diffusion head's whole reverse chain (MAR's MLP head, CASMAR's DiT head).

A sampling call of a diffusion head runs the same small network once per respaced step
(100 for MAR's MLP head, 250 for CASMAR's DiT head). On a GPU the MLP head is launch-bound
and the DiT head pays ~170 launches per step, so both heads capture the whole chain of one
call (condition embedding, every step, CFG, RePaint known-token injection) into one CUDA
graph over fixed buffers, and replay it:

- :class:`StaticChain` holds the buffers (condition, initial noise, every step's noise,
  CFG scale, known tokens and their mask, labels) and the body: the head's model function
  on those buffers fed to :meth:`GaussianDiffusion.p_sample_loop`, i.e. the eager sampler's
  own ops. ``capture`` records the body; ``run`` replays it (or, without a capture, runs
  it: the CPU tests use that to check the buffer logic against eager bit for bit).
- The noise is not drawn inside the graph: :meth:`StaticChain.fill` draws the initial
  noise and each step's noise with exactly the eager path's generator calls (same shapes,
  same order) into the static buffers, so a seed gives the eager tokens and leaves the
  generator in the same state.
- :class:`GraphCache` keeps the captured chains (LRU, one memory pool and capture stream per
  device) and :class:`GraphedHead` is what a head mixes in: the switch, the refusals, the
  cache lookup and the call.

Rows may be padded to a bucket (:func:`graph_rows`) so that the number of graphs stays
small when the row count changes every call (MAR). With CFG each half is padded
separately, laid out [cond (h real + pad) | uncond (h real + pad)], so the halves stay
aligned; every op of the heads is row-independent, so padded rows never touch real ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from maskar.nn.diffusion import GaussianDiffusion, ModelFn, PosteriorFn, posterior_step
from maskar.nn.graph_cache import LruGraphCache

# (z, scale or None, labels or None, cast to float32) -> model_fn(x_t, t); called in the captured body
ModelFnFactory = Callable[[Tensor, "Tensor | None", "Tensor | None", bool], ModelFn]


def graph_rows(n: int) -> int:
    """Padded row count of the CUDA-graph bucket holding ``n`` rows.

    ``n`` rounded up to a multiple of max(16, 2^(floor(log2 n) - 3)): at most 12.5% padding
    above 128 rows, and ~8 buckets per doubling, so the graph cache stays small while the
    number of rows changes every MAR iteration.
    """
    if n < 1:
        raise ValueError(f"graph_rows: expected n >= 1, got {n}")
    step = max(16, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


class StaticChain:
    """The whole reverse chain of one head call over fixed buffers of ``rows`` rows.

    ``x_shape`` is one sample's shape ((C,) for a token, (C, H, W) for a latent grid);
    ``z_like`` gives the condition's per-row shape and dtype. ``known_mask_shape`` (per row,
    e.g. (1, H, W)) adds RePaint buffers; ``labels`` adds an int64 label buffer.
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        make_model_fn: ModelFnFactory,
        rows: int,
        guided: bool,
        temperature: float,
        x_shape: tuple[int, ...],
        z_like: Tensor,
        known_mask_shape: tuple[int, ...] | None = None,
        labels: bool = False,
        paste_known: bool = False,
        posterior: PosteriorFn | None = None,
        weights: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        dev = z_like.device
        self.posterior, self.weights = posterior, weights
        # the per-device tables the steps read: made here, not inside the capture
        diffusion.timestep_tensor(dev)
        if posterior is not None:
            diffusion.step_coefficients(dev)
        self.diffusion, self.make_model_fn = diffusion, make_model_fn
        self.rows, self.guided, self.temperature, self.paste_known = rows, guided, temperature, paste_known
        self.z = torch.zeros((rows, *z_like.shape[1:]), dtype=z_like.dtype, device=dev)
        self.x_T = torch.zeros((rows, *x_shape), device=dev)  # float32, like the eager noise
        self.noise = torch.zeros((diffusion.num_timesteps, rows, *x_shape), device=dev)  # (T, R, ...)
        self.noise_steps = self.noise.unbind(0)  # views filled in place each call
        self.scale = torch.ones((), device=dev)  # CFG scale, float32
        self.known = self.known_mask = self.labels = None
        if known_mask_shape is not None:
            self.known = torch.zeros((rows, *x_shape), device=dev)
            self.known_mask = torch.zeros((rows, *known_mask_shape), dtype=torch.bool, device=dev)
        if labels:
            self.labels = torch.zeros(rows, dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None

    def body(self) -> Tensor:
        """The eager sampler's ops on the static buffers."""
        fused = self.posterior is not None
        with self.weights():
            model_fn = self.make_model_fn(self.z, self.scale if self.guided else None, self.labels, not fused)
            return self.diffusion.p_sample_loop(
                model_fn,
                self.x_T,
                temperature=self.temperature,
                known=self.known,
                known_mask=self.known_mask,
                paste_known=self.paste_known,
                step_noise=self.noise_steps,
                posterior=self.posterior,
            )

    def capture(self, pool: tuple, stream: torch.cuda.Stream) -> None:
        """Warm up on ``stream`` (lazy cuBLAS set-up, Triton autotuning and caches filled on
        first use must not happen in a capture), then capture."""
        # Autocast caches the low-precision copies of the weights: a copy made outside the
        # capture would be referenced by the graph and freed when autocast exits, so the
        # cache is emptied before the capture, and after it (its copies live in the pool).
        torch.clear_autocast_cache()
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            self.body()
        torch.cuda.current_stream(stream.device).wait_stream(stream)
        torch.clear_autocast_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: another thread's CUDA calls (e.g. a data loader) cannot break it
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                out = self.body()
        finally:
            torch.clear_autocast_cache()
        self.graph, self.out = graph, out

    def _put(self, buf: Tensor, src: Tensor, h: int, hb: int) -> None:
        """Copy ``src`` (N rows, [cond | uncond] halves of h rows when guided) into ``buf``."""
        buf[:h].copy_(src[:h])
        if self.guided:
            buf[hb : hb + h].copy_(src[h:])

    def fill(
        self,
        z: Tensor,
        cfg: float,
        generator: torch.Generator | None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        labels: Tensor | None = None,
        x_T: Tensor | None = None,
    ) -> None:
        """Copy the inputs in and draw the noise exactly as the eager path does (same calls,
        same order): x_T = randn(h, ...) shared by both CFG halves (or the given ``x_T``, N
        rows), then randn(N, ...) per step."""
        n, rows, steps = z.shape[0], self.rows, self.diffusion.num_timesteps
        h = n // 2 if self.guided else n
        hb = rows // 2 if self.guided else rows
        sample_shape = tuple(self.x_T.shape[1:])
        if x_T is None:
            first = torch.randn((h, *sample_shape), generator=generator, device=z.device, dtype=torch.float32)
            x_T = torch.cat([first, first]) if self.guided else first
        self._put(self.z, z, h, hb)
        self._put(self.x_T, x_T, h, hb)
        if self.guided:
            self.scale.fill_(cfg)
        if self.known is not None:
            self._put(self.known, known, h, hb)
            self._put(self.known_mask, known_mask.expand(n, *self.known_mask.shape[1:]), h, hb)
        if self.labels is not None:
            self._put(self.labels, labels, h, hb)
        if rows == n:  # no padding: draw straight into the static buffer
            for view in self.noise_steps:
                view.normal_(generator=generator)  # == torch.randn((n, ...), generator=...)
            return
        draws = torch.empty((steps, n, *sample_shape), device=z.device)
        for view in draws.unbind(0):
            view.normal_(generator=generator)
        self.noise[:, :h].copy_(draws[:, :h])
        if self.guided:
            self.noise[:, hb : hb + h].copy_(draws[:, h:])

    def run(self) -> None:
        if self.graph is None:
            self.out = self.body()
        else:
            self.graph.replay()

    def result(self, n: int) -> Tensor:
        """The real rows of the output (N, ...), in the eager layout (a fresh tensor)."""
        assert self.out is not None
        if self.rows == n:
            return self.out.clone()
        if self.guided:
            h, hb = n // 2, self.rows // 2
            return torch.cat([self.out[:h], self.out[hb : hb + h]])
        return self.out[:n].clone()


@contextlib.contextmanager
def swapped_parameters(module: nn.Module, tensors: dict[str, Tensor]) -> Iterator[None]:
    """Inside: the parameters named in ``tensors`` (dotted names under ``module``) are those
    tensors (plain tensors, e.g. low-precision copies); restored on exit."""
    saved = []
    try:
        for name, t in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = t
        yield
    finally:
        for owner, leaf, p in reversed(saved):
            owner._parameters[leaf] = p


def _cast(out: Tensor, cast: bool) -> Tensor:
    return out.float() if cast else out


class GraphCache(LruGraphCache):
    """The captured chains of one head (LRU), with one memory pool and capture stream per device."""

    def __init__(self, max_entries: int = 24):
        super().__init__(max_entries)
        self.pools: dict[torch.device, tuple] = {}

    def clear(self) -> None:
        super().clear()
        self.pools.clear()

    def chain(
        self,
        key: tuple,
        params: Iterable[Tensor],
        make: Callable[[], StaticChain],
        device: torch.device,
        capture: bool,
        owner: str,
    ) -> StaticChain | None:
        """The cached chain for ``key``, made and captured on first use (None if capture failed)."""
        key = key + (capture,)
        chain = self.lookup(tuple((p.data_ptr(), p.dtype) for p in params), key)
        if chain is not None:
            return chain
        chain = make()
        if capture:
            if device not in self.pools:
                self.pools[device] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(device))
            pool, stream = self.pools[device]
            try:
                with torch.cuda.device(device):
                    chain.capture(pool, stream)
            except Exception as e:  # noqa: BLE001 - any capture failure means: sample eagerly
                self.capture_failed(owner, e, stacklevel=4)
                return None
            self.captures += 1
        self.entries[key] = chain
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return chain


class GraphedHead(nn.Module):
    """Base of a diffusion head (with a denoiser ``net``): its sampler, eager or replayed as a
    CUDA graph, and the opt-in ``torch.compile`` of the per-step network call.

    A subclass gives :meth:`embed` (the condition embedding, constant over the steps) and
    :meth:`step` / :meth:`step_cfg` (one network call, unguided / guided on a batch laid out
    [cond | uncond]); its ``sample`` checks its arguments and calls :meth:`sample_chain`.
    ``cuda_graph`` (attribute, default True): let ``sample`` replay graphs for inputs on a GPU
    (see :meth:`graph_refusal` for the cases that always run eagerly).
    """

    net: nn.Module
    bucket_rows = True  # pad row counts to graph_rows() buckets (MAR: the count changes per call)
    compile_defaults: dict[str, Any] = {}

    def __init__(self) -> None:
        super().__init__()
        self.cuda_graph = True
        self._graphs = GraphCache()
        self._compiled: tuple[Callable, Callable] | None = None
        self._posterior: Callable | None = None  # compiled posterior_step, with _compiled

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / .cuda(): captured pointers go stale
        self._graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    # -- what a head provides

    def sample_shape(self, z: Tensor) -> tuple[int, ...]:
        """One sample's shape for conditions z: (C,) for a token, (C, H, W) for a latent grid."""
        raise NotImplementedError

    def embed(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, x: Tensor, t: Tensor, cond: Tensor, labels: Tensor | None) -> Tensor:
        raise NotImplementedError

    def graph_key(self) -> tuple:
        """What else a captured chain depends on (state of the head the step reads)."""
        return ()

    def step_cfg(
        self, x: Tensor, t: Tensor, cond: Tensor, labels: Tensor | None, scale: float | Tensor
    ) -> Tensor:
        raise NotImplementedError

    # -- sampling

    def compile_sampler(self, step_mode: str = "default", **compile_kwargs: Any) -> None:
        """Opt-in: ``torch.compile`` the per-step network call (both CFG forms). The CFG scale
        is then passed as a 0-d tensor, so one compile serves every scale; the CUDA-graph path
        captures the compiled kernels. The first call pays the compile time. ``step_mode``: the
        network call's torch.compile mode (the posterior keeps the default)."""
        kw = {**self.compile_defaults, **compile_kwargs}
        step_kw = {**kw, "mode": step_mode}
        self._compiled = (torch.compile(self.step, **step_kw), torch.compile(self.step_cfg, **step_kw))
        # The posterior arithmetic after each network call (~12 small elementwise kernels per
        # step eagerly) as one compiled kernel that also takes the network's output as it is
        # (the float32 cast fused in); the temperature comes as a 0-d tensor, so one compile
        # serves every temperature.
        self._posterior = torch.compile(posterior_step, **kw)

    def posterior_fn(self, temperature: float, device: torch.device) -> PosteriorFn | None:
        """The fused posterior for a chain at ``temperature`` (None: the eager ops)."""
        if self._compiled is None or self._posterior is None:
            return None
        temp = torch.full((), float(temperature), device=device)  # float32, as the scalar rounds
        fused = self._posterior
        return lambda x_t, out, noise, coef, _t, learned, clip, last: fused(
            x_t, out, noise, coef, temp, learned, clip, last
        )

    def low_precision_weights(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Inside: with the compiled step under autocast (on ``device``'s type) and no grad, the
        net's linear and convolution weights and biases are their autocast-dtype copies, made
        once on entry (once per chain: inside its CUDA graph) instead of at every step.
        Autocast's cast cache does not reach into compiled code, so the compiled step would
        otherwise re-cast them at every step (MAR-B's MLP head: ~14M weights, ~85 MB of traffic
        a step, 6,400 steps a call). The copies hold exactly the values autocast's casts
        produce, so the outputs do not change."""
        if self._compiled is None or not torch.is_autocast_enabled(device.type) or torch.is_grad_enabled():
            return contextlib.nullcontext()
        dtype = torch.get_autocast_dtype(device.type)
        copies = {
            f"{prefix}{'.' if prefix else ''}{name}": p.to(dtype)
            for prefix, m in self.net.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
            for name, p in m.named_parameters(recurse=False)
            if p.is_floating_point() and p.dtype != dtype
        }
        return swapped_parameters(self.net, copies)

    def model_fn(
        self, z: Tensor, scale: float | Tensor | None, labels: Tensor | None = None, cast: bool = True
    ) -> ModelFn:
        """The sampler's model function: unguided (``scale`` None) or guided with z / labels
        laid out [cond | uncond]. The same ops run eagerly and inside the CUDA graph. ``cast``
        False leaves the output in the network's dtype (the fused posterior casts it)."""
        cond = self.embed(z)  # constant over the diffusion steps
        step, step_cfg = self._compiled or (self.step, self.step_cfg)
        if scale is None:
            return lambda x, t: _cast(step(x, t, cond, labels), cast)
        return lambda x, t: _cast(step_cfg(x, t, cond, labels, scale), cast)

    def sample_chain(
        self,
        z: Tensor,
        temperature: float,
        cfg: float,
        diffusion: GaussianDiffusion,
        generator: torch.Generator | None,
        *,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        paste_known: bool = False,
        labels: Tensor | None = None,
        noise: Tensor | None = None,
        cuda_graph: bool | None = None,
    ) -> Tensor:
        """The reverse chain for conditions z (N, ...) -> samples (N, *sample_shape(z)), float32.

        With ``cfg != 1`` the rows are laid out [cond | uncond] and both halves start from
        the same noise draw (N/2, *sample_shape). ``noise`` (N, *sample_shape): the initial x_T
        instead of that draw (with CFG pass the same rows in both halves, as the sampler draws
        them); the per-step noise still comes from ``generator``, in the same calls.
        ``cuda_graph`` (None = the attribute) replays a captured graph where
        :meth:`graph_refusal` allows it: same draws as eager.
        """
        n = z.shape[0]
        want = (n, *self.sample_shape(z))
        if noise is not None and tuple(noise.shape) != want:
            raise ValueError(f"noise: expected x_T of shape {want}, got {tuple(noise.shape)}")
        use = self.cuda_graph if cuda_graph is None else cuda_graph
        if use and self.graph_refusal(z, cfg) is None:
            out = self._sample_graphed(
                z,
                temperature,
                cfg,
                diffusion,
                generator,
                known=known,
                known_mask=known_mask,
                paste_known=paste_known,
                labels=labels,
                noise=noise,
            )
            if out is not None:
                return out
        guided = cfg != 1.0
        if noise is None:
            noise = torch.randn((n // 2 if guided else n, *want[1:]), generator=generator, device=z.device)
            noise = torch.cat([noise, noise]) if guided else noise
        scale = None
        if guided:
            scale = torch.tensor(cfg, device=z.device) if self._compiled else cfg
        posterior = self.posterior_fn(temperature, z.device)
        with self.low_precision_weights(z.device):
            return diffusion.p_sample_loop(
                self.model_fn(z, scale, labels, cast=posterior is None),
                noise.float(),
                temperature=temperature,
                generator=generator,
                known=known,
                known_mask=known_mask,
                paste_known=paste_known,
                posterior=posterior,
            )

    # -- CUDA-graph path

    def graph_refusal(self, z: Tensor, cfg: float) -> str | None:
        """Why ``sample`` runs eagerly for these inputs (None: the graph path may be used)."""
        n = z.shape[0]
        if n == 0 or (cfg != 1.0 and n % 2):
            return f"row count {n} (CFG needs an even, non-zero count)"
        if self._graphs.failed:
            return "an earlier capture failed"
        if not z.is_cuda:
            return "not on CUDA"
        if torch.cuda.is_current_stream_capturing():
            return "already inside a CUDA-graph capture"
        return None

    def _sample_graphed(
        self,
        z: Tensor,
        temperature: float,
        cfg: float,
        diffusion: GaussianDiffusion,
        generator: torch.Generator | None,
        *,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        paste_known: bool = False,
        labels: Tensor | None = None,
        noise: Tensor | None = None,
        capture: bool = True,
    ) -> Tensor | None:
        """The graph path of :meth:`sample_chain` (``capture=False`` runs the same buffers eagerly)."""
        n = z.shape[0]
        x_shape = self.sample_shape(z)
        guided = cfg != 1.0
        if not self.bucket_rows:
            rows = n
        else:
            rows = 2 * graph_rows(n // 2) if guided else graph_rows(n)
        mask_shape = None if known_mask is None else tuple(known_mask.shape[1:])
        paste = paste_known and known is not None
        key = (
            id(diffusion),  # cached per respacing; the chain keeps a reference, so ids stay unique
            rows,
            guided,
            float(temperature),
            tuple(x_shape),
            z.dtype,
            z.device,
            mask_shape,
            paste,
            labels is not None,
            self._compiled is not None,
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
            torch.get_float32_matmul_precision(),
            *self.graph_key(),
        )

        def make() -> StaticChain:
            return StaticChain(
                diffusion,
                self.model_fn,
                rows,
                guided,
                float(temperature),
                tuple(x_shape),
                z,
                known_mask_shape=mask_shape,
                labels=labels is not None,
                paste_known=paste,
                posterior=self.posterior_fn(temperature, z.device),
                weights=lambda: self.low_precision_weights(z.device),
            )

        # Capture before drawing any noise: if it fails, the eager path sees the same generator.
        chain = self._graphs.chain(key, self.net.parameters(), make, z.device, capture, type(self).__name__)
        if chain is None:
            return None
        chain.fill(z, cfg, generator, known=known, known_mask=known_mask, labels=labels, x_T=noise)
        chain.run()
        return chain.result(n)
