"""bf16 working copies with fp32 masters (maskar/train/master_weights.py, maskar/kernels/adamw_master.py).

On the CPU: the AdamW kernel under TRITON_INTERPRET=1 (a subprocess) against its torch reference,
the reference against torch's own AdamW, the bf16 step of a tiny VAR / HMAR (CPU autocast) equal to
autocast's step with fp32 weights, the address table's fill after a capture (launch stubbed), and
the config's refusals. On a GPU: the graphed training step with and without the copies.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers_aot import compiles_as_launched, require_aot_compiler, resource_usage
from helpers_interpreter import run_under_interpreter

from maskar.config import ConfigError, load_config
from maskar.kernels import adamw_master as K
from maskar.train import graph_step as G
from maskar.train.clipping import clip_and_step
from maskar.train.master_weights import MasterWeights, swappable
from maskar.train.trainer import master_weights_on, param_groups

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_tensors(shapes, low: bool, seed: int, lrs=(1e-2, 3e-3), wds=(0.05, 0.0)) -> K.AdamWTensors:
    """Random masters, gradients (bf16 where ``low``), moments part-way through training, two
    groups' rates (device tensors) and per-tensor steps."""
    g = torch.Generator().manual_seed(seed)
    n = len(shapes)
    ps = [torch.randn(s, generator=g) for s in shapes]
    gs = [(torch.randn(s, generator=g) * 3).to(torch.bfloat16 if low else torch.float32) for s in shapes]
    ms = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=g) * 0.01 for s in shapes]
    rate = [torch.tensor(lr) for lr in lrs]
    return K.AdamWTensors(
        ps, gs, ms, vs, [rate[i % 2] for i in range(n)], [torch.tensor(float(3 + i)) for i in range(n)],
        [wds[i % 2] for i in range(n)], [p.to(torch.bfloat16) for p in ps] if low else None,
    )  # fmt: skip


def clone_tensors(ts: K.AdamWTensors) -> K.AdamWTensors:
    def c(xs):
        return None if xs is None else [x.clone() for x in xs]

    return K.AdamWTensors(c(ts.params), c(ts.grads), c(ts.exp_avgs), c(ts.exp_avg_sqs), ts.lrs,
                          c(ts.steps), list(ts.weight_decays), c(ts.lows))  # fmt: skip


def max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30))
               for x, y in zip(a, b))  # fmt: skip


# ----------------------------------------------------------------------------- CPU: the kernel

_RUNNER = """
import json, sys, torch
sys.path.insert(0, {tests_dir!r})
from test_master_weights import make_tensors, clone_tensors, max_rel
from maskar.kernels import adamw_master as K
shapes = [(3, 5), (2 * 64 + 7,), (7,), (64, 3)]  # a tensor over several programs, odd tails
for case, low, scale, block in [("fp32", False, None, 64), ("fp32-clip", False, 1.7, 64),
                                ("bf16", True, None, 32), ("bf16-clip", True, 2.5, 4096)]:
    a = make_tensors(shapes, low, seed=len(case))
    b = clone_tensors(a)
    gs = None if scale is None else torch.tensor(scale)
    launch = K.AdamWLaunch(a, block=block)
    parts = launch.sum_squares(a)
    want_sq = sum(float(g.double().pow(2).sum()) for g in a.grads)
    rel = abs(float(parts.double().sum()) - want_sq) / want_sq
    sq = dict(n=parts.numel(), n_chunks=launch.n_chunks, rel=rel)
    launch(a, 0.9, 0.95, 1e-8, gs, bound=True)
    K.adamw_reference_(b, 0.9, 0.95, 1e-8, gs)
    out = dict(case=case, p=max_rel(a.params, b.params), m=max_rel(a.exp_avgs, b.exp_avgs),
               v=max_rel(a.exp_avg_sqs, b.exp_avg_sqs), steps=[float(s) for s in a.steps],
               want_steps=[float(s) for s in b.steps], sq=sq)
    if low:
        out["low_rounded"] = all(torch.equal(lo, p.to(torch.bfloat16)) for lo, p in zip(a.lows, a.params))
    print("RESULT " + json.dumps(out))
"""


def test_kernel_equals_its_reference_under_the_interpreter() -> None:
    res = run_under_interpreter(_RUNNER, timeout=600)
    assert set(res) == {"fp32", "fp32-clip", "bf16", "bf16-clip"}
    for case, r in res.items():
        assert r["steps"] == r["want_steps"], case
        assert r["p"] < 1e-6 and r["m"] < 1e-6 and r["v"] < 1e-6, (case, r)
        assert r["sq"]["n"] == r["sq"]["n_chunks"] and r["sq"]["rel"] < 1e-6, (case, r["sq"])
        if case.startswith("bf16"):
            assert r["low_rounded"], case  # the copy is the master rounded to nearest even


_STEP_RUNNER = """
import json, sys, copy, torch
sys.path.insert(0, {tests_dir!r})
from test_master_weights import max_rel
from maskar.train.master_weights import MasterWeights
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(40, 72), torch.nn.LayerNorm(72), torch.nn.Linear(72, 3))
for max_norm in (0.5, 0.0, 1e9):
    runs = []
    for kernel in (True, False):
        m = copy.deepcopy(model)
        rest = [m[0].bias, m[1].weight, m[1].bias, m[2].bias]
        groups = [dict(params=[m[0].weight, m[2].weight], weight_decay=0.05, lr=torch.tensor(1e-2)),
                  dict(params=rest, weight_decay=0.0, lr=torch.tensor(1e-2))]
        mw = MasterWeights(m, torch.optim.AdamW(groups, betas=(0.9, 0.95)), kernel=kernel)
        g = torch.Generator().manual_seed(1)
        for low in mw.lows:
            low.grad = (torch.randn(low.shape, generator=g) * 2).to(torch.bfloat16)
        m[1].weight.grad = torch.randn(72, generator=g)
        m[1].bias.grad = torch.randn(72, generator=g)
        norm = mw.step(max_norm)
        runs.append((float(norm), [p.detach().clone() for p in m.parameters()]))
    (nk, pk), (nr, pr) = runs
    print("RESULT " + json.dumps(dict(case=str(max_norm), norm=nk, want=nr, p=max_rel(pk, pr))))
"""


def test_master_step_with_kernels_equals_the_reference_path_under_the_interpreter() -> None:
    """:meth:`MasterWeights.step` through the kernels (the norm from the block sums of both
    launches, bf16 and fp32 gradients, then AdamW) against its torch path (``_foreach_norm``, the
    reference step), clipped, unclipped and with clipping off."""
    res = run_under_interpreter(_STEP_RUNNER, timeout=600)
    assert set(res) == {"0.5", "0.0", "1000000000.0"}
    for case, r in res.items():
        assert abs(r["norm"] - r["want"]) <= 1e-6 * r["want"] and r["want"] > 1.0, (case, r)
        assert r["p"] < 1e-6, (case, r)


def test_reference_equals_torch_adamw_over_steps() -> None:
    """Three steps of the reference against torch's AdamW (two groups, device-tensor rates, one
    clipped step) on the same fp32 gradients."""
    shapes = [(4, 6), (9,), (5, 5)]
    ts = make_tensors(shapes, low=False, seed=1)
    for s in ts.steps:
        s.zero_()
    for m, v in zip(ts.exp_avgs, ts.exp_avg_sqs):
        m.zero_(), v.zero_()
    ps = [torch.nn.Parameter(p.clone()) for p in ts.params]
    groups = [{"params": ps[0::2], "weight_decay": 0.05, "lr": torch.tensor(1e-2)},
              {"params": ps[1::2], "weight_decay": 0.0, "lr": torch.tensor(3e-3)}]  # fmt: skip
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        grads = [torch.randn(s, generator=g) for s in shapes]
        scale = torch.tensor(2.0) if step == 1 else None
        for p, gr in zip(ps, grads):
            p.grad = gr / scale if scale is not None else gr.clone()
        opt.step()
        ts.grads = grads
        K.adamw_reference_(ts, 0.9, 0.95, 1e-8, scale)
    assert max_rel(ts.params, [p.detach() for p in ps]) < 1e-6
    assert max_rel(ts.exp_avg_sqs, [opt.state[p]["exp_avg_sq"] for p in ps]) < 1e-6
    assert [float(s) for s in ts.steps] == [3.0] * 3


def test_launch_fills_the_address_table_after_a_capture(monkeypatch) -> None:
    """Inside a capture the gradients' addresses are the graph pool's: the table keeps the old ones
    (the kernel is not run then) until ``fill_pending`` writes them, before the first replay."""
    ts = make_tensors([(3, 4), (5,)], low=True, seed=2)
    launches = []
    monkeypatch.setattr(K, "_launch", lambda *a, **k: launches.append(a))
    launch = K.AdamWLaunch(ts, block=4)
    assert launch.n_chunks == 3 + 2 and launch.chunk_o.tolist() == [0, 4, 8, 0, 4]
    launch(ts, 0.9, 0.95, 1e-8)
    first = launch.addrs.clone()
    assert first[:, 1].tolist() == [g.data_ptr() for g in ts.grads]
    assert first[:, 4].tolist() == [lo.data_ptr() for lo in ts.lows]
    ts.grads = [g.clone() for g in ts.grads]  # what a capture's backward allocates
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    launch.device = torch.device("cuda")  # the capture check asks CUDA only
    launch.sum_squares(ts)  # the norm's launch binds as the step's does
    assert torch.equal(launch.addrs, first)
    launch(ts, 0.9, 0.95, 1e-8, bound=True)
    assert torch.equal(launch.addrs, first)
    launch.fill_pending()
    assert launch.addrs[:, 1].tolist() == [g.data_ptr() for g in ts.grads]
    assert [a[0].__name__ for a in launches] == ["_adamw_master", "_sum_squares", "_adamw_master"]
    with pytest.raises(ValueError, match="differ from the ones the launch was built for"):
        launch(make_tensors([(3, 4)], low=True, seed=3), 0.9, 0.95, 1e-8)


@pytest.mark.parametrize("low", [False, True])
def test_kernel_compiles_for_sm90_as_launched(low) -> None:
    """The launch as a GPU would compile it (Hopper, maskar's launch options): it compiles without
    spills, and the addresses read from the table (aligned, checked on the host) give vector
    loads and stores."""
    require_aot_compiler()
    ts = make_tensors([(64, 96), (4096,)], low=low, seed=6)
    with compiles_as_launched() as found:
        launch = K.AdamWLaunch(ts)
        launch.sum_squares(ts)
        launch(ts, 0.9, 0.95, 1e-8, torch.tensor(1.5), bound=True)
    assert [name for name, _ in found] == ["_sum_squares", "_adamw_master"]
    for name, compiled in found:
        ptx = compiled.asm["ptx"]  # whole blocks load (and store) 16 bytes a thread at a time
        assert "ld.global.v4.b32" in ptx, name
        if name == "_adamw_master":
            assert "st.global.v4.b32" in ptx
        usage = resource_usage(compiled)
        if usage is not None:
            assert usage["STACK"] == 0, (name, usage)


def test_tensor_checks_name_the_problem() -> None:
    ts = make_tensors([(3,)], low=True, seed=4)
    ts.grads = [ts.grads[0].float()]
    with pytest.raises(ValueError, match="gradients must all be torch.bfloat16"):
        K.AdamWLaunch(ts)
    ts = make_tensors([(3,)], low=False, seed=4)
    ts.lrs = [torch.tensor(1e-3, dtype=torch.float64)]
    with pytest.raises(ValueError, match="learning rate and step must be fp32 scalar"):
        K.adamw_reference_(ts, 0.9, 0.95, 1e-8)


# ----------------------------------------------------------------------------- CPU: the training step


def _tiny(preset: str, *overrides: str):
    from maskar.registry import build_model

    torch.manual_seed(0)
    cfg = load_config(preset, ["model.cond_drop_rate=0", "model.drop_path_rate=0", *overrides])
    model = build_model(cfg.model)
    return model.train()


def _opt(model, device_rates: bool):
    named = list(model.named_trainable_parameters())
    opt = torch.optim.AdamW(param_groups(named, 0.05, model.no_weight_decay_keywords()), lr=1e-3,
                            betas=(0.9, 0.95), foreach=False)  # fmt: skip
    if device_rates:  # what the graph step gives MasterWeights (torch's own step never runs)
        G.as_capturable(opt, torch.device("cpu"))
    return opt, [p for _, p in named]


def _batch(model, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(4, 3, model.image_size, model.image_size, generator=g) * 2 - 1,
            "label": torch.randint(0, 10, (4,), generator=g)}  # fmt: skip


@pytest.mark.parametrize("preset", ["var-tiny", "hmar-tiny", "hmar-tiny:model.stage=2"])
def test_bf16_copies_give_autocasts_loss_and_gradients(preset) -> None:
    """The swapped step computes what CPU bf16 autocast computes with fp32 weights: the same loss
    and gradients bit for bit; after the first AdamW step the weights agree to its rounding (later
    steps see weights a rounding apart, which Adam's normalised update can grow to a learning rate
    where a gradient is near zero, so they are held to the loss only); the copies are the masters
    rounded, and outside the step the model holds its fp32 parameters."""
    ref = _tiny(*preset.split(":"))  # stage 2: frozen linears stay fp32 (autocast casts them)
    new = copy.deepcopy(ref)
    ref_opt, ref_params = _opt(ref, False)
    new_opt, _ = _opt(new, True)
    master = MasterWeights(new, new_opt, kernel=False)
    assert len(master.lows) == len(swappable(new)) > 0
    fp32_before = {k: v.dtype for k, v in new.state_dict().items()}
    for step in range(3):
        batch = _batch(ref, step)
        torch.manual_seed(100 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_loss = ref.loss(batch)["loss"]
        ref_loss.backward()
        ref_grads = [p.grad.clone() for g in ref_opt.param_groups for p in g["params"]]
        clip_and_step(ref_opt, ref_params, 0.5)  # small enough that every step clips
        ref_opt.zero_grad(set_to_none=True)

        master.zero_grad()
        torch.manual_seed(100 + step)
        with master.swapped(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = new.loss(batch)["loss"]
            loss.backward()
        grads = master.grads()
        if step == 0:  # the same weights: the same numbers
            assert torch.equal(loss, ref_loss)
            assert all(torch.equal(g.float(), r) for g, r in zip(grads, ref_grads))
            assert sum(g.dtype == torch.bfloat16 for g in grads) == len(master.lows)
        else:
            assert abs(loss.item() - ref_loss.item()) < 1e-3 * abs(ref_loss.item())
        norm = master.step(0.5)
        assert norm.item() > 0.5
        if step == 0:
            ref_w = [p.detach() for g in ref_opt.param_groups for p in g["params"]]
            new_w = [p.detach() for g in new_opt.param_groups for p in g["params"]]
            assert max_rel(new_w, ref_w) < 1e-6
    assert all(torch.equal(lo, p.to(torch.bfloat16)) for lo, p in zip(master.lows, master.masters))
    assert {k: v.dtype for k, v in new.state_dict().items()} == fp32_before
    assert new_opt.state_dict()["state"][0]["step"].item() == 3.0


def test_master_weights_refuses_what_it_cannot_step() -> None:
    model = _tiny("var-tiny")
    with pytest.raises(ValueError, match="lr must be a device tensor"):
        MasterWeights(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match="needs torch.optim.AdamW, got SGD"):
        MasterWeights(model, torch.optim.SGD(model.parameters(), lr=1e-3))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("train.cuda_graph=false",), "master_weights: needs cuda_graph=true"),
        (("train.cuda_graph=true", "train.precision=fp32"), "master_weights: needs precision bf16, got fp32"),
    ],
)
def test_config_refuses_master_weights_without_its_step(tmp_path, overrides, needle) -> None:
    with pytest.raises(ConfigError, match="master_weights") as e:
        load_config("hmar-tiny", [f"train.out_dir={tmp_path}", "train.master_weights=true", *overrides])
    assert needle in str(e.value)


def test_master_weights_auto_is_on_with_the_graphed_bf16_step_only(tmp_path) -> None:
    def on(*overrides: str, amp=torch.bfloat16) -> bool:
        cfg = load_config("hmar-tiny", [f"train.out_dir={tmp_path}", *overrides])
        return master_weights_on(cfg.train, amp)

    assert cfg_default(tmp_path) == "auto"
    assert on() and on("train.cuda_graph=auto")  # auto, where the step turns out to be a graph
    assert not on("train.cuda_graph=auto", amp=None)
    assert on("train.cuda_graph=true")
    assert not on("train.cuda_graph=true", amp=None)
    assert on("train.cuda_graph=true", "train.master_weights=auto")
    assert not on("train.cuda_graph=true", "train.master_weights=auto", amp=None)  # fp32: nothing to copy
    assert not on("train.cuda_graph=false", "train.master_weights=auto")  # no graph, no copies
    assert not on("train.cuda_graph=true", "train.master_weights=false")
    assert on("train.cuda_graph=true", "train.master_weights=true", "train.precision=bf16")


def cfg_default(tmp_path) -> object:
    return load_config("hmar-tiny", [f"train.out_dir={tmp_path}"]).train.master_weights


# ----------------------------------------------------------------------------- GPU


def _train(preset: str, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    from maskar import checkpoint as ck
    from maskar.train.trainer import train

    cfg = load_config(preset, [
        f"train.out_dir={out}", "train.steps=8", "train.log_every=2", "train.progress=false",
        "train.tensorboard=false", "train.ckpt_every=0", "data.synthetic_size=32", "train.batch_size=8",
        "train.schedule=lin0", "train.warmup_steps=2", "train.lr=1e-3", "model.cond_drop_rate=0",
        "model.drop_path_rate=0", "device=cuda", "train.precision=bf16", "train.cuda_graph=true", *overrides,
    ])  # fmt: skip
    train(cfg)
    return ck.load_tensors(ck.latest_checkpoint(out) / "model.safetensors")


@gpu
@needs_cuda
@pytest.mark.parametrize("compile_mode", ["false", "blocks", "full"])
def test_gpu_graphed_step_with_copies_equals_the_graphed_step(tmp_path, compile_mode) -> None:
    """8 steps (3 eager, the capture, 5 replays) with the bf16 copies against the same run
    without them: the weights agree to rounding (the AdamW kernels' arithmetic), the checkpoint
    holds fp32 weights."""
    common = (f"train.compile={compile_mode}",)
    base = _train("hmar-tiny", tmp_path / "base", *common, "train.master_weights=false")
    new = _train("hmar-tiny", tmp_path / "master", *common, "train.master_weights=true")
    worst = max(float((new[k].float() - base[k].float()).norm() / base[k].float().norm().clamp_min(1e-12))
                for k in base)  # fmt: skip
    print(f"hmar-tiny compile={compile_mode}: copies vs fp32 weights, 8 graphed steps, rel max {worst:.1e}")
    assert all(new[k].dtype == base[k].dtype for k in base)
    assert worst < 2e-2


@gpu
@needs_cuda
def test_gpu_stage2_graphed_step_with_copies_equals_the_graphed_step(tmp_path) -> None:
    """HMAR stage 2 (frozen stage-1 blocks; the mask ratio drawn on the GPU at every replay, the
    same stream either way): with ``auto`` copies against the same run without them."""
    common = ("model.stage=2", "train.compile=false")
    base = _train("hmar-tiny", tmp_path / "base", *common, "train.master_weights=false")
    new = _train("hmar-tiny", tmp_path / "master", *common)  # auto: the default
    worst = max(float((new[k].float() - base[k].float()).norm() / base[k].float().norm().clamp_min(1e-12))
                for k in base)  # fmt: skip
    print(f"hmar-tiny stage 2: copies vs fp32 weights, 8 graphed steps, rel max {worst:.1e}")
    assert worst < 2e-2


@gpu
@needs_cuda
def test_gpu_run_with_copies_resumes_with_and_without_them(tmp_path) -> None:
    """A run with the copies writes an ordinary checkpoint (fp32 weights, float rates, capturable
    off): an eager run continues it, and a graphed run with the copies continues that."""
    from maskar import checkpoint as ck

    run = tmp_path / "run"
    _train("var-tiny", run, "train.compile=false", "train.master_weights=auto", "train.ckpt_every=8")
    state = ck.load_trainer_state(ck.latest_checkpoint(run))
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in state["optimizer"]["param_groups"])
    _train("var-tiny", run, "train.compile=false", "train.cuda_graph=false", "train.steps=10")
    assert ck.load_trainer_state(ck.latest_checkpoint(run))["step"] == 10
    w = _train("var-tiny", run, "train.compile=false", "train.master_weights=true", "train.steps=16")
    assert ck.load_trainer_state(ck.latest_checkpoint(run))["step"] == 16
    floats = [v for v in w.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in floats)


@gpu
@needs_cuda
def test_gpu_kernel_equals_its_reference() -> None:
    for low in (False, True):
        a = make_tensors([(1024, 3072), (4097,), (7, 5)], low=low, seed=5)

        def cuda(xs):
            return None if xs is None else [x.cuda() for x in xs]

        a = K.AdamWTensors(cuda(a.params), cuda(a.grads), cuda(a.exp_avgs), cuda(a.exp_avg_sqs), cuda(a.lrs),
                           cuda(a.steps), a.weight_decays, cuda(a.lows))  # fmt: skip
        b = clone_tensors(a)
        scale = torch.tensor(1.3, device="cuda")
        launch = K.AdamWLaunch(a)
        sq = launch.sum_squares(a).sum()
        want = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(a.grads, 2, dtype=torch.float32)))
        assert abs(float(sq.sqrt()) - float(want)) <= 1e-6 * float(want)
        launch(a, 0.9, 0.95, 1e-8, scale, bound=True)
        K.adamw_reference_(b, 0.9, 0.95, 1e-8, scale)
        assert max_rel(a.params, b.params) < 1e-6
        assert max_rel(a.exp_avg_sqs, b.exp_avg_sqs) < 1e-6
        if low:
            assert all(torch.equal(lo, p.to(torch.bfloat16)) for lo, p in zip(a.lows, a.params))
