"""The CUDA-graph call sites inside the samplers, reached on the CPU.

The graph paths run only on CUDA, so the CPU suite never executed the lines that call into them:
on 2026-12-03 the VAR / HMAR call site passed ``runner.generate`` one argument too few and every
GPU generation with graphs raised TypeError (fixed in a1351fc, found by a device call). Here the
gates that keep those paths CUDA-only are opened and the runners are built with ``capture=False``
(their bodies on their static buffers, no graph), so ``model.generate`` goes through the very call
sites a GPU run uses, and must give the eager samples.
"""

from __future__ import annotations

import pytest
import torch
from sampling_golden import CASES, build_model
from test_casmar import SAMPLE, randomize_heads, tiny_casmar
from test_mar import randomize_head, tiny_mar

from maskar.models import scale_graphs
from maskar.models import var as var_mod
from maskar.nn import graphed_chain


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: with several, CPU matmul may round the static buffers' copies 1 ulp off the
    eager tensors (see tests/test_graphed_chain.py); the claim here is about the call sites."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _force_scale_graphs(monkeypatch: pytest.MonkeyPatch, built: list) -> None:
    monkeypatch.setattr(var_mod, "graphs_usable", lambda model, device: True)

    def runner(self, model, batch, args, refine_kw, precision):
        r = scale_graphs.ScaleGraphRunner(model, batch, args, refine_kw, precision, capture=False)
        built.append(r)
        return r

    monkeypatch.setattr(scale_graphs.GraphCache, "runner", runner)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]], ids=lambda c: c[0])
def test_next_scale_generate_through_the_graph_call_site(case, monkeypatch):
    name, arch, overrides, labels, knobs = case
    model = build_model(arch, overrides).eval()
    lab = torch.tensor(labels)
    want = model.generate(lab, **knobs)
    built: list = []
    _force_scale_graphs(monkeypatch, built)
    got = model.generate(lab, **knobs)
    assert len(built) == 1, "generate did not take the graph path"
    assert torch.equal(got, want)


def _force_head_graphs(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    monkeypatch.setattr(graphed_chain.GraphedHead, "graph_refusal", lambda self, z, cfg: None)
    real = graphed_chain.GraphedHead._sample_graphed

    def sample_graphed(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return real(self, *args, **kwargs, capture=False)

    monkeypatch.setattr(graphed_chain.GraphedHead, "_sample_graphed", sample_graphed)


@pytest.mark.parametrize("arch", ["mar", "casmar"])
def test_diffusion_heads_sample_through_the_graph_call_site(arch, monkeypatch):
    if arch == "mar":
        model, knobs = tiny_mar(), dict(num_iter=3, num_sampling_steps="4", cfg=2.0)
        randomize_head(model)
    else:
        model, knobs = tiny_casmar(), dict(SAMPLE, cfg=2.0, re_cfg=1.5)
        randomize_heads(model)
    model.eval()
    lab = torch.tensor([0, 3, 1, 2])
    want = model.generate(lab, seed=0, **knobs)  # eager: the heads refuse graphs off CUDA
    calls: list = []
    _force_head_graphs(monkeypatch, calls)
    got = model.generate(lab, seed=0, **knobs)
    assert calls, "no diffusion head took the graph path"
    if arch == "casmar":
        assert len(set(calls)) == 2  # the scaffold's MLP head and the refine stage's DiT head
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
