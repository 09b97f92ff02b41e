"""CUDA-graph sampling of the diffusion head (DiffLoss.sample) against the eager sampler.

CPU tests run the graph path's static buffers (padding, CFG layout, pre-drawn noise)
without capturing and require bitwise equality with eager; GPU tests capture real graphs
and compare with eager within the documented tolerances below, printing the measured
differences (run with ``-rP`` to see them).
"""

from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from test_casmar import SAMPLE, randomize_heads, tiny_casmar
from test_mar import randomize_head, tiny_mar

from maskar.nn.diffloss import DiffLoss
from maskar.nn.graphed_chain import StaticChain, graph_rows

# Tolerances of graph vs eager: max / mean abs difference of the sampled tokens divided by
# max(1, max |eager token|) (the tiny models' randomised heads give tokens up to ~1e5, so
# absolute differences scale with them). fp32: only GEMM reordering where padded row counts
# pick other kernels (aligned counts: expect 0). bf16 autocast: such a reordering can round a
# GEMM output to the neighbouring bf16 value, which the remaining steps (and, in MAR, later
# iterations) carry along. Measured on an H100 (2026-11-22, torch 2.11): bitwise equal
# everywhere (fp32 and bf16, padded or not) except the tiny MAR at B=4 in fp32 (relative max
# 9e-7: 8..40-row calls padded to 16..64) and the tiny CASMAR in fp32 (scaffold 1.4e-7).
FP32_MAX = 1e-4
BF16_MAX, BF16_MEAN = 0.1, 5e-3  # one head call (100 steps)
MAR_BF16_MAX, MAR_BF16_MEAN = 0.25, 1e-2  # whole MAR sampling (tokens feed later iterations)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_head(device="cpu", learn_sigma=True, steps="10", c=4, cz=8, depth=2, width=16, std=0.3):
    torch.manual_seed(0)
    head = DiffLoss(c, cz, depth, width, num_sampling_steps=steps, learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():  # the head starts as eps = 0: give it weights that matter
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return head.to(device)


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- CPU


def test_graph_rows_buckets():
    prev = 0
    for n in range(1, 5000):
        b = graph_rows(n)
        assert b >= n and b % 16 == 0 and b >= prev
        if n >= 128:
            assert b <= n * 1.125  # at most 12.5% padding
        prev = b
    assert len({graph_rows(n) for n in range(1, 5000)}) <= 60  # a bounded number of graphs
    assert [graph_rows(n) for n in (1, 16, 17, 64, 100, 129, 448, 6400)] == [
        16,
        16,
        32,
        64,
        112,
        144,
        448,
        6656,
    ]
    with pytest.raises(ValueError, match="n >= 1"):
        graph_rows(0)


@pytest.mark.parametrize(("learn_sigma", "steps"), [(True, "10"), (True, "ddim5"), (False, "3,2")])
@pytest.mark.parametrize(("cfg", "temperature"), [(1.0, 1.0), (2.5, 0.7)])
@pytest.mark.parametrize("n", [6, 32, 34])
def test_static_buffers_equal_eager_on_cpu(learn_sigma, steps, cfg, temperature, n):
    """Padding, the CFG half layout and the pre-drawn noise reproduce eager: bit for bit when no
    row is padded; with padding to rounding only (a multi-threaded CPU matmul may block a
    16-row batch differently from a 6-row one)."""
    head = random_head(learn_sigma=learn_sigma, steps=steps)
    z = torch.randn(n, 8)
    g_eager, g_static = gen(3), gen(3)
    eager = head.sample(z, temperature, cfg, generator=g_eager, cuda_graph=False)
    static = head._sample_graphed(z, temperature, cfg, head.gen_diffusion(), g_static, capture=False)
    half = n // 2 if cfg != 1.0 else n
    if graph_rows(half) == half:
        assert torch.equal(static, eager)
    else:
        torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(g_static.get_state(), g_eager.get_state())  # same number of draws
    # a given x_T replaces exactly the first draw, on both paths
    g_given = gen(3)
    x_T = torch.randn((half, 4), generator=g_given)  # what the sampler draws first
    x_T = torch.cat([x_T, x_T]) if cfg != 1.0 else x_T
    state = g_given.get_state()
    given = head.sample(z, temperature, cfg, generator=g_given, noise=x_T, cuda_graph=False)
    assert torch.equal(given, eager)
    g_given.set_state(state)
    diff = head.gen_diffusion()
    static = head._sample_graphed(z, temperature, cfg, diff, g_given, capture=False, noise=x_T)
    if graph_rows(half) == half:
        assert torch.equal(static, eager)
    else:
        torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_batched_modulation_is_the_per_block_function(learn_sigma, cfg):
    """All adaLN projections as one matmul (the CUDA default) give the per-block samples to
    rounding, and its static-buffer path the eager one bit for bit (no row padded)."""
    head = random_head(learn_sigma=learn_sigma, depth=3)
    z = torch.randn(8, 8)
    assert head.embed(z)[1] is None  # the CPU default: the per-block path, samples as recorded
    per_block = head.sample(z, 0.9, cfg, generator=gen(5), cuda_graph=False)
    head.batched_modulation = True
    c_emb, (weight, bias) = head.embed(z)
    assert weight.shape == ((3 * 3 + 2) * 16, 16) and bias.shape == ((3 * 3 + 2) * 16,)
    batched = head.sample(z, 0.9, cfg, generator=gen(5), cuda_graph=False)
    torch.testing.assert_close(batched, per_block, rtol=1e-5, atol=1e-5)
    static = head._sample_graphed(z, 0.9, cfg, head.gen_diffusion(), gen(5), capture=False)
    assert torch.equal(static, batched)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head.embed(z)[1][0].dtype == torch.bfloat16  # cast once per chain, as autocast would


@pytest.mark.parametrize("cfg", [1.0, 2.5])
@pytest.mark.parametrize("autocast", [False, True])
def test_time_table_gives_the_same_samples_and_follows_weight_updates(cfg, autocast, monkeypatch):
    """The time-embedding table (the CUDA default, forced on here) gives the samples of the
    per-step timestep MLP bit for bit, eagerly and through the static buffers, without running
    that MLP per step; an in-place weight update refills it in place (captured graphs read it);
    another respacing adds its rows."""
    head = random_head(depth=2)
    z = torch.randn(8, 8)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def sample(table: bool, steps: str | None = None) -> torch.Tensor:
        head.time_table = table
        with ctx:
            return head.sample(z, 0.9, cfg, generator=gen(5), cuda_graph=False, num_sampling_steps=steps)

    plain = sample(False)
    assert head._t_store is None
    tabled = sample(True)
    assert torch.equal(tabled, plain) and head._t_table is None  # the table is read only inside sample()
    key, table, covered = head._t_store
    diff = head.gen_diffusion()
    assert covered == {diff}  # the table holds this respacing's rows
    calls = []
    forward = head.net.time_embed.forward
    monkeypatch.setattr(head.net.time_embed, "forward", lambda t: (calls.append(1), forward(t))[1])
    assert torch.equal(sample(True), plain) and not calls  # rows filled: no timestep MLP at all
    with ctx, head._time_table_for(z, diff):
        static = head._sample_graphed(z, 0.9, cfg, diff, gen(5), capture=False)
    assert torch.equal(static, plain)
    with torch.no_grad():
        for q in head.net.time_embed.parameters():
            q.mul_(1.1)  # in place, as an optimizer step
    plain2, tabled2 = sample(False), sample(True)
    assert torch.equal(tabled2, plain2) and not torch.equal(tabled2, plain)
    assert head._t_store[1] is table  # refilled in place
    assert torch.equal(sample(True, "7"), sample(False, "7"))
    assert head.gen_diffusion("7") in head._t_store[2]
    head.time_table = "auto"
    assert head.sample(z, 0.9, cfg, generator=gen(5), cuda_graph=False) is not None
    assert head._t_table is None


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_time_table_with_the_compiled_step_and_weight_copies(backend):
    """Compiled step (Dynamo; AOTAutograd too) under bf16 autocast, where the step reads bf16
    weight copies: the table is made from the same copies, so the samples stay bit for bit; and
    the compiled step reads the table's current rows after an in-place refill (not a copy of
    the rows it was traced with)."""
    import torch._dynamo

    torch._dynamo.reset()
    head = random_head(depth=2)
    head.compile_sampler(backend=backend)
    z = torch.randn(8, 8)

    def both() -> dict:
        out = {}
        for table in (False, True):
            head.time_table = table
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out[table] = head.sample(z, 0.9, 2.5, generator=gen(3), cuda_graph=False)
        return out

    first = both()
    assert torch.equal(first[True], first[False])
    assert head._t_store[1].dtype == torch.bfloat16
    with torch.no_grad():
        for q in head.net.time_embed.parameters():
            q.mul_(1.5)
    second = both()
    assert torch.equal(second[True], second[False]) and not torch.equal(second[True], first[True])


def test_static_chain_is_reused_within_a_bucket_and_stale_padding_is_harmless():
    head = random_head()
    diff = head.gen_diffusion()
    for n in (34, 50, 40, 34):  # cfg halves 17, 25, 20, 17: one 32-row bucket per half
        z = torch.randn(n, 8)
        eager = head.sample(z, 1.0, 2.0, generator=gen(n), cuda_graph=False)
        static = head._sample_graphed(z, 1.0, 2.0, diff, gen(n), capture=False)
        torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-6)  # padded rows: rounding only
    assert len(head._graphs.entries) == 1
    (chain,) = head._graphs.entries.values()
    assert isinstance(chain, StaticChain) and chain.rows == 2 * graph_rows(17) == 64


def test_cpu_sampling_never_takes_the_graph_path(monkeypatch):
    head = random_head()
    z = torch.randn(6, 8)
    ref = head.sample(z, 0.9, 2.0, generator=gen(0), cuda_graph=False)

    def boom(*a, **k):
        raise AssertionError("graph path used on CPU")

    monkeypatch.setattr(head, "_sample_graphed", boom)
    assert torch.equal(head.sample(z, 0.9, 2.0, generator=gen(0)), ref)  # default: graphs on
    assert torch.equal(head.sample(z, 0.9, 2.0, generator=gen(0), cuda_graph=True), ref)
    assert not head._graphs.entries


def test_graph_refusals():
    head = random_head()
    z = torch.randn(6, 8)
    assert head.graph_refusal(z, 2.0) == "not on CUDA"
    assert "row count 5" in head.graph_refusal(torch.randn(5, 8), 2.0)
    assert "row count 0" in head.graph_refusal(torch.randn(0, 8), 1.0)
    head._graphs.failed = True
    assert "earlier capture failed" in head.graph_refusal(z, 1.0)
    head._graphs.failed = False
    head.compile_sampler()  # lazy: nothing is compiled until called; graphs capture compiled kernels
    assert head.graph_refusal(z, 1.0) == "not on CUDA"


def test_cache_survives_neither_copies_nor_moves_and_tracks_weights():
    head = random_head()
    z = torch.randn(6, 8)
    head._sample_graphed(z, 1.0, 1.0, head.gen_diffusion(), gen(0), capture=False)
    assert len(head._graphs.entries) == 1
    twin = copy.deepcopy(head)  # e.g. an EMA copy: graphs cannot be copied
    assert not twin._graphs.entries and len(head._graphs.entries) == 1
    assert not pickle.loads(pickle.dumps(head))._graphs.entries
    assert set(head.state_dict()) == set(twin.state_dict())  # no new state-dict keys
    head.double().float()  # Module._apply: the captured pointers would be stale
    assert not head._graphs.entries
    head._sample_graphed(z, 1.0, 1.0, head.gen_diffusion(), gen(0), capture=False)
    old = next(iter(head._graphs.entries.values()))
    p = next(head.net.parameters())
    p.data = p.data.clone()  # replaced storage without _apply: the weight fingerprint notices
    out = head._sample_graphed(z, 1.0, 1.0, head.gen_diffusion(), gen(0), capture=False)
    assert next(iter(head._graphs.entries.values())) is not old
    torch.testing.assert_close(
        out, head.sample(z, 1.0, 1.0, generator=gen(0), cuda_graph=False), rtol=1e-5, atol=1e-6
    )  # 6 rows padded to 16: rounding only


def test_mar_config_and_keywords(monkeypatch):
    from maskar.config import load_config
    from maskar.models.mar import MARGraphSampleConfig
    from maskar.sampling import sampling_kwargs

    cfg = load_config("mar-tiny", ["sample.cuda_graph=false"])
    assert isinstance(cfg.sample, MARGraphSampleConfig) and cfg.sample.cuda_graph is False
    assert load_config("mar-tiny").sample.cuda_graph is True
    assert "cuda_graph" not in sampling_kwargs(load_config("casmar-tiny").sample)  # CASMAR: head default

    model = tiny_mar()
    seen = []
    real = model.diffloss.sample

    def spy(z, temperature, cfg, **kw):
        seen.append(kw["cuda_graph"])
        return real(z, temperature, cfg, **kw)

    monkeypatch.setattr(model.diffloss, "sample", spy)
    labels = torch.tensor([1, 2])
    kwargs = sampling_kwargs(cfg.sample)
    kwargs.pop("seed")
    kwargs.update(num_iter=2, num_sampling_steps="3")
    a = model.generate(labels, seed=0, **kwargs)  # the config's keywords are accepted
    b = model.generate(labels, seed=0, **{**kwargs, "cuda_graph": True})
    assert seen == [False, False, True, True] and torch.equal(a, b)  # CPU: the same eager path


def test_bench_train_batch_zero_skips_training(capsys):
    from maskar.bench.mar import main

    argv = ["--preset", "mar-tiny", "--device", "cpu", "--batch", "2", "--num-iters", "2"]
    assert main(argv + ["--train-batch", "0", "--sample-reps", "1", "--cuda-graph", "both"]) == 0
    out = capsys.readouterr().out
    assert "img/s" in out and "train step" not in out
    assert out.count("\nsample num_iter=2") == 1  # CPU: graphs are GPU-only, one eager case


# ----------------------------------------------------------------------------- GPU


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(max, mean) abs difference relative to max(1, max |b|), and that scale."""
    scale = max(1.0, b.float().abs().max().item())
    d = (a.float() - b.float()).abs() / scale
    return d.max().item(), d.mean().item(), scale


def _check(tag: str, graph: torch.Tensor, eager: torch.Tensor, bf16: bool, limits=None) -> None:
    mx, mean, scale = _diff(graph, eager)
    print(
        f"{tag}: rel max {mx:.3g} rel mean {mean:.3g} (scale {scale:.3g}) exact {torch.equal(graph, eager)}"
    )
    assert torch.isfinite(graph).all()
    max_tol, mean_tol = limits or ((BF16_MAX, BF16_MEAN) if bf16 else (FP32_MAX, FP32_MAX))
    assert mx <= max_tol and mean <= mean_tol, (tag, mx, mean)


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_compiled_sampler_with_fused_posterior_against_eager(precision):
    """compile_sampler() (Inductor: the compiled step and the fused posterior) inside the CUDA
    graph against the uncompiled graph path, one chain, same noise: rounding (printed with -rP)."""
    import torch._dynamo

    torch._dynamo.reset()
    head = random_head("cuda", True, "100", c=16, cz=64, depth=3, width=256, std=0.05)
    z = torch.randn(256, 64, device="cuda")
    out = {}
    for compiled in (False, True):
        if compiled:
            head.compile_sampler()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out[compiled] = head.sample(z, 0.9, 2.9, generator=gen(7, "cuda"), cuda_graph=True)
    assert head.posterior_fn(0.9, z.device) is not None
    _check(f"compiled + fused posterior {precision}", out[True], out[False], precision == "bf16")


@gpu
@needs_cuda
def test_gpu_time_table_in_compiled_graphs_follows_in_place_updates():
    """Inductor-compiled step in CUDA graphs, bf16 autocast: with the time-embedding table (the
    CUDA default) against the per-step timestep MLP, before and after an in-place update of that
    MLP's weights (the table is refilled in place; a graph or a compiled step that had copied
    the old rows would differ by far more than rounding; printed with -rP)."""
    import torch._dynamo

    torch._dynamo.reset()
    head = random_head("cuda", True, "100", c=16, cz=64, depth=3, width=256, std=0.05)
    head.compile_sampler()
    z = torch.randn(256, 64, device="cuda")

    def run(table: bool) -> torch.Tensor:
        head.time_table = table
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return head.sample(z, 0.9, 2.9, generator=gen(7, "cuda"), cuda_graph=True)

    before = run(True)
    _check("time table vs timestep MLP", before, run(False), True)
    with torch.no_grad():
        for q in head.net.time_embed.parameters():
            q.mul_(1.5)
    after = run(True)
    _check("after an in-place update", after, run(False), True)
    assert not torch.equal(after, before)  # the update reached the samples


@gpu
@needs_cuda
def test_gpu_compiled_step_with_weight_copies_against_per_step_casts():
    """bf16 autocast, compiled, in CUDA graphs: the weights' bf16 copies made once per chain
    (low_precision_weights) against the compiled step casting them itself at every step: the
    same values, so equal up to kernel choice (printed with -rP)."""
    import contextlib

    import torch._dynamo

    torch._dynamo.reset()
    head = random_head("cuda", True, "100", c=16, cz=64, depth=3, width=256, std=0.05)
    head.compile_sampler()
    z = torch.randn(256, 64, device="cuda")
    out = {}
    for copies in (True, False):
        if not copies:  # a new chain (the cache key does not know this switch) that casts per step
            head.low_precision_weights = lambda device: contextlib.nullcontext()
            head._graphs.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out[copies] = head.sample(z, 0.9, 2.9, generator=gen(7, "cuda"), cuda_graph=True)
    _check("weight copies once per chain vs cast per step", out[True], out[False], True)


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_batched_modulation_against_per_block(precision):
    """The CUDA default (one adaLN matmul) against the per-block path, one chain, same noise:
    the differences are the kernels' rounding (printed with -rP)."""
    head = random_head("cuda", True, "100", c=16, cz=64, depth=3, width=256, std=0.05)
    z = torch.randn(256, 64, device="cuda")
    out = {}
    for batched in (True, False):
        head.batched_modulation = batched
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out[batched] = head.sample(z, 1.0, 2.9, generator=gen(7, "cuda"), cuda_graph=True)
    _check(f"batched adaLN vs per block {precision}", out[True], out[False], precision == "bf16")


@gpu
@needs_cuda
@pytest.mark.parametrize(("learn_sigma", "steps"), [(True, "100"), (True, "ddim25"), (False, "100")])
@pytest.mark.parametrize(("cfg", "temperature"), [(1.0, 1.0), (2.9, 1.0), (2.9, 0.9), (1.0, 0.95)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("n", [128, 70])  # 70: padded (cfg halves 35 -> 48, no cfg 70 -> 80)
def test_gpu_graph_equals_eager(learn_sigma, steps, cfg, temperature, precision, n):
    head = random_head("cuda", learn_sigma, steps, c=16, cz=64, depth=3, width=256, std=0.05)
    z = torch.randn(n, 64, device="cuda")
    bf16 = precision == "bf16"
    results = {}
    for mode in (False, True, True):  # eager, capture + replay, replay again
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            g = gen(7, "cuda")
            out = head.sample(z, temperature, cfg, generator=g, cuda_graph=mode)
        results.setdefault(mode, []).append((out, g.get_state()))
    ((eager, g_eager),) = results[False]
    (first, g_first), (second, _) = results[True]
    assert head._graphs.captures == 1
    assert torch.equal(first, second)  # replays are reproducible
    assert torch.equal(g_first, g_eager)  # the graph path consumed the same random numbers
    _check(f"head {learn_sigma=} {steps=} {cfg=} {temperature=} {precision} {n=}", first, eager, bf16)


@gpu
@needs_cuda
def test_gpu_graph_survives_autocast_regions_and_in_place_weight_updates():
    head = random_head("cuda", c=16, cz=64, depth=2, width=128, std=0.05, steps="20")
    z = torch.randn(96, 64, device="cuda")

    def both():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager = head.sample(
                z, 1.0, 2.0, generator=gen(1, "cuda"), cuda_graph=False
            )  # fills the cast cache
            graph = head.sample(z, 1.0, 2.0, generator=gen(1, "cuda"), cuda_graph=True)
        return eager, graph

    e1, g1 = both()
    junk = [torch.randn(1 << 20, device="cuda") for _ in range(8)]  # reuse freed blocks
    e2, g2 = both()  # a new autocast region: the graph must not read freed weight casts
    del junk
    _check("autocast regions 1", g1, e1, bf16=True)
    _check("autocast regions 2", g2, e2, bf16=True)
    assert torch.equal(g1, g2)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(1.1)  # in place (an optimizer step): the graph reads the new values
    e3, g3 = both()
    _check("after in-place update", g3, e3, bf16=True)
    assert not torch.equal(e3, e1)
    assert head._graphs.captures == 1
    head.double().float()  # new storage: the cache is dropped and re-captured
    e4, g4 = both()
    _check("after .double().float()", g4, e4, bf16=True)
    assert head._graphs.captures == 2


@gpu
@needs_cuda
def test_gpu_buckets_and_bounded_cache():
    head = random_head("cuda", c=16, cz=64, steps="10")
    head._graphs.max_entries = 2
    for n in (70, 76, 128, 40):  # buckets 80, 80, 128, 48
        z = torch.randn(n, 64, device="cuda")
        eager = head.sample(z, 1.0, 1.0, generator=gen(n, "cuda"), cuda_graph=False)
        graph = head.sample(z, 1.0, 1.0, generator=gen(n, "cuda"))
        _check(f"bucket n={n}", graph, eager, bf16=False)
    assert head._graphs.captures == 3 and len(head._graphs.entries) == 2


@gpu
@needs_cuda
def test_gpu_capture_failure_falls_back_to_eager(monkeypatch):
    head = random_head("cuda", c=16, cz=64, steps="10")
    z = torch.randn(32, 64, device="cuda")
    eager = head.sample(z, 1.0, 2.0, generator=gen(0, "cuda"), cuda_graph=False)

    def fail(self, pool, stream):
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(StaticChain, "capture", fail)
    with pytest.warns(RuntimeWarning, match="CUDA-graph capture failed .*sampling eagerly"):
        out = head.sample(z, 1.0, 2.0, generator=gen(0, "cuda"))
    assert torch.equal(out, eager)  # no noise was drawn before the failed capture
    assert "earlier capture failed" in head.graph_refusal(z, 2.0)
    assert torch.equal(head.sample(z, 1.0, 2.0, generator=gen(0, "cuda")), eager)  # no second warning


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch", [4, 16])  # 16: every row count is a bucket size (no padding)
def test_gpu_mar_tokens_graph_equals_eager(precision, batch):
    model = tiny_mar().cuda()
    randomize_head(model)
    labels = torch.arange(batch, device="cuda") % 11  # 10 == class_num: unconditional
    bf16 = precision == "bf16"
    out = {}
    for graphs in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out[graphs] = model.sample_tokens(
                labels,
                num_iter=5,
                cfg=3.0,
                temperature=0.9,
                num_sampling_steps="50",
                generator=gen(0, "cuda"),
                cuda_graph=graphs,
            )
    assert model.diffloss._graphs.captures >= 2
    _check(
        f"MAR tokens {precision} B={batch}",
        out[True],
        out[False],
        bf16,
        (MAR_BF16_MAX, MAR_BF16_MEAN) if bf16 else None,
    )
    images = model.generate(labels, seed=1, num_iter=3, cfg=2.0, num_sampling_steps="10")
    assert torch.isfinite(images).all()


@gpu
@needs_cuda
def test_gpu_casmar_stage1_graph_equals_eager():
    model = tiny_casmar().cuda()
    randomize_heads(model)
    labels = torch.tensor([3, 10], device="cuda")
    out = {}
    for graphs in (False, True):
        model.diffloss.cuda_graph = graphs  # CASMAR's stage-1 head is a DiffLoss
        big, small = model.sample_tokens(labels, cfg=3.0, re_cfg=2.0, generator=gen(0, "cuda"), **SAMPLE)
        out[graphs] = (big, small)
    assert model.diffloss._graphs.captures >= 1
    _check("CASMAR scaffold", out[True][1], out[False][1], bf16=False)
    _check("CASMAR big tokens", out[True][0], out[False][0], bf16=False)
