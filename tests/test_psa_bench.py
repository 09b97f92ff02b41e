"""benchmarks/psa.py: its PSA variants and its check path, on tiny shapes on the CPU (no timing claims)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from maskar.bench import psa as bench
from maskar.bench.psa import Problem

PROBLEMS = [
    Problem((8, 8), 7, 1),  # released setting, window as large as most of the grid
    Problem((9, 9), 3, 1),  # interior queries without padded slots
    Problem((6, 5), 3, 2),  # rectangular, dilation 2
    Problem((4, 4), 7, 1),  # window larger than the grid
    Problem((5, 7), 5, 1, scale=0.3),  # explicit scale
]


def loop_psa(q, k, v, p: Problem):
    """Plain loop: in-grid window keys, plus (k*k - valid) exp(0) terms in the denominator."""
    b, nh, n, d = q.shape
    h, w = p.grid
    r = p.kernel // 2
    scale = d**-0.5 if p.scale is None else p.scale
    out = torch.zeros_like(q)
    for i in range(h):
        for j in range(w):
            keys = [
                (i + p.dilation * a) * w + (j + p.dilation * c)
                for a in range(-r, r + 1)
                for c in range(-r, r + 1)
                if 0 <= i + p.dilation * a < h and 0 <= j + p.dilation * c < w
            ]
            e = (torch.einsum("bhd,bhkd->bhk", q[:, :, i * w + j], k[:, :, keys]) * scale).exp()
            denom = e.sum(-1, keepdim=True) + (p.kernel**2 - len(keys))
            out[:, :, i * w + j] = torch.einsum("bhk,bhkd->bhd", e / denom, v[:, :, keys])
    return out


def _qkv(p: Problem, b=2, h=2, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, p.tokens, d, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("p", PROBLEMS, ids=str)
def test_unfold_peer_matches_loop(p):
    q, k, v = _qkv(p)
    torch.testing.assert_close(bench.unfold_psa(q, k, v, p), loop_psa(q, k, v, p), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", PROBLEMS, ids=str)
def test_sdpa_bias_matches_unfold_peer(p):
    q, k, v = _qkv(p, seed=1)
    want = bench.unfold_psa(q, k, v, p)
    torch.testing.assert_close(bench.sdpa_bias_psa(q, k, v, p), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", PROBLEMS, ids=str)
def test_padded_slots_counts_off_grid_window_slots(p):
    h, w = p.grid
    r = p.kernel // 2
    want = [
        sum(
            not (0 <= i + p.dilation * a < h and 0 <= j + p.dilation * c < w)
            for a in range(-r, r + 1)
            for c in range(-r, r + 1)
        )
        for i in range(h)
        for j in range(w)
    ]
    assert bench.padded_slots(p).tolist() == want


@pytest.mark.skipif(not bench.flex_available(), reason="torch without FlexAttention")
@pytest.mark.parametrize("p", PROBLEMS, ids=str)
def test_flex_variant_matches_unfold_peer(p):
    # eager FlexAttention, forward only: torch has no flex backward on the CPU
    q, k, v = _qkv(p, seed=2)
    got = bench.flex_psa(q, k, v, p, compiled=False)
    torch.testing.assert_close(got, bench.unfold_psa(q, k, v, p), rtol=1e-10, atol=1e-12)
    assert bench.flex_kv_len(p) % bench.FLEX_BLOCK == 0 and bench.flex_kv_len(p) > p.tokens


def test_check_passes_exact_variants_and_rejects_others():
    p = Problem((6, 6), 5, 1)
    for fn in (bench.sdpa_bias_psa, bench.unfold_psa):
        assert bench.check(fn, p, 2, 2, 16, torch.float32, "cpu") < 1e-5

    def window_without_border_term(q, k, v, p):  # a masked window softmax: NOT PSA at borders
        missing = bench.padded_slots(p)
        r = p.kernel // 2
        ys, xs = torch.arange(p.tokens) // p.grid[1], torch.arange(p.tokens) % p.grid[1]
        inside = ((ys[:, None] - ys[None]).abs() <= r) & ((xs[:, None] - xs[None]).abs() <= r)
        assert int((p.kernel**2 - inside.sum(1) - missing).abs().sum()) == 0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=inside)

    assert bench.check(window_without_border_term, p, 2, 2, 16, torch.float32, "cpu") > 1e-2
    assert bench.check(bench.dense_nomask, p, 2, 2, 16, torch.float32, "cpu") > 1e-2


def test_bench_case_reports_failed_check():
    p = Problem((5, 5), 3, 1)

    def wrong(q, k, v, p):
        return bench.sdpa_bias_psa(q, k, v, p) * 1.01

    row = bench.bench_case("sdpa_bias", wrong, p, 1, 2, 8, torch.float32, reps=1, warmup=0, device="cpu")
    assert row["skip"].startswith("FAILED check") and "fwd_ms" not in row
    row = bench.bench_case("sdpa_bias", bench.sdpa_bias_psa, p, 1, 2, 8, torch.float32, reps=2, warmup=0,
                           device="cpu")
    assert "skip" not in row and row["err"] < 1e-5 and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0


def test_cpu_smoke_run_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = bench.main(["--device", "cpu", "--cases", "4x4:1:1", "--windows", "3:1", "--reps", "1",
                     "--warmup", "0", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    by = {r["method"]: r for r in rows}
    assert set(by) <= set(bench.DEFAULT_METHODS.split(","))
    assert {"sdpa_bias", "unfold", "dense_nomask"} <= set(by)
    for name in ("sdpa_bias", "unfold"):
        assert by[name]["err"] < 1e-5 and "skip" not in by[name]
    if "flex" in by:  # forward checked and timed; its backward is CUDA only
        assert by["flex"]["err"] < 1e-5 and by["flex"]["fwd_ms"] > 0
    assert "err" not in by["dense_nomask"]
    text = capsys.readouterr().out
    assert "| fp32 | 4x4 | 1 | 1 |" in text and "NOT the same function" in text


def test_cli_errors_and_help(capsys):
    with pytest.raises(SystemExit, match="--cases"):
        bench.parse_case("16x16:64")
    assert bench.parse_case("6x5:2:3") == ((6, 5), 2, 3) and bench.parse_case("8:1:1") == ((8, 8), 1, 1)
    with pytest.raises(SystemExit, match="unknown method"):
        bench.methods(["nope"])
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0 and "maskar bench psa" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert bench.main([]) == 2


def test_floor_counts_only_in_grid_window_pairs():
    p = Problem((16, 16), 7, 1)
    valid = int((49 - bench.padded_slots(p)).sum())
    assert valid == sum(min(i + 3, 15) - max(i - 3, 0) + 1 for i in range(16)) ** 2
    # infinite bandwidth: FLOP-bound, 4 (fwd) and 4 + 10 (fwd+bwd) * D * pairs at 1 TFLOP/s
    f, fb = bench.floors_ms(p, 1, 1, 64, 2, gbs=math.inf, tflops=1.0)
    assert f == pytest.approx(4 * 64 * valid * 1e-9) and fb == pytest.approx(14 * 64 * valid * 1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_exact_variants_pass_the_check(dtype):
    # the kernel, compiled flex with its backward, the SDPA + bias path and the unfold peer
    # vs the fp32 unfold reference
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    p = Problem((16, 16), 7, 1)
    for name in ("sdpa_bias", "triton", "unfold", "flex"):
        fns = bench.methods([name])
        if name not in fns:
            continue
        err = bench.check(fns[name], p, 2, 4, 64, dtype, "cuda")
        assert err <= bench.TOLERANCE[dtype], (name, err)


def test_config_names_tell_fused_delta_apart():
    # the autotune log lists both backward variants of one tile; without the flag they read the same
    from maskar.kernels.neighborhood import NaConfig

    assert bench._cfg_str(NaConfig(8, 8, 32, 4, 2)) == "8x8/n32/w4/s2"
    assert bench._cfg_str(NaConfig(8, 8, 32, 4, 2, True)) == "8x8/n32/w4/s2/fd"


def test_kernel_time_probes_profile_then_time_again(monkeypatch):
    # the kernel rows are profiled after every row is timed; each gets its fwd+bwd re-timed after that
    calls = []
    monkeypatch.setattr(bench, "kernel_ms_per_call", lambda fn: calls.append(fn) or {"_na_fwd": 0.1})
    row: dict = {}

    def fwd():
        return torch.ones(4).sum()

    def fwd_bwd():
        return torch.ones(4).sum()

    probes = [(row, fwd, fwd_bwd, 3, 1, "cpu")]
    bench.kernel_time_probes(probes)
    assert calls == [fwd, fwd_bwd] and probes == []
    assert row["fwd_kernel_ms"] == row["fwd_bwd_kernel_ms"] == 0.1
    assert row["fwd_bwd_kernels"] == {"_na_fwd": 0.1} and row["fwd_bwd_ms_after_profile"] > 0
