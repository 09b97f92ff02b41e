"""The fast training path against its references (CPU): the chunked linear + cross-entropy, the
block-sparse attention and q/k-norm custom ops, the rewritten VAR/HMAR losses, torch.compile (no graph
breaks, no recompiles, equal to eager) and activation checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_nextscale import randomize
from torch._dynamo.testing import CompileCounterWithBackend

from maskar.config import build
from maskar.nn.attention import ScalePattern, sdpa_attention
from maskar.nn.losses import chunk_rows, linear_cross_entropy
from maskar.registry import get_model_spec
from maskar.train import parallelize as P

TOK = dict(arch="vqvae", resolution=16, ch=16, ch_mult=[1, 2, 2], norm_groups=8, z_channels=8, vocab_size=64,
           patch_nums=[1, 2, 3, 4], enc_res_blocks=1, dec_res_blocks=1)  # fmt: skip


def tiny(arch: str, stage: int = 1, depth: int = 3, **kw):
    extra = dict(stage=stage, n_layers_train=2) if arch == "hmar" else {}
    spec = get_model_spec(arch)
    fields = dict(arch=arch, tokenizer=TOK, depth=depth, width=64, heads=2, **extra, **kw)
    cfg = build(spec.config_cls, fields)
    torch.manual_seed(0)
    m = spec.build(cfg).train()
    randomize(m)
    trained = {id(p) for _, p in m.named_trainable_parameters()}
    for p in m.parameters():
        p.requires_grad_(id(p) in trained)
    return m


def batch_of(model, B: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"indices": torch.randint(0, model.vocab_size, (B, model.L), generator=g),
            "label": torch.randint(0, model.num_classes, (B,), generator=g)}  # fmt: skip


def loss_grads(model, batch, seed: int = 5):
    torch.manual_seed(seed)
    params = [p for _, p in model.named_trainable_parameters()]
    out = model.loss(batch)
    grads = torch.autograd.grad(out["loss"], params)
    return out, grads


@pytest.fixture
def cpu_reference(monkeypatch):
    """Route ``auto`` attention on the CPU to the block-sparse custom op (its SDPA reference), the
    q/k norm to the ``maskar::qk_norm`` ops and the FFN's GELU to the ``maskar::gelu_tanh`` ops
    (their torch references): the graph a GPU run compiles."""
    import maskar.kernels.block_sparse as bs
    import maskar.kernels.gelu_bias as gb
    import maskar.kernels.qk_norm as qn

    monkeypatch.setattr(bs, "CPU_REFERENCE", True)
    monkeypatch.setattr(qn, "CPU_REFERENCE", True)
    monkeypatch.setattr(gb, "CPU_REFERENCE", True)
    bs._device_ok_cached.cache_clear()
    yield bs
    bs._device_ok_cached.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- linear + CE


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("rows", [64, 1000])  # several chunks with a short last one; one chunk
def test_linear_cross_entropy_equals_f_cross_entropy(bias, smoothing, rows):
    g = torch.Generator().manual_seed(0)
    N, C, V = 300, 16, 50
    h = torch.randn(N, C, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(V, C, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, dtype=torch.float64, generator=g)
    leaves = [x for x in (h, W, b) if x is not None]

    loss, ce, correct = linear_cross_entropy(h, W, b, t, w, smoothing, rows=rows)
    got = torch.autograd.grad(2.5 * loss, leaves)  # an upstream gradient other than 1
    logits = F.linear(h, W, b)
    ref_ce = F.cross_entropy(logits, t, reduction="none", label_smoothing=smoothing)
    ref_loss = (ref_ce * w).sum()
    want = torch.autograd.grad(2.5 * ref_loss, leaves)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(correct, logits.argmax(-1) == t)
    assert not ce.requires_grad and not correct.requires_grad
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_under_bf16_autocast_matches_autocast_reference():
    """Autocast rounding as the unfused path: bf16 logits, fp32 softmax, bf16 logit gradient."""
    g = torch.Generator().manual_seed(1)
    N, C, V = 200, 32, 96
    h = torch.randn(N, C, generator=g, requires_grad=True)
    W = (torch.randn(V, C, generator=g) * 0.2).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, generator=g) / N
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ce, _ = linear_cross_entropy(h, W, b, t, w, rows=64)
        logits = F.linear(h, W, b).float()
    got = torch.autograd.grad(loss, (h, W, b))
    ref = (F.cross_entropy(logits, t, reduction="none") * w).sum()
    want = torch.autograd.grad(ref, (h, W, b))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(got, want):
        assert a.dtype == e.dtype
        # the reference rounds dW / db once to bf16; the chunked sums stay fp32
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-2 * e.abs().max().item())


def test_chunk_rows_bounds_the_logits():
    assert chunk_rows(32 * 680, 4096) * 4096 <= (1 << 25) + 64 * 4096
    assert chunk_rows(32 * 680, 4096) % 64 == 0
    assert math.ceil(32 * 680 / chunk_rows(32 * 680, 4096)) == 3
    assert chunk_rows(10, 4096) == 64


# ----------------------------------------------------------------------------- attention custom op


@pytest.mark.parametrize("kind", ["block_diagonal", "block_causal"])
def test_block_sparse_op_reference_path_matches_sdpa_and_passes_opcheck(kind):
    import maskar.kernels.block_sparse as bs

    p = ScalePattern.from_sides(kind, (1, 2, 3, 4))
    qkv = torch.randn(2, p.total, 3, 2, 32, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = bs.block_sparse_attention(q, k, v, p, 0.3)
    ref = sdpa_attention(q, k, v, p, 0.3)
    assert out.transpose(1, 2).is_contiguous()  # (B, H, L, D) view of (B, L, H, D), as the kernel's
    torch.testing.assert_close(out, ref)
    do = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, do)[0], torch.autograd.grad(ref, qkv, do)[0])
    args = (q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_())
    torch.library.opcheck(bs.block_sparse_attn_op, (*args, list(p.lengths), kind, 0.3))


def test_block_sparse_op_traces_without_graph_break():
    import maskar.kernels.block_sparse as bs

    p = ScalePattern.from_sides("block_causal", (1, 2, 3))

    def f(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return bs.block_sparse_attention(q, k, v, p, 0.5).square().sum()

    qkv = torch.randn(2, p.total, 3, 2, 32, requires_grad=True)
    assert torch._dynamo.explain(f)(qkv).graph_break_count == 0
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(qkv), qkv)[0]
    want = torch.autograd.grad(f(qkv), qkv)[0]
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- losses of the models


def _reference_loss(model, batch, seed: int = 5):
    """The losses as written before the fused head: full logits + F.cross_entropy."""
    torch.manual_seed(seed)
    indices = model.batch_indices(batch)
    x_in = model.tokenizer.teacher_forcing_input(indices).float()
    if getattr(model, "stage", 1) == 2:
        x_own = model.tokenizer.own_residual_input(indices).float()
        B = x_in.shape[0]
        masked = model.sample_train_mask(B, x_in.device).expand(B, -1)
        labels = model.drop_labels(batch["label"].long())
        logits = model.mask_forward(labels, x_in, x_own, masked)[:, 1:]
        target = torch.cat(indices[1:], dim=1)
        return F.cross_entropy(logits[masked], target[masked])
    labels = model.drop_labels(batch["label"].long())
    logits = model(labels, x_in)
    ce = F.cross_entropy(logits.transpose(1, 2), torch.cat(indices, dim=1), reduction="none")
    return (ce * model.loss_weight).sum(1).mean()


@pytest.mark.parametrize("arch,stage", [("var", 1), ("hmar", 1), ("hmar", 2)])
def test_model_loss_equals_full_logits_cross_entropy(arch, stage):
    model = tiny(arch, stage, drop_path_rate=0.2)
    batch = batch_of(model)
    params = [p for _, p in model.named_trainable_parameters()]
    out, got = loss_grads(model, batch)
    ref = _reference_loss(model, batch)
    want = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_drop_path_rate_is_a_buffer_not_saved():
    model = tiny("var", drop_path_rate=0.3)
    rates = [b.drop_path.p for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert all(b.drop_path.active for b in model.blocks)  # block 0 runs the same code
    assert not any("rate" in k for k in model.state_dict())


# ----------------------------------------------------------------------------- torch.compile


def _explain(model, batch):
    torch.manual_seed(0)
    indices = model.batch_indices(batch)
    x_in = model.tokenizer.teacher_forcing_input(indices).float()
    target = torch.cat(indices, dim=1)
    if getattr(model, "stage", 1) == 2:
        x_own = model.tokenizer.own_residual_input(indices).float()
        masked = model.sample_train_mask(3, x_in.device).expand(3, -1)
        return torch._dynamo.explain(model.masked_loss)(batch["label"], x_in, x_own, masked, target)
    return torch._dynamo.explain(model.next_scale_loss)(batch["label"], x_in, target)


@pytest.mark.parametrize("arch,stage", [("var", 1), ("hmar", 1), ("hmar", 2)])
@pytest.mark.parametrize("attn", ["triton-op", "sdpa"])
def test_whole_step_traces_as_one_graph(arch, stage, attn, request):
    if attn == "triton-op":
        request.getfixturevalue("cpu_reference")
    model = tiny(arch, stage, drop_path_rate=0.1)
    if attn == "sdpa":
        from maskar.nn.attention import set_backend

        set_backend(model, "sdpa")
    ex = _explain(model, batch_of(model))
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
    ops = [str(n.target) for g in ex.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("block_sparse_attn" in o for o in ops) == (attn == "triton-op")
    # the q/k norm's op sits in the forward subgraph of its autograd.Function
    graphs = [m.graph for g in ex.graphs for m in g.modules() if hasattr(m, "graph")]
    nested = [str(n.target) for graph in graphs for n in graph.nodes]
    assert any("maskar.qk_norm" in o for o in nested) == (attn == "triton-op")
    assert any("maskar.gelu_tanh" in o for o in nested) == (attn == "triton-op")  # the FFN's GELU op


@pytest.mark.parametrize("mode", ["blocks", "full"])
@pytest.mark.parametrize("arch,stage", [("var", 1), ("hmar", 1), ("hmar", 2)])
def test_compiled_step_equals_eager_without_recompiles(arch, stage, mode, cpu_reference):
    """Three steps on different batches (and a changed lognorm weight buffer): as many graphs as
    after the first step (blocks: one for all blocks, one more for stage 2's frozen blocks, and
    the head), and the same loss and gradients as eager."""
    model = tiny(arch, stage, depth=4, drop_path_rate=0.0, cond_drop_rate=0.0)
    eager = [loss_grads(model, batch_of(model, seed=s)) for s in range(3)]
    counter = CompileCounterWithBackend("aot_eager")
    assert P.apply_compile(model, mode, backend=counter)
    frames = []
    for s in range(3):
        if s == 2:
            model.loss_weight.mul_(1.0)  # buffers are graph inputs: changing values never recompiles
        out, grads = loss_grads(model, batch_of(model, seed=s))
        frames.append(counter.frame_count)
        torch.testing.assert_close(out["loss"], eager[s][0]["loss"], rtol=1e-5, atol=1e-6)
        for a, e in zip(grads, eager[s][1]):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    expected = {"full": 1, "blocks": 2 + (stage == 2)}[mode]
    assert frames == [expected] * 3


def test_drop_path_rates_share_one_compiled_block():
    """Each block has its own drop-path rate (a buffer): one graph serves all of them."""
    model = tiny("hmar", 1, depth=4, drop_path_rate=0.3)
    counter = CompileCounterWithBackend("aot_eager")
    P.apply_compile(model, "blocks", backend=counter)
    for s in range(2):
        loss_grads(model, batch_of(model, seed=s))
    assert counter.frame_count == 2  # the block graph and the head + loss graph


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager(cpu_reference):
    """The real backend once on the CPU (Inductor's C++ kernels; the GPU script checks Triton's)."""
    model = tiny("hmar", 1, depth=2, drop_path_rate=0.0, cond_drop_rate=0.0)
    batch = batch_of(model)
    out_e, grads_e = loss_grads(model, batch)
    P.apply_compile(model, "blocks")
    out_c, grads_c = loss_grads(model, batch)
    torch.testing.assert_close(out_c["loss"], out_e["loss"], rtol=1e-5, atol=1e-6)
    for a, e in zip(grads_c, grads_e):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("arch,stage", [("var", 1), ("hmar", 2)])
def test_activation_checkpointing_gives_the_same_gradients(arch, stage):
    model = tiny(arch, stage, depth=3, drop_path_rate=0.3)  # random drop path: RNG replayed in recompute
    batch = batch_of(model)
    out, want = loss_grads(model, batch)
    assert P.apply_activation_checkpointing(model) == len(model.repeated_blocks())
    out2, got = loss_grads(model, batch)
    assert torch.equal(out2["loss"], out["loss"])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_compiles_without_breaks(cpu_reference):
    model = tiny("hmar", 1, depth=3, drop_path_rate=0.0, cond_drop_rate=0.0)
    batch = batch_of(model)
    _, want = loss_grads(model, batch)
    P.apply_activation_checkpointing(model)
    assert _explain(model, batch).graph_break_count == 0
    counter = CompileCounterWithBackend("aot_eager")
    P.apply_compile(model, "blocks", backend=counter)
    _, got = loss_grads(model, batch)
    assert counter.frame_count == 2
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- FLOPs, modes


def test_flops_per_sample_is_six_times_token_path_weights():
    model = tiny("var", depth=3)
    C, V, Cz = 64, 64, 8
    per_token = 3 * 12 * C * C + C * V + Cz * C
    assert model.train_flops_per_sample() == 6 * per_token * model.L
    s2 = tiny("hmar", 2, depth=3)
    frozen, trained = 12 * C * C, 2 * 12 * C * C + C * V
    assert s2.train_flops_per_sample() == (4 * frozen + 6 * trained + 4 * Cz * C) * s2.L


def test_compile_mode_resolution():
    model = tiny("var")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert P.resolve_compile_mode("auto", model, cpu) == "none"
    assert P.resolve_compile_mode("auto", model, cuda) == "blocks"
    assert P.resolve_compile_mode("auto", torch.nn.Linear(2, 2), cuda) == "none"
    assert P.resolve_compile_mode(True, model, cpu) == "full"
    assert P.resolve_compile_mode(False, model, cuda) == "none"
    from maskar.config import ConfigError

    with pytest.raises(ConfigError, match="no repeated blocks"):
        P.resolve_compile_mode("blocks", torch.nn.Linear(2, 2), cpu)
    with pytest.raises(ConfigError, match="no repeated blocks"):
        P.apply_activation_checkpointing(torch.nn.Linear(2, 2))
    assert P.mfu(1e12, 100.0, 790.0) == pytest.approx(100 / 790)
    assert P.mfu(1e12, 100.0, None) is None


def test_bench_train_step_cpu_smoke(tmp_path, capsys):
    from maskar.bench import train_step

    out = tmp_path / "rows.json"
    rc = train_step.main(["tiny=true", "models=hmar,var", "stage=1,2", "compile=false,blocks",
                          "compile_backend=aot_eager", "steps=2", "warmup=1", f"json={out}",
                          f"profile={tmp_path / 'prof.txt'}"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["stage"], r["compile"]) for r in rows] == [
        ("hmar-tiny", 1, "false"), ("hmar-tiny", 1, "blocks"), ("hmar-tiny", 2, "false"),
        ("hmar-tiny", 2, "blocks"), ("var-tiny", 1, "false"), ("var-tiny", 1, "blocks"),
    ]  # fmt: skip
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_s"] == pytest.approx(r["batch"] * r["L"] / r["step_ms"] * 1e3)
        assert r["b2b_ms"] > 0  # the same steps launched back to back
        if r["compile"] == "blocks":
            assert r["loss_rel"] < 1e-5 and r["grad_rel"] < 1e-4
    assert "MFU =" in text and (tmp_path / "prof.txt").is_file()


def test_bench_train_step_graph_rows_parse_and_need_cuda(tmp_path) -> None:
    """The ``/graph`` suffix (the whole step as one CUDA graph) parses, and without a CUDA device
    a run with such a row stops (exit 2) before any model is built, writing nothing."""
    from maskar.bench import train_step

    assert train_step.parse_row("hmar/d16/blocks/graph")["graph"] is True
    assert train_step.parse_row("var/d16/blocks")["graph"] is False
    assert train_step.parse_row("hmar/d16/blocks/graph/master")["master"] is True
    with pytest.raises(SystemExit, match="/master needs /graph"):
        train_step.parse_row("hmar/d16/blocks/master")
    out = tmp_path / "rows.json"
    with pytest.raises(SystemExit, match="/graph needs a CUDA device, got cpu"):
        rows = "rows=hmar/d1/false,hmar/d16/blocks/graph"
        train_step.main(["tiny=true", rows, "device=cpu", f"json={out}"])
    assert not out.exists()


# ----------------------------------------------------------------------------- the trainer


def _train_tiny_hmar(out_dir, *overrides: str) -> dict:
    from maskar import checkpoint as ck
    from maskar.config import load_config
    from maskar.train.trainer import train

    cfg = load_config("hmar-tiny", [
        f"train.out_dir={out_dir}", "train.steps=4", "train.log_every=2", "train.progress=false",
        "train.tensorboard=false", "data.synthetic_size=16", "model.drop_path_rate=0.2", *overrides,
    ])  # fmt: skip
    train(cfg)
    return ck.load_tensors(ck.latest_checkpoint(out_dir) / "model.safetensors")


def test_trainer_checkpointing_matches_and_logs_mfu(tmp_path):
    plain = _train_tiny_hmar(tmp_path / "a")
    ac = _train_tiny_hmar(tmp_path / "b", "train.activation_checkpointing=true", "train.peak_tflops=1")
    for k in plain:
        torch.testing.assert_close(ac[k], plain[k], rtol=1e-5, atol=1e-6)
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "| mfu " in log and "| step_ms " in log and "| samples_per_s " in log
    assert "| mfu " not in (tmp_path / "a" / "log.txt").read_text()  # CPU: no known peak


_OP_UNDER_INTERPRETER = r"""
import torch
import maskar.kernels.block_sparse as bs
from maskar.nn.attention import ScalePattern, sdpa_attention
assert bs._INTERPRET
torch.manual_seed(0)
for kind in ("block_diagonal", "block_causal"):
    p = ScalePattern(kind, (1, 4, 9, 16))
    qkv = torch.randn(1, p.total, 3, 2, 32).half().requires_grad_()

    def f(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return bs.block_sparse_attention(q, k, v, p, 0.25)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(qkv)  # the custom op, kernels interpreted
    do = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, do)
    x = qkv.detach().float().requires_grad_()
    ref = sdpa_attention(*x.permute(2, 0, 3, 1, 4).unbind(0), p, 0.25)
    (gr,) = torch.autograd.grad(ref, x, do.float())
    print("ERR", kind, (out.float() - ref).abs().max().item(), (g.float() - gr).abs().max().item())
"""


def test_custom_op_runs_the_kernels_under_the_interpreter():
    """The op's GPU path (Triton kernels, separate dq/dk/dv outputs), on the CPU via TRITON_INTERPRET."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _OP_UNDER_INTERPRETER], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs = [line.split() for line in proc.stdout.splitlines() if line.startswith("ERR")]
    assert len(errs) == 2
    for _, kind, out_err, grad_err in errs:
        assert float(out_err) < 5e-3 and float(grad_err) < 2e-2, (kind, out_err, grad_err)


# ----------------------------------------------------------------------------- scales backend


@pytest.mark.parametrize("kind", ["block_diagonal", "block_causal"])
def test_scales_backend_equals_sdpa_and_traces(kind):
    """One dense call per scale (the leading small scales together) == SDPA with the full mask."""
    from maskar.nn.attention import attention

    p = ScalePattern.from_sides(kind, (1, 2, 3, 4, 8, 10))  # 30 small tokens, then 64 and 100
    qkv = torch.randn(2, p.total, 3, 2, 16, dtype=torch.float64, requires_grad=True)

    def f(qkv, backend):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return attention(q, k, v, p, backend=backend, scale=0.3)

    got, ref = f(qkv, "scales"), f(qkv, "sdpa")
    torch.testing.assert_close(got, ref)
    do = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(got, qkv, do)[0], torch.autograd.grad(ref, qkv, do)[0])
    assert torch._dynamo.explain(f)(qkv, "scales").graph_break_count == 0
    x = torch.randn(1, 2, 5, 16)
    torch.testing.assert_close(attention(x, x, x, None, backend="scales"), attention(x, x, x, None))


@pytest.mark.parametrize("kind", ["block_diagonal", "block_causal"])
def test_scales_backend_backward_splits_instead_of_zero_filling(kind):
    """The per-scale calls take their query rows (and block-diagonal keys / values) through one
    split, so the backward concatenates the calls' gradients once instead of giving each a
    full-size zero tensor to sum (slice_backward + add): at 1024 px ~4 GB a block. Block-causal
    keys and values (overlapping prefixes) add their gradients into one buffer in place."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from maskar.nn.attention import attention

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    p = ScalePattern.from_sides(kind, (1, 2, 3, 4, 8, 10, 12))  # 30 small tokens, then 3 dense calls
    qkv = torch.randn(1, p.total, 3, 2, 8, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = attention(q, k, v, p, backend="scales")
    with Ops() as ops:
        torch.autograd.grad(out, qkv, torch.randn_like(out))
    assert "aten.slice_backward" not in ops.names, ops.names
    assert ops.names.count("aten.zeros") <= (0 if kind == "block_diagonal" else 2), ops.names
    # and so through AOTAutograd too (Dynamo traces the prefix views' autograd.Function whole)
    q64 = qkv.detach().double().requires_grad_()

    def f(qkv, backend):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return attention(q, k, v, p, backend=backend, scale=0.3)

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q64, "scales")
    ref = f(q64, "sdpa")
    do = torch.randn_like(ref)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, q64, do)[0], torch.autograd.grad(ref, q64, do)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scales_backend_sums_prefix_gradients_in_fp32(dtype):
    """Block-causal keys and values get one gradient per later scale; in bf16 they are summed in
    fp32 and rounded once, as one masked SDPA call would (not rounded after every call)."""
    from maskar.nn.attention_scales import _Prefixes

    ends = (3, 7, 20, 40, 64, 100, 150, 200)
    x = torch.randn(2, 3, ends[-1], 8, dtype=dtype, requires_grad=True)
    views = _Prefixes.apply(x, ends)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(v.shape, generator=g).to(dtype) for v in views]
    (got,) = torch.autograd.grad(views, x, grads)
    want = torch.zeros(x.shape)
    for end, gi in zip(ends, grads, strict=True):
        want[:, :, :end] += gi.float()
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype))


def test_drop_path_draws_one_mask_per_branch_and_sample():
    """Attention and FFN updates are dropped independently (two draws, as the official block)."""
    from maskar.nn.blocks import AdaLNSelfAttnBlock

    torch.manual_seed(0)
    C = 8
    blk = AdaLNSelfAttnBlock(C, C, 2, drop_path=0.5).train()
    with torch.no_grad():  # each branch adds a constant: attention e_1, FFN e_0; gammas 1
        blk.ada_lin[-1].weight.zero_()
        blk.ada_lin[-1].bias.zero_()
        blk.ada_lin[-1].bias[: 2 * C] = 1.0
        for lin, unit in ((blk.attn.proj, 1), (blk.ffn.fc2, 0)):
            lin.weight.zero_()
            lin.bias.zero_()
            lin.bias[unit] = 1.0
    x = torch.randn(2000, 3, C)
    d = blk(x, torch.zeros(2000, C)) - x  # (keep_ffn, keep_attn) * 1 / 0.5 in dims 0 and 1
    keep_ffn, keep_attn = d[:, 0, 0] / 2, d[:, 0, 1] / 2
    for k in (keep_ffn, keep_attn):
        assert set(k.round().tolist()) <= {0.0, 1.0}
        assert k.mean().item() == pytest.approx(0.5, abs=0.05)
    assert (keep_ffn != keep_attn).float().mean().item() == pytest.approx(0.5, abs=0.05)  # independent


def test_auto_takes_scales_only_for_long_low_precision_training(monkeypatch):
    """``auto`` picks the scales backend for long-sequence training in fp16 / bf16 on CUDA (where it
    beat the fused kernel on the H200) and nothing else: not in inference, not in fp32, not at
    512 px's length. The device check is the only CUDA-specific part, so it is stubbed here."""
    from maskar.nn import attention as attn_mod
    from maskar.nn import attention_scales

    long_p = ScalePattern.from_sides("block_causal", (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64))
    short_p = ScalePattern.from_sides("block_causal", (1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
    assert long_p.total == 9451 >= attention_scales.AUTO_MIN_TOKENS > short_p.total == 2240

    class FakeCuda(torch.Tensor):  # a tensor that says it is on CUDA, for the predicate alone
        is_cuda = True

    def picked(p, dtype, grad):
        q = torch.empty(1, 1, p.total, 16, dtype=dtype).as_subclass(FakeCuda)
        with torch.set_grad_enabled(grad):
            return attention_scales.picked_by_auto(q, q, q, p)

    assert picked(long_p, torch.bfloat16, True) and picked(long_p, torch.float16, True)
    assert not picked(long_p, torch.bfloat16, False)  # inference
    assert not picked(long_p, torch.float32, True)
    assert not picked(short_p, torch.bfloat16, True)
    cpu = torch.empty(1, 1, long_p.total, 16, dtype=torch.bfloat16)
    assert not attention_scales.picked_by_auto(cpu, cpu, cpu, long_p)

    # the dispatch: where the predicate holds, auto runs scales ahead of every other backend
    calls = []
    backend = attn_mod._BACKENDS["scales"]
    monkeypatch.setattr(backend, "auto_when", lambda *a: True)
    monkeypatch.setattr(backend, "fn", lambda *a: calls.append("scales") or a[0])
    q = torch.randn(1, 1, short_p.total, 16)
    attn_mod.attention(q, q, q, short_p)
    assert calls == ["scales"]
    monkeypatch.setattr(backend, "auto_when", lambda *a: False)
    ref = attn_mod.attention(q, q, q, short_p)
    assert calls == ["scales"]
    torch.testing.assert_close(ref, attn_mod.sdpa_attention(q, q, q, short_p))
