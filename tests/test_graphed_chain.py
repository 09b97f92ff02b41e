"""The CUDA-graph chain (maskar.nn.graphed_chain) for CASMAR's DiT head, and RePaint through it.

CPU tests run the graph path's static buffers (pre-drawn noise stream, CFG layout, known-token
injection, labels) without capturing and require bitwise equality with the eager sampler;
GPU tests capture real graphs and print the measured differences (run with ``-rP``).
"""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from test_casmar import SAMPLE, randomize_heads, tiny_casmar
from test_cuda_graph_sampling import _check, gen, random_head

from maskar.nn.diffusion import create_diffusion
from maskar.nn.graphed_chain import StaticChain

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def dit_head(attention: str = "psa", device: str = "cpu"):
    model = tiny_casmar(head_attention=attention)
    randomize_heads(model)
    return model.cond_diffloss.to(device).eval()  # eval: SALA's label drop is training-only


def dit_inputs(n: int, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, 4, 4, generator=g)
    known = torch.randn(n, 4, 4, 4, generator=g)
    keep = torch.rand(n, 1, 4, 4, generator=g) < 0.4
    labels = torch.randint(0, 11, (n,), generator=g)
    return tuple(t.to(device) for t in (z, known, keep, labels))


def head_and_inputs(which: str):
    """A random MLP head ("mlp") or DiT head ("dit"), its conditions and sample() keywords."""
    if which == "mlp":
        return random_head(), torch.randn(32, 8), {}
    head = dit_head()
    z, known, keep, labels = dit_inputs(4)
    return head, z, dict(labels=labels, known=known, known_mask=keep)


# ----------------------------------------------------------------------------- CPU


def test_step_noise_replaces_the_draws_of_the_eager_loop():
    diff = create_diffusion("7", learn_sigma=False)
    x_T = torch.randn(3, 4)

    def model(x, t):
        return torch.tanh(x + t[:, None].float() / 1000)

    g = gen(5)
    eager = diff.p_sample_loop(model, x_T, temperature=0.8, generator=g)
    g2 = gen(5)
    draws = [torch.randn(3, 4, generator=g2) for _ in range(7)]
    assert torch.equal(diff.p_sample_loop(model, x_T, temperature=0.8, step_noise=draws), eager)
    with pytest.raises(ValueError, match="6 step noises for 7 steps"):
        diff.p_sample_loop(model, x_T, step_noise=draws[:6])


@pytest.mark.parametrize("attention", ["psa", "sala"])
@pytest.mark.parametrize(("cfg", "temperature"), [(1.0, 1.0), (2.5, 0.9)])
@pytest.mark.parametrize("repaint", [False, True, "paste"])
@torch.no_grad()
def test_dit_static_chain_equals_eager_on_cpu(attention, cfg, temperature, repaint):
    """Static buffers (x_T shared by the CFG halves, every step's noise, known tokens and their
    mask, labels) give the eager DiT sampler's output bit for bit and the same generator state."""
    head = dit_head(attention)
    n = 4 if cfg != 1.0 else 3
    z, known, keep, labels = dit_inputs(n)
    if cfg != 1.0:  # [cond | uncond]: the halves share known tokens, labels differ (null class)
        known, keep = torch.cat([known[:2], known[:2]]), torch.cat([keep[:2], keep[:2]])
        labels = torch.cat([labels[:2], torch.full((2,), 10)])
    kw = dict(labels=labels)
    if repaint:
        kw.update(known=known, known_mask=keep, paste_known=repaint == "paste")
    g_eager, g_static = gen(3), gen(3)
    eager = head.sample(z, temperature, cfg, generator=g_eager, cuda_graph=False, **kw)
    diff = head.gen_diffusion()
    static = head._sample_graphed(z, temperature, cfg, diff, g_static, capture=False, **kw)
    assert torch.equal(static, eager)
    assert torch.equal(g_static.get_state(), g_eager.get_state())  # same number of draws
    if repaint == "paste":
        assert torch.equal(static.masked_select(keep), known.masked_select(keep))
    (chain,) = head._graphs.entries.values()
    assert isinstance(chain, StaticChain) and chain.rows == n  # the DiT head never pads
    assert (chain.known is not None) == bool(repaint)
    # a second call reuses the chain and its buffers: stale contents must not leak
    z2, known2, keep2, _ = dit_inputs(n, seed=1)
    if repaint:
        kw.update(known=known2, known_mask=keep2)
    eager2 = head.sample(z2, temperature, cfg, generator=gen(4), cuda_graph=False, **kw)
    static2 = head._sample_graphed(z2, temperature, cfg, diff, gen(4), capture=False, **kw)
    assert torch.equal(static2, eager2) and len(head._graphs.entries) == 1


@torch.no_grad()
def test_mlp_head_repaint_through_padded_static_chain():
    """The MLP head's graph path now takes known tokens too: padded rows (6 -> 16, or the CFG
    halves 3 -> 16 each) are unknown and never change the real ones."""
    head = random_head()
    for cfg in (1.0, 3.0):
        z = torch.randn(6, 8)
        known = torch.randn(6, 4)
        keep = torch.rand(6, 1) < 0.5
        kw = dict(known=known, known_mask=keep, paste_known=True)
        eager = head.sample(z, 0.9, cfg, generator=gen(0), cuda_graph=False, **kw)
        static = head._sample_graphed(z, 0.9, cfg, head.gen_diffusion(), gen(0), capture=False, **kw)
        torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-6)  # padded GEMMs: rounding only
        assert torch.equal(static.masked_select(keep), known.masked_select(keep.expand(6, 4)))


@pytest.mark.parametrize("which", ["mlp", "dit"])
@torch.no_grad()
def test_compiled_step_runs_in_the_static_chain(which):
    """compile_sampler: the static chain calls the compiled step functions (dynamo with the
    eager backend here: same ops, so bit for bit; inductor on the GPU rounds differently)."""
    import torch._dynamo

    torch._dynamo.reset()
    head, z, kw = head_and_inputs(which)
    plain = head.sample(z, 0.9, 2.0, generator=gen(0), cuda_graph=False, **kw)
    head.compile_sampler(backend="eager")
    calls = []
    step_cfg = head._compiled[1]
    head._compiled = (head._compiled[0], lambda *a: (calls.append(1), step_cfg(*a))[1])
    eager = head.sample(z, 0.9, 2.0, generator=gen(0), cuda_graph=False, **kw)
    static = head._sample_graphed(z, 0.9, 2.0, head.gen_diffusion(), gen(0), capture=False, **kw)
    steps = head.gen_diffusion().num_timesteps
    assert len(calls) == 2 * steps  # both paths went through the compiled guided step
    assert torch.equal(eager, plain) and torch.equal(static, plain)


@pytest.mark.parametrize("preset", ["mar-tiny", "casmar-tiny"])
def test_sample_compile_switch_compiles_once(monkeypatch, preset):
    """``sample.compile=true`` reaches generate / edit, which call compile_sampler() once."""
    from maskar.config import load_config
    from maskar.registry import build_model
    from maskar.sampling import sampling_kwargs

    cfg = load_config(preset, ["sample.compile=true", "sample.num_iter=1", "sample.num_sampling_steps=2"])
    model = build_model(cfg.model).eval()
    calls = []
    monkeypatch.setattr(
        model, "compile_sampler", lambda **kw: (calls.append(kw), setattr(model, "_sampler_compiled", True))
    )
    kw = sampling_kwargs(cfg.sample)
    kw.pop("seed")
    if preset == "casmar-tiny":
        kw.update(scaffold_num_iter=1, refine_num_sampling_steps="2")
    labels = torch.tensor([1, 2])
    model.generate(labels, **kw)
    model.edit(torch.zeros(2, 3, 32, 32), torch.ones(2, 1, 32, 32, dtype=torch.bool), labels, **kw)
    assert calls == [{}]
    # the default, auto, compiles on CUDA only: on this CPU model nothing is compiled
    cfg = load_config(preset, ["sample.num_iter=1", "sample.num_sampling_steps=2"])
    assert cfg.sample.compile == "auto"
    model = build_model(cfg.model).eval()
    monkeypatch.setattr(model, "compile_sampler", lambda **kw: calls.append(kw))
    kw = sampling_kwargs(cfg.sample)
    kw.pop("seed")
    if preset == "casmar-tiny":
        kw.update(scaffold_num_iter=1, refine_num_sampling_steps="2")
    model.generate(labels, **kw)
    assert calls == [{}]
    with pytest.raises(ValueError, match="compile: expected auto, true or false, got 'yes'"):
        model.generate(labels, **{**kw, "compile": "yes"})


def test_dit_graph_refusals_and_switch(monkeypatch):
    head = dit_head()
    z, *_ = dit_inputs(3)
    assert head.graph_refusal(z, 1.0) == "not on CUDA"
    assert "row count 3" in head.graph_refusal(z, 2.0)
    calls = []
    monkeypatch.setattr(head, "_sample_graphed", lambda *a, **k: calls.append(1))
    head.sample(z, 1.0, 1.0, generator=gen(0))  # CPU: eager whatever the switch says
    assert not calls and head.cuda_graph is True
    monkeypatch.setattr(head, "graph_refusal", lambda z, cfg: None)
    head.cuda_graph = False
    head.sample(z, 1.0, 1.0, generator=gen(0))
    assert not calls
    head.sample(z, 1.0, 1.0, generator=gen(0), cuda_graph=True)  # the argument wins
    assert calls == [1]


def test_casmar_stage2_static_chain_equals_eager(monkeypatch):
    """A whole tiny CASMAR sampling with the DiT head forced through the static buffers
    (no capture on the CPU) gives the eager tokens bit for bit.

    One CPU thread: with several, the CPU matmul splits rows by thread and can round the static
    buffers' copies differently from the eager tensors (1 ulp, seen with 2 threads); a GPU graph
    replays the eager kernels, so the bitwise claim is about the chain's logic, not CPU BLAS."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _static_chain_equals_eager(monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _static_chain_equals_eager(monkeypatch):
    model = tiny_casmar()
    randomize_heads(model)
    labels = torch.tensor([3, 10])
    eager = model.sample_tokens(labels, cfg=3.0, re_cfg=2.0, generator=gen(0), **SAMPLE)
    head = model.cond_diffloss
    real = head._sample_graphed
    monkeypatch.setattr(head, "graph_refusal", lambda z, cfg: None)
    monkeypatch.setattr(head, "_sample_graphed", lambda *a, **k: real(*a, **{**k, "capture": False}))
    static = model.sample_tokens(labels, cfg=3.0, re_cfg=2.0, generator=gen(0), **SAMPLE)
    assert len(head._graphs.entries) == 1
    assert torch.equal(static[0], eager[0]) and torch.equal(static[1], eager[1])


@pytest.mark.parametrize("attention", ["psa", "sala"])
@torch.no_grad()
def test_dit_block_casts_its_attention_input_once_with_the_same_result(monkeypatch, attention):
    """Under autocast the DiT block hands its attention (and MLP) the low-precision input that each
    linear layer would cast to itself: one cast instead of three, the same bits out."""
    import maskar.models.casmar as casmar_module

    model = tiny_casmar(head_attention=attention, gdm_w=32, gdm_heads=2)
    randomize_heads(model)
    block = model.cond_diffloss.net.blocks[0].eval()
    g = torch.Generator().manual_seed(0)
    x, c, cond = (torch.randn(2, 16, 32, generator=g) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        once = block(x, c, (4, 4), cond)
        monkeypatch.setattr(casmar_module, "_autocast_input", lambda t: t)
        per_layer = block(x, c, (4, 4), cond)
    assert torch.equal(once, per_layer)


# ----------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_gpu_dit_graph_equals_eager(precision, cfg):
    head = dit_head(device="cuda")
    n = 8
    z, known, keep, labels = dit_inputs(n, "cuda")
    bf16 = precision == "bf16"
    out = {}
    for mode in (False, True, True):  # eager, capture + replay, replay again
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            g = gen(7, "cuda")
            res = head.sample(
                z, 1.0, cfg, labels=labels, known=known, known_mask=keep, generator=g, cuda_graph=mode
            )
        out.setdefault(mode, []).append((res, g.get_state()))
    ((eager, g_eager),) = out[False]
    (first, g_first), (second, _) = out[True]
    assert head._graphs.captures == 1 and torch.equal(first, second)
    assert torch.equal(g_first, g_eager)
    _check(f"DiT head {precision} cfg={cfg}", first, eager, bf16)


@gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_casmar_tokens_graph_equals_eager(precision):
    model = tiny_casmar().cuda()
    randomize_heads(model)
    labels = torch.tensor([3, 10, 1, 2], device="cuda")
    bf16 = precision == "bf16"
    out = {}
    model.diffloss.cuda_graph = False  # padded MLP-head rows may round differently: keep stage 1 eager
    for graphs in (False, True):
        model.cond_diffloss.cuda_graph = graphs
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out[graphs] = model.sample_tokens(labels, cfg=3.0, re_cfg=2.0, generator=gen(0, "cuda"), **SAMPLE)
    assert model.cond_diffloss._graphs.captures == 1
    _check(f"CASMAR scaffold {precision}", out[True][1], out[False][1], bf16, (0.25, 1e-2) if bf16 else None)
    _check(f"CASMAR tokens {precision}", out[True][0], out[False][0], bf16, (0.25, 1e-2) if bf16 else None)


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="Inductor's CPU code needs a C++ compiler"
)
@torch.no_grad()
def test_fused_posterior_under_inductor_equals_eager_to_rounding():
    """compile_sampler with the default backend (Inductor, here its CPU code): the per-step
    posterior runs as the compiled posterior_step, on the network's output as it comes; the
    chain stays within float32 rounding of the eager sampler (Inductor may contract a
    multiply-add into an FMA), and a second temperature reuses the same compiled code."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    head = random_head()
    z = torch.randn(32, 8)
    plain = {t: head.sample(z, t, 2.0, generator=gen(0), cuda_graph=False) for t in (0.9, 0.5)}
    head.compile_sampler()
    assert head.posterior_fn(0.9, z.device) is not None
    for t, want in plain.items():
        got = head.sample(z, t, 2.0, generator=gen(0), cuda_graph=False)
        static = head._sample_graphed(z, t, 2.0, head.gen_diffusion(), gen(0), capture=False)
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-4 * scale, t  # 100 steps of float32 rounding
        assert torch.equal(static, got)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 4, frames  # step_cfg, posterior (last step and the others): not one per temperature


@pytest.mark.parametrize("which", ["mlp", "dit"])
@torch.no_grad()
def test_compiled_step_reads_weight_copies_made_once_per_chain(which):
    """Under autocast the compiled step gets the linear / conv weights as low-precision copies
    made once per chain (low_precision_weights): its traced graph casts no parameter, the
    samples equal those of the compiled step that casts them itself (same values), the
    parameters are restored afterwards, and later chains reuse the compiled graphs."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd

    head, z, kw = head_and_inputs(which)
    params = {n: p for n, p in head.named_parameters()}
    casts: list[list[str]] = []

    shapes = {tuple(p.shape) for p in params.values()}

    def count_casts(gm, example_inputs):  # casts of float32 graph inputs shaped as a parameter
        found = []
        for n in gm.graph.nodes:
            src = n.args[0] if n.op == "call_function" and n.args else None
            if not (isinstance(src, torch.fx.Node) and src.op == "placeholder"):
                continue
            val = src.meta.get("val")
            if ("_to_copy" in str(n.target) or "convert_element_type" in str(n.target)) and (
                isinstance(val, torch.Tensor) and val.dtype == torch.float32 and tuple(val.shape) in shapes
            ):
                found.append(src.name)
        casts.append(found)
        return gm

    out = {}
    for swap in (False, True):
        torch._dynamo.reset()
        head._graphs.clear()  # the static chains below are made anew for each variant
        head.compile_sampler(backend=aot_autograd(fw_compiler=count_casts))
        if not swap:  # the compiled step as before: autocast casts the weights inside it
            head.low_precision_weights = lambda device: contextlib.nullcontext()
        casts.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[swap] = head.sample(z, 0.9, 2.0, generator=gen(0), cuda_graph=False, **kw)
            compiled = len(casts)
            again = head.sample(z, 0.9, 2.0, generator=gen(0), cuda_graph=False, **kw)
            assert len(casts) == compiled  # new copies each chain, no recompile
            static = head._sample_graphed(z, 0.9, 2.0, head.gen_diffusion(), gen(0), capture=False, **kw)
        assert torch.equal(again, out[swap]) and torch.equal(static, out[swap])
        step_casts = max(len(c) for c in casts)
        if swap:
            assert step_casts == 0, casts
        else:
            assert step_casts > 4, casts  # the weights of the step's linears, cast per call
            del head.low_precision_weights
    assert torch.equal(out[True], out[False])
    assert all(p is params[n] and p.dtype == torch.float32 for n, p in head.named_parameters())
