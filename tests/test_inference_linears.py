"""cast_linears_: VAR / HMAR store their linears in bf16 for inference, and sampling under bf16
autocast gives the same tokens and images bit for bit (autocast casts those weights anyway)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskar.config import load_config
from maskar.registry import build_model


def _model(preset: str, *overrides: str):
    """A tiny model with every generator weight jittered: zero-initialised layers (adaLN, a
    diffusion head's final layer) would otherwise make the outputs ignore the other weights."""
    torch.manual_seed(0)
    model = build_model(load_config(preset, list(overrides)).model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("tokenizer."):
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _sample(model, labels: torch.Tensor):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model.generate(labels, seed=3)


@pytest.mark.parametrize("preset,overrides", [("var-tiny", ()), ("hmar-tiny", ("model.stage=2",))])
def test_bf16_linears_sample_exactly_what_autocast_samples(preset, overrides) -> None:
    model = _model(preset, *overrides)
    labels = torch.tensor([0, 1, 2])
    before = _sample(model, labels)
    tok_before = {n: p.detach().clone() for n, p in model.tokenizer.named_parameters()}
    n = model.cast_linears_(torch.bfloat16)
    linears = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not name.startswith("tokenizer")
    ]
    assert n == len(linears) > 0 and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(p.dtype == torch.float32 for p in model.tokenizer.parameters())  # the tokenizer is left alone
    assert all(torch.equal(p, tok_before[name]) for name, p in model.tokenizer.named_parameters())
    after = _sample(model, labels)
    assert torch.equal(before, after)
    assert model.cast_linears_(torch.bfloat16) == 0  # idempotent


def test_training_a_cast_model_is_refused() -> None:
    model = _model("var-tiny")
    model.cast_linears_(torch.bfloat16)
    with pytest.raises(RuntimeError, match="cast to torch.bfloat16 for inference"):
        model.train()
    model.eval()  # inference mode stays allowed


@pytest.mark.parametrize("preset", ["var-tiny", "hmar-tiny"])
def test_bf16_linears_give_the_same_logits_bit_for_bit(preset) -> None:
    """The teacher-forced logits under bf16 autocast, before and after the cast (a numerical
    check: sampled tokens alone could hide small differences)."""
    from helpers_nextscale import random_indices

    model = _model(preset)
    labels = torch.tensor([0, 3])
    indices = random_indices(model, 2)
    with torch.no_grad():
        x_in = model.tokenizer.teacher_forcing_input(indices).float()

    def logits():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            h, cond = model.hidden(labels, x_in)
            return model.logits(h, cond).float()

    before = logits()
    model.cast_linears_(torch.bfloat16)
    assert torch.equal(logits(), before)
    w = model.head.weight.data  # the comparison does see a weight change of one bf16 step
    w[0] = (w[0].float() * (1 + 2**-7)).to(w.dtype)
    assert not torch.equal(logits(), before)


def test_the_sampling_cli_casts_only_on_cuda_under_low_precision() -> None:
    from maskar.sampling import inference_weights

    for device, precision, cast in [
        ("cpu", "auto", False), ("cpu", "bf16", False), ("cuda", "fp32", False),
        ("cuda", "auto", True), ("cuda", "bf16", True), ("cuda", "fp16", True),
    ]:  # fmt: skip
        model = _model("var-tiny")  # a CPU model: the device argument alone decides
        inference_weights(model, torch.device(device), precision)
        want = (torch.float16 if precision == "fp16" else torch.bfloat16) if cast else torch.float32
        assert model.head.weight.dtype == want, (device, precision)
    inference_weights(nn.Linear(2, 2), torch.device("cuda"), "bf16")  # models without the method: left alone


@pytest.mark.parametrize(
    "preset,kw",
    [
        ("mar-tiny", dict(num_iter=4, cfg=2.0, num_sampling_steps="8")),
        (
            "casmar-tiny",
            dict(num_iter=2, cfg=2.0, re_cfg=2.0, num_sampling_steps="6", refine_num_sampling_steps="6"),
        ),
    ],
)
def test_masked_generators_sample_the_same_with_bf16_linears(preset, kw) -> None:
    """MAR / CASMAR: transformer and diffusion heads' linears in bf16 give the same images under
    bf16 autocast (the diffusion chains are continuous: any weight change would show)."""
    model = _model(preset)
    labels = torch.tensor([0, 1])

    def sample():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.generate(labels, seed=5, compile=False, **kw)

    before = sample()
    n = model.cast_linears_(torch.bfloat16)
    assert n > 0 and all(p.dtype == torch.float32 for p in model.tokenizer.parameters())
    assert torch.equal(sample(), before)
    with pytest.raises(RuntimeError, match="for inference"):
        model.train()
    w = model.z_proj.weight.data  # the comparison does see a weight change of a few bf16 steps
    w.mul_(1 + 2**-5)
    assert not torch.equal(sample(), before)


def test_a_cast_model_refuses_other_precisions() -> None:
    from maskar.config import ConfigError
    from maskar.sampling import inference_weights

    model = _model("var-tiny")
    inference_weights(model, torch.device("cuda"), "bf16")
    inference_weights(model, torch.device("cuda"), "auto")  # the same dtype again: nothing to do
    with pytest.raises(ConfigError, match="fp32 on cuda needs the fp32 weights"):
        inference_weights(model, torch.device("cuda"), "fp32")
    with pytest.raises(RuntimeError, match="already torch.bfloat16"):
        inference_weights(model, torch.device("cuda"), "fp16")
