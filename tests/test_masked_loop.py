"""The masked-generation loop shared by MAR and CASMAR's two stages (models/mar.py) gives, bit for
bit, the tokens, the random draws and the traces of the loops it replaced
(tests/reference_masked_loops.py), on fresh random tiny models: with and without CFG, both CFG
schedules, temperatures, known (editing) tokens, PSA and SALA heads; and the seeded tokens
recorded from main before it (tests/masked_sampling_golden.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import reference_masked_loops as ref
import torch
from masked_sampling_golden import CASES, build_model, decoded, run_case
from test_casmar import randomize_heads, tiny_casmar
from test_mar import randomize_head, tiny_mar

from maskar.nn.sampling import SamplingTrace


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same_traces(a: SamplingTrace, b: SamplingTrace) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert (x.stage, x.index) == (y.stage, y.index)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.mask, y.mask)
        assert set(x.info) == set(y.info)
        for key, v in x.info.items():
            w = y.info[key]
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, w), key
            elif dataclasses.is_dataclass(v):
                for f in dataclasses.fields(v):
                    p, q = getattr(v, f.name), getattr(w, f.name)
                    assert torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q, (key, f.name)
            else:
                assert v == w, key


def random_known(b: int, n: int, c: int, unknown: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n, C) tokens and a (B, n) known mask with ``unknown`` unknown tokens in every row."""
    g = gen(seed)
    known = torch.randn(b, n, c, generator=g)
    order = torch.argsort(torch.rand(b, n, generator=g), dim=1)
    mask = torch.ones(b, n, dtype=torch.bool).scatter(1, order[:, :unknown], False)
    return known, mask


MAR_CASES = [
    dict(num_iter=4, cfg=3.0, temperature=0.9),
    dict(num_iter=1, cfg=1.0),
    dict(num_iter=7, cfg=2.0, cfg_schedule="constant", temperature=0.5),
    dict(num_iter=40, cfg=1.5),  # more steps than tokens: the loop stops early
]


@pytest.mark.parametrize("case", MAR_CASES)
@pytest.mark.parametrize("edit", [False, True])
def test_mar_loop_is_bitwise_the_reference(case, edit):
    model = tiny_mar()
    randomize_head(model)
    labels = torch.tensor([3, 10, 1])  # 10 == class_num: unconditional
    kw = dict(case, num_sampling_steps="4")
    if edit:
        kw["known"], kw["known_mask"] = random_known(3, model.seq_len, model.token_channels, 9, seed=5)
    g1, g2, t1, t2 = gen(0), gen(0), SamplingTrace(), SamplingTrace()
    got = model.sample_tokens(labels, generator=g1, trace=t1, **kw)
    want = ref.mar_sample_tokens(model, labels, generator=g2, trace=t2, **kw)
    assert torch.equal(got, want) and torch.equal(g1.get_state(), g2.get_state())
    assert_same_traces(t1, t2)


CASMAR_CASES = [
    dict(num_iter=3, scaffold_num_iter=3, cfg=3.0, re_cfg=2.0, temperature=0.9),
    dict(num_iter=2, scaffold_num_iter=5, cfg=1.0, re_cfg=1.0),
    dict(num_iter=4, scaffold_num_iter=2, cfg=2.0, re_cfg=1.5, cfg_schedule="constant"),
]


@pytest.mark.parametrize("case", CASMAR_CASES)
@pytest.mark.parametrize("attention", ["psa", "sala"])
@pytest.mark.parametrize("edit", [False, True])
def test_casmar_loops_are_bitwise_the_reference(case, attention, edit):
    model = tiny_casmar(head_attention=attention)
    randomize_heads(model)
    labels = torch.tensor([3, 10, 1])
    kw = dict(case, num_sampling_steps="3", refine_num_sampling_steps="3")
    if edit:
        kw["known"], kw["known_mask"] = random_known(3, model.seq_len, model.token_channels, 10, seed=6)
        small = random_known(3, model.scaffold_len, model.token_channels, 2, seed=7)
        kw["known_small"], kw["known_small_mask"] = small
    g1, t1 = gen(0), SamplingTrace()
    big, small = model.sample_tokens(labels, generator=g1, trace=t1, **kw)

    g2, t2 = gen(0), SamplingTrace()
    stage1 = dict(
        cfg=kw["re_cfg"],
        cfg_schedule=kw.get("cfg_schedule", "linear"),
        temperature=kw.get("temperature", 1.0),
        num_sampling_steps="3",
    )
    small_ref, small_z, predicted = ref.casmar_sample_scaffold(
        model,
        labels,
        num_iter=kw["scaffold_num_iter"],
        generator=g2,
        trace=t2,
        known=kw.get("known_small"),
        known_mask=kw.get("known_small_mask"),
        **stage1,
    )
    stage2 = dict(stage1, cfg=kw["cfg"], num_sampling_steps="3")
    big_ref = ref.casmar_refine(
        model,
        labels,
        model.refine_scaffold(small_z, predicted),
        num_iter=kw["num_iter"],
        generator=g2,
        trace=t2,
        known=kw.get("known"),
        known_mask=kw.get("known_mask"),
        **stage2,
    )
    assert torch.equal(small, small_ref) and torch.equal(big, big_ref)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert_same_traces(t1, t2)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_casmar_scaffold_fallback_for_stuck_samples_is_the_reference(monkeypatch, cfg):
    """More scaffold steps than the AMR ratio frees tokens: some steps draw nothing for a sample,
    and the official fallback (its most salient masked token) must fire as the reference's does;
    the loop applies it on the GPU without reading whether any row is stuck."""
    model = tiny_casmar()
    randomize_heads(model)
    labels = torch.tensor([3, 10, 1])
    fired = []
    scores = ref.saliency_scores
    monkeypatch.setattr(ref, "saliency_scores", lambda x: fired.append(1) or scores(x))
    kw = dict(num_iter=12, cfg=cfg, num_sampling_steps="3")
    g1, g2, t1, t2 = gen(0), gen(0), SamplingTrace(), SamplingTrace()
    got = model.sample_scaffold(labels, generator=g1, trace=t1, **kw)
    want = ref.casmar_sample_scaffold(model, labels, generator=g2, trace=t2, **kw)
    assert fired, "the case should make the reference take its fallback"
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(g1.get_state(), g2.get_state())
    assert_same_traces(t1, t2)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read GPU values back to the host (each waits for the GPU's queue):
    scalar reads, nonzero and boolean indexing; ``tolist`` is counted by the caller's patch."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func in (aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default):
            self.count += 1
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            self.count += any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None
            )
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("steps", [(3, 2), (6, 2), (3, 5)], ids=lambda s: f"scaffold{s[0]}-refine{s[1]}")
def test_casmar_sampling_reads_the_gpu_at_most_twice_a_scaffold_step(monkeypatch, steps):
    """The AMR count (one read in SAMS) and, in the scaffold, the number of tokens the MLP head
    draws (one read) are the only values a step needs on the host; given tokens, the first step
    also reads the masked count (one per stage). It was ~12 reads a scaffold step and 5 a refine
    step."""
    scaffold, refine = steps
    model = tiny_casmar()
    randomize_heads(model)
    reads = _HostReads()
    tolist = torch.Tensor.tolist

    def counted(self):
        reads.count += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with torch.no_grad(), reads:
        model.sample_tokens(
            torch.tensor([3, 10, 1]), num_iter=refine, scaffold_num_iter=scaffold, cfg=2.0, re_cfg=1.5,
            num_sampling_steps="3", refine_num_sampling_steps="3", generator=gen(0),
        )  # fmt: skip
    # scaffold: SAMS except after the last step, the drawn count every step; refine: SAMS except
    # after the last step; no read of the starting masked count when no tokens are given
    assert reads.count == (2 * scaffold - 1) + (refine - 1), reads.count


def test_casmar_stage2_from_latents_is_the_reference():
    model = tiny_casmar()
    randomize_heads(model)
    labels = torch.tensor([2, 4])
    latents = torch.randn(2, model.token_channels, model.scaffold_side, model.scaffold_side)
    kw = dict(num_iter=3, cfg=2.5, num_sampling_steps="3")
    got = model.sample_refine_from_latents(labels, latents, generator=gen(1), **kw)
    scaffold = model.cond_proj(latents.flatten(2).transpose(1, 2))
    want = ref.casmar_refine(model, labels, scaffold, generator=gen(1), **kw)
    assert torch.equal(got, want)


GOLDEN = Path(__file__).parent / "data" / "masked_sampling_golden.json"

# How far a recorded token may be from today's on a CPU whose fp32 code paths round differently
# from the recording machine's: MKL's GEMM blocking and the vectorised exp / log / LayerNorm differ
# between AVX2, AVX-512 and AMX machines, and the tiny random heads' tokens reach 1e5, so the
# error follows the tokens' scale. Measured on a Sapphire Rapids CPU (AVX-512 + AMX, 2026-12-05)
# against the recording: at most 2.4e-6 of the scale. A changed formula or draw moves tokens by
# a large part of the scale.
PLATFORM_ATOL = 2e-5  # times max |token|
PLATFORM_RTOL = 1e-4


def assert_recorded(tokens: torch.Tensor, name: str) -> None:
    """``tokens`` equal the recording of case ``name``: bit for bit on a CPU that rounds as the
    recording machine's did, else within the platform rounding bound above."""
    want = decoded(json.loads(GOLDEN.read_text())[name])
    if torch.equal(tokens, want):
        return
    assert tokens.shape == want.shape, (tokens.shape, want.shape)
    scale = float(want.abs().max())
    err = (tokens - want).abs()
    bound = PLATFORM_ATOL * scale + PLATFORM_RTOL * want.abs()
    worst = float((err / bound).max())
    assert worst <= 1.0, (
        f"{name}: not bit for bit, and beyond CPU rounding: max |diff| {float(err.max()):.3g} at "
        f"token scale {scale:.3g} ({worst:.2f} x the bound)"
    )


def _run_one_thread(model: torch.nn.Module, labels: list[int], knobs: dict) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded: a CPU matmul may block differently across threads
    try:
        return run_case(model, labels, knobs)
    finally:
        torch.set_num_threads(threads)


def test_the_recording_check_tells_rounding_from_a_change():
    """Within the bound: a CPU's rounding; a relative change of 1e-3 at one token is not."""
    want = decoded(json.loads(GOLDEN.read_text())["mar_cfg"])
    scale = float(want.abs().max())
    assert_recorded(want + PLATFORM_ATOL * scale / 2, "mar_cfg")
    changed = want.clone()
    changed.view(-1)[7] += 1e-3 * scale
    with pytest.raises(AssertionError, match="beyond CPU rounding"):
        assert_recorded(changed, "mar_cfg")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_seeded_tokens_equal_the_recorded_reference(case):
    """Seeded tokens recorded from main at 9439c91, before the shared loop and the DiT-head graphs
    (tests/masked_sampling_golden.py): today's samplers give them bit for bit (fp32, one thread)
    on a CPU that rounds as the recording machine's did, within CPU rounding on others
    (:func:`assert_recorded`)."""
    name, arch, overrides, labels, knobs = case
    assert_recorded(_run_one_thread(build_model(arch, overrides), labels, knobs), name)


@pytest.mark.parametrize("compiled", [False, True], ids=["deferred-eager", "compiled-eager-backend"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("mar_cfg", "casmar_psa")], ids=lambda c: c[0])
def test_deferred_residual_adds_keep_the_recorded_tokens(case, compiled):
    """Compiled sampling leaves each block's last residual add to the next block's graph
    (``_run_blocks``): the same operations on the same values, so the tokens of the path without
    it bit for bit on this CPU (and so the recording, :func:`assert_recorded`), through the
    deferring blocks run eagerly and under Dynamo (MAR: a handful of graphs, the
    first block's, nothing pending, and the rest's; CASMAR compiles as many frames with the
    deferral as without it, 22 on the CPU)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    name, arch, overrides, labels, knobs = case
    plain = _run_one_thread(build_model(arch, overrides), labels, knobs)  # no deferral, this CPU
    model = build_model(arch, overrides)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    if compiled:
        model.compile_sampler(backend=counter)
    else:
        model._sampler_compiled = True  # the deferring path without any compile
    tokens = _run_one_thread(model, labels, knobs)
    assert torch.equal(tokens, plain)  # bit for bit on any CPU: the same operations on the same values
    assert_recorded(tokens, name)
    if compiled and arch == "mar":  # blocks (first / rest) and the head's steps: within Dynamo's limit
        assert 2 <= counter.frame_count <= 8, counter.frame_count
