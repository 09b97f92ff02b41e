"""Diffusion loss head of MAR: a small MLP denoiser conditioned per token.

``SimpleMLPAdaLN`` predicts (eps, variance interpolation) for one token's latent
x_t given the timestep and the transformer's output z for that token. Its module
and parameter names match the official checkpoint (``diffloss.net.*``).

``DiffLoss`` wraps it with a 1000-step training diffusion and a respaced sampling
diffusion; classifier-free guidance is applied to eps only.

Sampling runs the MLP once per respaced step (100) for every MAR iteration, ~85 small
kernels each: on a GPU it is launch-bound. On CUDA, ``DiffLoss.sample`` therefore
captures the whole reverse chain of one call (all steps) into a CUDA graph per
(padded row count, CFG on/off, temperature, respacing, dtype / autocast state) and
replays it; the noise is pre-drawn with the eager path's generator calls, so the graph
path gives the eager tokens up to floating-point reordering (see docs/mar.md).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from maskar.nn.diffusion import GaussianDiffusion, create_diffusion


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift (one fused multiply-add)."""
    return torch.addcmul(shift, x, 1 + scale)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), laid out as [cos | sin] (MAR/DiT order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """LN -> adaLN modulate -> MLP -> gated residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def init_linears_xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every ``nn.Linear`` in ``module`` (module order)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def init_adaln_zero(
    time_embed: TimestepEmbedder, blocks: Iterable[nn.Module], final_layer: FinalLayer
) -> None:
    """N(0, 0.02) timestep-MLP weights; zero adaLN modulations and output layer, so that every
    block starts as the identity (used by the MLP head here and CASMAR's DiT head)."""
    nn.init.normal_(time_embed.mlp[0].weight, std=0.02)
    nn.init.normal_(time_embed.mlp[2].weight, std=0.02)
    for block in blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(final_layer.linear.weight)
    nn.init.zeros_(final_layer.linear.bias)


class SimpleMLPAdaLN(nn.Module):
    """MLP denoiser: x (N, C_in), t (N,), c (N, C_z) -> (N, C_out)."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        z_channels: int,
        num_res_blocks: int,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linears_xavier(self)
        init_adaln_zero(self.time_embed, self.res_blocks, self.final_layer)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.forward_embedded(x, self.time_embed(t), self.cond_embed(c))

    def forward_embedded(self, x: Tensor, t_emb: Tensor, c_emb: Tensor) -> Tensor:
        """Forward with precomputed embeddings: t_emb (N or 1, W), c_emb = cond_embed(c) (N, W)."""
        x = self.input_proj(x)
        y = t_emb + c_emb
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x: Tensor, t: Tensor, c: Tensor, cfg_scale: float) -> Tensor:
        """Guided output for a batch laid out [cond | uncond] whose halves share x.

        The first half of x is run with both halves of c; eps = eps_u + s (eps_c - eps_u)
        is written to both halves; the variance channels pass through unguided.
        """
        return self.forward_with_cfg_embedded(x, self.time_embed(t), self.cond_embed(c), cfg_scale)

    def forward_with_cfg_embedded(
        self, x: Tensor, t_emb: Tensor, c_emb: Tensor, cfg_scale: float | Tensor
    ) -> Tensor:
        half = x[: len(x) // 2]
        out = self.forward_embedded(torch.cat([half, half], dim=0), t_emb, c_emb)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond_eps, uncond_eps = eps.float().chunk(2, dim=0)
        # The official uncond + s * (cond - uncond), in float32 (bitwise official in fp32; under
        # autocast one rounding at the end). A 0-d float32 tensor scale (compiled / CUDA-graph
        # sampler) gives the same result as the Python float, which the kernels round to float32.
        guided = (uncond_eps + cfg_scale * (cond_eps - uncond_eps)).to(eps.dtype)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


# ----------------------------------------------------------------------------- CUDA-graph sampling


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


class _StaticChain:
    """The whole reverse chain of one :meth:`DiffLoss.sample` call over fixed buffers.

    Rows are padded to ``rows``; with CFG each half is padded separately, laid out
    [cond (h real + pad) | uncond (h real + pad)], so the halves stay aligned for
    ``forward_with_cfg_embedded``. Every op is row-independent, so padded rows never
    change the real ones. ``capture`` records :meth:`body` as a CUDA graph; without it
    (CPU tests) :meth:`run` executes the body directly.
    """

    def __init__(
        self,
        head: DiffLoss,
        diffusion: GaussianDiffusion,
        rows: int,
        guided: bool,
        temperature: float,
        z_like: Tensor,
    ):
        dev = z_like.device
        c = head.in_channels
        self.head, self.diffusion, self.rows = head, diffusion, rows
        self.guided, self.temperature = guided, temperature
        self.z = torch.zeros(rows, z_like.shape[1], dtype=z_like.dtype, device=dev)  # (R, C_z)
        self.x_T = torch.zeros(rows, c, device=dev)  # (R, C) float32, like the eager noise
        self.noise = torch.zeros(diffusion.num_timesteps, rows, c, device=dev)  # (T, R, C)
        self.noise_steps = self.noise.unbind(0)  # views filled in place each call
        self.scale = torch.ones((), device=dev)  # CFG scale, float32
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None

    def body(self) -> Tensor:
        """The eager sampler's ops (DiffLoss.sample + p_sample_at) on the static buffers."""
        net = self.head.net
        c_emb = net.cond_embed(self.z)
        if self.guided:

            def model_fn(x: Tensor, t: Tensor) -> Tensor:
                return net.forward_with_cfg_embedded(x, net.time_embed(t[:1]), c_emb, self.scale).float()
        else:

            def model_fn(x: Tensor, t: Tensor) -> Tensor:
                return net.forward_embedded(x, net.time_embed(t[:1]), c_emb).float()

        x = self.x_T
        for k, i in enumerate(reversed(range(self.diffusion.num_timesteps))):
            x = self.diffusion.p_sample_at(
                model_fn, x, i, temperature=self.temperature, noise=self.noise_steps[k]
            )
        return x

    def capture(self, pool: tuple, stream: torch.cuda.Stream) -> None:
        """Warm up on ``stream`` (lazy cuBLAS set-up must not happen in a capture), then capture."""
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

    def fill(
        self, z: Tensor, cfg: float, generator: torch.Generator | None, x_T: Tensor | None = None
    ) -> None:
        """Copy z in and draw the noise exactly as the eager path does (same calls, same order);
        a given ``x_T`` (N, C) replaces the first draw."""
        n, rows, steps = z.shape[0], self.rows, self.diffusion.num_timesteps
        h = n // 2 if self.guided else n
        hb = rows // 2 if self.guided else rows
        c = self.x_T.shape[1]
        # eager: x_T = randn(h, C) (both CFG halves share it), then randn(n, C) per step
        if x_T is None:
            first = second = torch.randn((h, c), generator=generator, device=z.device, dtype=torch.float32)
        else:
            first, second = x_T[:h], x_T[h:]
        self.z[:h].copy_(z[:h])
        self.x_T[:h].copy_(first)
        if self.guided:
            self.z[hb : hb + h].copy_(z[h:])
            self.x_T[hb : hb + h].copy_(second)
            self.scale.fill_(cfg)
        if rows == n:  # no padding: draw straight into the static buffer
            for view in self.noise_steps:
                view.normal_(generator=generator)  # == torch.randn((n, C), generator=...)
            return
        draws = torch.empty((steps, n, c), device=z.device)
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
        """The real rows of the output (N, C), in the eager layout (a fresh tensor)."""
        assert self.out is not None
        if self.rows == n:
            return self.out.clone()
        if self.guided:
            h, hb = n // 2, self.rows // 2
            return torch.cat([self.out[:h], self.out[hb : hb + h]])
        return self.out[:n].clone()


class _GraphCache:
    """LRU cache of captured chains; copies and pickles as an empty cache (graphs cannot be)."""

    def __init__(self, max_entries: int = 24):
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, _StaticChain] = OrderedDict()
        self.weights: tuple = ()  # (data_ptr, dtype) of the parameters the graphs read
        self.pools: dict[torch.device, tuple] = {}  # one memory pool + capture stream per device
        self.failed = False  # a capture failed: sample eagerly from then on
        self.captures = 0

    def clear(self) -> None:
        self.entries.clear()
        self.pools.clear()

    def __deepcopy__(self, memo: dict) -> _GraphCache:
        return _GraphCache(self.max_entries)

    def __getstate__(self) -> dict:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])


class DiffLoss(nn.Module):
    """Per-token diffusion loss and sampler around :class:`SimpleMLPAdaLN`.

    ``cuda_graph`` (attribute, default True): let :meth:`sample` replay CUDA graphs for
    inputs on a GPU (see :meth:`graph_refusal` for the cases that always run eagerly).
    """

    def __init__(
        self,
        target_channels: int,
        z_channels: int,
        depth: int,
        width: int,
        num_sampling_steps: str | int = "100",
        grad_checkpointing: bool = False,
        learn_sigma: bool = True,
        noise_schedule: str = "cosine",
        num_train_steps: int = 1000,
    ):
        super().__init__()
        self.in_channels = target_channels
        self.learn_sigma = learn_sigma
        self.noise_schedule = noise_schedule
        self.num_train_steps = num_train_steps
        self.num_sampling_steps = str(num_sampling_steps)
        self.net = SimpleMLPAdaLN(
            in_channels=target_channels,
            model_channels=width,
            out_channels=target_channels * (2 if learn_sigma else 1),
            z_channels=z_channels,
            num_res_blocks=depth,
            grad_checkpointing=grad_checkpointing,
        )
        self.train_diffusion = self._make_diffusion("")
        self._gen_cache: dict[str, GaussianDiffusion] = {}
        self._compiled: tuple | None = None
        self.cuda_graph = True
        self._graphs = _GraphCache()

    def _apply(self, fn, *args, **kwargs):  # .to() / .half() / .cuda(): captured pointers go stale
        self._graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def compile_sampler(self, **compile_kwargs) -> None:
        """Opt-in: ``torch.compile`` the denoiser used by :meth:`sample` (dynamic row count).

        Sampling runs the small MLP hundreds of times per image, so it is launch-bound on a
        GPU; compiling fuses its elementwise ops. The first call pays the compile time.
        """
        kw = {"dynamic": True, **compile_kwargs}
        self._compiled = (
            torch.compile(self.net.forward_embedded, **kw),
            torch.compile(self.net.forward_with_cfg_embedded, **kw),
        )

    def _make_diffusion(self, respacing: str) -> GaussianDiffusion:
        return create_diffusion(
            respacing,
            noise_schedule=self.noise_schedule,
            num_steps=self.num_train_steps,
            learn_sigma=self.learn_sigma,
        )

    def gen_diffusion(self, num_sampling_steps: str | int | None = None) -> GaussianDiffusion:
        """The respaced sampling diffusion (cached per respacing string)."""
        key = self.num_sampling_steps if num_sampling_steps is None else str(num_sampling_steps)
        if key not in self._gen_cache:
            self._gen_cache[key] = self._make_diffusion(key)
        return self._gen_cache[key]

    def forward(self, target: Tensor, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scalar loss; target (N, C), z (N, C_z), mask (N,) 1 = counts (mean over masked rows)."""
        t = torch.randint(0, self.train_diffusion.num_timesteps, (target.shape[0],), device=target.device)
        terms = self.train_diffusion.training_losses(lambda x, ts: self.net(x, ts, z), target, t)
        loss = terms["loss"]
        if mask is not None:
            mask = mask.to(loss.dtype)
            return (loss * mask).sum() / mask.sum().clamp(min=1)
        return loss.mean()

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        temperature: float = 1.0,
        cfg: float = 1.0,
        *,
        num_sampling_steps: str | int | None = None,
        generator: torch.Generator | None = None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        paste_known: bool = False,
        noise: Tensor | None = None,
        cuda_graph: bool | None = None,
    ) -> Tensor:
        """Sample token latents (N, C) for conditions z (N, C_z).

        With ``cfg != 1`` z is laid out [cond | uncond]; both halves start from the same
        noise and the returned rows of the two halves are the same guided chain's
        first half and a companion chain (use the first half).
        ``known`` / ``known_mask``: RePaint (see :meth:`GaussianDiffusion.p_sample_loop`; known
        rows come back as the last step's mean, or as ``known`` with ``paste_known``).
        ``noise`` (N, C): the initial x_T instead of a draw (with CFG pass the same rows in
        both halves, as the sampler draws them); the per-step noise still comes from
        ``generator``, in the same calls as without it.
        ``cuda_graph`` (None = the ``cuda_graph`` attribute) replays a captured CUDA graph
        of the whole chain where :meth:`graph_refusal` allows it; same draws as eager.
        """
        n = z.shape[0]
        if noise is not None and tuple(noise.shape) != (n, self.in_channels):
            raise ValueError(
                f"noise: expected x_T of shape {(n, self.in_channels)}, got {tuple(noise.shape)}"
            )
        use_graph = self.cuda_graph if cuda_graph is None else cuda_graph
        if use_graph and self.graph_refusal(z, cfg, known) is None:
            diffusion = self.gen_diffusion(num_sampling_steps)
            out = self._sample_graphed(z, temperature, cfg, diffusion, generator, x_T=noise)
            if out is not None:
                return out
        dtype = torch.float32
        x_T = noise
        # The condition embedding is the same at every step; the sampling loop calls the
        # model with one timestep for all rows, so one time-embedding row is broadcast.
        c_emb = self.net.cond_embed(z)
        fwd, fwd_cfg = self._compiled or (self.net.forward_embedded, self.net.forward_with_cfg_embedded)
        if cfg != 1.0:
            if x_T is None:
                x_T = torch.randn(
                    (n // 2, self.in_channels), generator=generator, device=z.device, dtype=dtype
                )
                x_T = torch.cat([x_T, x_T], dim=0)
            scale = torch.tensor(cfg, device=z.device) if self._compiled else cfg

            def model_fn(x: Tensor, t: Tensor) -> Tensor:
                return fwd_cfg(x, self.net.time_embed(t[:1]), c_emb, scale).float()
        else:
            if x_T is None:
                x_T = torch.randn((n, self.in_channels), generator=generator, device=z.device, dtype=dtype)

            def model_fn(x: Tensor, t: Tensor) -> Tensor:
                return fwd(x, self.net.time_embed(t[:1]), c_emb).float()

        return self.gen_diffusion(num_sampling_steps).p_sample_loop(
            model_fn,
            x_T.to(dtype),
            temperature=temperature,
            generator=generator,
            known=known,
            known_mask=known_mask,
            paste_known=paste_known,
        )

    # -- CUDA-graph path

    def graph_refusal(self, z: Tensor, cfg: float, known: Tensor | None = None) -> str | None:
        """Why :meth:`sample` runs eagerly for these inputs (None: the graph path may be used)."""
        if known is not None:
            return "known entries (RePaint injection) are sampled eagerly"
        if self._compiled is not None:
            return "the torch.compile'd sampler is used instead"
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

    def _graph_key(
        self, diffusion: GaussianDiffusion, rows: int, guided: bool, temperature: float, z: Tensor
    ) -> tuple:
        return (
            id(diffusion),  # cached per respacing; the chain keeps a reference, so ids stay unique
            rows,
            guided,
            temperature,
            z.dtype,
            z.device,
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
            torch.get_float32_matmul_precision(),
        )

    def _static_chain(
        self,
        diffusion: GaussianDiffusion,
        rows: int,
        guided: bool,
        temperature: float,
        z: Tensor,
        capture: bool = True,
    ) -> _StaticChain | None:
        """The cached chain for this shape, capturing it on first use (None if capture failed)."""
        cache = self._graphs
        weights = tuple((p.data_ptr(), p.dtype) for p in self.net.parameters())
        if weights != cache.weights:  # parameters were replaced: the graphs read old memory
            cache.clear()
            cache.weights = weights
        key = self._graph_key(diffusion, rows, guided, temperature, z) + (capture,)
        chain = cache.entries.get(key)
        if chain is not None:
            cache.entries.move_to_end(key)
            return chain
        chain = _StaticChain(self, diffusion, rows, guided, temperature, z)
        if capture:
            dev = z.device
            if dev not in cache.pools:
                cache.pools[dev] = (torch.cuda.graph_pool_handle(), torch.cuda.Stream(dev))
            pool, stream = cache.pools[dev]
            try:
                with torch.cuda.device(dev):
                    chain.capture(pool, stream)
            except Exception as e:  # noqa: BLE001 - any capture failure means: sample eagerly
                cache.failed = True
                cache.clear()
                warnings.warn(
                    f"DiffLoss: CUDA-graph capture failed ({type(e).__name__}: {e}); sampling eagerly",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return None
            cache.captures += 1
        cache.entries[key] = chain
        while len(cache.entries) > cache.max_entries:
            cache.entries.popitem(last=False)
        return chain

    def _sample_graphed(
        self,
        z: Tensor,
        temperature: float,
        cfg: float,
        diffusion: GaussianDiffusion,
        generator: torch.Generator | None,
        capture: bool = True,
        x_T: Tensor | None = None,
    ) -> Tensor | None:
        """The graph path of :meth:`sample` (``capture=False`` runs the same buffers eagerly)."""
        n = z.shape[0]
        guided = cfg != 1.0
        rows = 2 * graph_rows(n // 2) if guided else graph_rows(n)
        # Capture before drawing any noise: if it fails, the eager path sees the same generator.
        chain = self._static_chain(diffusion, rows, guided, float(temperature), z, capture)
        if chain is None:
            return None
        chain.fill(z, cfg, generator, x_T)
        chain.run()
        return chain.result(n)
