"""The matrix form of bicubic / area resampling (maskar/tokenizers/resample.py) against F.interpolate.

The matrix form is the tokenizer's path on CUDA (bicubic); on the CPU the default stays
F.interpolate, so these tests call the matrix form directly and run the tokenizer's helpers with
``use_backend("matmul")`` against ``use_backend("interpolate")``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskar.bench import tokenizer_ops
from maskar.config import build
from maskar.tokenizers import resample
from maskar.tokenizers.vqvae import PATCH_NUMS, MultiScaleVQVAE, VQVAEConfig

SCHEDULES = {**{str(k): v for k, v in PATCH_NUMS.items()}, "fmnist": (1, 2, 3, 4, 6, 8)}
FP32_ROUNDING = 2.0**-24  # half an ulp of 1: a correctly rounded float32 result is this close


def pairs(pns: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """(mode, n_in, n_out) of every resampling a schedule makes: pn_k -> side up, side -> pn_k down."""
    side = pns[-1]
    return [("bicubic", pn, side) for pn in pns[:-1]] + [("area", side, pn) for pn in pns[:-1]]


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize(
    "mode,h,w,H,W",
    [("bicubic", 1, 1, 16, 16), ("bicubic", 5, 3, 16, 7), ("bicubic", 9, 9, 4, 4),
     ("bicubic", 13, 13, 16, 16), ("area", 16, 16, 13, 13), ("area", 7, 12, 2, 5), ("area", 3, 3, 8, 8),
     ("area", 64, 64, 3, 3)],
)  # fmt: skip
def test_matrix_form_is_interpolate_in_float64(mode, h, w, H, W):
    """Built from F.interpolate of the identity basis: the same linear map, to float64 rounding,
    on non-square maps and in both directions (border clamping, the cubic's taps, area windows)."""
    x = torch.randn(3, 4, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * W))
    want = F.interpolate(x, size=(H, W), mode=mode)
    got = resample.resize_matmul(x, (H, W), mode)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert max_rel(got, want) < 1e-14
    # The rows of a resize matrix sum to 1 (constants are kept), as F.interpolate's weights do.
    a = resample.resize_matrix(h, H, mode)
    torch.testing.assert_close(a.sum(1), torch.ones(H, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_fp32_error_at_every_scale_pair(schedule):
    """fp32 maps of every (pn_k, side) pair of the 256 / 512 / 1024 px and Fashion-MNIST schedules.

    Measured here (B 8, C 32, normal inputs; max |diff| / max |ref| over a schedule's pairs),
    matrix form vs F.interpolate fp32 / matrix form vs float64 truth / F.interpolate vs truth:
      256 px   bicubic 1.8e-7 / 5.1e-8 / 1.7e-7   area 2.6e-7 / 4.6e-8 / 2.5e-7
      512 px   bicubic 2.0e-7 / 5.8e-8 / 1.7e-7   area 4.9e-7 / 5.3e-8 / 5.0e-7
      1024 px  bicubic 4.3e-7 / 5.4e-8 / 4.0e-7   area 1.1e-6 / 4.9e-8 / 1.0e-6
      fmnist   bicubic 1.6e-7 / 5.2e-8 / 1.5e-7   area 2.3e-7 / 5.1e-8 / 2.0e-7
    The matrix form is correctly rounded (within 2^-24 = 6.0e-8 of the truth); the differences
    from F.interpolate are F.interpolate's own fp32 rounding (area 64 -> 3 sums 441 values).
    """
    g = torch.Generator().manual_seed(len(schedule))
    for mode, n_in, n_out in pairs(SCHEDULES[schedule]):
        x = torch.randn(8, 32, n_in, n_in, generator=g)
        ref = F.interpolate(x, size=(n_out, n_out), mode=mode)
        got = resample.resize_matmul(x, (n_out, n_out), mode)
        truth = F.interpolate(x.double(), size=(n_out, n_out), mode=mode)
        assert got.dtype == torch.float32
        assert max_rel(got, truth) <= FP32_ROUNDING * 1.001, (mode, n_in, n_out)
        assert max_rel(got, ref) <= 2e-6, (mode, n_in, n_out, max_rel(got, ref))
        assert max_rel(got, ref) <= max_rel(ref, truth) + FP32_ROUNDING, (mode, n_in, n_out)


def test_autocast_cannot_lower_the_precision():
    """Under bf16 autocast a float32 matmul would run in bf16 (error ~4e-3); the float64 products
    are not autocast-eligible, so the result is the same as without autocast."""
    x = torch.randn(4, 8, 6, 6)
    plain = resample.resize_matmul(x, (16, 16), "bicubic")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = resample.resize_matmul(x, (16, 16), "bicubic")
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)


def test_backend_dispatch_and_other_dtypes():
    x = torch.randn(2, 3, 5, 5)
    assert resample.backend == "auto"
    # auto on the CPU: F.interpolate itself, bit for bit (the recorded fp32 CPU outputs need it).
    assert torch.equal(
        resample.resize(x, (16, 16), "bicubic"), F.interpolate(x, size=(16, 16), mode="bicubic")
    )
    assert not resample.uses_matmul("bicubic", torch.device("cpu"))
    assert resample.uses_matmul("bicubic", torch.device("cuda")) and not resample.uses_matmul(
        "area", torch.device("cuda")
    )
    with resample.use_backend("matmul"):
        assert torch.equal(
            resample.resize(x, (16, 16), "bicubic"), resample.resize_matmul(x, (16, 16), "bicubic")
        )
        assert resample.uses_matmul("area", torch.device("cpu"))
    with resample.use_backend("interpolate"):
        assert not resample.uses_matmul("bicubic", torch.device("cuda"))
    assert resample.backend == "auto"
    with pytest.raises(ValueError, match="resample backend"):
        with resample.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="resample mode"):
        resample.resize_matrix(3, 4, "bilinear")
    # Half precision in, half precision out (computed in float64, rounded once).
    xb = x.to(torch.bfloat16)
    got = resample.resize_matmul(xb, (16, 16), "bicubic")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, F.interpolate(xb.double(), size=(16, 16), mode="bicubic").to(torch.bfloat16))


def test_matrix_form_compiles_without_graph_breaks():
    x = torch.randn(2, 3, 5, 5)
    fn = torch.compile(
        lambda t: resample.resize_matmul(t, (16, 16), "bicubic"), fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(fn(x), resample.resize_matmul(x, (16, 16), "bicubic"), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the tokenizer's paths


@pytest.fixture(scope="module")
def tiny() -> MultiScaleVQVAE:
    cfg = build(
        VQVAEConfig,
        dict(resolution=16, ch=8, ch_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1, norm_groups=4,
             z_channels=4, vocab_size=32, patch_nums=(1, 2, 3, 5, 8), dead_code_steps=0),
        "model",
    )  # fmt: skip
    torch.manual_seed(0)
    m = MultiScaleVQVAE(cfg).eval()
    with torch.no_grad():
        m.quantize.embedding.weight.normal_()
    return m


def _both(fn):
    with resample.use_backend("interpolate"):
        ref = fn()
    with resample.use_backend("matmul"):
        got = fn()
    return got, ref


def test_tokenizer_helpers_match_interpolate(tiny):
    """teacher_forcing_input, own_residual_input, the next_input loop and f_hat: the matrix form
    (bicubic and area) against F.interpolate, to fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, tiny.vocab_size, (3, pn * pn), generator=g) for pn in tiny.patch_nums]

    def sampling():
        fhat, outs = torch.zeros(3, 4, 8, 8), []
        for si, idx in enumerate(ids):
            fhat, nxt = tiny.next_input(si, fhat, tiny.embed_map(idx, si))
            outs.append(nxt.flatten())
        return torch.cat(outs)

    with torch.no_grad():
        for fn in (lambda: tiny.teacher_forcing_input(ids), lambda: tiny.own_residual_input(ids), sampling,
                   lambda: tiny.indices_to_fhat(ids)):  # fmt: skip
            got, ref = _both(fn)
            assert got.shape == ref.shape and max_rel(got, ref) < 2e-6


def test_codebook_gradient_through_the_matrix_form(tiny):
    """Tokenizer training differentiates through bicubic_up (the codebook's gradient): the matrix
    form's backward equals F.interpolate's to rounding."""
    f = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    w = tiny.quantize.embedding.weight

    def grad():
        w.grad = None
        _, ids, loss, _ = tiny.quantize.quantize(f, train=True)
        loss.backward()
        return torch.cat([w.grad.flatten(), torch.cat([i.flatten() for i in ids]).double()])

    got, ref = _both(grad)
    w.grad = None
    n = w.numel()
    assert torch.equal(got[n:], ref[n:])  # the same codes were chosen
    assert max_rel(got[:n], ref[:n]) < 1e-5


def test_bench_runs_on_cpu(capsys, tmp_path):
    out = tmp_path / "ops.json"
    assert tokenizer_ops.main(["cases=fmnistx2", "reps=1", "warmup=0", "device=cpu", f"json={out}"]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == set(tokenizer_ops.OPS)
    assert {r["backend"] for r in rows} == set(resample.BACKENDS)
    assert all(r["max_rel_vs_interpolate"] < 2e-6 for r in rows)
    assert "teacher_forcing_input" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="SCHEDULExBATCH"):
        tokenizer_ops.main(["cases=300x2"])


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_is_the_matrix_form_and_immune_to_tf32():
    """On CUDA with TF32 allowed (and under bf16 autocast) the default path equals F.interpolate to
    fp32 rounding at every pair of the 256 / 1024 px and Fashion-MNIST schedules."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        for schedule in ("256", "1024", "fmnist"):
            for mode, n_in, n_out in pairs(SCHEDULES[schedule]):
                x = torch.randn(32, 32, n_in, n_in, device="cuda", generator=g)
                ref = F.interpolate(x, size=(n_out, n_out), mode=mode)
                assert resample.uses_matmul("bicubic", x.device)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    got = resample.resize(x, (n_out, n_out), mode)
                assert got.dtype == torch.float32
                assert max_rel(got, ref) <= 2e-6, (schedule, mode, n_in, n_out, max_rel(got, ref))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
