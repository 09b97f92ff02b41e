"""Gaussian diffusion and the MAR diffusion-loss head against direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from maskar.nn.diffloss import DiffLoss, SimpleMLPAdaLN, timestep_embedding
from maskar.nn.diffusion import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    create_diffusion,
    get_betas,
    posterior_step,
    space_timesteps,
)

# ----------------------------------------------------------------------------- schedules


def test_cosine_schedule_closed_form():
    t_steps = 1000
    betas = get_betas("cosine", t_steps)
    f = [math.cos((i / t_steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(t_steps + 1)]
    expected = np.minimum([1 - f[i + 1] / f[i] for i in range(t_steps)], 0.999)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    assert betas[-1] == 0.999  # the last step is clipped
    # alpha_bar_t = f(t+1)/f(0) wherever no clipping happened
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(abar[:-1], np.array(f[1:-1]) / f[0], rtol=1e-10)


def test_linear_schedule_closed_form():
    np.testing.assert_allclose(get_betas("linear", 1000), np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(get_betas("linear", 250), np.linspace(4e-4, 0.08, 250))
    with pytest.raises(ValueError, match="noise schedule"):
        get_betas("sigmoid", 10)


def test_space_timesteps_even_and_sections():
    kept = sorted(space_timesteps(1000, "100"))
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    # closed form: round(k * 999 / 99), with float accumulation as in IDDPM (banker's rounding)
    stride = 999 / 99
    acc, expected = 0.0, []
    for _ in range(100):
        expected.append(round(acc))
        acc += stride
    assert kept == expected
    assert max(abs(k - i * stride) for i, k in enumerate(kept)) <= 0.5 + 1e-9
    assert sorted(space_timesteps(1000, "1000")) == list(range(1000))
    # sections: 10 from [0, 500) and 5 from [500, 1000)
    kept = sorted(space_timesteps(1000, "10,5"))
    assert kept[:10] == [round(i * 499 / 9) for i in range(10)]
    assert kept[10:] == [500 + round(i * 499 / 4) for i in range(5)]
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    assert sorted(space_timesteps(100, "1")) == [0]
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_betas_preserve_alpha_bar():
    base = GaussianDiffusion(get_betas("cosine", 1000))
    spaced = create_diffusion("25", noise_schedule="cosine")
    kept = sorted(space_timesteps(1000, "25"))
    assert spaced.num_timesteps == 25
    assert list(spaced.timestep_map) == kept
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-9)
    full = create_diffusion("")
    np.testing.assert_allclose(full.betas, base.betas, rtol=1e-9)
    # the model is called with the original indices
    seen = []
    spaced.p_sample(
        lambda x, t: (seen.append(t.clone()), torch.zeros(x.shape[0], 2 * x.shape[1]))[1],
        torch.zeros(2, 3),
        torch.tensor([24, 3]),
    )
    assert seen[0].tolist() == [kept[24], kept[3]]


# ----------------------------------------------------------------------------- variance and VB term


def _direct_kl(m1, lv1, m2, lv2):
    # KL between two univariate Gaussians, written from the textbook formula
    v1, v2 = math.exp(lv1), math.exp(lv2)
    return math.log(math.sqrt(v2) / math.sqrt(v1)) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5


def _direct_cdf(x):
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _direct_decoder_nll_bits(x0, mean, log_var):
    std = math.exp(0.5 * log_var)
    lo, hi = (x0 - mean - 1 / 255) / std, (x0 - mean + 1 / 255) / std
    if x0 < -0.999:
        p = _direct_cdf(hi)
    elif x0 > 0.999:
        p = 1 - _direct_cdf(lo)
    else:
        p = _direct_cdf(hi) - _direct_cdf(lo)
    return -math.log(max(p, 1e-12)) / math.log(2)


def test_approx_cdf_close_to_exact():
    x = torch.linspace(-5, 5, 101, dtype=torch.float64)
    np.testing.assert_allclose(approx_standard_normal_cdf(x).numpy(), norm.cdf(x.numpy()), atol=2e-4)


def test_learned_range_variance_and_vb_match_direct_computation():
    torch.manual_seed(0)
    diff = GaussianDiffusion(get_betas("cosine", 50), "learned_range")
    n, c = 6, 3
    x0 = torch.rand(n, c, dtype=torch.float64) * 2 - 1
    x0[0, 0], x0[1, 1] = -1.0, 1.0  # edge bins of the decoder likelihood
    t = torch.tensor([0, 0, 1, 7, 30, 49])
    noise = torch.randn(n, c, dtype=torch.float64)
    eps_pred = torch.randn(n, c, dtype=torch.float64)
    var_v = torch.rand(n, c, dtype=torch.float64) * 2 - 1
    model_out = torch.cat([eps_pred, var_v], dim=1)

    terms = diff.training_losses(lambda x, ts: model_out, x0, t, noise=noise)
    betas = get_betas("cosine", 50)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    for i in range(n):
        ti = int(t[i])
        vb_row, mse_row = 0.0, 0.0
        for j in range(c):
            xt = math.sqrt(abar[ti]) * x0[i, j].item() + math.sqrt(1 - abar[ti]) * noise[i, j].item()
            # learned range: interpolate log beta_t and the (t=0-clipped) log posterior variance
            min_log = math.log(post_var[max(ti, 1)])
            frac = (var_v[i, j].item() + 1) / 2
            log_var = frac * math.log(betas[ti]) + (1 - frac) * min_log
            got = diff.model_log_variance(var_v[i : i + 1, j : j + 1], x0[i : i + 1, :1], t[i : i + 1]).item()
            assert got == pytest.approx(log_var, rel=1e-10)
            # means of q(x_{t-1}|x_t,x_0) and of p with x0 predicted from eps
            x0_hat = (xt - math.sqrt(1 - abar[ti]) * eps_pred[i, j].item()) / math.sqrt(abar[ti])

            def post_mean(a, xt=xt, ti=ti):
                c1 = math.sqrt(abar_prev[ti]) * betas[ti] / (1 - abar[ti])
                c2 = math.sqrt(1 - betas[ti]) * (1 - abar_prev[ti]) / (1 - abar[ti])
                return c1 * a + c2 * xt

            if ti == 0:
                vb = _direct_decoder_nll_bits(x0[i, j].item(), post_mean(x0_hat), log_var)
            else:
                vb = _direct_kl(post_mean(x0[i, j].item()), min_log, post_mean(x0_hat), log_var) / math.log(2)
            vb_row += vb / c
            mse_row += (noise[i, j].item() - eps_pred[i, j].item()) ** 2 / c
        assert terms["vb"][i].item() == pytest.approx(vb_row, rel=1e-6, abs=1e-9)
        assert terms["mse"][i].item() == pytest.approx(mse_row, rel=1e-9)
        # MSE + VB, not rescaled
        assert terms["loss"][i].item() == pytest.approx(mse_row + vb_row, rel=1e-6)


def test_vb_term_trains_only_the_variance():
    diff = GaussianDiffusion(get_betas("cosine", 20), "learned_range")
    out = torch.randn(4, 4, requires_grad=True)
    terms = diff.training_losses(lambda x, t: out, torch.randn(4, 2), torch.tensor([0, 3, 10, 19]))
    (g,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert g[:, :2].abs().max() == 0 and g[:, 2:].abs().max() > 0


def test_fixed_variances():
    betas = get_betas("linear", 30)
    big = GaussianDiffusion(betas, "fixed_large")
    small = GaussianDiffusion(betas, "fixed_small")
    t = torch.arange(30)
    x = torch.zeros(30, 1, dtype=torch.float64)
    abar = np.cumprod(1 - betas)
    post = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
    np.testing.assert_allclose(big.model_log_variance(None, x, t)[1:, 0].numpy(), np.log(betas[1:]))
    np.testing.assert_allclose(big.model_log_variance(None, x, t)[0, 0].item(), np.log(post[0]))
    np.testing.assert_allclose(small.model_log_variance(None, x, t)[1:, 0].numpy(), np.log(post))
    terms = big.training_losses(lambda x, ts: torch.zeros_like(x), torch.randn(30, 2), t)
    assert "vb" not in terms and torch.equal(terms["loss"], terms["mse"])
    with pytest.raises(ValueError, match="channels"):
        big.training_losses(lambda x, ts: torch.zeros(30, 4), torch.randn(30, 2), t)


def test_masked_loss_zeroes_entries():
    diff = GaussianDiffusion(get_betas("cosine", 10), "fixed_large")
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = torch.tensor([2, 5])
    mask = torch.zeros(2, 1, 4)
    mask[..., :2] = 1
    full = diff.training_losses(lambda x, ts: torch.zeros_like(x), x0, t, noise=noise)
    masked = diff.training_losses(lambda x, ts: torch.zeros_like(x), x0, t, noise=noise, mask=mask)
    expected = (noise**2 * mask).mean(dim=(1, 2))
    torch.testing.assert_close(masked["loss"], expected)
    assert not torch.equal(full["loss"], masked["loss"])


# ----------------------------------------------------------------------------- sampling


def test_temperature_scales_the_noise_std():
    diff = GaussianDiffusion(get_betas("cosine", 10), "fixed_large")
    x = torch.zeros(4000, 2)
    t = torch.full((4000,), 5)
    zero = lambda x, ts: torch.zeros_like(x)  # noqa: E731
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = diff.p_sample(zero, x, t, temperature=1.0, generator=g1)
    s05 = diff.p_sample(zero, x, t, temperature=0.5, generator=g2)
    torch.testing.assert_close(s05, 0.5 * s1)  # the mean is 0 here
    expected_std = math.sqrt(diff.betas[5])
    assert s1.std().item() == pytest.approx(expected_std, rel=0.05)
    # no noise at t = 0
    t0 = torch.zeros(4000, dtype=torch.long)
    torch.testing.assert_close(
        diff.p_sample(zero, x, t0, temperature=1.0), diff.p_sample(zero, x, t0, temperature=3.0)
    )


def test_repaint_returns_the_step0_mean_at_known_entries():
    # Reference (casmar_mar.md §3.5): before every reverse step the known entries of x_t are
    # overwritten with q_sample(known, t, initial noise); the loop ends after the step-0
    # p_sample with no write-back, so known entries hold the step-0 mean, not x_0.
    diff = create_diffusion("5", learn_sigma=False)
    known = torch.randn(3, 4)
    known_mask = torch.tensor([[True, False, True, False]]).expand(3, 4)
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return 0.3 * x + t[:, None].float() / 1000

    noise = torch.randn(3, 4)
    out = diff.p_sample_loop(model, noise, known=known, known_mask=known_mask, generator=torch.Generator())
    # before the first step (t = T-1) the known entries equal q_sample(known, T-1, initial noise)
    t_last = torch.full((3,), diff.num_timesteps - 1)
    torch.testing.assert_close(seen[0][known_mask], diff.q_sample(known, t_last, noise)[known_mask])
    torch.testing.assert_close(seen[0][~known_mask], noise[~known_mask])
    x_in = seen[-1]  # what the last step (t = 0) saw
    assert torch.equal(x_in[known_mask], diff.q_sample_at(known, 0, noise)[known_mask])
    mean0 = diff.p_mean_variance(model, x_in, torch.zeros(3, dtype=torch.long))["mean"]
    assert torch.equal(out, mean0)  # everywhere: no noise is added at t = 0
    assert not torch.allclose(out[known_mask], known[known_mask])
    pasted = diff.p_sample_loop(
        model, noise, known=known, known_mask=known_mask, paste_known=True, generator=torch.Generator()
    )
    assert torch.equal(pasted[known_mask], known[known_mask])
    assert torch.equal(pasted[~known_mask], out[~known_mask])


# Official arithmetic (IDDPM gaussian_diffusion.py as used by MAR/CASMAR; casmar_mar.md §2.4):
# coefficients are float64 tables indexed per row, cast to float32 and broadcast densely; the
# step computes x_0 = a x_t - b eps, then mean = c1 x_0 + c2 x_t, the log-variance
# frac log(beta) + (1 - frac) log(posterior var clipped) (learned) or the fixed table, and
# returns mean + nonzero * exp(0.5 log_var) * noise * temperature.


def _extract(arr: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    res = torch.from_numpy(arr)[t].float()
    while res.ndim < len(shape):
        res = res[..., None]
    return res + torch.zeros(shape)


def _official_p_sample(diff, model, x, t, noise, temperature=1.0, clip=False):
    out = model(x, torch.from_numpy(diff.timestep_map)[t])
    c = x.shape[1]
    if diff.var_type == "learned_range":
        eps, v = out[:, :c], out[:, c:]
        min_log = _extract(diff.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract(np.log(diff.betas), t, x.shape)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
    else:
        eps = out
        table = {
            "fixed_large": np.log(np.append(diff.posterior_variance[1], diff.betas[1:])),
            "fixed_small": diff.posterior_log_variance_clipped,
        }[diff.var_type]
        log_var = _extract(table, t, x.shape)
    x0 = (
        _extract(diff.sqrt_recip_alphas_cumprod, t, x.shape) * x
        - _extract(diff.sqrt_recipm1_alphas_cumprod, t, x.shape) * eps
    )
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = (
        _extract(diff.posterior_mean_coef1, t, x.shape) * x0
        + _extract(diff.posterior_mean_coef2, t, x.shape) * x
    )
    nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
    return mean + nonzero * torch.exp(0.5 * log_var) * noise * temperature, mean, log_var


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("var_type", ["learned_range", "fixed_large", "fixed_small"])
def test_sampling_step_is_the_official_arithmetic_bitwise(var_type, clip):
    diff = create_diffusion(
        "100", learn_sigma=var_type == "learned_range", sigma_small=var_type == "fixed_small"
    )
    g = torch.Generator().manual_seed(0)
    c = 4
    w = torch.randn(c, 2 * c if var_type == "learned_range" else c, generator=g)

    def model(x, t):  # eps correlated with x (as a denoiser's is); variance values in (-1, 1)
        out = torch.tanh(x @ w * 1e-3 + t[:, None].float() / 1000)
        return torch.cat([out[:, :c] * 50 + x[:, :1] * 0.9, out[:, c:]], 1)

    for scale in (1.0, 1e4):
        x = torch.randn(64, c, generator=g) * scale
        noise = torch.randn(64, c, generator=g)
        for i in (99, 50, 1, 0):
            t = torch.full((64,), i)
            want, want_mean, want_log_var = _official_p_sample(diff, model, x, t, noise, 0.7, clip)
            got = diff.p_sample_at(model, x, i, temperature=0.7, clip_denoised=clip, noise=noise)
            assert torch.equal(got, want), (scale, i)
            pmv = diff.p_mean_variance(model, x, t, clip_denoised=clip)
            assert torch.equal(pmv["mean"], want_mean) and torch.equal(pmv["log_variance"], want_log_var)
            drawn = torch.Generator().manual_seed(i)
            noise_i = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
            got_row = diff.p_sample(model, x, t, temperature=0.7, clip_denoised=clip, generator=drawn)
            assert torch.equal(got_row, _official_p_sample(diff, model, x, t, noise_i, 0.7, clip)[0])


def test_p_sample_mean_matches_float64_at_t99_with_large_x():
    # The first sampling step (t = 99 of the 100 respaced steps, a ~ b ~ 2e4) with |x| ~ 1e4
    # and a guided eps of a few hundred: the float32 mean is within 1e-6 (relative to its
    # largest entry) of the same formula evaluated in float64.
    diff = create_diffusion("100")
    i = 99
    a, b = diff.sqrt_recip_alphas_cumprod[i], diff.sqrt_recipm1_alphas_cumprod[i]
    c1, c2 = diff.posterior_mean_coef1[i], diff.posterior_mean_coef2[i]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(4096, 16, generator=g) * 1e4
        eps = torch.randn(4096, 16, generator=g) * 300
        out = torch.cat([eps, torch.zeros_like(eps)], 1)
        got = diff.p_mean_variance(lambda x_, t_, o=out: o, x, torch.full((4096,), i))["mean"]
        step = diff.p_sample_at(lambda x_, t_, o=out: o, x, i, noise=torch.zeros_like(x))
        assert torch.equal(step, got)
        x64, e64 = x.double(), eps.double()
        ref = c1 * (a * x64 - b * e64) + c2 * x64
        assert float((got.double() - ref).abs().max() / ref.abs().max()) <= 1e-6


def test_p_mean_variance_returns_the_variance():
    for var_type in ("learned_range", "fixed_large", "fixed_small"):
        diff = create_diffusion(
            "10", learn_sigma=var_type == "learned_range", sigma_small=var_type == "fixed_small"
        )
        x = torch.randn(6, 3)
        out = torch.rand(6, 6 if var_type == "learned_range" else 3) * 2 - 1
        t = torch.tensor([0, 1, 2, 5, 8, 9])
        pmv = diff.p_mean_variance(lambda x_, t_, o=out: o, x, t)
        assert pmv["variance"].shape == x.shape == pmv["log_variance"].shape
        if var_type == "learned_range":
            assert torch.equal(pmv["variance"], torch.exp(pmv["log_variance"]))
        else:
            table = diff.fixed_large_variance if var_type == "fixed_large" else diff.posterior_variance
            assert torch.equal(pmv["variance"], _extract(table, t, x.shape))
            torch.testing.assert_close(pmv["variance"][1:], torch.exp(pmv["log_variance"][1:]))
    assert float(pmv["variance"][0, 0]) == 0.0  # fixed_small: the unclipped posterior variance at t = 0


# ----------------------------------------------------------------------------- MLP head


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[:, :4], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 4:], torch.sin(t[:, None] * freqs))


def test_simple_mlp_adaln_keys_and_zero_init():
    net = SimpleMLPAdaLN(16, 32, 32, 24, 2)
    keys = set(net.state_dict())
    for k in (
        "time_embed.mlp.0.weight",
        "time_embed.mlp.2.weight",
        "cond_embed.weight",
        "input_proj.weight",
        "res_blocks.1.in_ln.weight",
        "res_blocks.1.mlp.0.weight",
        "res_blocks.1.mlp.2.weight",
        "res_blocks.1.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
    ):
        assert k in keys
    assert not any("norm_final" in k for k in keys)
    out = net(torch.randn(5, 16), torch.randint(0, 1000, (5,)), torch.randn(5, 24))
    assert out.shape == (5, 32) and out.abs().max() == 0  # zero-init output layer


def test_cfg_applies_to_eps_only_with_shared_noise():
    torch.manual_seed(0)
    head = DiffLoss(target_channels=4, z_channels=8, depth=2, width=16, num_sampling_steps="4")
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, t = torch.randn(3, 4), torch.tensor([1, 2, 3])
    zc, zu = torch.randn(3, 8), torch.randn(3, 8)
    out = head.net.forward_with_cfg(
        torch.cat([x, torch.randn(3, 4)]), torch.cat([t, t]), torch.cat([zc, zu]), 3.0
    )
    oc, ou = head.net(x, t, zc), head.net(x, t, zu)
    guided = ou[:, :4] + 3.0 * (oc[:, :4] - ou[:, :4])
    torch.testing.assert_close(out[:3, :4], guided)
    torch.testing.assert_close(out[3:, :4], guided)
    torch.testing.assert_close(out[:3, 4:], oc[:, 4:])  # variance channels pass through unguided
    torch.testing.assert_close(out[3:, 4:], ou[:, 4:])
    # sampling: with cfg the two halves start from the same noise
    g = torch.Generator().manual_seed(0)
    s_cfg = head.sample(torch.cat([zc, zu]), cfg=2.0, generator=g)
    assert s_cfg.shape == (6, 4)
    g = torch.Generator().manual_seed(0)
    first = torch.randn(3, 4, generator=g)
    calls = []
    head.gen_diffusion().p_sample_loop(
        lambda x, t: (calls.append(x.clone()), torch.zeros(6, 8))[1], torch.cat([first, first])
    )
    assert torch.equal(calls[0][:3], calls[0][3:])


def test_diffloss_training_decreases_and_mask():
    torch.manual_seed(0)
    head = DiffLoss(target_channels=2, z_channels=4, depth=1, width=32)
    target = torch.randn(64, 2) * 0.1 + torch.tensor([0.5, -0.5])
    z = torch.randn(64, 4)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = head(target, z)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert head(target, z).item() < first
    mask = torch.zeros(64)
    mask[:10] = 1
    assert torch.isfinite(head(target, z, mask))


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("var_type", ["learned_range", "fixed_large", "fixed_small"])
def test_sampling_loop_scalar_path_equals_per_row_path(var_type, clip):
    torch.manual_seed(0)
    betas = get_betas("cosine", 1000)
    diff = create_diffusion(
        "7", learn_sigma=var_type == "learned_range", sigma_small=var_type == "fixed_small"
    )
    assert diff.var_type == var_type and np.allclose(diff.alphas_cumprod[-1], np.cumprod(1 - betas)[-1])
    w = torch.randn(3, 6 if var_type == "learned_range" else 3) * 0.3

    def model(x, t):
        out = torch.tanh(x @ w + t[:, None].float() / 1000)
        return out

    noise = torch.randn(5, 3)
    g = torch.Generator().manual_seed(4)
    got = diff.p_sample_loop(model, noise, temperature=0.8, clip_denoised=clip, generator=g)
    g = torch.Generator().manual_seed(4)
    x = noise
    for i in reversed(range(diff.num_timesteps)):
        x = diff.p_sample(model, x, torch.full((5,), i), temperature=0.8, clip_denoised=clip, generator=g)
    assert torch.equal(got, x)  # the scalar path runs the same arithmetic in the same order


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_head_sampling_with_cached_embeddings_equals_plain_forward(cfg):
    torch.manual_seed(0)
    head = DiffLoss(target_channels=4, z_channels=8, depth=2, width=16, num_sampling_steps="6")
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    z = torch.randn(6, 8)
    got = head.sample(z, temperature=0.9, cfg=cfg, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    if cfg != 1.0:
        noise = torch.randn(3, 4, generator=g)
        noise = torch.cat([noise, noise])
        fn = lambda x, t: head.net.forward_with_cfg(x, t, z, cfg)  # noqa: E731
    else:
        noise = torch.randn(6, 4, generator=g)
        fn = lambda x, t: head.net(x, t, z)  # noqa: E731
    diff = head.gen_diffusion()
    x = noise
    for i in reversed(range(diff.num_timesteps)):
        x = diff.p_sample(fn, x, torch.full((6,), i), temperature=0.9, generator=g)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("var_type", ["learned_range", "fixed_large"])
def test_p_sample_at_with_given_noise_equals_drawing_it(var_type):
    """The CUDA-graph sampler passes pre-drawn noise; it must equal the generator's draw."""
    diff = create_diffusion("5", learn_sigma=var_type == "learned_range")
    w = torch.randn(3, 6 if var_type == "learned_range" else 3) * 0.3

    def model(x, t):
        return torch.tanh(x @ w + t[:, None].float() / 1000)

    x = torch.randn(4, 3)
    for i in (3, 0):
        drawn = diff.p_sample_at(model, x, i, temperature=0.8, generator=torch.Generator().manual_seed(1))
        noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
        assert torch.equal(diff.p_sample_at(model, x, i, temperature=0.8, noise=noise), drawn)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("var_type", ["learned_range", "fixed_large", "fixed_small"])
def test_posterior_step_is_p_sample_at_bitwise(var_type, clip):
    """The fused sampler's posterior (posterior_step on a step_coefficients row, the
    temperature as a float or a float32 0-d tensor, the model output in bf16 or float32)
    equals p_sample_at's own ops bit for bit; p_sample_loop with it gives the same chain."""
    diff = create_diffusion(
        "50", learn_sigma=var_type == "learned_range", sigma_small=var_type == "fixed_small"
    )
    g = torch.Generator().manual_seed(1)
    c = 4
    w = torch.randn(c, 2 * c if var_type == "learned_range" else c, generator=g)

    def model(x, t):
        out = torch.tanh(x @ w * 1e-2 + t[:, None].float() / 1000)
        return torch.cat([out[:, :c] * 30 + x[:, :1] * 0.9, out[:, c:]], 1)

    x = torch.randn(32, c, generator=g) * 3
    noise = torch.randn(32, c, generator=g)
    table = diff.step_coefficients("cpu")
    assert table.shape == (50, 6) and table.dtype == torch.float32
    for i in (49, 20, 1, 0):
        want = diff.p_sample_at(model, x, i, temperature=0.7, clip_denoised=clip, noise=noise)
        for temp in (0.7, torch.tensor(0.7)):
            fused = lambda x_t, out, n, coef, _t, learned, cl, last, temp=temp: posterior_step(  # noqa: E731
                x_t, out, n, coef, temp, learned, cl, last
            )
            got = diff.p_sample_at(
                model, x, i, temperature=0.7, clip_denoised=clip, noise=noise, posterior=fused
            )
            assert torch.equal(got, want), (i, temp)

        # a bf16 network output: the posterior's own cast is the model function's .float()
        def half(x_, t_):
            return model(x_, t_).bfloat16()

        def half_f32(x_, t_):
            return model(x_, t_).bfloat16().float()

        want_b = diff.p_sample_at(half_f32, x, i, temperature=0.7, noise=noise)
        got_b = diff.p_sample_at(half, x, i, temperature=0.7, noise=noise, posterior=posterior_step)
        assert torch.equal(got_b, want_b)
    chain = diff.p_sample_loop(model, x, temperature=0.9, generator=torch.Generator().manual_seed(3))
    fused_chain = diff.p_sample_loop(
        model, x, temperature=0.9, generator=torch.Generator().manual_seed(3), posterior=posterior_step
    )
    assert torch.equal(fused_chain, chain)


def test_each_step_timestep_is_a_view_of_one_device_tensor():
    """p_sample_at hands the model its (N,) timestep as a stride-0 view of one entry of the
    per-device timestep_tensor (no fill kernel per step), with the values of timestep_map."""
    diff = create_diffusion("10", learn_sigma=False)
    seen = []

    def model(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    x = torch.randn(5, 3)
    for i in (9, 4, 0):
        diff.p_sample_at(model, x, i, generator=torch.Generator().manual_seed(0))
    for i, t in zip((9, 4, 0), seen):
        assert t.shape == (5,) and t.stride() == (0,) and t.dtype == torch.long
        assert torch.equal(t, torch.full((5,), int(diff.timestep_map[i])))
    assert diff.timestep_tensor("cpu") is diff.timestep_tensor(torch.device("cpu"))
