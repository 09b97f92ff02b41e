"""FSDP2 on CPU (gloo): sharded training equals one process, resume across world sizes, SIGKILL.

Every multi-rank run happens in one pair of spawned processes (a fresh process group per run);
the one-process runs in between happen on rank 0 while rank 1 waits for a marker file. Runs use
``tests/helpers_fsdp.py``'s tiny block model (3 blocks, one FSDP2 unit each, a frozen tokenizer).

Tolerances: in fp32 a 2-rank run differs from one process only in the order gradients are
summed (the two halves of the batch are reduced over the ranks), so weights after 6 AdamW steps
agree to rtol 1e-5 / atol 1e-6. With bf16 block weights (``fsdp_param_dtype=bf16``) the gathered
weights are rounded to bf16 where one process's autocast rounds only the matmul operands:
rtol 1e-2 / atol 2e-3 (measured: 2.2e-4 max after 6 steps).
Runs on the same world size are bitwise equal (the killed-and-resumed run is compared with
``torch.equal``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers_fsdp  # noqa: F401 - registers model.arch=fsdp_blocks
import pytest
import torch

from maskar import checkpoint as ck
from maskar.config import ConfigError, dump_yaml, load_config
from maskar.train import distributed as D
from maskar.train.trainer import Trainer, batch_rule, train

HERE = Path(__file__).parent


def blocks_flags(out_dir: Path, *overrides: str) -> list[str]:
    base = [
        "model.arch=fsdp_blocks",
        "model.resolution=8",
        "model.width=16",
        "model.depth=3",
        "model.num_classes=4",
        "data.name=synthetic",
        "data.resolution=8",
        "data.synthetic_size=32",
        "data.synthetic_classes=4",
        "train.batch_size=8",
        "train.steps=6",
        "train.lr=1e-2",
        "train.schedule=lin0",
        "train.warmup_steps=2",
        "train.min_lr=1e-4",
        "train.grad_clip=0.5",
        "train.ema=0.9",
        "train.ckpt_every=2",
        "train.log_every=2",
        "train.progress=false",
        "train.tensorboard=false",
        "device=cpu",
        f"train.out_dir={out_dir}",
    ]
    return base + list(overrides)


def blocks_cfg(out_dir: Path, *overrides: str):
    return load_config(None, blocks_flags(out_dir, *overrides))


def final_weights(out_dir: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(step, model weights, EMA weights) of a run's latest checkpoint (the gathered safetensors)."""
    latest = ck.latest_checkpoint(out_dir)
    step = ck.load_trainer_state(latest)["step"]
    return step, ck.load_tensors(latest / ck.MODEL_FILE), ck.load_tensors(latest / ck.EMA_FILE)


def assert_close_runs(a: Path, b: Path, rtol: float, atol: float) -> None:
    sa, ma, ea = final_weights(a)
    sb, mb, eb = final_weights(b)
    assert sa == sb
    for got, want in ((ma, mb), (ea, eb)):
        assert got.keys() == want.keys()
        for k in want:
            if rtol == 0 and atol == 0:
                assert torch.equal(got[k], want[k]), f"{k} differs ({a.name} vs {b.name})"
            else:
                torch.testing.assert_close(
                    got[k], want[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
                )


# ----------------------------------------------------------------------------- spawned ranks

_EXACT = ("train.ema=0.9",)  # deterministic loss: the model's noise_std is 0 by default
_NOISY = ("model.noise_std=0.3", "train.schedule=constant", "train.warmup_steps=0", "train.steps=12")
_FSDP = ("train.parallel=fsdp2",)


def _single_rank(fn) -> None:
    """Run ``fn`` as a one-process job (no torchrun variables) inside a spawned rank."""
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        fn()
    finally:
        os.environ.update(saved)


def _wait_for(marker: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{marker} did not appear")
        time.sleep(0.05)


def _worker(rank: int, world: int, ports: list[int], root: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    out = Path(root)
    ports = iter(ports)

    def both(cfg, stop_at=None):
        os.environ["MASTER_PORT"] = str(next(ports))  # a fresh rendezvous for each process group
        train(cfg, stop_at=stop_at)

    def rank0_alone(name: str, cfg, stop_at=None):
        if rank == 0:
            _single_rank(lambda: train(cfg, stop_at=stop_at))
            (out / f"{name}.done").touch()
        else:
            _wait_for(out / f"{name}.done")

    both(blocks_cfg(out / "fsdp", *_EXACT, *_FSDP))
    both(blocks_cfg(out / "fsdp-ac", *_EXACT, *_FSDP, "train.activation_checkpointing=true"))
    both(blocks_cfg(out / "accum", *_EXACT, *_FSDP, "train.grad_accum=2"))
    # CPU offload on a CPU run: the policy's code path (shards, the clipping, the AdamW step; no copies)
    both(blocks_cfg(out / "offload", *_EXACT, *_FSDP, "train.fsdp_cpu_offload=true"))
    both(blocks_cfg(out / "bf16", *_EXACT, *_FSDP, "train.precision=bf16", "train.fsdp_param_dtype=bf16"))
    # Resharding: 2 ranks (FSDP2) -> 1 process (plain) -> 2 ranks (FSDP2) ...
    both(blocks_cfg(out / "2-1-2", *_EXACT, *_FSDP), stop_at=2)
    rank0_alone("2-1-2", blocks_cfg(out / "2-1-2", *_EXACT), stop_at=4)
    both(blocks_cfg(out / "2-1-2", *_EXACT, *_FSDP))
    # ... and 1 rank (FSDP2, its own distributed checkpoint) -> 2 ranks -> 1 rank.
    rank0_alone("1-2-1a", blocks_cfg(out / "1-2-1", *_EXACT, *_FSDP), stop_at=2)
    both(blocks_cfg(out / "1-2-1", *_EXACT, *_FSDP), stop_at=4)
    rank0_alone("1-2-1b", blocks_cfg(out / "1-2-1", *_EXACT, *_FSDP))
    # The uninterrupted reference of the SIGKILL test (per-rank noise: RNG restore matters).
    both(blocks_cfg(out / "noisy", *_NOISY, *_FSDP))
    # Real HMAR blocks: checkpointing, then per-block compile, then fully_shard (the trainer's order).
    os.environ["MASTER_PORT"] = str(next(ports))
    info = D.init_distributed("cpu")
    try:
        _composed_gradients(info, out)
    finally:
        D.shutdown_distributed()


def _composed_gradients(info: D.DistInfo, out: Path) -> None:
    """Gradients of HMAR (stages 1 and 2) with activation checkpointing, blocks compiled
    (aot_eager: the graphs Inductor would get) and FSDP2 on this rank's half of the batch, against
    an eager unsharded copy on the whole batch. Writes the largest relative error per stage."""
    import copy
    import json

    from test_adaln_norm_kernel import count_calls
    from test_train_speed import batch_of, tiny

    import maskar.kernels.adaln_norm as an
    import maskar.kernels.block_sparse as bs
    from maskar.nn import ffn_epilogue as fe
    from maskar.train import parallelize as P
    from maskar.train.trainer import _LossCall

    bs.CPU_REFERENCE = True  # the fused attention's custom op (its SDPA reference on the CPU)
    bs._device_ok_cached.cache_clear()
    # the sharded model's blocks run the LayerNorm ops with the FFN residual's and the biases' sums
    # (their CPU bodies: the biases' gradients come from the ops, through checkpointing, compile
    # and FSDP2); the eager reference runs the torch code
    an.CPU_REFERENCE, an.SUMS = True, True
    fe.CPU_REFERENCE = True  # and the FFN through MASKAR_FFN_EPILOGUE's ops
    # counted inside the custom ops' CPU bodies (they run, not traced, under compile)
    calls = count_calls(an, ("_reference_forward", "_reference_gated_add_backward"))
    ffn_calls = count_calls(fe, ("_torch_fc1_gelu", "_torch_fc2_dgelu"))
    errors = {}
    for stage in (1, 2):
        torch._dynamo.reset()
        ref = tiny("hmar", stage, depth=3, drop_path_rate=0.0, cond_drop_rate=0.0)
        model = copy.deepcopy(ref)
        batch = batch_of(ref, B=4, seed=1)
        torch.manual_seed(5)  # stage 2's mask (shared by the batch: the same on both halves)
        an.ENABLED = fe.ENABLED = False
        ref.loss(batch)["loss"].backward()
        an.ENABLED = fe.ENABLED = True
        P.apply_activation_checkpointing(model)
        P.apply_compile(model, "blocks", backend="aot_eager")
        root = P.apply_fsdp(_LossCall(model), model, info, param_dtype=None)
        half = {k: v.chunk(info.world_size)[info.rank] for k, v in batch.items()}
        torch.manual_seed(5)
        root(half, "loss")["loss"].backward()
        worst = 0.0
        for (name, p), (_, q) in zip(model.named_trainable_parameters(), ref.named_trainable_parameters()):
            assert D.is_sharded(p), name
            g = D.full_tensor(p.grad)
            worst = max(worst, ((g - q.grad).norm() / q.grad.norm().clamp(min=1e-12)).item())
        errors[stage] = worst
    if info.rank == 0:
        (out / "composed.json").write_text(json.dumps(errors))
        (out / "composed-calls.json").write_text(json.dumps({**calls, **ffn_calls}))


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux /proc)."""
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def _free_port() -> int:
    from test_trainer import _free_port as free

    return free()


@pytest.fixture(scope="module")
def spawned_runs(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("fsdp")
    ports = [_free_port() for _ in range(11)]
    ctx = mp.start_processes(_worker, args=(2, ports, str(root)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300  # a stuck rendezvous fails the tests instead of hanging CI
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("2-rank FSDP2 runs did not finish in 300 s (rendezvous stuck?)")
    train(blocks_cfg(root / "single", *_EXACT))
    train(blocks_cfg(root / "single-bf16", *_EXACT, "train.precision=bf16"))
    return root


def test_two_ranks_fsdp2_equal_one_process(spawned_runs: Path) -> None:
    assert_close_runs(spawned_runs / "fsdp", spawned_runs / "single", rtol=1e-5, atol=1e-6)
    latest = ck.latest_checkpoint(spawned_runs / "fsdp")
    state = ck.load_trainer_state(latest)
    assert state["format"] == 2 and state["world_size"] == 2 and state["optimizer"] is None
    assert set(state["optimizer_groups"]["optimizer"][0]["params"]) <= {n for n, _ in helpers_param_names()}
    # every file of the checkpoint, the distributed shards included, is listed and verified
    sums = ck.read_checksums(latest)
    assert {n for n in sums if n.startswith("dcp/")} == set(ck.distributed_files(latest)) != set()
    for name in sums:
        ck.verify_file(latest, name)
    meta = ck.read_distributed_metadata(latest)
    assert any(k.startswith("optimizer.blocks.0.fc1.weight.exp_avg") for k in meta.state_dict_metadata)
    log = (spawned_runs / "fsdp" / "log.txt").read_text()
    assert "fsdp2: 3 block units" in log and "global batch 8 = 2 FSDP2 process(es) x 4 per micro-batch" in log


def helpers_param_names():
    return helpers_fsdp.BlocksModel(helpers_fsdp.BlocksConfig()).named_trainable_parameters()


def test_activation_checkpointing_under_fsdp2_equals_one_process(spawned_runs: Path) -> None:
    assert_close_runs(spawned_runs / "fsdp-ac", spawned_runs / "single", rtol=1e-5, atol=1e-6)


def test_checkpointing_compile_and_fsdp2_compose_on_hmar(spawned_runs: Path) -> None:
    """Relative gradient error (norm) of the composed transforms vs eager on one process."""
    import json

    errors = json.loads((spawned_runs / "composed.json").read_text())
    assert set(errors) == {"1", "2"}
    assert all(e < 5e-5 for e in errors.values()), errors  # measured: 7e-6 (stage 1), 6e-6 (stage 2)
    calls = json.loads((spawned_runs / "composed-calls.json").read_text())
    assert all(n > 0 for n in calls.values()), calls  # the sharded blocks ran the ops


def test_gradient_accumulation_under_fsdp2_equals_the_whole_batch(spawned_runs: Path) -> None:
    assert_close_runs(spawned_runs / "accum", spawned_runs / "single", rtol=1e-5, atol=1e-6)


def test_cpu_offload_policy_equals_one_process(spawned_runs: Path) -> None:
    assert_close_runs(spawned_runs / "offload", spawned_runs / "single", rtol=1e-5, atol=1e-6)
    assert "CPU offload" in (spawned_runs / "offload" / "log.txt").read_text()


def test_bf16_block_weights_stay_close_to_autocast(spawned_runs: Path) -> None:
    assert_close_runs(spawned_runs / "bf16", spawned_runs / "single-bf16", rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("name", ["2-1-2", "1-2-1"])
def test_resume_on_another_world_size_continues_the_trajectory(spawned_runs: Path, name: str) -> None:
    assert_close_runs(spawned_runs / name, spawned_runs / "single", rtol=1e-5, atol=1e-6)
    log = (spawned_runs / name / "log.txt").read_text()
    assert "at step 2 (epoch 0, batch 2)" in log and "at step 4 (epoch 1, batch 0)" in log


def test_sigkill_mid_run_then_resume_equals_uninterrupted(spawned_runs: Path, tmp_path: Path) -> None:
    """torchrun, 2 ranks: the whole process group is SIGKILLed after a checkpoint (no chance to
    save); the same command resumes from the last complete checkpoint and ends bitwise equal."""
    out = tmp_path / "killed"
    config = tmp_path / "run.yaml"  # the reference run's config; steps / ckpt_every differ below
    config.write_text(dump_yaml(blocks_cfg(out, *_NOISY, *_FSDP)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))

    def torchrun(*extra: str) -> subprocess.Popen:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        cmd = [*launcher, *rendezvous, str(HERE / "helpers_fsdp.py"), "train", f"config={config}", *extra]
        return subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    proc = torchrun("train.steps=1000000", "train.ckpt_every=2")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            latest = ck.latest_checkpoint(out) if out.exists() else None
            if latest is not None and int(latest.name[len("step-") :]) >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
    finally:
        # torchrun starts each rank in its own session: kill the launcher and every rank, as a
        # batch system ending the job would (no process gets to save)
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = int(ck.latest_checkpoint(out).name[len("step-") :])
    assert 4 <= killed_at < 12
    done = torchrun("train.steps=12", "train.ckpt_every=2")
    output = done.communicate(timeout=180)[0].decode()
    assert done.returncode == 0, "\n".join(ln for ln in output.splitlines() if "error" in ln.lower())[-3000:]
    log = (out / "log.txt").read_text()
    assert f"resumed from {out / ck.step_dir_name(killed_at)} at step {killed_at}" in log
    assert_close_runs(out, spawned_runs / "noisy", rtol=0, atol=0)


# ----------------------------------------------------------------------------- in-process checks


def test_batch_rule_names_the_split_and_the_scaling() -> None:
    line = batch_rule(768, 3e-4, 8, 2, "fsdp2")
    assert "global batch 768 = 8 FSDP2 process(es) x 48 per micro-batch x 2 accumulation" in line
    assert "0.0001 per 256 images" in line and "lr = base_lr x global batch / 256" in line


def test_fsdp2_settings_are_checked_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fp16 is not supported with parallel=fsdp2"):
        blocks_cfg(tmp_path, *_FSDP, "train.precision=fp16")
    with pytest.raises(ConfigError, match="grad_accum: batch_size 8 is not divisible by grad_accum 3"):
        blocks_cfg(tmp_path, "train.grad_accum=3")
    for value in ("true", "full"):
        with pytest.raises(
            ConfigError, match="compiles the whole step, which parallel=fsdp2 does not support"
        ):
            blocks_cfg(tmp_path, *_FSDP, f"train.compile={value}")


def test_metadata_with_foreign_globals_is_refused(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(os.system))  # would run code on load
    with pytest.raises(ck.CheckpointError, match="posix.system is not allowed"):
        ck.read_distributed_metadata(tmp_path)


def test_sharded_checkpoint_is_verified_and_checked_against_the_run(tmp_path: Path) -> None:
    """One process with a one-rank FSDP2 group: a changed shard byte and a model of another
    shape are refused with one message each, before anything is loaded."""
    out = tmp_path / "run"
    train(blocks_cfg(out, *_FSDP, "train.steps=2"))
    shard = ck.latest_checkpoint(out) / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    try:
        with pytest.raises(ck.CheckpointError, match=r"dcp/__0_0.distcp does not match its SHA-256"):
            Trainer(blocks_cfg(out, *_FSDP, "train.steps=4"))
    finally:
        D.shutdown_distributed()
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    try:
        with pytest.raises(ck.CheckpointError, match=r"sharded model state does not match this run: .*shape"):
            Trainer(blocks_cfg(out, *_FSDP, "train.steps=4", "model.width=8"))
    finally:
        D.shutdown_distributed()
    trainer = Trainer(blocks_cfg(out, "train.steps=4"))  # intact: a plain process resumes from it
    assert trainer.step == 2 and trainer.optimizer.state_dict()["state"][0]["step"].item() == 2


def test_bench_train_step_parallel_rows_and_scaling_efficiency(tmp_path: Path) -> None:
    """One process (plain and a one-rank FSDP2 group) gives the baseline; 2 ranks under torchrun
    time DDP and FSDP2 rows, check their gradients against one process on the global batch and
    report the scaling efficiency against the baseline."""
    import json

    from maskar.bench import train_step

    common = ["tiny=true", "models=hmar", "device=cpu", "precision=fp32", "steps=2", "warmup=1"]
    base = tmp_path / "one.json"
    assert train_step.main([*common, "parallel=none,fsdp2", f"json={base}"]) == 0
    one = json.loads(base.read_text())["rows"]
    assert [(r["parallel"], r["world"]) for r in one] == [("none", 1), ("fsdp2", 1)]
    assert one[1]["grad_rel"] < 1e-6  # a one-rank group: the same arithmetic as one process
    out = tmp_path / "two.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    rendezvous = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    bench = [
        "-m",
        "maskar",
        "bench",
        "train_step",
        *common,
        "parallel=ddp,fsdp2",
        f"baseline={base}",
        f"json={out}",
    ]
    done = subprocess.run(
        [*launcher, *rendezvous, *bench], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["parallel"], r["world"], r["global_batch"]) for r in rows] == [
        ("ddp", 2, 16),
        ("fsdp2", 2, 16),
    ]
    for r in rows:
        assert r["grad_rel"] < 1e-5, r
        assert r["images_s"] == pytest.approx(2 * r["batch"] / r["step_ms"] * 1e3)
        assert r["scaling_eff"] == pytest.approx(r["images_s"] / (2 * one[0]["images_s"]))
    assert done.stdout.count("grad rel") == 2  # rank 0 prints, rank 1 is quiet
