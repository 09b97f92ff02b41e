"""Diffusion loss head of MAR: a small MLP denoiser conditioned per token.

``SimpleMLPAdaLN`` predicts (eps, variance interpolation) for one token's latent
x_t given the timestep and the transformer's output z for that token. Its module
and parameter names match the official checkpoint (``diffloss.net.*``).

``DiffLoss`` wraps it with a 1000-step training diffusion and a respaced sampling
diffusion; classifier-free guidance is applied to eps only.

Sampling runs the MLP once per respaced step (100) for every MAR iteration, ~85 small
kernels each: on a GPU it is launch-bound. On CUDA, ``DiffLoss.sample`` therefore
replays the whole reverse chain of one call as a CUDA graph per (padded row count, CFG
on/off, temperature, respacing, dtype / autocast state) (:mod:`maskar.nn.graphed_chain`);
the noise is pre-drawn with the eager path's generator calls, so the graph path gives the
eager tokens up to floating-point reordering (see docs/mar.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from maskar import env
from maskar.nn import linear_gelu
from maskar.nn.diffusion import GaussianDiffusion, create_diffusion
from maskar.nn.graphed_chain import GraphedHead

# maskar.kernels.adaln_mlp once loaded (DiffLoss with fused_blocks on; stays None without Triton)
_fused_kernels = None


def load_fused_kernels() -> None:
    """Import the fused residual-block kernels (when a head is switched to them, never inside a
    torch.compile trace)."""
    global _fused_kernels
    if _fused_kernels is None:
        try:
            from maskar.kernels import adaln_mlp
        except ImportError:  # no Triton on this install: the torch path runs
            return
        _fused_kernels = adaln_mlp


def fused_blocks_apply(x: Tensor, modulation: tuple[Tensor, Tensor] | None) -> bool:
    """Whether the fused residual-block kernels can run this step: loaded, batched modulation
    (its weight in the compute dtype fp16 / bf16), a width the kernels' K steps divide, no
    autograd, CUDA or the Triton interpreter."""
    if _fused_kernels is None or modulation is None or torch.is_grad_enabled():
        return False
    if modulation[0].dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] % _fused_kernels.K_MULTIPLE:
        return False
    return x.is_cuda or _fused_kernels._INTERPRET


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
        return self.modulated(x, self.adaLN_modulation(y))

    def modulated(self, x: Tensor, mod: Tensor) -> Tensor:
        """The block for a given modulation ``mod`` = adaLN_modulation(y) (N, 3C)."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.modulated(x, self.adaLN_modulation(y))

    def modulated(self, x: Tensor, mod: Tensor) -> Tensor:
        shift, scale = mod.chunk(2, dim=-1)
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

    def modulation_weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Every adaLN projection (the res blocks', then the final layer's) as one weight
        ((3 * blocks + 2) W, W) and bias, the weight cast to ``dtype`` (the autocast dtype: the
        values the per-block path's autocast casts give each weight)."""
        linears = [b.adaLN_modulation[-1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[-1]]
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears])
        return (weight if dtype is None else weight.to(dtype)), bias

    def forward_embedded(
        self, x: Tensor, t_emb: Tensor, c_emb: Tensor, modulation: tuple[Tensor, Tensor] | None = None,
        fused: bool = False,
    ) -> Tensor:  # fmt: skip
        """Forward with precomputed embeddings: t_emb (N or 1, W), c_emb = cond_embed(c) (N, W).

        ``modulation`` (:meth:`modulation_weights`): every adaLN projection reads the same
        SiLU(y), so they run as one matmul (inference: at the sampler's few hundred rows seven
        narrow matmuls each fill a fraction of the GPU); the same function, rounded per the
        one kernel. ``fused`` (where :func:`fused_blocks_apply`): each residual block as two
        Triton kernels, the final layer as one (:mod:`maskar.kernels.adaln_mlp`)."""
        x = self.input_proj(x)
        y = t_emb + c_emb
        if fused and fused_blocks_apply(x, modulation):
            return self._forward_fused(x, linear_gelu.linear(F.silu(y), *modulation), modulation[0].dtype)
        if modulation is not None:
            width = x.shape[-1]
            mods = linear_gelu.linear(F.silu(y), *modulation).split(
                [3 * width] * len(self.res_blocks) + [2 * width], dim=-1
            )
            for block, mod in zip(self.res_blocks, mods):
                x = block.modulated(x, mod)
            return self.final_layer.modulated(x, mods[-1])
        for block in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)

    def _forward_fused(self, x: Tensor, mods: Tensor, dtype: torch.dtype) -> Tensor:
        """The blocks and the final layer on the batched modulation ``mods`` (N, (3 blocks + 2) W)
        through the fused kernels, the same rounding steps as the module path (see the kernels)."""
        kern, width = _fused_kernels, x.shape[-1]
        x = x.to(dtype).contiguous()
        for i, block in enumerate(self.res_blocks):
            base, lin1, lin2, ln = 3 * width * i, block.mlp[0], block.mlp[2], block.in_ln
            h = kern.modulated_linear_op(x, mods, base, base + width, ln.weight, ln.bias, ln.eps,
                                         lin1.weight.to(dtype), lin1.bias.to(dtype), "silu")
            x = kern.gated_residual_linear_op(h, lin2.weight.to(dtype), lin2.bias.to(dtype), x, mods,
                                              base + 2 * width)
        final, base = self.final_layer, 3 * width * len(self.res_blocks)
        return kern.modulated_linear_op(x, mods, base, base + width, None, None, final.norm_final.eps,
                                        final.linear.weight.to(dtype), final.linear.bias.to(dtype), "none")

    def forward_with_cfg(self, x: Tensor, t: Tensor, c: Tensor, cfg_scale: float) -> Tensor:
        """Guided output for a batch laid out [cond | uncond] whose halves share x.

        The first half of x is run with both halves of c; eps = eps_u + s (eps_c - eps_u)
        is written to both halves; the variance channels pass through unguided.
        """
        return self.forward_with_cfg_embedded(x, self.time_embed(t), self.cond_embed(c), cfg_scale)

    def forward_with_cfg_embedded(
        self,
        x: Tensor,
        t_emb: Tensor,
        c_emb: Tensor,
        cfg_scale: float | Tensor,
        modulation: tuple[Tensor, Tensor] | None = None,
        fused: bool = False,
    ) -> Tensor:
        half = x[: len(x) // 2]
        out = self.forward_embedded(torch.cat([half, half], dim=0), t_emb, c_emb, modulation, fused)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond_eps, uncond_eps = eps.float().chunk(2, dim=0)
        # The official uncond + s * (cond - uncond), in float32 (bitwise official in fp32; under
        # autocast one rounding at the end). A 0-d float32 tensor scale (compiled / CUDA-graph
        # sampler) gives the same result as the Python float, which the kernels round to float32.
        guided = (uncond_eps + cfg_scale * (cond_eps - uncond_eps)).to(eps.dtype)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


class DiffLoss(GraphedHead):
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
        self._t_table: Tensor | None = None  # the time-embedding table while sample() uses it
        # (key, table, the respaced diffusions whose rows it holds)
        self._t_store: tuple[tuple, Tensor, set[GaussianDiffusion]] | None = None
        if self.fused_blocks:
            load_fused_kernels()

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

    # -- sampling (GraphedHead: eager or CUDA-graph chain, opt-in compile of the step)

    compile_defaults = {"dynamic": True}  # the row count changes every MAR iteration

    def sample_shape(self, z: Tensor) -> tuple[int, ...]:
        return (self.in_channels,)

    # "auto": the adaLN projections as one matmul in CUDA sampling (SimpleMLPAdaLN.forward_embedded);
    # True / False force it on / off everywhere (the CPU keeps the per-block path by default, so
    # its seeded samples stay those recorded before).
    batched_modulation: bool | str = "auto"

    def embed(self, z: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(cond_embed(z), the concatenated adaLN weights or None): the same at every step. Made
        inside each chain (and so inside its CUDA graph): a replay reads the current weights."""
        use = self.batched_modulation
        if use == "auto":
            use = z.is_cuda and not (self.training and torch.is_grad_enabled())
        modulation = None
        if use:
            dev = z.device.type
            modulation = self.net.modulation_weights(
                torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            )
        return self.net.cond_embed(z), modulation

    # The sampling loop calls the model with one timestep for all rows, so one time-embedding
    # row is broadcast.

    # Each residual block as two Triton kernels in fp16 / bf16 sampling with the batched
    # modulation (maskar.kernels.adaln_mlp; ~31 -> ~17 kernels a step). Off: slower on an H200
    # (2026-12-05); MASKAR_HEAD_FUSED=1 or set_fused_blocks(True) turns it on.
    fused_blocks: bool = bool(env.switch("MASKAR_HEAD_FUSED"))

    def set_fused_blocks(self, on: bool) -> None:
        """Switch this head's fused residual blocks on / off (loads the kernels)."""
        if on:
            load_fused_kernels()
        self.fused_blocks = on

    def step(self, x: Tensor, t: Tensor, cond: tuple, labels: Tensor | None = None) -> Tensor:
        c_emb, modulation = cond
        return self.net.forward_embedded(x, self._time_embedding(t), c_emb, modulation, self.fused_blocks)

    def step_cfg(
        self, x: Tensor, t: Tensor, cond: tuple, labels: Tensor | None, scale: float | Tensor
    ) -> Tensor:
        c_emb, modulation = cond
        return self.net.forward_with_cfg_embedded(
            x, self._time_embedding(t), c_emb, scale, modulation, self.fused_blocks
        )

    # "auto": in CUDA sampling each step gathers its time embedding from a table instead of
    # running the timestep MLP (sinusoid, two one-row linears, SiLU: about 4 of the ~35 kernels
    # of a compiled step, 10 eagerly, at every one of MAR-B's 25,600 steps at num_iter 256).
    # The table's rows are the same one-row calls, made outside the chain and its CUDA graph,
    # once per weights (remade in place when the timestep MLP's weights change, so captured
    # graphs read the new rows). True / False force it on / off (the CPU keeps it off by default).
    time_table: bool | str = "auto"

    def graph_key(self) -> tuple:
        # a chain captured with the table reads it; one captured with the fused blocks runs them
        return (self._t_table is not None, bool(self.fused_blocks))

    def _time_embedding(self, t: Tensor) -> Tensor:
        """(1, W) embedding of the step's timestep t[0] (every row shares it)."""
        table = self._t_table
        if table is not None:
            return table.index_select(0, t[:1])
        return self.net.time_embed(t[:1])

    @contextlib.contextmanager
    def _time_table_for(self, z: Tensor, diffusion: GaussianDiffusion) -> Iterator[None]:
        """Inside: ``step`` reads the time embeddings of ``diffusion``'s timesteps from the table,
        filled first with its rows unless they are there (all of them again when the weights,
        their version, the device or the autocast state changed)."""
        use = self.time_table
        if use == "auto":
            use = z.is_cuda
        capturing = z.is_cuda and torch.cuda.is_current_stream_capturing()
        if not use or capturing or (self.training and torch.is_grad_enabled()):
            yield
            return
        dev = z.device
        params = list(self.net.time_embed.parameters())
        autocast = torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type)
        key = (dev, autocast, self._compiled is not None, *((q.data_ptr(), q._version) for q in params))
        store = self._t_store
        if store is None or store[0] != key:
            covered: set[GaussianDiffusion] = set()
            table = None if store is None else store[1]
        else:
            _, table, covered = store
        if diffusion not in covered:
            rows = sorted({int(v) for v in diffusion.timestep_map})
            with self.low_precision_weights(dev):  # what the compiled step's linears read
                new = torch.cat([
                    self.net.time_embed(torch.full((1,), v, dtype=torch.long, device=dev)) for v in rows
                ])
            shape = (max(self.num_train_steps, rows[-1] + 1), new.shape[1])
            if table is None or table.shape != shape or table.dtype != new.dtype or table.device != dev:
                table = torch.zeros(shape, dtype=new.dtype, device=dev)
                self._graphs.clear()  # captured chains read the old table's memory
            table[torch.tensor(rows, device=dev)] = new
            covered = covered | {diffusion}
        self._t_store = (key, table, covered)
        self._t_table = table
        try:
            yield
        finally:
            self._t_table = None

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
        diffusion = self.gen_diffusion(num_sampling_steps)
        with self._time_table_for(z, diffusion):
            return self.sample_chain(z, temperature, cfg, diffusion, generator, known=known,
                                     known_mask=known_mask, paste_known=paste_known, noise=noise,
                                     cuda_graph=cuda_graph)
