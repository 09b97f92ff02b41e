"""train.cuda_graph: the whole step as one CUDA graph (maskar/train/graph_step.py).

On the CPU: the refusals (each names the setting and the value, before any data or model work),
the models' graph-safety answers and the optimizer plumbing (device-tensor rates, checkpoints
as an eager run writes them). On a GPU: a tiny VAR and HMAR stage 1 trained with the graph
equal the same runs without it, and a graph run's checkpoint resumes in an eager run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from maskar import checkpoint as ck
from maskar.config import ConfigError, load_config
from maskar.models.toy import ToyDenoiser
from maskar.train import graph_step as G
from maskar.train.trainer import train

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cfg(preset: str, out_dir: Path, *overrides: str):
    return load_config(preset, [
        f"train.out_dir={out_dir}", "train.steps=8", "train.log_every=2", "train.progress=false",
        "train.tensorboard=false", "train.ckpt_every=0", "data.synthetic_size=32", "train.batch_size=8",
        "train.schedule=lin0", "train.warmup_steps=2", "train.lr=1e-3", *overrides,
    ])  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (("train.grad_accum=2",), "grad_accum=1, got 2"),
        (("train.precision=fp16",), "precision fp16"),
        (("train.activation_checkpointing=true",), "activation_checkpointing"),
    ],
)
def test_config_refuses_what_a_graph_cannot_replay(tmp_path, overrides, needle) -> None:
    with pytest.raises(ConfigError, match="cuda_graph") as e:
        _cfg("hmar-tiny", tmp_path, "train.cuda_graph=true", *overrides)
    assert needle in str(e.value)


def test_auto_is_the_default_and_steps_aside_where_a_graph_cannot_replay(tmp_path) -> None:
    from maskar.train.trainer import graph_refusal

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    tc = _cfg("hmar-tiny", tmp_path).train
    assert tc.cuda_graph == "auto" and graph_refusal(tc, cuda, 1) is None
    for overrides, needle in [
        (("train.grad_accum=2",), "grad_accum=1, got 2"),
        (("train.precision=fp16",), "precision fp16"),
        (("train.activation_checkpointing=true",), "activation_checkpointing"),
        (("train.parallel=fsdp2",), "not supported with parallel=fsdp2"),
    ]:
        tc = _cfg("hmar-tiny", tmp_path, *overrides).train  # auto: no refusal at load
        assert needle in graph_refusal(tc, cuda, 1)
    tc = _cfg("hmar-tiny", tmp_path).train
    assert graph_refusal(tc, cuda, 2) == "needs one process on a CUDA device, got 2 processes"
    assert "got device cpu" in graph_refusal(tc, torch.device("cpu"), 1)


@pytest.mark.filterwarnings("ignore:model.tokenizer_ckpt is not set")
def test_auto_leaves_the_whole_compiled_step_uncaptured(tmp_path, monkeypatch) -> None:
    from maskar.train import trainer as T

    monkeypatch.setattr(T, "graph_refusal", lambda *a: None)  # as if on one GPU
    cfg = _cfg("hmar-tiny", tmp_path / "run", "device=cpu", "train.steps=1", "train.compile=full")
    trainer = T.Trainer(cfg)
    try:
        why = "not with train.compile=full (true captures it anyway)"
        assert trainer.graph_off == f"train.cuda_graph=auto: {why}"
        assert trainer.graph_step is None
    finally:
        trainer.close()


@pytest.mark.filterwarnings("ignore:model.tokenizer_ckpt is not set")
def test_auto_trains_eagerly_on_the_cpu_and_logs_why(tmp_path) -> None:
    train(_cfg("hmar-tiny", tmp_path / "run", "device=cpu", "train.steps=2", "train.compile=false"))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "eager launches (train.cuda_graph=auto: needs one process on a CUDA device, got device cpu)" in log


def test_auto_steps_aside_for_a_model_that_is_not_graph_safe(tmp_path, monkeypatch) -> None:
    from maskar.train import trainer as T

    monkeypatch.setattr(T, "graph_refusal", lambda *a: None)  # as if on one GPU: the model decides
    toy = ["model.arch=toy", "model.resolution=8", "model.width=8", "model.num_classes=4",
           "data.name=synthetic", "data.resolution=8", "data.synthetic_size=16", "data.synthetic_classes=4",
           "train.batch_size=8", "train.steps=2", "train.progress=false", "train.tensorboard=false",
           "device=cpu"]  # fmt: skip
    train(load_config("toy", [*toy, f"train.out_dir={tmp_path / 'run'}"]))
    log = (tmp_path / "run" / "log.txt").read_text()
    why = "ToyDenoiser does not declare its training step graph-safe"
    assert f"eager launches (train.cuda_graph=auto: {why})" in log
    with pytest.raises(ConfigError, match=rf"train.master_weights: needs the step as one CUDA graph \({why}"):
        train(load_config("toy", [*toy, f"train.out_dir={tmp_path / 'run2'}", "train.master_weights=true"]))


def test_master_weights_true_needs_a_graph_before_touching_the_run_dir(tmp_path) -> None:
    cfg = _cfg("hmar-tiny", tmp_path / "run", "device=cpu", "train.master_weights=true",
               "train.precision=bf16")  # fmt: skip
    needle = r"train.master_weights: needs the step as one CUDA graph \(train.cuda_graph=auto: needs one"
    with pytest.raises(ConfigError, match=needle):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_trainer_refuses_cpu_before_touching_the_run_dir(tmp_path) -> None:
    cfg = _cfg("hmar-tiny", tmp_path / "run", "train.cuda_graph=true", "device=cpu")
    with pytest.raises(ConfigError, match=r"cuda_graph: needs one process on a CUDA device, got device cpu"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_models_make_their_step_graph_safe_or_say_why_not() -> None:
    from maskar.registry import build_model

    var = build_model(load_config("var-tiny", []).model)
    assert G.prepare_for_graph(var) is None
    hmar1 = build_model(load_config("hmar-tiny", []).model)
    assert G.prepare_for_graph(hmar1) is None
    hmar2 = build_model(load_config("hmar-tiny", ["model.stage=2"]).model)
    assert not hmar2.device_mask_draws
    assert G.prepare_for_graph(hmar2) is None and hmar2.device_mask_draws  # the ratio is now drawn on the GPU
    toy = ToyDenoiser.__new__(ToyDenoiser)
    assert "does not declare" in G.prepare_for_graph(toy)


@pytest.mark.parametrize("positions", ["shared", "per_sample"])
def test_device_drawn_train_masks_have_the_host_drawn_distribution(positions) -> None:
    """HMAR stage 2's device-side mask draw (for graphs): per draw one ratio for every scale,
    ceil(ratio * n) positions per scale, k >= 1, uniformly placed; the ratio ~ U(0, 1]."""
    from maskar.registry import build_model

    m = build_model(load_config("hmar-tiny", ["model.stage=2", f"model.mask_positions={positions}"]).model)
    m.device_mask_draws = True
    sizes = [pn * pn for pn in m.patch_nums[1:]]
    torch.manual_seed(0)
    ratios, hits = [], torch.zeros(m.L - 1)
    for _ in range(400):
        mask = m.sample_train_mask(8, torch.device("cpu"))
        assert mask.shape == ((1 if positions == "shared" else 8), m.L - 1) and mask.dtype == torch.bool
        counts = torch.stack([part.sum(1) for part in mask.split(sizes, dim=1)], dim=1)  # (rows, scales)
        assert (counts == counts[:1]).all() and (counts >= 1).all()  # every row the same counts
        # one ratio explains every scale's count: ceil(r * n) = count for some r in (0, 1]
        lo = max(((c - 1) / n) for c, n in zip(counts[0].tolist(), sizes))
        hi = min((c / n) for c, n in zip(counts[0].tolist(), sizes))
        assert lo < hi + 1e-6
        ratios.append(hi)
        hits += mask.float().mean(0)
    assert 0.45 < sum(ratios) / len(ratios) < 0.6  # E[ceil(rn)/n] a little above E[r] = 0.5
    per_scale = [h.std() / h.mean() for h in (hits / 400).split(sizes)]
    assert max(per_scale) < 0.25  # positions uniform within each scale


def test_rates_live_in_tensors_and_checkpoints_stay_portable() -> None:
    p = torch.nn.Parameter(torch.randn(4, 3))
    groups = [{"params": [p], "weight_decay": 0.1}, {"params": [], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=0.5)
    G.as_capturable(opt, torch.device("cpu"))
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(lr, torch.Tensor) and lr.item() == 0.5 for lr in lrs)
    assert all(g["capturable"] for g in opt.param_groups)
    G.set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == lrs  # the same tensors, filled in place
    assert all(lr.item() == 0.25 for lr in lrs)
    sd = G.portable_state_dict(opt)
    assert [g["lr"] for g in sd["param_groups"]] == [0.25, 0.25]
    assert not any(g["capturable"] for g in sd["param_groups"])
    assert all(g["capturable"] for g in opt.param_groups)  # the live optimizer is untouched
    eager = torch.optim.AdamW([{"params": [p]}, {"params": []}], lr=1.0)
    eager.load_state_dict(sd)
    assert [g["lr"] for g in eager.param_groups] == [0.25, 0.25]
    G.set_lr(eager, 0.125)  # float rates are plain assignments
    assert [g["lr"] for g in eager.param_groups] == [0.125, 0.125]


def test_graphed_step_needs_cuda() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        G.GraphedStep(lambda b: {"loss": p.sum()}, opt, [p], 1.0, contextlib.nullcontext, torch.device("cpu"))


# ----------------------------------------------------------------------------- GPU

DETERMINISTIC = ("model.cond_drop_rate=0", "model.drop_path_rate=0", "train.compile=false")


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return ck.load_tensors(ck.latest_checkpoint(out_dir) / "model.safetensors")


def _log_losses(out_dir: Path) -> list[str]:
    return [ln for ln in (out_dir / "log.txt").read_text().splitlines() if "| loss " in ln]


@gpu
@needs_cuda
@pytest.mark.parametrize("preset", ["var-tiny", "hmar-tiny"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_graphed_training_equals_eager(tmp_path, preset, precision) -> None:
    """8 steps (3 eager warm-up, capture, 5 replays) with no random draws in the step: the same
    weights as the run without the graph, to rounding (capturable AdamW's arithmetic)."""
    common = (*DETERMINISTIC, f"train.precision={precision}", "device=cuda")
    train(_cfg(preset, tmp_path / "eager", *common, "train.cuda_graph=false"))
    assert "eager launches (train.cuda_graph=false)" in (tmp_path / "eager" / "log.txt").read_text()
    # the copies (train.master_weights=auto) change the arithmetic; tests/test_master_weights.py has them
    train(_cfg(preset, tmp_path / "graph", *common, "train.cuda_graph=true", "train.master_weights=false"))
    eager, graph = _weights(tmp_path / "eager"), _weights(tmp_path / "graph")
    worst = 0.0
    for k in eager:
        d = (graph[k].float() - eager[k].float()).norm() / eager[k].float().norm().clamp_min(1e-12)
        worst = max(worst, d.item())
    print(f"{preset} {precision}: graphed vs eager weights after 8 steps, rel max {worst:.1e}")
    assert worst < (1e-5 if precision == "fp32" else 2e-2)
    assert len(_log_losses(tmp_path / "graph")) == 4
    assert "one CUDA graph (train.cuda_graph), autocast" in (tmp_path / "graph" / "log.txt").read_text()


@gpu
@needs_cuda
def test_gpu_graphed_compiled_blocks_equal_the_compiled_step(tmp_path) -> None:
    """The configuration `maskar train` runs on CUDA: compiled blocks (train.compile=auto) and the
    fused attention kernel inside the captured step, against the same run without the graph."""
    common = ("model.cond_drop_rate=0", "model.drop_path_rate=0", "train.compile=blocks", "device=cuda")
    train(_cfg("hmar-tiny", tmp_path / "eager", *common, "train.cuda_graph=false"))
    graph_only = ("train.cuda_graph=true", "train.master_weights=false")  # the copies: test_master_weights.py
    train(_cfg("hmar-tiny", tmp_path / "graph", *common, *graph_only))
    eager, graph = _weights(tmp_path / "eager"), _weights(tmp_path / "graph")
    worst = max(
        ((graph[k].float() - eager[k].float()).norm() / eager[k].float().norm().clamp_min(1e-12)).item()
        for k in eager
    )
    print(f"hmar-tiny compile=blocks bf16: graphed vs ungraphed weights after 8 steps, rel max {worst:.1e}")
    assert worst < 2e-2


@gpu
@needs_cuda
def test_gpu_hmar_stage2_graph_draws_a_new_mask_ratio_every_step(tmp_path) -> None:
    """Stage 2 under the graph: its mask ratio comes from the GPU, so the logged per-window mean
    mask ratio varies from window to window (a frozen host draw would repeat one value)."""
    run = tmp_path / "s2"
    train(
        _cfg(
            "hmar-tiny",
            run,
            "device=cuda",
            "train.compile=false",
            "train.cuda_graph=true",
            "model.stage=2",
            "train.steps=16",
            "train.log_every=2",
        )
    )
    ratios = [float(ln.split("| mask_ratio ")[1].split()[0]) for ln in _log_losses(run)]
    print(f"hmar-tiny stage 2 graphed, logged mask ratios {ratios}")
    assert len(ratios) == 8 and len(set(ratios)) > 4


@gpu
@needs_cuda
def test_gpu_graph_run_resumes_in_an_eager_run(tmp_path) -> None:
    """A graph run's checkpoint is an ordinary one (float rates, capturable off) and an eager run
    continues it; label dropout and drop path on."""
    run = tmp_path / "run"
    noisy = ("device=cuda", "train.compile=false", "model.cond_drop_rate=0.5", "model.drop_path_rate=0.1")
    train(_cfg("var-tiny", run, *noisy, "train.cuda_graph=true", "train.ckpt_every=8"))
    state = ck.load_trainer_state(ck.latest_checkpoint(run))
    assert all(isinstance(g["lr"], float) and not g["capturable"] for g in state["optimizer"]["param_groups"])
    train(_cfg("var-tiny", run, *noisy, "train.steps=10", "train.cuda_graph=false"))
    assert ck.load_trainer_state(ck.latest_checkpoint(run))["step"] == 10


@gpu
@needs_cuda
def test_gpu_replays_draw_new_random_numbers() -> None:
    """GPU draws inside the captured step are fresh at every replay (Philox offsets advance)."""
    dev = torch.device("cuda")
    p = torch.nn.Parameter(torch.ones(64, device=dev))
    opt = torch.optim.AdamW([p], lr=0.0, fused=True)

    def loss_fn(batch):
        return {"loss": (p * torch.rand(64, device=dev)).sum() * batch["x"].sum()}

    step = G.GraphedStep(loss_fn, opt, [p], 1.0, contextlib.nullcontext, dev, warmup=1)
    x = {"x": torch.ones(3, device=dev)}
    losses = [step(x)[0]["loss"].item() for _ in range(5)]  # 1 eager, capture + replay, 3 replays
    assert step.graph is not None
    assert len(set(losses)) == 5, losses


def test_static_batch_is_refilled_in_place_and_shape_changes_are_refused() -> None:
    """The replay reads the capture's input buffers: each batch is copied into them (the same
    storage), and a batch of another shape, dtype or key set is refused with the values named."""
    step = G.GraphedStep.__new__(G.GraphedStep)  # the capture itself needs CUDA; _load does not
    step.static_batch = {
        "indices": torch.zeros(4, 10, dtype=torch.long),
        "label": torch.zeros(4, dtype=torch.long),
    }
    ptrs = {k: v.data_ptr() for k, v in step.static_batch.items()}
    new = {"indices": torch.arange(40).view(4, 10), "label": torch.tensor([3, 1, 2, 0])}
    step._load(new)
    assert all(torch.equal(step.static_batch[k], new[k]) for k in new)
    assert {k: v.data_ptr() for k, v in step.static_batch.items()} == ptrs
    with pytest.raises(
        ValueError, match=r"batch\['indices'\] is \(3, 10\) torch.int64, the graph was captured for \(4, 10\)"
    ):
        step._load(
            {"indices": torch.zeros(3, 10, dtype=torch.long), "label": torch.zeros(3, dtype=torch.long)}
        )
    with pytest.raises(ValueError, match="torch.int32"):
        step._load(
            {"indices": torch.zeros(4, 10, dtype=torch.int32), "label": torch.zeros(4, dtype=torch.long)}
        )
    with pytest.raises(ValueError, match=r"batch keys \['image', 'label'\] differ"):
        step._load({"image": torch.zeros(4, 3), "label": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"batch entries \['indices', 'label'\] are not CUDA tensors"):
        step(new)
