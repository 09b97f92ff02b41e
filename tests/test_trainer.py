"""Trainer: schedules, EMA, parameter groups, the sampler, exact resume, signals, DDP on CPU."""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskar import checkpoint as ck
from maskar import registry
from maskar.config import ConfigError, ModelConfig, load_config
from maskar.models.toy import ToyDenoiser
from maskar.train import distributed as D
from maskar.train.ema import EMA
from maskar.train.schedule import lr_at
from maskar.train.trainer import Trainer, param_groups, train


def toy_cfg(out_dir: Path, *overrides: str):
    base = [
        "model.arch=toy",
        "model.resolution=8",
        "model.width=8",
        "model.num_classes=4",
        "data.name=synthetic",
        "data.resolution=8",
        "data.synthetic_size=24",
        "data.synthetic_classes=4",
        "train.batch_size=8",
        "train.steps=7",
        "train.lr=1e-2",
        "train.schedule=lin0",
        "train.warmup_steps=2",
        "train.min_lr=1e-4",
        "train.grad_clip=0.5",
        "train.ema=0.9",
        "train.ckpt_every=3",
        "train.log_every=2",
        "train.progress=false",
        "train.tensorboard=false",
        "device=cpu",
        f"train.out_dir={out_dir}",
    ]
    return load_config(None, base + list(overrides))


def read_run(out_dir: Path) -> dict[str, dict]:
    latest = ck.latest_checkpoint(out_dir)
    state = ck.load_trainer_state(latest)
    opt = {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}
    return {
        "model": ck.load_tensors(latest / "model.safetensors"),
        "ema": ck.load_tensors(latest / "ema.safetensors") if (latest / "ema.safetensors").exists() else {},
        "opt": opt,
        "step": state["step"],
    }


def assert_runs_identical(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema", "opt"):
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


# ----------------------------------------------------------------------------- schedules


def test_schedules_match_closed_forms() -> None:
    kw = dict(lr=1.0, total_steps=21, warmup_steps=5, warmup_start=0.1, min_lr=0.0)
    for name in ("constant", "cosine", "linear", "lin0"):
        assert lr_at(0, schedule=name, **kw) == pytest.approx(0.1)
        assert lr_at(2, schedule=name, **kw) == pytest.approx(0.1 + 0.9 * 2 / 5)
        assert lr_at(5, schedule=name, **kw) == pytest.approx(1.0)
    # After warm-up: progress = (step - 5) / 15.
    assert lr_at(20, schedule="constant", **kw) == 1.0
    assert lr_at(8, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_at(20, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_at(8, schedule="linear", **kw) == pytest.approx(0.8)
    # lin0 holds the peak for the first 5% of the decay phase, then decays linearly to min_lr.
    assert lr_at(6, schedule="lin0", **kw) == pytest.approx((1 - 1 / 15) / 0.95)
    assert lr_at(20, schedule="lin0", **kw) == pytest.approx(0.0)
    long = dict(lr=2.0, total_steps=1101, warmup_steps=100, warmup_start=0.005, min_lr=0.2)
    assert lr_at(0, schedule="lin0", **long) == pytest.approx(0.01)
    assert lr_at(149, schedule="lin0", **long) == 2.0  # progress 0.049 < 0.05
    assert lr_at(600, schedule="lin0", **long) == pytest.approx(0.2 + 1.8 * 0.5 / 0.95)
    assert lr_at(1100, schedule="lin0", **long) == pytest.approx(0.2)
    assert lr_at(5000, schedule="cosine", **long) == pytest.approx(0.2)  # clamped past the end
    with pytest.raises(ValueError, match="train.schedule"):
        lr_at(0, lr=1.0, total_steps=10, schedule="step")


# ----------------------------------------------------------------------------- EMA and groups


def test_ema_matches_closed_form() -> None:
    lin = nn.Linear(2, 1)
    named = list(lin.named_parameters())
    p0 = lin.weight.detach().clone()
    ema = EMA(named, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update()
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update()
    expected = 0.9 * 0.9 * p0 + 0.9 * 0.1 * 1.0 + 0.1 * 3.0
    torch.testing.assert_close(ema.state_dict()["weight"], expected, rtol=0, atol=1e-7)
    assert ema.num_updates == 2
    target = nn.Linear(2, 1)
    ema.copy_to(target)
    torch.testing.assert_close(target.weight, expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="train.ema"):
        EMA(named, decay=1.0)


def test_param_groups_decay_and_no_decay() -> None:
    model = ToyDenoiser(load_config(None, ["model.arch=toy", "model.width=8"]).model)
    groups = param_groups(list(model.named_parameters()), 0.05, model.no_weight_decay_keywords())
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_group["decay"] == ["conv_in.weight", "conv_mid.weight", "conv_out.weight", "coord_gain"]
    assert by_group["no_decay"] == [
        "class_emb.weight",  # keyword from no_weight_decay_keywords()
        "conv_in.bias",
        "conv_mid.bias",
        "conv_out.bias",
        "norm.bias",
        "norm.weight",
    ]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


# ----------------------------------------------------------------------------- data order


def test_batch_sampler_is_world_size_independent_and_resumable() -> None:
    single = D.EpochBatchSampler(20, 8, rank=0, world_size=1, seed=3)
    ranks = [D.EpochBatchSampler(20, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        merged = [a + b for a, b in zip(*[list(r) for r in ranks])]
        assert merged == list(single) and len(merged) == 2  # 20 // 8 batches, tail dropped
    single.set_epoch(0)
    epoch0 = list(single)
    single.set_epoch(1)
    assert list(single) != epoch0
    single.set_epoch(0, start_batch=1)
    assert list(single) == epoch0[1:] and len(single) == 1
    with pytest.raises(ConfigError, match="train.batch_size: 9 is not divisible by the 2 processes"):
        D.EpochBatchSampler(20, 9, rank=0, world_size=2, seed=0)
    with pytest.raises(ConfigError, match="larger than the dataset"):
        D.EpochBatchSampler(5, 8, rank=0, world_size=1, seed=0)


def test_rng_state_round_trip_is_weights_only(tmp_path: Path) -> None:
    import random

    import numpy as np

    D.seed_everything(5)
    ck.save_trainer_state(tmp_path, {"rng": D.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(2)
    D.set_rng_state(ck.load_trainer_state(tmp_path)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# ----------------------------------------------------------------------------- training runs


def test_train_writes_checkpoints_logs_and_learns(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = toy_cfg(out, "train.steps=6", "train.keep_last=1", "train.tensorboard=true", "train.ema=0")
    assert train(cfg) == out
    assert [s for s, _ in ck.list_step_checkpoints(out)] == [6]
    assert (out / "latest").read_text().strip() == "step-0000006"
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    assert not (out / "step-0000006" / "ema.safetensors").exists()
    lines = (out / "log.txt").read_text().splitlines()
    steps = [line for line in lines if "| loss " in line]
    assert len(steps) == 3 and "step 6/6 | loss" in steps[-1]
    assert "step: train.compile=none, eager launches" in lines[2]  # how the steps ran, for comparisons
    for key in ("lr", "grad_norm", "it_per_s", "samples_per_s", "max_mem_gb", "mse_noisy"):
        assert f"| {key} " in steps[-1]
    model, cfg2 = ck.load_model(out)
    assert cfg2.train.steps == 6 and int(model.steps_seen) == 6  # the hook ran every step
    images = model.generate(torch.tensor([0, 1]), seed=0, steps=2)
    assert images.shape == (2, 3, 8, 8) and images.abs().max() <= 1


def test_resume_after_sigterm_equals_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hflip draws from the process RNG in the data pipeline; the toy model draws noise and
    # label dropout from it too, so this checks RNG restore as well as data position.
    flags = ["data.hflip=true"]
    train(toy_cfg(tmp_path / "straight", *flags))
    straight = read_run(tmp_path / "straight")

    original_hook = ToyDenoiser.on_train_step_end

    def interrupt_at_4(self, step):
        out = original_hook(self, step)
        if step == 4:  # epoch 1, batch 1: mid-epoch, between two periodic checkpoints
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(ToyDenoiser, "on_train_step_end", interrupt_at_4)
    with pytest.raises(SystemExit) as e:
        train(toy_cfg(tmp_path / "resumed", *flags))
    assert e.value.code == 128 + signal.SIGTERM
    assert ck.latest_checkpoint(tmp_path / "resumed").name == "step-0000004"
    monkeypatch.setattr(ToyDenoiser, "on_train_step_end", original_hook)

    train(toy_cfg(tmp_path / "resumed", *flags))
    assert_runs_identical(straight, read_run(tmp_path / "resumed"))
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "resumed from" in log and "at step 4 (epoch 1, batch 1)" in log


def test_stop_at_then_resume_equals_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts = []
    monkeypatch.setattr(ToyDenoiser, "on_train_start", lambda self, step: starts.append(step), raising=False)
    train(toy_cfg(tmp_path / "a", "train.steps=6", "train.ckpt_every=0"))
    cfg_b = toy_cfg(tmp_path / "b", "train.steps=6", "train.ckpt_every=0")
    train(cfg_b, stop_at=3)  # end of epoch 0: the resumed run starts a fresh epoch
    assert ck.latest_checkpoint(tmp_path / "b").name == "step-0000003"
    train(cfg_b)
    assert starts == [0, 0, 3]
    assert_runs_identical(read_run(tmp_path / "a"), read_run(tmp_path / "b"))
    # Already finished: a further call does nothing and keeps the result.
    before = read_run(tmp_path / "b")
    train(cfg_b)
    assert_runs_identical(before, read_run(tmp_path / "b"))


def test_fresh_run_calls_init_pretrained_and_init_from_loads_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(ToyDenoiser, "init_pretrained", lambda self: calls.append(1), raising=False)
    src = tmp_path / "src"
    train(toy_cfg(src, "train.steps=2"))
    assert calls == [1]
    trainer = Trainer(toy_cfg(tmp_path / "ft", "train.init_from=" + str(src)))
    assert calls == [1]  # init_from replaces init_pretrained
    reference, _ = ck.load_model(src, prefer_ema=False)
    for k, v in reference.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k
    assert trainer.step == 0  # weights only, a fresh schedule
    Trainer(toy_cfg(src, "train.steps=4"))  # resume: neither
    assert calls == [1]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_steps_on_cpu(tmp_path: Path, precision: str) -> None:
    trainer = Trainer(toy_cfg(tmp_path, f"train.precision={precision}"))
    before = trainer.model.conv_in.weight.detach().clone()
    batch = next(trainer._batches())
    metrics = trainer.train_step(batch, want_norm=True)
    assert math.isfinite(metrics["loss"].item()) and math.isfinite(metrics["grad_norm"].item())
    assert (trainer.scaler is not None) == (precision == "fp16")
    assert not torch.equal(before, trainer.model.conv_in.weight)


def test_batch_size_must_be_divisible_by_world_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        D,
        "init_distributed",
        lambda name: D.DistInfo(rank=0, world_size=3, local_rank=0, device=torch.device("cpu")),
    )
    with pytest.raises(ConfigError, match="train.batch_size: 8 is not divisible by the 3 processes"):
        Trainer(toy_cfg(tmp_path))


# ----------------------------------------------------------------------------- discriminator


@dataclass
class _GanConfig(ModelConfig):
    arch: str = "test_gan"


class _TinyGan(nn.Module):
    """Generator = per-pixel affine map; discriminator = linear score on the mean pixel."""

    def __init__(self, cfg: _GanConfig) -> None:
        super().__init__()
        self.gen = nn.Conv2d(3, 3, 1)
        self.disc = nn.Linear(3, 1)

    def disc_parameters(self):
        return self.disc.parameters()

    def loss(self, batch):
        fake = self.gen(batch["image"])
        adv = F.softplus(-self.disc(fake.mean((2, 3)))).mean()  # reaches disc params too
        return {"loss": F.mse_loss(fake, batch["image"]) + 0.1 * adv}

    def disc_loss(self, batch):
        fake = self.gen(batch["image"]).detach()
        real = batch["image"]
        d = F.softplus(self.disc(fake.mean((2, 3)))) + F.softplus(-self.disc(real.mean((2, 3))))
        return {"loss": d.mean()}


registry.register("test_gan", kind="tokenizer", config_cls=_GanConfig, build=_TinyGan)


def test_discriminator_gets_its_own_optimizer(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "model.arch=test_gan",
            "data.resolution=4",
            "data.synthetic_size=8",
            "train.batch_size=4",
            "train.lr=1e-2",
            "train.disc_lr=0",
            "train.progress=false",
            "train.tensorboard=false",
            "device=cpu",
            f"train.out_dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg)
    gen0, disc0 = trainer.model.gen.weight.detach().clone(), trainer.model.disc.weight.detach().clone()
    metrics = trainer.train_step(next(trainer._batches()), want_norm=True)
    assert {"loss", "disc_loss", "grad_norm", "disc_grad_norm"} <= set(metrics)
    assert not torch.equal(gen0, trainer.model.gen.weight)
    # disc_lr=0: the generator's loss must not move the discriminator through the main optimizer.
    assert torch.equal(disc0, trainer.model.disc.weight)
    assert {id(p) for p in trainer.main_params} == {id(p) for p in trainer.model.gen.parameters()}
    trainer.cfg.train.disc_lr = None
    trainer.disc_lr = trainer.cfg.train.lr
    trainer.train_step(next(trainer._batches()))
    assert not torch.equal(disc0, trainer.model.disc.weight)


# ----------------------------------------------------------------------------- DDP on CPU


def _free_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999): the OS hands ephemeral ports
    to gloo's pair connections of earlier process groups, and a rendezvous port picked from
    that range could be taken again by the time its group starts (seen once as a hang)."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def _ddp_worker(rank: int, world: int, ports: list[int], out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    out = Path(out_dir)
    noisy = ("train.steps=5", "data.hflip=true")  # per-rank RNG in data and model
    runs = [
        (toy_cfg(out / "ddp", *_DETERMINISTIC, "train.ckpt_every=2"), None),
        (toy_cfg(out / "straight", *noisy), None),
        (toy_cfg(out / "resumed", *noisy), 4),  # stop mid-epoch ...
        (toy_cfg(out / "resumed", *noisy), None),  # ... and resume
    ]
    for port, (cfg, stop_at) in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous for each process group
        train(cfg, stop_at=stop_at)


# No per-sample randomness: the 2-rank run must match the 1-process run up to float rounding.
_DETERMINISTIC = ("model.noise_std=0", "model.class_dropout=0", "train.steps=4")


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process_and_resume_exactly(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    ports = [_free_port() for _ in range(4)]
    ctx = mp.start_processes(_ddp_worker, args=(2, ports, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240  # a stuck rendezvous fails the test instead of hanging CI
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("2-rank DDP run did not finish in 240 s (rendezvous stuck?)")
    train(toy_cfg(tmp_path / "single", *_DETERMINISTIC, "train.ckpt_every=2"))
    ddp, single = read_run(tmp_path / "ddp"), read_run(tmp_path / "single")
    assert ddp["step"] == single["step"] == 4
    for k in single["model"]:
        torch.testing.assert_close(ddp["model"][k], single["model"][k], rtol=1e-5, atol=1e-6)
    state = ck.load_trainer_state(tmp_path / "ddp" / "step-0000004")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank streams
    assert [s for s, _ in ck.list_step_checkpoints(tmp_path / "ddp")] == [2, 4]
    assert_runs_identical(read_run(tmp_path / "straight"), read_run(tmp_path / "resumed"))


def test_logger_without_tensorboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from maskar.train.logging import RunLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    printed: list[str] = []
    log = RunLogger(tmp_path, enabled=True, tensorboard=True)
    log.set_console(printed.append)
    assert log.tb is None and "pip install tensorboard" in log.tb_error
    log.scalars(5, 10, {"loss": 0.25, "lr": 1e-4})
    line = (tmp_path / "log.txt").read_text().strip()
    assert line.endswith("step 5/10 | loss 0.2500 | lr 1.000e-04") and printed == [line]
    silent = RunLogger(tmp_path / "rank1", enabled=False)
    silent.scalars(1, 1, {"loss": 1.0})
    assert not (tmp_path / "rank1").exists()


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    flags = (
        "model.noise_std=0",
        "model.class_dropout=0",
        "train.steps=3",
        "train.ema=0",
        "train.ckpt_every=0",
    )
    train(toy_cfg(tmp_path / "eager", *flags))
    train(toy_cfg(tmp_path / "compiled", *flags, "train.compile=true"))
    eager, compiled = read_run(tmp_path / "eager")["model"], read_run(tmp_path / "compiled")["model"]
    assert eager.keys() == compiled.keys()  # saved from the unwrapped model: no _orig_mod prefix
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5)


def test_sigterm_to_process_group_with_data_workers_saves(tmp_path):
    """`timeout`, SLURM and Ctrl-C signal the whole group: workers must not die before the save."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "maskar", "train", "preset=toy", "data.num_workers=1", "train.steps=1000000",
        f"train.out_dir={out}", "train.progress=false", "train.log_every=1", "train.ckpt_every=0",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "log.txt").exists():
            time.sleep(0.2)
        while time.time() < deadline and "step 3/" not in (out / "log.txt").read_text():
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped by SIGTERM" in output, output[-2000:]
    assert (out / "latest").exists()


def _sigterm_then_seed(worker_id: int) -> None:
    """A SIGTERM that reaches a new worker before ``seed_worker`` made it ignore SIGTERM."""
    import os
    import signal

    from maskar.train.distributed import seed_worker

    os.kill(os.getpid(), signal.SIGTERM)
    seed_worker(worker_id)


def test_workers_started_shielded_survive_an_early_sigterm():
    """The window `test_sigterm_to_process_group_with_data_workers_saves` hit now and then: a
    group SIGTERM while an epoch's workers start. Started through iter_with_workers_shielded,
    the signal waits blocked until the worker ignores it; the loader delivers every batch."""
    import signal

    from torch.utils.data import DataLoader

    from maskar.train.distributed import iter_with_workers_shielded

    loader = DataLoader(list(range(6)), batch_size=2, num_workers=1, worker_init_fn=_sigterm_then_seed)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert [b.tolist() for b in iter_with_workers_shielded(loader)] == [[0, 1], [2, 3], [4, 5]]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the main process's mask is back
