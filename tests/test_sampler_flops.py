"""The FLOP model of MAR and CASMAR sampling (maskar.bench.sampler_flops) against an independent
count: torch.utils.flop_counter.FlopCounterMode over a real sampling call of a tiny model."""

from __future__ import annotations

import pytest
import torch
from test_casmar import randomize_heads, tiny_casmar
from test_mar import expected_reveals, randomize_head, tiny_mar
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import maskar.models.casmar as casmar_module
from maskar.bench import sampler_flops as sf
from maskar.config import load_config
from maskar.nn.sampling import SamplingTrace
from maskar.registry import build_model


def counted(fn) -> int:
    # The math SDPA backend decomposes attention into bmm's, which the counter sees (the
    # fused CPU kernel is not in its registry).
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("num_iter", [1, 4])
def test_mar_flop_model_equals_flop_counter(cfg, num_iter):
    model = tiny_mar().eval().requires_grad_(False)
    randomize_head(model)
    trace = SamplingTrace()
    labels = torch.tensor([1, 2, 10])

    def run():
        model.sample_tokens(labels, num_iter=num_iter, cfg=cfg, num_sampling_steps="5", trace=trace)

    total = counted(run)
    assert sf.mar_counts(trace) == expected_reveals(16, num_iter) == sf.mar_schedule(16, num_iter)
    model_count = sf.mar_sampling(model, 3, cfg != 1.0, 5, sf.mar_counts(trace))
    assert model_count["total"] == total
    assert model_count["transformer"] > 0 and model_count["head"] > 0


@pytest.mark.parametrize("attention", ["psa", "sala"])
@pytest.mark.parametrize(("cfg", "re_cfg"), [(1.0, 1.0), (2.5, 2.0)])
def test_casmar_flop_model_equals_flop_counter(monkeypatch, attention, cfg, re_cfg):
    """Counts from the sampler's trace (what the benchmark uses); the encoder's visible counts
    and the saliency calls are also spied on directly, as an independent check of them."""
    model = tiny_casmar(head_attention=attention).eval().requires_grad_(False)
    randomize_heads(model)
    encoder_calls, saliency_calls = [], []
    real_encoder, real_saliency = model.forward_encoder, casmar_module.saliency_scores
    monkeypatch.setattr(
        model, "forward_encoder", lambda *a: (encoder_calls.append((a[4], a[5])), real_encoder(*a))[1]
    )
    monkeypatch.setattr(
        casmar_module, "saliency_scores", lambda x: (saliency_calls.append(x.shape[1]), real_saliency(x))[1]
    )
    trace = SamplingTrace()
    labels = torch.tensor([1, 2, 3])

    def run():
        model.sample_tokens(
            labels,
            num_iter=3,
            scaffold_num_iter=3,
            cfg=cfg,
            re_cfg=re_cfg,
            num_sampling_steps="4",
            refine_num_sampling_steps="5",
            generator=torch.Generator().manual_seed(0),
            trace=trace,
        )

    total = counted(run)
    n = model.seq_len
    stage1, stage2 = sf.casmar_counts(trace)
    assert [m for m, _ in stage1] == [m - n for stage, m in encoder_calls if stage == 0]
    assert stage2 == [m for stage, m in encoder_calls if stage == 1]
    # SAMS computes the saliency (affinity_column_sums); the scaffold's fallback reads SAMS's
    assert saliency_calls == []
    keys = sf.dit_attention_keys(model.cond_diffloss, executed=True)  # what the SDPA path computes
    args = (model, 3, re_cfg != 1.0, cfg != 1.0, 4, 5, stage1, stage2, 3, 3)
    got = sf.casmar_sampling(*args, dit_keys=keys)
    assert got["total"] == total
    assert all(v > 0 for k, v in got.items() if k != "saliency")
    # the window count (k^2 keys) is what PSA needs; the SDPA path computes every key
    window = sf.casmar_sampling(*args)
    assert window["dit_head"] < got["dit_head"] and sf.dit_attention_keys(model.cond_diffloss) == 9


def test_nominal_casmar_counts_follow_the_schedule():
    with torch.device("meta"):
        model = build_model(load_config("casmar-b").model)
    stage1, stage2 = sf.casmar_nominal_counts(model, 64, 32, 4)
    assert len(stage1) == 32 and stage1[0] == (64, 64) and stage1[-1][0] > 0
    assert sum(k for _, k in stage1) >= 64 * 64  # every scaffold token is drawn at least once
    # after step s, 256 - int(256 (1 - cos(pi/2 (s+1)/4))) stay masked: 237, 182, 98
    assert stage2 == [256, 237, 182, 98]
    assert sf.amr_masked(256, 0.5) == 128 and sf.amr_masked(10, 0.99) == 9


def test_full_size_counts_match_the_hand_count():
    """MAR-B / CASMAR-B at B 64 with CFG (docs/benchmarks.md quotes these)."""
    with torch.device("meta"):
        mar = build_model(load_config("mar-b").model)
        cas = build_model(load_config("casmar-b").model)
    mar64 = sf.mar_sampling(mar, 64, True, 100, expected_reveals(256, 64))
    mar256 = sf.mar_sampling(mar, 64, True, 100, expected_reveals(256, 256))
    # the head draws every token once whatever num_iter: 2 x 64 x 256 rows x 100 steps
    assert mar64["head"] == pytest.approx(2 * 64 * 256 * 100 * 2 * 33.6e6, rel=0.01)
    assert mar256["head"] == pytest.approx(mar64["head"], rel=1e-3)  # + the one-row time MLP per call
    assert 0.90e15 < mar64["total"] < 0.95e15 and 3.2e15 < mar256["total"] < 3.3e15
    stage1, stage2 = sf.casmar_nominal_counts(cas, 64, 32, 4)
    c = sf.casmar_sampling(cas, 64, True, True, 100, 250, stage1, stage2, 32, 4)
    # DiT head: 6 blocks of (6 + 4 + 8) W^2 per token (adaLN per token) + final 2 W^2, W = 512,
    # plus the 7 x 7 window attention (4 x 49 x W per token and block)
    per_token = 2 * (6 * 18 + 2) * 512**2 + 6 * 4 * 49 * 512
    assert c["dit_head"] == pytest.approx(128 * 256 * 1000 * per_token, rel=0.01)
    assert 2.3e15 < c["total"] < 2.45e15


@pytest.mark.parametrize("num_iter", [1, 4, 7, 64, 256])
def test_mar_schedule_is_the_sampler_trace(num_iter):
    assert sf.mar_schedule(256, num_iter) == expected_reveals(256, num_iter)


def test_sampler_flops_command(capsys):
    assert sf.main(["--batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "| mar-b num_iter 256 |" in out and "| casmar-b num_iter 4 |" in out and "casmar-h" in out
    with pytest.raises(SystemExit):
        sf.main(["--batch", "0"])
