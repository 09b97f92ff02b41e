"""Gaussian diffusion (DDPM / IDDPM) for diffusion heads: MAR's MLP head, CASMAR's DiT head.

The math follows Ho et al. 2020 and Nichol & Dhariwal 2021 (IDDPM), as used by
DiT and MAR:

- beta schedules: ``cosine`` (IDDPM, max beta 0.999) and ``linear`` (DDPM, scaled to T);
- the model predicts epsilon; its variance is either learned ("learned_range":
  a second output half interpolates log beta and log posterior variance in log
  space) or fixed ("fixed_large" = beta_t, "fixed_small" = posterior variance);
- the training loss is MSE(eps) plus, with a learned variance, the variational
  bound term (KL / decoder NLL in bits) on a stop-gradient mean; the VB term is
  not rescaled (IDDPM ``LossType.MSE``);
- respacing keeps a subset of the T steps (IDDPM ``space_timesteps``) and
  recomputes betas from alpha_bar; the model still sees the original indices;
- ancestral sampling multiplies the noise std by a temperature (MAR);
- optional known-entry replacement (RePaint): before each reverse step the known
  entries of x_t are overwritten with q(x_t | x_0) drawn with the initial noise.

All schedule arrays are computed in float64 numpy and gathered per call as float32, and
every sampling step runs the official arithmetic in the official order (IDDPM
``p_mean_variance`` / ``p_sample``): x_0 = a x_t - b eps first, then the posterior mean
c1 x_0 + c2 x_t, then mean + std * noise * temperature with std = exp(0.5 log_var). A step
therefore gives the official code's float32 result bit for bit (same kernels), which is what
lets a user compare maskar with it; docs/mar.md gives the accuracy of this order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> model output
# (x_t, model output, noise, coefficient row, temperature, learned variance, clip, last step) -> x_{t-1}
PosteriorFn = Callable[[Tensor, Tensor, Tensor, Tensor, float, bool, bool, bool], Tensor]
VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")


# ----------------------------------------------------------------------------- schedules


def cosine_alpha_bar(t: float) -> float:
    """IDDPM cosine alpha_bar at continuous time t in [0, 1] (offset s = 0.008)."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(
    num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


def get_betas(schedule: str, num_steps: int) -> np.ndarray:
    """(T,) float64 betas of a named schedule."""
    if schedule == "cosine":
        return betas_for_alpha_bar(num_steps, cosine_alpha_bar)
    if schedule == "linear":
        # DDPM's 1e-4 .. 0.02 for T=1000, scaled so other T give a similar process.
        scale = 1000 / num_steps
        return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
    raise ValueError(f"noise schedule: expected 'cosine' or 'linear', got {schedule!r}")


def space_timesteps(num_steps: int, section_counts: str | int | list[int]) -> set[int]:
    """Which of ``num_steps`` original steps to keep (IDDPM semantics).

    ``"100"`` keeps 100 evenly spread steps (first and last included); ``"10,15,20"``
    splits the range into three equal sections and keeps that many from each;
    ``"ddimN"`` keeps ``range(0, T, stride)`` for the stride giving exactly N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == desired:
                    return set(range(0, num_steps, stride))
            raise ValueError(
                f"respacing {section_counts!r}: no integer stride gives {desired} of {num_steps} steps"
            )
        try:
            counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"respacing: expected 'N', 'N1,N2,...' or 'ddimN', got {section_counts!r}"
            ) from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    size_per = num_steps // len(counts)
    extra = num_steps % len(counts)
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count or count < 1:
            raise ValueError(f"respacing: cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate in float and round with Python's round(), exactly as IDDPM does.
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return set(kept)


# ----------------------------------------------------------------------------- likelihood helpers


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Phi(x) used by IDDPM's decoder NLL."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of data x in [-1, 1] quantised to 256 bins (edges extend to +-inf)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


_DEVICE_CACHE: dict[tuple[int, str], tuple[np.ndarray, Tensor]] = {}


def _on_device(arr: np.ndarray, device: torch.device) -> Tensor:
    """``arr`` as a tensor on ``device``, cached so sampling loops do not re-upload it."""
    key = (id(arr), str(device))
    hit = _DEVICE_CACHE.get(key)
    if hit is None or hit[0] is not arr:  # the id may have been reused by a new array
        hit = (arr, torch.from_numpy(arr).to(device))
        if len(_DEVICE_CACHE) > 512:
            _DEVICE_CACHE.clear()
        _DEVICE_CACHE[key] = hit
    return hit[1]


def posterior_step(
    x_t: Tensor,
    out: Tensor,
    noise: Tensor,
    coef: Tensor,
    temperature: float,
    learned: bool,
    clip: bool,
    last: bool,
) -> Tensor:
    """:meth:`GaussianDiffusion.p_sample_at`'s arithmetic after the model call, on a row ``coef``
    of :meth:`GaussianDiffusion.step_coefficients` (float32 0-d tensors multiply as the Python
    scalars do, rounded to float32): the same ops in the same order. Compiled (the heads'
    ``compile_sampler``) it is one kernel instead of ~12 per step; Inductor may contract a
    multiply-add into one FMA, so the compiled form equals this one to rounding."""
    out = out.float()
    c = x_t.shape[1]
    eps = out[:, :c] if learned else out
    x0 = coef[0] * x_t - coef[1] * eps
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = coef[2] * x0 + coef[3] * x_t
    if last:
        return mean
    if learned:
        frac = (out[:, c:] + 1) / 2
        log_var = frac * coef[4] + (1 - frac) * coef[5]
    else:
        log_var = coef[4].expand_as(x_t)
    return mean + torch.exp(0.5 * log_var) * noise * temperature


def _gather(arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """arr[t] as a tensor broadcastable to ``like`` (N, 1, ...), in like's dtype."""
    out = _on_device(arr, t.device)[t].to(like.dtype)
    return out.reshape(out.shape + (1,) * (like.ndim - 1))


# ----------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """A discrete Gaussian diffusion process over ``len(betas)`` steps.

    ``timestep_map`` maps this process's step index to the index the model was
    trained with (identity unless respaced).
    """

    def __init__(
        self, betas: np.ndarray, var_type: str = "learned_range", timestep_map: list[int] | None = None
    ):
        if var_type not in VAR_TYPES:
            raise ValueError(f"diffusion variance type: expected one of {list(VAR_TYPES)}, got {var_type!r}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("diffusion betas: expected a 1-D array in (0, 1]")
        self.var_type = var_type
        self.learn_sigma = var_type == "learned_range"
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.asarray(
            timestep_map if timestep_map is not None else range(len(betas)), dtype=np.int64
        )

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; clip the log with the t=1 value.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.log_betas = np.log(betas)
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self._coef_tables: dict[torch.device, Tensor] = {}  # step_coefficients, per device
        self._timestep_tensors: dict[torch.device, Tensor] = {}  # timestep_tensor, per device

    def timestep_tensor(self, device: torch.device | str) -> Tensor:
        """(T,) int64 on ``device``: the model's timestep of each step index (``timestep_map``).
        A step's (N,) timestep is a stride-0 view of one entry: no fill kernel per step. Made
        once per device, outside any CUDA-graph capture (see :class:`StaticChain`)."""
        device = torch.device(device)
        t = self._timestep_tensors.get(device)
        if t is None:
            t = self._timestep_tensors[device] = torch.from_numpy(np.asarray(self.timestep_map)).to(device)
        return t

    def step_coefficients(self, device: torch.device | str) -> Tensor:
        """(T, 6) float32 on ``device``, per step index: sqrt(1/ᾱ), sqrt(1/ᾱ - 1), the two
        posterior-mean coefficients, then the log variance (learned range: log β and the
        clipped posterior log variance; fixed: the fixed log variance, twice); see
        :func:`posterior_step`. Made once per device (the sampling loop reads it every step)."""
        device = torch.device(device)
        table = self._coef_tables.get(device)
        if table is None:
            lv = self.posterior_log_variance_clipped
            if self.var_type == "fixed_large":
                lv = self.fixed_large_log_variance
            cols = [
                self.sqrt_recip_alphas_cumprod,
                self.sqrt_recipm1_alphas_cumprod,
                self.posterior_mean_coef1,
                self.posterior_mean_coef2,
                self.log_betas if self.learn_sigma else lv,
                self.posterior_log_variance_clipped if self.learn_sigma else lv,
            ]
            # float64 -> float32 rounds to nearest, as a kernel rounds a Python scalar operand
            table = torch.from_numpy(np.stack(cols, axis=1)).to(device=device, dtype=torch.float32)
            self._coef_tables[device] = table
        return table

    # -- forward process

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            _gather(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            _gather(self.posterior_mean_coef1, t, x_t) * x_start
            + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        var = _gather(self.posterior_variance, t, x_t)
        log_var = _gather(self.posterior_log_variance_clipped, t, x_t)
        return mean, var, log_var

    # -- reverse process

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def model_log_variance(self, var_values: Tensor | None, x_t: Tensor, t: Tensor) -> Tensor:
        """log sigma_t^2 of p(x_{t-1} | x_t) shaped like x_t; ``var_values`` in [-1, 1] for learned_range."""
        if self.var_type == "learned_range":
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = _gather(self.log_betas, t, x_t)
            frac = (var_values + 1) / 2  # model output in [-1, 1] -> [0, 1]
            return frac * max_log + (1 - frac) * min_log
        # Dense like the official tensors, so exp() takes the same kernel path on them.
        if self.var_type == "fixed_large":
            # beta_t, with the first entry set to the posterior variance (better decoder likelihood)
            return _gather(self.fixed_large_log_variance, t, x_t).expand_as(x_t).contiguous()
        return _gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t).contiguous()

    def model_variance(self, log_var: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """sigma_t^2 as the official ``p_mean_variance`` returns it: exp(log_var) for a learned
        variance; the unclipped table for fixed ones (so fixed_small is 0 at t = 0)."""
        if self.var_type == "learned_range":
            return torch.exp(log_var)
        table = self.fixed_large_variance if self.var_type == "fixed_large" else self.posterior_variance
        return _gather(table, t, x_t).expand_as(x_t).contiguous()

    def split_output(self, out: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Model output -> (eps, var_values); channels are on dim 1."""
        c = x_t.shape[1]
        if self.learn_sigma:
            if out.shape[1] != 2 * c:
                raise ValueError(
                    f"learned-variance diffusion: model output has {out.shape[1]} channels, expected {2 * c}"
                )
            return out[:, :c], out[:, c:]
        if out.shape[1] != c:
            raise ValueError(
                f"fixed-variance diffusion: model output has {out.shape[1]} channels, expected {c}"
            )
        return out, None

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Indices the model was trained with, for this process's step indices t."""
        return _on_device(self.timestep_map, t.device)[t]

    def p_mean_variance(
        self, model_fn: ModelFn, x_t: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) for per-row step indices t (N,), as the official ``p_mean_variance``.

        Returns ``mean``, ``variance``, ``log_variance`` (each shaped like x_t), the model's
        ``pred_xstart`` (clamped to [-1, 1] with ``clip_denoised``) and ``eps``.
        """
        out = model_fn(x_t, self.model_timesteps(t))
        eps, var_values = self.split_output(out, x_t)
        log_var = self.model_log_variance(var_values, x_t, t)
        x0 = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return {
            "mean": mean,
            "variance": self.model_variance(log_var, x_t, t),
            "log_variance": log_var,
            "pred_xstart": x0,
            "eps": eps,
        }

    def p_sample(
        self,
        model_fn: ModelFn,
        x_t: Tensor,
        t: Tensor,
        *,
        temperature: float = 1.0,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1}; temperature multiplies the noise std (no noise at t=0)."""
        out = self.p_mean_variance(model_fn, x_t, t, clip_denoised)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise * temperature

    def p_sample_loop(
        self,
        model_fn: ModelFn,
        noise: Tensor,
        *,
        temperature: float = 1.0,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
        known: Tensor | None = None,
        known_mask: Tensor | None = None,
        paste_known: bool = False,
        step_noise: Sequence[Tensor] | None = None,
        posterior: PosteriorFn | None = None,
    ) -> Tensor:
        """Run the reverse process from x_T = ``noise`` down to x_0.

        ``known`` (x_0 values) and ``known_mask`` (bool, broadcastable to x) enable
        RePaint-style conditioning: before each step the known entries of x_t are
        replaced by q_sample(known, t, initial noise). As in the official loop, the result
        at known entries is the last step's mean; ``paste_known=True`` writes the known x_0
        there instead (editing, where they must come back unchanged).
        ``step_noise`` (one tensor shaped like x per step, in sampling order) replaces the
        N(0, 1) draw of each step: the CUDA-graph sampler pre-draws it into static buffers
        with this loop's generator calls. ``posterior``: see :meth:`p_sample_at`.
        """
        if (known is None) != (known_mask is None):
            raise ValueError("p_sample_loop: pass both known and known_mask, or neither")
        if step_noise is not None and len(step_noise) != self.num_timesteps:
            raise ValueError(f"p_sample_loop: {len(step_noise)} step noises for {self.num_timesteps} steps")
        x = noise
        for k, i in enumerate(reversed(range(self.num_timesteps))):
            if known is not None:
                x = torch.where(known_mask, self.q_sample_at(known, i, noise), x)
            x = self.p_sample_at(
                model_fn,
                x,
                i,
                temperature=temperature,
                clip_denoised=clip_denoised,
                generator=generator,
                noise=None if step_noise is None else step_noise[k],
                posterior=posterior,
            )
        if known is not None and paste_known:
            x = torch.where(known_mask, known.to(x.dtype), x)
        return x

    # The sampling loop uses one step index for the whole batch: the schedule coefficients
    # are then Python scalars, which saves ~10 tiny gather kernels per step on a GPU. The
    # kernels round a Python scalar to the tensor's float32 before multiplying, so the
    # results equal the official dense float32 coefficient tensors bit for bit.

    def q_sample_at(self, x_start: Tensor, i: int, noise: Tensor) -> Tensor:
        """q_sample with one step index ``i`` for every row."""
        return (
            float(self.sqrt_alphas_cumprod[i]) * x_start
            + float(self.sqrt_one_minus_alphas_cumprod[i]) * noise
        )

    def p_sample_at(
        self,
        model_fn: ModelFn,
        x_t: Tensor,
        i: int,
        *,
        temperature: float = 1.0,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        posterior: PosteriorFn | None = None,
    ) -> Tensor:
        """:meth:`p_sample` with one step index ``i`` for every row (same arithmetic, bitwise).

        ``noise`` (shaped like x_t) replaces the N(0, 1) draw: the CUDA-graph sampler pre-draws
        it into a static buffer with the same generator calls as this eager path.
        ``posterior``: :func:`posterior_step` or a compiled form of it, run on the model output
        instead of the ops below (same generator calls).
        """
        t_model = self.timestep_tensor(x_t.device)[i : i + 1].expand(x_t.shape[0])
        if posterior is not None:
            out = model_fn(x_t, t_model)
            self.split_output(out, x_t)  # the channel-count check
            if noise is None:
                noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            coef = self.step_coefficients(x_t.device)[i]
            return posterior(x_t, out, noise, coef, temperature, self.learn_sigma, clip_denoised, i == 0)
        eps, var_values = self.split_output(model_fn(x_t, t_model), x_t)
        # Official order: x_0 first, then the posterior mean. Folding them into
        # x_t (c1 a + c2) - (c1 b) eps rounds differently, and seeded chains drift apart.
        x0 = float(self.sqrt_recip_alphas_cumprod[i]) * x_t - float(self.sqrt_recipm1_alphas_cumprod[i]) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = float(self.posterior_mean_coef1[i]) * x0 + float(self.posterior_mean_coef2[i]) * x_t
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        if i == 0:
            return mean  # no noise at the last step (officially mean + 0 * ...)
        lo = float(self.posterior_log_variance_clipped[i])
        if self.var_type == "learned_range":
            frac = (var_values + 1) / 2
            log_var = frac * float(self.log_betas[i]) + (1 - frac) * lo
        else:
            lv = float(self.fixed_large_log_variance[i]) if self.var_type == "fixed_large" else lo
            log_var = torch.full_like(x_t, lv)
        return mean + torch.exp(0.5 * log_var) * noise * temperature

    # -- training

    def vb_terms_bpd(
        self, eps: Tensor, var_values: Tensor | None, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> Tensor:
        """Elementwise VB term in bits: KL(q(x_{t-1}|x_t,x_0) || p) for t>0, decoder NLL at t=0."""
        true_mean, _, true_log_var = self.q_posterior(x_start, x_t, t)
        log_var = self.model_log_variance(var_values, x_t, t)
        mean, _, _ = self.q_posterior(self.predict_xstart_from_eps(x_t, t, eps), x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var) / math.log(2.0)
        first = (t == 0).reshape(-1, *([1] * (x_t.ndim - 1)))
        return torch.where(first, nll, kl)

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-row losses (N,): ``mse`` on eps, ``vb`` (learned variance only) and ``loss``.

        ``mask`` (broadcastable to x_start, 1 = counts) zeroes entries before the
        per-row mean (CASMAR's masked MSE); it is not renormalised here.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model_fn(x_t, self.model_timesteps(t))
        eps, var_values = self.split_output(out, x_t)
        m = 1.0 if mask is None else mask.to(x_start.dtype)
        terms = {"mse": mean_flat((noise - eps) ** 2 * m)}
        if self.learn_sigma:
            # The VB term trains only the variance: the mean enters with a stop-gradient.
            vb = self.vb_terms_bpd(eps.detach(), var_values, x_start, x_t, t)
            terms["vb"] = mean_flat(vb * m)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms


def respaced(base_betas: np.ndarray, use_timesteps: set[int], var_type: str) -> GaussianDiffusion:
    """The diffusion over the kept steps, with betas recomputed from alpha_bar."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(base_betas, dtype=np.float64))
    last = 1.0
    new_betas, kept = [], []
    for i, abar in enumerate(alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1.0 - abar / last)
            last = abar
            kept.append(i)
    return GaussianDiffusion(np.array(new_betas), var_type, timestep_map=kept)


def create_diffusion(
    respacing: str | int | None = "",
    *,
    noise_schedule: str = "cosine",
    num_steps: int = 1000,
    learn_sigma: bool = True,
    sigma_small: bool = False,
) -> GaussianDiffusion:
    """DiT/MAR-style factory: ``respacing`` "" or None keeps all ``num_steps`` steps."""
    betas = get_betas(noise_schedule, num_steps)
    var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    if respacing is None or respacing == "":
        respacing = str(num_steps)
    return respaced(betas, space_timesteps(num_steps, respacing), var_type)
