"""The fast next-scale sampling path (issue 14) against its references.

- the fused top-k / top-p sampler: exact probabilities of the reference filter (ties included,
  exhaustively on a small vocabulary), a chi-square test on its draws, no full-vocabulary sort,
  and the exponential race drawing bitwise what ``torch.multinomial`` draws;
- seeded fp32 CPU samples of tiny VAR / HMAR models equal those recorded from main before this
  work (tests/sampling_golden.py);
- the CUDA-graph path's bodies, run on their static buffers without capture, give the eager
  loop's tokens and images and leave the caller's generator (or the default one) where the eager
  loop does; on a GPU the captured graphs do too;
- the bf16 decoder stays close to the fp32 one; chunked sampling changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import pickle
from pathlib import Path

import pytest
import torch
from sampling_golden import CASES, build_model, decoded_images, run_case
from torch.utils._python_dispatch import TorchDispatchMode

from maskar.models import var as var_mod
from maskar.models.scale_graphs import GraphCache, ScaleGraphRunner, graphs_usable
from maskar.nn.sampling import (
    draw_from_probs,
    exponential_noise,
    filter_logits,
    sample_from_logits,
    topk_topp_probs,
)

GOLDEN = Path(__file__).parent / "data" / "sampling_golden.json"
# The recorded tokens must come back exactly; the recorded images are the recording CPU's fp32
# decode, and another CPU's convolution kernels round differently: up to 1.3e-6 on an AMD EPYC
# with AVX2 (2026-12-06) against the recording machine's, tokens equal. Hence 1e-5 for images.
IMAGE_ATOL = 1e-5
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ----------------------------------------------------------------------------- the sampler


def test_exponential_race_is_torch_multinomial():
    """multinomial(probs, 1) == argmax(probs / Exp(1) noise drawn from the same generator)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(10):
        R, V = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 700, (1,), generator=g))
        probs = torch.rand(R, V, generator=g).pow(4)
        probs[:, :: 3 + trial] = 0  # filtered entries
        probs /= probs.sum(-1, keepdim=True)
        g1, g2 = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        want = torch.multinomial(probs, 1, generator=g1).view(-1)
        got = draw_from_probs(probs, exponential_noise(R, V, g2, "cpu"))
        assert torch.equal(got, want)
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same RNG use


@pytest.mark.parametrize("top_k", range(0, 6))
def test_fused_probabilities_equal_the_reference_filter_with_ties(top_k):
    """Every row of a 5-token vocabulary with logits in {0, 1, 2} (ties everywhere)."""
    rows = torch.tensor(list(itertools.product([0.0, 1.0, 2.0], repeat=5)))
    for top_p in (0.0, 0.05, 0.2, 0.3, 0.5, 0.7, 0.9, 0.96, 0.999, 1.0):
        want = filter_logits(rows, top_k, top_p).softmax(-1)
        assert torch.equal(topk_topp_probs(rows, top_k, top_p), want), (top_k, top_p)


def test_fused_probabilities_equal_the_reference_on_random_logits():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        V = int(torch.randint(2, 600, (1,), generator=g))
        x = torch.randn(64, V, generator=g) * float(torch.rand(1, generator=g) * 6)
        if trial % 3 == 1:
            x = x.bfloat16().float()  # bf16 logits: many ties
        if trial % 3 == 2:
            x = x.round()
        k = int(torch.randint(0, V + 2, (1,), generator=g))
        p = float(torch.rand(1, generator=g))
        assert torch.equal(topk_topp_probs(x, k, p), filter_logits(x, k, p).softmax(-1)), (V, k, p)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((str(func.overloadpacket), shapes))
        return func(*args, **(kwargs or {}))


def test_fused_sampler_never_sorts_the_vocabulary_when_k_is_small():
    x = torch.randn(32, 4096)
    with _OpLog() as log:
        sample_from_logits(x, 900, 0.96, 1.0, torch.Generator().manual_seed(0))
    sorts = [shapes for name, shapes in log.calls if "sort" in name]
    assert sorts == []  # topk(900) selects and orders its 900 values; nothing sorts 4096
    assert any(name.endswith("topk") for name, _ in log.calls)
    with _OpLog() as log:
        sample_from_logits(x, 900, 0.96, 1.0, torch.Generator().manual_seed(0), method="reference")
    assert any("sort" in name and shapes[0][-1] == 4096 for name, shapes in log.calls)


def test_fused_and_reference_draw_the_same_tokens():
    g = torch.Generator().manual_seed(1)
    for top_k, top_p, temp in [(8, 0.9, 1.0), (0, 0.5, 0.7), (30, 0.0, 1.3), (0, 0.0, 1.0), (1, 0.96, 1.0)]:
        x = torch.randn(5, 33, 120, generator=g) * 3
        a = sample_from_logits(x, top_k, top_p, temp, torch.Generator().manual_seed(7), method="reference")
        b = sample_from_logits(x, top_k, top_p, temp, torch.Generator().manual_seed(7))
        assert torch.equal(a, b) and a.shape == (5, 33)
    with pytest.raises(ValueError, match="sampler"):
        sample_from_logits(x, 1, 0.0, 1.0, method="sorted")


def test_fused_draws_pass_a_chi_square_test():
    """20k draws from one row with ties, top-k 7 and top-p 0.8 against the reference distribution."""
    from scipy.stats import chisquare

    logits = torch.tensor([2.0, 1.0, 1.0, 0.5, 3.0, 0.5, 0.5, 2.0, -1.0, 0.5, 1.5, 0.0])
    want = filter_logits(logits[None], 7, 0.8).softmax(-1)[0]
    n = 20000
    draws = sample_from_logits(logits.expand(n, -1), 7, 0.8, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=logits.numel()).double()
    support = want > 0
    assert counts[~support].sum() == 0  # never a filtered token
    expected = want[support].double() / want[support].double().sum() * n
    stat = chisquare(counts[support].numpy(), expected.numpy())
    assert stat.pvalue > 1e-3, (counts.tolist(), want.tolist())
    assert support.sum() >= 3  # the case keeps several tokens, tie at the boundary included


def test_temperature_and_argmax_limits():
    # seeded: at temperature 1e-4 two logits closer than ~1e-3 could trade places by the noise
    # (the global RNG once gave such a pair)
    x = torch.randn(4, 7, 50, generator=torch.Generator().manual_seed(13))
    top2 = x.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-2
    cold = sample_from_logits(x, 0, 0.0, 1e-4, torch.Generator().manual_seed(0))
    assert torch.equal(cold, x.argmax(-1))
    assert torch.equal(sample_from_logits(x, 1, 0.96, 1.0, torch.Generator().manual_seed(0)), x.argmax(-1))


# ----------------------------------------------------------------------------- same samples as before


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_seeded_fp32_samples_equal_the_recorded_main(case):
    name, arch, overrides, labels, knobs = case
    golden = json.loads(GOLDEN.read_text())[name]
    model = build_model(arch, overrides)
    tokens, images = run_case(model, labels, knobs)
    assert [t.tolist() for t in tokens] == golden["tokens"]
    torch.testing.assert_close(images, decoded_images(golden), rtol=0, atol=IMAGE_ATOL)


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[CASES[0][0], CASES[5][0]])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "own_adds"])
def test_compiled_sampler_gives_the_recorded_samples_with_one_graph_per_part(
    case, backend, defer, monkeypatch
):
    """compile_sampler(): each block's work before and after its attention runs as one traced
    graph for every scale (VAR's KV cache, HMAR's refinement passes and chunks included), and
    the seeded fp32 samples stay the recorded ones (eager backend: the same kernels; aot_eager:
    functionalised graphs). MASKAR_DEFER_RESIDUAL (``defer``, the default): each block's FFN
    residual add made in the next block's first graph (the last block's in its own): every block
    but the first takes a pending add and every block but the last leaves one; off, every block
    runs the same step with its own add."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from maskar.nn.blocks import AdaLNSelfAttnBlock

    name, arch, overrides, labels, knobs = case
    golden = json.loads(GOLDEN.read_text())[name]
    model = build_model(arch, overrides)
    monkeypatch.setattr(var_mod.NextScaleModel, "defer_residual_adds", defer)
    calls: list[tuple[bool, bool]] = []
    step = AdaLNSelfAttnBlock.deferred_step

    def spy(self, carry, cond, pattern=None, cache=None, defer=False):
        calls.append((carry[1] is not None, defer))
        step(self, carry, cond, pattern, cache, defer)
        assert len(carry) == 2 and (carry[1] is not None) == defer

    monkeypatch.setattr(AdaLNSelfAttnBlock, "deferred_step", spy)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    model.compile_sampler(backend=counter)
    tokens, images = run_case(model, labels, knobs)
    assert [t.tolist() for t in tokens] == golden["tokens"]
    torch.testing.assert_close(images, decoded_images(golden), rtol=0, atol=IMAGE_ATOL)
    depth = len(model.blocks)
    passes = len(calls) // depth
    assert passes >= len(golden["tokens"]) and len(calls) == passes * depth
    want = [(defer and i > 0, defer and i < depth - 1) for i in range(depth)]
    assert all(calls[j * depth : (j + 1) * depth] == want for j in range(passes)), calls[: 2 * depth]
    # one graph per part, shared by every block (Dynamo inlines the modules: weights are graph
    # inputs), never one per block or per scale: at most one more for the first scale's single
    # token (sizes of 1 are always specialised) and one for a later batch size (HMAR's
    # refinement rows, or an AOT guard), times two for HMAR stage 2 (frozen and trainable
    # blocks' parameters differ in requires_grad, which Dynamo guards): within Dynamo's limit
    # of 8 per function (past it, calls would fall back to eager), far below the 2 x blocks x
    # scales graphs a per-block or per-scale compile would make. Four parts deferring, two not.
    parts = 4 if defer else 2
    per_block_per_scale = 2 * len(model.repeated_blocks()) * len(golden["tokens"])
    assert parts <= counter.frame_count <= 4 * parts < per_block_per_scale, counter.frame_count


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[CASES[0][0], CASES[5][0]])
def test_deferred_steps_keep_no_stale_activation_alive_into_the_ffn(case, monkeypatch):
    """Where a pass's memory peaks, at each block's post-attention graph (its FFN), no earlier
    activation the compiled parts made is still alive: not the block's input, not q / k / v,
    not the previous block's pending FFN output (the modulations are (rows, 1, 6, C), kept).
    Their references are dropped by AdaLNSelfAttnBlock.deferred_step's carry; before it, the
    deferred adds had raised HMAR-d16 1024 px B 8's graph pool by 0.34 GB on an H100."""
    import weakref

    from maskar.nn.blocks import AdaLNSelfAttnBlock

    name, arch, overrides, labels, knobs = case
    model = build_model(arch, overrides)
    monkeypatch.setattr(var_mod.NextScaleModel, "defer_residual_adds", True)
    torch._dynamo.reset()
    model.compile_sampler(backend="eager")
    made: list[weakref.ref] = []  # every activation a part returned, the modulations left out
    stale: list[int] = []

    def wrap(fn, ffn: bool, mod_at: int | None):
        def call(*args):
            if ffn:
                x = args[0]
                stale.append(sum(1 for r in made if r() is not None and r() is not x))
            out = fn(*args)
            outs = out if isinstance(out, tuple) else (out,)
            made.extend(weakref.ref(t) for i, t in enumerate(outs) if i != mod_at)
            return out

        return call

    blocks = [m for m in model.modules() if isinstance(m, AdaLNSelfAttnBlock)]
    for blk in blocks:
        pre, post, pre_after, post_deferred = blk._compiled_parts
        blk._compiled_parts = (wrap(pre, False, 3), wrap(post, True, None), wrap(pre_after, False, 4),
                               wrap(post_deferred, True, None))  # fmt: skip
    run_case(model, labels, knobs)
    assert len(stale) > len(blocks) and max(stale) == 0, stale


def test_defer_residual_switch_is_read_at_import():
    """MASKAR_DEFER_RESIDUAL: on by default, off with 0."""
    from helpers_env import last_line_with

    code = "import maskar.models.var as v; print(v.NextScaleModel.defer_residual_adds)"
    for value, want in ((None, "True"), ("0", "False"), ("1", "True")):
        assert last_line_with("MASKAR_DEFER_RESIDUAL", value, code) == want


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[CASES[0][0], CASES[5][0]])
def test_compiled_decoder_gives_the_recorded_images(case, monkeypatch):
    """compile_sampler(decoder=True): the decode of every chunk (a ragged last one included) runs
    through torch.compile (aot_eager: the functionalised, decomposed graph of the same ops) and
    gives the recorded tokens and images to rounding (group norm's decomposition sums in another
    order: ~2e-6)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    name, arch, overrides, labels, knobs = case
    golden = json.loads(GOLDEN.read_text())[name]
    model = build_model(arch, overrides)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_sampler(decoder=True, backend=counter)
    monkeypatch.setattr(var_mod, "DECODE_PIXELS", 2 * model.image_size**2)  # chunks of 2 and 1 images
    tokens, images = run_case(model, labels, knobs)
    assert [t.tolist() for t in tokens] == golden["tokens"]
    torch.testing.assert_close(images, decoded_images(golden), rtol=0, atol=1e-5)
    assert counter.frame_count >= 3  # the blocks' two parts and the decoder at least


def test_compiling_a_second_model_in_a_process_warns_until_dynamo_is_reset():
    """compile_sampler() on a model while Dynamo holds sampling code compiled for another model:
    a warning (the second model would reuse that code; such a model sampled as slowly as
    uncompiled on the GPU); none for the first model, none again for the same model, none after
    torch._dynamo.reset()."""
    import warnings

    name, arch, overrides, labels, knobs = CASES[0]
    first, second = build_model(arch, overrides), build_model(arch, overrides)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.compile_sampler(decoder=True, backend="eager")
        run_case(first, labels, knobs)  # compiles: Dynamo now holds code for `first`
        first.compile_sampler(decoder=True, backend="eager")  # the same model again: no warning
    with pytest.warns(UserWarning, match=r"torch._dynamo.reset\(\)"):
        second.compile_sampler(decoder=True, backend="eager")
    torch._dynamo.reset()
    third = build_model(arch, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third.compile_sampler(decoder=True, backend="eager")


def test_bench_sample_takes_compile_decoder():
    from maskar.bench import sample as bench

    assert bench._parse(["compile_decoder=true"])["compile_decoder"] is True
    with pytest.raises(SystemExit, match="compile_decoder"):
        bench._parse(["compile_decoder=2"])


def test_reference_sampler_and_chunked_rows_give_the_same_samples(monkeypatch):
    name, arch, overrides, labels, knobs = CASES[5]  # HMAR stage 2 with refinement
    model = build_model(arch, overrides)
    tokens, images = run_case(model, labels, knobs)
    model.sampler = "reference"
    ref_tokens, ref_images = run_case(model, labels, knobs)
    model.sampler = "fused"
    monkeypatch.setattr(var_mod, "SAMPLE_ROWS", 5)  # chunks of 1-2 samples on the larger scales
    monkeypatch.setattr(var_mod, "BLOCK_ROWS", 20)  # the transformer too (HMAR: no KV cache)
    chunk_tokens, chunk_images = run_case(model, labels, knobs)
    for a, b, c in zip(tokens, ref_tokens, chunk_tokens, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(images, ref_images)
    torch.testing.assert_close(chunk_images, images, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- graph-structured path


def _eager(model, labels, knobs, seed):
    return run_case(model, labels, dict(knobs, seed=seed))


def _runner_args(model, knobs: dict, seed: int):
    """(SamplingArgs, refinement options) of ``generate(**knobs)``, as the runner receives them."""
    knobs = dict(knobs)
    args = dict(cfg=1.5, cfg_schedule="linear", temperature=1.0, top_k=900, top_p=0.96)
    args.update({k: knobs.pop(k) for k in list(args) if k in knobs})
    return model._sampling_args(*args.values(), seed, "cpu"), model._refine_options(knobs, editing=False)


def _runner_and_args(case):
    name, arch, overrides, labels, knobs = case
    model = build_model(arch, overrides)
    knobs = dict(knobs)
    seed = knobs.pop("seed")
    args, refine_kw = _runner_args(model, knobs, seed)
    runner = ScaleGraphRunner(model, len(labels), args, refine_kw, "fp32", capture=False)
    return model, runner, args, refine_kw, torch.tensor(labels), seed


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[6], CASES[7]], ids=lambda c: c[0])
def test_graph_structured_path_gives_the_eager_tokens(case):
    name, labels = case[0], case[3]
    knobs = {k: v for k, v in case[4].items() if k != "seed"}
    model, runner, args, refine_kw, _, seed = _runner_and_args(case)
    # the noise plan: one draw per scale, plus one per refinement pass
    schedule = refine_kw.get("schedule")
    want_plan = [
        [len(labels) * pn * pn] * (len(schedule[si]) if schedule and refine_kw["refine_on"] and pn > 1 else 1)
        for si, pn in enumerate(model.patch_nums)
    ]
    assert runner.plan == want_plan
    for call, (lab, s) in enumerate([(labels, seed), (labels[::-1], seed + 11), (labels, seed)]):
        want_tokens, want_images = _eager(model, lab, knobs, s)
        got_tokens: list[torch.Tensor] = []
        got = runner.generate(model, torch.tensor(lab), torch.Generator().manual_seed(s), got_tokens)
        for a, b in zip(got_tokens, want_tokens, strict=True):
            assert torch.equal(a, b), (name, call)
        assert torch.equal(got, want_images), (name, call)


def _two_calls(call) -> list[list[torch.Tensor]]:
    out = []
    for _ in range(2):
        tokens: list[torch.Tensor] = []
        with torch.no_grad():
            call(tokens)
        out.append(tokens)
    return out


@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=lambda c: c[0])
def test_graph_path_advances_one_generator_as_the_eager_loop(case):
    """Two calls with one generator give the eager loop's two batches (different ones), and the
    generator ends where the eager loop leaves it: the runner hands its state over and back."""
    model, runner, args, refine_kw, lab, seed = _runner_and_args(case)
    assert args.generator is not None
    want = _two_calls(lambda t: model._autoregress(lab, args, out_indices=t, **refine_kw))
    gen = torch.Generator().manual_seed(seed)
    got = _two_calls(lambda t: runner.generate(model, lab, gen, t))
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(got[0], got[1], strict=True))
    assert torch.equal(gen.get_state(), args.generator.get_state())


def test_graph_path_without_a_generator_draws_from_the_default_one():
    """generator=None: the eager loop draws from the device's default generator, so the runner
    does too (seeded by torch.manual_seed) and advances it alike."""
    model, runner, args, refine_kw, lab, _ = _runner_and_args(CASES[6])
    args = dataclasses.replace(args, generator=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        want = _two_calls(lambda t: model._autoregress(lab, args, out_indices=t, **refine_kw))
        want_state = torch.default_generator.get_state()
        torch.manual_seed(123)
        got = _two_calls(lambda t: runner.generate(model, lab, None, t))
        assert torch.equal(torch.default_generator.get_state(), want_state)
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True))


def test_graph_path_names_a_draw_that_departs_from_the_plan():
    model, runner, _, _, lab, seed = _runner_and_args(CASES[6])
    noise = runner.noise
    noise.begin(0)
    noise(runner.plan[0][0])
    with pytest.raises(RuntimeError, match=r"scale 0 asked for draw 1 of .* the recorded plan is \["):
        noise(runner.plan[0][0])  # one draw more than recorded
    rows = runner.plan[2][0]
    runner.plan[2][0] = rows + 1  # the bodies now ask scale 2 for other rows than the plan says
    with pytest.raises(RuntimeError, match=rf"scale 2 asked for draw 0 of {rows} rows; the recorded plan "
                                           rf"is \[{rows + 1}"):  # fmt: skip
        runner.generate(model, lab, torch.Generator().manual_seed(seed), None)


def test_each_chunk_draws_its_own_noise_and_the_cpu_samples_stay(monkeypatch):
    """The head and the sampler run in chunks of SAMPLE_ROWS rows and each chunk draws its own
    (rows, V) noise, so a large scale's whole noise never exists at once; a CPU generator gives
    the same numbers split or not, so the samples are the unchunked eager loop's."""
    labels = CASES[0][3]
    want_tokens, want_images = run_case(build_model(*CASES[0][1:3]), labels, CASES[0][4])
    monkeypatch.setattr(var_mod, "SAMPLE_ROWS", 5)  # chunks of 1-2 samples on the larger scales
    model, runner, _, _, _, seed = _runner_and_args(CASES[0])
    B = len(labels)
    for si, pn in enumerate(model.patch_nums):
        per = max(1, 5 // (pn * pn))
        assert runner.plan[si] == [min(per, B - b0) * pn * pn for b0 in range(0, B, per)], si
    assert max(len(p) for p in runner.plan) == B  # one sample per chunk on the large scales
    tokens: list[torch.Tensor] = []
    images = runner.generate(model, torch.tensor(labels), torch.Generator().manual_seed(seed), tokens)
    assert all(torch.equal(a, b) for a, b in zip(tokens, want_tokens, strict=True))
    assert torch.equal(images, want_images)  # the images depend on the tokens alone


def test_graph_cache_is_cpu_free_and_copies_empty():
    model = build_model("hmar", {"stage": 2})
    assert not graphs_usable(model, torch.device("cpu"))
    model._graphs.entries[("x",)] = object()
    clone = copy.deepcopy(model)
    assert isinstance(clone._graphs, GraphCache) and not clone._graphs.entries
    assert not pickle.loads(pickle.dumps(model._graphs)).entries


def test_static_kv_cache_equals_the_growing_cache():
    from maskar.nn.blocks import KVCache, StaticKVCache

    g = torch.Generator().manual_seed(0)
    grow, static = KVCache(), StaticKVCache(1 + 4 + 9)
    for n in (1, 4, 9):
        k, v = torch.randn(2, 3, n, 5, generator=g), torch.randn(2, 3, n, 5, generator=g)
        (k1, v1), (k2, v2) = grow.append(k, v), static.append(k, v)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    with pytest.raises(ValueError, match="capacity"):
        static.append(k, v)


# ----------------------------------------------------------------------------- decoder precision


def test_bf16_decode_is_close_to_fp32_and_returns_float32():
    model = build_model("var", {})
    tok = model.tokenizer
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, tok.vocab_size, (4, p * p), generator=g) for p in tok.patch_nums]
    fhat = tok.indices_to_fhat(ids)
    with torch.no_grad():
        f32, b16 = tok.fhat_to_img(fhat), tok.fhat_to_img(fhat, precision="bf16")
    assert b16.dtype == torch.float32 and b16.shape == f32.shape
    assert all(p.dtype == torch.float32 for p in tok.parameters())  # the module is untouched
    mse = (b16 - f32).pow(2).flatten(1).mean(1)
    assert (10 * torch.log10(4 / mse)).min() > 30  # dB; the GPU script measures real tokens
    with pytest.raises(ValueError, match="decode precision"):
        tok.fhat_to_img(fhat, precision="fp8")


def test_decode_precision_follows_autocast():
    model = build_model("var", {})
    cpu = torch.device("cpu")
    assert model.decode_precision_for(cpu) == "fp32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.decode_precision_for(cpu) == "bf16"
        model.decode_precision = "fp32"
        assert model.decode_precision_for(cpu) == "fp32"


def test_labels_on_the_cpu_are_checked_there():
    model = build_model("var", {})
    with pytest.raises(ValueError, match="labels"):
        model.generate(torch.tensor([11]))
    assert model._check_labels(torch.tensor([1, 10])).dtype == torch.int64


# ----------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=lambda c: c[0])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("sampler", ["fused", "triton"])
def test_gpu_captured_graphs_give_the_eager_tokens(case, precision, sampler):
    name, arch, overrides, labels, knobs = case
    model = build_model(arch, overrides).cuda()
    model.sampler = sampler  # triton: the one-kernel draw (maskar.kernels.categorical) inside the graphs
    knobs = dict(knobs)
    seed = knobs.pop("seed")
    lab = torch.tensor(labels, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    outs = []
    for graphs in (False, True, True, True):  # eager, eager (first sighting), capture + replay, replay
        model.cuda_graphs = graphs
        tokens: list[torch.Tensor] = []
        with torch.no_grad(), autocast:
            args = model._sampling_args(
                knobs.get("cfg", 1.5), "linear", 1.0, knobs["top_k"], knobs["top_p"], seed, "cuda"
            )
            rest = {k: v for k, v in knobs.items() if k not in ("cfg", "top_k", "top_p")}
            images = model._autoregress(lab, args, out_indices=tokens, **model._refine_options(rest, False))
        outs.append((tokens, images))
    assert model._graphs.captures == 1
    for tokens, images in outs[1:]:
        for a, b in zip(tokens, outs[0][0], strict=True):
            assert torch.equal(a, b), name
        torch.testing.assert_close(images, outs[0][1], rtol=0, atol=1e-5 if precision == "fp32" else 2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=lambda c: c[0])
def test_gpu_captured_graphs_advance_the_generator_as_the_eager_loop(case):
    """The graphs draw from the runner's generator, registered with each graph before its capture:
    consecutive calls with one generator, or with none (the default CUDA generator), give the
    eager loop's tokens, and the generator ends where the eager loop leaves it. The first graphs
    call is eager (the key's first sighting), the second captures and replays."""
    name, arch, overrides, labels, knobs = case
    model = build_model(arch, overrides).cuda()
    knobs = dict(knobs)
    seed = knobs.pop("seed")
    lab = torch.tensor(labels, device="cuda")
    rest = {k: v for k, v in knobs.items() if k not in ("cfg", "top_k", "top_p")}

    def calls(graphs: bool, seed: int | None, n: int = 2):
        model.cuda_graphs = graphs
        args = model._sampling_args(knobs.get("cfg", 1.5), "linear", 1.0, knobs["top_k"], knobs["top_p"],
                                    seed, "cuda")  # fmt: skip
        out = []
        for _ in range(n):
            tokens: list[torch.Tensor] = []
            with torch.no_grad():
                model._autoregress(lab, args, out_indices=tokens, **model._refine_options(rest, False))
            out.append(tokens)
        gen = args.generator if args.generator is not None else torch.cuda.default_generators[0]
        return out, gen.get_state()

    def same(a, b):
        pairs = (xy for ta, tb in zip(a, b, strict=True) for xy in zip(ta, tb, strict=True))
        return all(torch.equal(x, y) for x, y in pairs)

    with torch.cuda.device(0), torch.random.fork_rng(devices=[0]):
        want, want_state = calls(False, seed, 3)
        first, first_state = calls(True, seed)  # eager, then capture + replay
        assert model._graphs.captures == 1
        assert same(first, want[:2]) and torch.equal(first_state, calls(False, seed)[1])
        got, got_state = calls(True, seed, 3)  # replays
        assert model._graphs.captures == 1
        assert same(got, want) and torch.equal(got_state, want_state), name
        torch.cuda.manual_seed(123)
        want, want_state = calls(False, None)
        torch.cuda.manual_seed(123)
        got, got_state = calls(True, None)
        assert model._graphs.captures == 1
        assert same(got, want) and torch.equal(got_state, want_state), name


@gpu
@needs_cuda
@pytest.mark.parametrize("preset", ["hmar-d16", "var-d16"])
def test_gpu_reserved_pool_gives_the_same_tokens_in_a_smaller_pool(monkeypatch, preset):
    """The pool reservation (scale_graphs.RESERVE_POOL) changes where tensors live, not what the
    graphs compute, and at 256 px less memory is then reserved (the allocator model:
    scripts/graph_pool_model.py)."""
    from maskar.bench.sample import build_case
    from maskar.models import scale_graphs

    model, _ = build_case(
        preset, ["model.stage=2"] if preset.startswith("hmar") else [], torch.device("cuda"), "auto"
    )
    model.cast_linears_(torch.bfloat16)
    lab = torch.arange(16, device="cuda") % model.num_classes
    results = {}
    for reserve in (False, True):
        monkeypatch.setattr(scale_graphs, "RESERVE_POOL", reserve)
        model._graphs.clear()
        torch.cuda.empty_cache()
        for _ in range(3):  # eager (first sighting), capture, replay
            tokens: list[torch.Tensor] = []
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                args = model._sampling_args(1.5, "linear", 1.0, 900, 0.96, 0, "cuda")
                model._autoregress(lab, args, out_indices=tokens, **model._refine_options({}, False))
        runner = next(iter(model._graphs.entries.values()))
        assert (runner.reserve_bytes > 0) == reserve
        # everything reserved once the cache is emptied (the graphs' pool, the weights, the
        # returned images): both ways the noise is drawn inside the graphs, in their pool
        torch.cuda.empty_cache()
        results[reserve] = (tokens, torch.cuda.memory_reserved())
    for a, b in zip(results[True][0], results[False][0], strict=True):
        assert torch.equal(a, b), preset
    assert results[True][1] < results[False][1], (preset, results[True][1], results[False][1])


@gpu
@needs_cuda
def test_gpu_compiled_decoder_inside_the_graphs_gives_the_eager_images():
    """compile_sampler(decoder=True) with Inductor: the captured graphs replay the compiled decode
    (bf16) and give the tokens and images of the same compiled code run eagerly."""
    name, arch, overrides, labels, knobs = CASES[5]
    model = build_model(arch, overrides).cuda()
    lab = torch.tensor(labels, device="cuda")
    torch._dynamo.reset()
    model.compile_sampler(decoder=True)
    outs = []
    for _ in range(3):  # eager (first sighting), capture + replay, replay
        tokens: list[torch.Tensor] = []
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            args = model._sampling_args(knobs["cfg"], "linear", 1.0, knobs["top_k"], knobs["top_p"],
                                        seed=4, device="cuda")
            images = model._autoregress(lab, args, out_indices=tokens, **model._refine_options({}, False))
        outs.append((tokens, images))
    assert model._graphs.captures == 1 and model._decoder is not None
    for tokens, images in outs[1:]:
        for a, b in zip(tokens, outs[0][0], strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(images, outs[0][1], rtol=0, atol=1e-5)


@gpu
@needs_cuda
@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[CASES[0][0], CASES[5][0]])
def test_gpu_deferred_residual_adds_give_the_undeferred_samples(case, monkeypatch):
    """MASKAR_DEFER_RESIDUAL under Inductor, bf16, inside the captured graphs: the same tokens as
    the blocks' own adds, images to rounding (the sum and the norm's statistics made in one
    kernel instead of two)."""
    name, arch, overrides, labels, knobs = case
    lab = torch.tensor(labels, device="cuda")
    outs = {}
    for defer in (False, True):
        monkeypatch.setattr(var_mod.NextScaleModel, "defer_residual_adds", defer)
        model = build_model(arch, overrides).cuda()
        torch._dynamo.reset()
        model.compile_sampler()
        for _ in range(2):  # eager (first sighting), then capture + replay
            tokens: list[torch.Tensor] = []
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                args = model._sampling_args(knobs["cfg"], "linear", 1.0, knobs["top_k"], knobs["top_p"],
                                            seed=4, device="cuda")
                images = model._autoregress(lab, args, out_indices=tokens, **model._refine_options({}, False))
        outs[defer] = (tokens, images)
    agree = [float((a == b).float().mean()) for a, b in zip(outs[True][0], outs[False][0], strict=True)]
    print(f"{name}: token agreement per scale {agree}")
    assert min(agree) == 1.0
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=0, atol=1e-3)


def test_pool_reservation_is_the_peak_with_headroom_in_whole_segments():
    from maskar.models.scale_graphs import RESERVE_MARGIN, reserve_size

    assert reserve_size(0) == 0 and reserve_size(-5) == 0
    mib2 = 2 << 20
    for peak in (1, mib2, 10**9, 3 * 10**9 + 7):
        r = reserve_size(peak)
        assert r % mib2 == 0 and peak * RESERVE_MARGIN <= r < peak * RESERVE_MARGIN + mib2
        assert peak * 1.25 <= reserve_size(peak, 1.25) < peak * 1.25 + mib2


def test_pool_margin_switch_is_read_at_import_and_checked():
    """MASKAR_GRAPH_POOL_MARGIN sets the headroom (a sweep in one run); a bad value is named."""
    from helpers_env import last_line_with

    code = "import maskar.models.scale_graphs as g; print(g.RESERVE_MARGIN)"
    for value, want in (("1.25", "1.25"), (None, "1.02")):
        assert last_line_with("MASKAR_GRAPH_POOL_MARGIN", value, code) == want
    from maskar.env import margin

    for bad in ("0.9", "nan", "big"):
        with pytest.raises(ValueError, match=f"MASKAR_GRAPH_POOL_MARGIN: .*got '{bad}'"):
            margin(bad)


def test_recording_noise_allocates_every_draw_and_records_the_plan():
    """The warm-up's noise is a whole (rows, V) float32 tensor per draw, as the graphs' draws are
    (transient blocks of their pool, so the warm-up's live peak must count them), and touches no
    generator."""
    from maskar.models.scale_graphs import _RecordingNoise

    rec = _RecordingNoise(7, torch.device("cpu"))
    state = torch.default_generator.get_state()
    rec.begin(0)
    a, b = rec(5), rec(3)
    assert rec.plan == [[5, 3]] and a.shape == (5, 7) and b.shape == (3, 7)
    assert a.dtype == torch.float32 and a.is_contiguous() and a.untyped_storage().nbytes() == 5 * 7 * 4
    assert bool((a == 1).all()) and torch.equal(torch.default_generator.get_state(), state)


def _pool_model():
    from helpers_scripts import load_script

    return load_script("graph_pool_model")


def test_allocator_model_grows_a_segment_per_larger_request_and_reuses_a_reservation():
    m = _pool_model()
    mib = 1 << 20
    # Each "scale" allocates two tensors 1.5x the last scale's and frees them: the pool model
    # cannot fit a larger request in the freed blocks and adds segments, as the allocator does.
    events, size = [], 12 * mib
    for _ in range(6):
        k = len(events)
        events += [[size, "a"], [size, "b"], [-k - 1, ""], [-k - 2, ""]]
        size = int(size * 1.5)
    plain = m.replay(events)
    assert plain["left"] == 0 and plain["peak"] == 2 * m.round_size(events[-4][0])
    assert plain["reserved"] > 2 * plain["peak"]
    # One segment of the live peak first: every request splits it, nothing else is added.
    reserved = m.replay(events, reserve=plain["peak"])
    assert reserved["reserved"] == plain["peak"]
    # Frees merge neighbours: after everything is freed a request the size of the segment fits.
    pool = m.Pool()
    pool.add_segment(64 * mib)
    hs = [pool.malloc(16 * mib) for _ in range(4)]
    for h in (hs[1], hs[3], hs[0], hs[2]):
        pool.release(h)
    pool.malloc(64 * mib)
    assert pool.reserved == 64 * mib
    # Small requests come from their own 2 MiB segments, 5 MiB ones from 20 MiB segments; noise
    # draws are counted (the graphs draw them in their pool) unless skipped.
    events = [[1000, "x"], [5 * mib, "noise"]]
    assert m.replay(events)["reserved"] == m.SMALL_BUFFER + m.LARGE_BUFFER
    assert m.replay(events, skip=("noise",))["reserved"] == m.SMALL_BUFFER


def test_allocator_model_names_a_bad_case_before_tracing(capsys):
    m = _pool_model()
    for case, words in [("hmar-d16:256", "preset:resolution:batch"), ("nope:256:8", "unknown preset"),
                        ("mar-b:256:8", "VAR / HMAR"), ("hmar-d16:300:8", "resolution 300")]:  # fmt: skip
        assert m.main(["hmar-tiny:16:2", case]) == 2  # the good first case is not traced either
        out = capsys.readouterr()
        assert words in out.err and case in out.err and "live peak" not in out.out


def test_allocator_model_traces_a_sampling_call_on_the_meta_device():
    m = _pool_model()
    events = m.trace("hmar-tiny", 16, 4)
    sizes = [n for n, _ in events if n >= 0]
    frees = [n for n, _ in events if n < 0]
    assert sizes and len(frees) <= len(sizes)
    r = m.replay(events)
    assert 0 < r["peak"] <= r["reserved"]


def test_bench_decode_measures_bf16_against_fp32_on_real_tokens(tmp_path):
    """The shipped hmar-fmnist tokenizer on a few Fashion-MNIST test images (CPU smoke run)."""
    from maskar.bench import decode as bench_decode

    ckpt = Path(__file__).parents[1] / "checkpoints" / "hmar-fmnist"
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path / "d.json"
    assert bench_decode.main([f"ckpt={ckpt}", "limit=16", "batch=8", "device=cpu", f"json={out}"]) == 0
    q = json.loads(out.read_text())["quality"]
    assert q["images"] == 16 and q["image_shape"] == [1, 32, 32]
    assert q["psnr_bf16_vs_fp32_min"] > 45  # dB (measured 57-61 on the CPU)
    assert abs(q["psnr_bf16_vs_original"] - q["psnr_fp32_vs_original"]) < 0.1


def test_generate_compile_option_compiles_once_and_names_a_bad_value(monkeypatch):
    """``sample.compile`` (VAR / HMAR): true compiles the sampler with its decoder before the
    first call and never again; auto and false leave it uncompiled; anything else is named."""
    from maskar.config import ConfigError

    name, arch, overrides, labels, knobs = CASES[6]
    model = build_model(arch, overrides)
    calls: list[bool] = []

    def fake_compile(self, decoder: bool = False, **kw) -> None:
        calls.append(decoder)
        self._sampler_compiled = True

    monkeypatch.setattr(type(model), "compile_sampler", fake_compile)
    lab = torch.tensor(labels)
    for compile, want in (("auto", []), (False, []), (True, [True]), (True, [True])):
        model.generate(lab, seed=0, compile=compile)
        assert calls == want, compile
    model._sampler_compiled = False
    with pytest.raises(ConfigError, match="compile: expected auto, true or false, got 'yes'"):
        model.generate(lab, seed=0, compile="yes")
    assert calls == [True]  # checked before any work


def test_sample_config_takes_the_compile_switch(capsys):
    from maskar.cli import main

    assert main(["info", "preset=hmar-tiny", "sample.compile=true"]) == 0
    assert "compile: true" in capsys.readouterr().out
    assert main(["info", "preset=var-tiny", "sample.compile=maybe"]) == 2
    assert "compile" in capsys.readouterr().err


def test_op_count_script_counts_each_region_of_a_call():
    """scripts/sampling_op_counts.py: HMAR-d16's structure at B 2; the refinement passes show as
    whole transformer passes at s01 (one) and s02 (three), every other scale one pass."""
    from helpers_scripts import load_script

    m = load_script("sampling_op_counts")
    regions = m.count("hmar-d16", 256, 2)
    scales = m.per_scale(regions)
    assert list(scales)[1:] == [f"s{i:02d}" for i in range(10)] + ["decode"]
    assert all(n > 0 for n in regions.values())
    assert [k for k in regions if k.startswith("s02 refine")] == ["s02 refine1", "s02 refine2", "s02 refine3"]
    plain = scales["s03"]
    assert scales["s01"] > 1.8 * plain and scales["s02"] > 3.6 * plain
    assert m.main(["hmar-d16", "--batch", "0"]) == 2
