"""Checkpoint directories: atomic round trip, strict-loading errors, crash safety, official files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from maskar import checkpoint as ck
from maskar.checkpoint import CheckpointError
from maskar.config import ConfigError, load_config, to_dict


def toy_cfg(*overrides: str):
    return load_config(None, ["model.arch=toy", "model.resolution=8", "model.width=8", *overrides])


def toy_model(cfg):
    from maskar.registry import build_model

    torch.manual_seed(0)
    return build_model(cfg.model)


def test_round_trip_identical_tensors_and_config(tmp_path: Path) -> None:
    cfg = toy_cfg("train.lr=3e-4")
    model = toy_model(cfg)
    model.steps_seen.fill_(7)
    ck.save_model(tmp_path / "ck", model, cfg)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["SHA256SUMS", "config.yaml", "model.safetensors"]
    loaded, cfg2 = ck.load_model(tmp_path / "ck")
    assert to_dict(cfg2) == to_dict(cfg)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Non-persistent buffers are rebuilt, never stored.
    assert "coord" not in ck.load_tensors(tmp_path / "ck" / "model.safetensors")
    assert not loaded.training


def test_ema_overlay_and_prefer_ema(tmp_path: Path) -> None:
    cfg = toy_cfg()
    model = toy_model(cfg)
    ema = {k: torch.full_like(v, 0.25) for k, v in model.named_parameters()}
    ck.save_model(tmp_path, model, cfg, ema_state=ema)
    with_ema, _ = ck.load_model(tmp_path)
    raw, _ = ck.load_model(tmp_path, prefer_ema=False)
    assert torch.equal(with_ema.conv_in.weight, torch.full_like(model.conv_in.weight, 0.25))
    assert torch.equal(raw.conv_in.weight, model.conv_in.weight)
    # Saving again without EMA removes the stale EMA file.
    ck.save_model(tmp_path, model, cfg)
    assert not (tmp_path / "ema.safetensors").exists()


def test_tied_and_view_tensors_are_saved(tmp_path: Path) -> None:
    lin = nn.Linear(4, 4, bias=False)
    state = {"a": lin.weight, "b": lin.weight, "row": lin.weight[1], "t": lin.weight.t()}
    ck.save_tensors(tmp_path / "w.safetensors", state)
    back = ck.load_tensors(tmp_path / "w.safetensors")
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def test_mismatch_reports_all_problems_in_one_message() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = model.state_dict()
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["1.weight"] = torch.zeros(5, 4)
    with pytest.raises(CheckpointError) as e:
        ck.load_state_dict_checked(model, sd, context="test ckpt")
    msg = str(e.value)
    assert "test ckpt" in msg and "Sequential" in msg
    assert "1 missing key(s): 0.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "1 shape mismatch(es): 1.weight (checkpoint (5, 4) vs model (2, 4))" in msg


def test_many_missing_keys_are_counted_not_all_listed() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(10)])
    with pytest.raises(CheckpointError, match=r"20 missing key\(s\): 0\.weight.*\(15 more\)"):
        ck.load_state_dict_checked(model, {})


def test_clear_errors_for_missing_things(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        ck.load_model(tmp_path / "empty")
    cfg = toy_cfg()
    ck.save_model(tmp_path / "ok", toy_model(cfg), cfg)
    os.unlink(tmp_path / "ok" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        ck.load_model(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="trainer_state.pt is missing"):
        ck.load_trainer_state(tmp_path / "ok")


def test_wrong_and_unknown_architecture(tmp_path: Path) -> None:
    cfg = toy_cfg()
    ck.save_model(tmp_path, toy_model(cfg), cfg)
    with pytest.raises(CheckpointError, match="holds a 'toy' model, expected a 'var' model"):
        ck.load_model(tmp_path, arch="var")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    data["model"]["arch"] = "no-such-arch"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match="unknown architecture 'no-such-arch'") as e:
        ck.load_model(tmp_path)
    assert isinstance(e.value, ConfigError)  # the CLI reports it as a user error


def test_weights_of_another_model_are_rejected(tmp_path: Path) -> None:
    small, big = toy_cfg("model.width=8"), toy_cfg("model.width=12")
    ck.save_model(tmp_path, toy_model(big), big)
    # Pretend the config was edited by hand: weights no longer fit the built model.
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(small)))
    with pytest.raises(
        CheckpointError,
        match=r"9 shape mismatch\(es\): .*class_emb.weight \(checkpoint \(11, 12\) vs model \(11, 8\)\)",
    ):
        ck.load_model(tmp_path)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = toy_cfg()
    model = toy_model(cfg)
    first = ck.save_step_checkpoint(tmp_path, 10, model, cfg, trainer_state={"step": 10})
    before = ck.load_tensors(first / "model.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing trainer state")

    monkeypatch.setattr(ck, "save_trainer_state", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ck.save_step_checkpoint(tmp_path, 20, model, cfg, trainer_state={"step": 20})
    assert ck.latest_checkpoint(tmp_path) == first
    assert [s for s, _ in ck.list_step_checkpoints(tmp_path)] == [10]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir cleaned up
    after = ck.load_tensors(first / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ck.load_trainer_state(first) == {"step": 10}


def test_crash_inside_file_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    ck.atomic_write_bytes(target, b"old")

    def half_write(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.atomic_write_bytes(target, half_write)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_step_checkpoints_latest_pointer_and_pruning(tmp_path: Path) -> None:
    cfg = toy_cfg()
    model = toy_model(cfg)
    for step in (1, 2, 3):
        ck.save_step_checkpoint(tmp_path, step, model, cfg, trainer_state={"step": step}, keep_last=2)
    assert [s for s, _ in ck.list_step_checkpoints(tmp_path)] == [2, 3]
    assert (tmp_path / "latest").read_text().strip() == "step-0000003"
    # Re-saving an existing step replaces it.
    ck.save_step_checkpoint(tmp_path, 3, model, cfg, trainer_state={"step": 33}, keep_last=2)
    assert ck.load_trainer_state(tmp_path / "step-0000003") == {"step": 33}
    # A restarted run (resume=false) saving step 1 drops the abandoned run's later steps.
    ck.save_step_checkpoint(tmp_path, 1, model, cfg, trainer_state={"step": 1}, keep_last=2)
    assert [s for s, _ in ck.list_step_checkpoints(tmp_path)] == [1]
    ck.save_step_checkpoint(tmp_path, 3, model, cfg, trainer_state={"step": 3}, keep_last=2)
    # load_model on a run dir follows the pointer.
    loaded, _ = ck.load_model(tmp_path)
    assert torch.equal(loaded.conv_in.weight, model.conv_in.weight)


def test_trainer_state_is_weights_only_safe(tmp_path: Path) -> None:
    state = {"step": 3, "rng": {"python": (3, (1, 2), None)}, "opt": {"lr": 0.1, "t": torch.ones(2)}}
    ck.save_trainer_state(tmp_path, state)
    back = ck.load_trainer_state(tmp_path)
    assert back["step"] == 3 and back["rng"]["python"] == (3, (1, 2), None)
    assert torch.equal(back["opt"]["t"], torch.ones(2))


class _Opaque:
    pass


def test_load_official_entries_and_unsafe_pickles(tmp_path: Path) -> None:
    sd = {"w": torch.arange(3.0)}
    ns = argparse.Namespace(model="mar_base", epochs=400)
    torch.save({"model": sd, "model_ema": {"w": torch.zeros(3)}, "args": ns, "epoch": 5}, tmp_path / "a.pth")
    assert torch.equal(ck.load_official(tmp_path / "a.pth", key="model")["w"], sd["w"])
    assert ck.load_official(tmp_path / "a.pth")["args"].model == "mar_base"
    with pytest.raises(
        CheckpointError, match=r"no entry 'ema'; top-level entries: \['args', 'epoch', 'model'"
    ):
        ck.load_official(tmp_path / "a.pth", key="ema")
    torch.save({"model": sd, "thing": _Opaque()}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match=r"weights_only=True.*_Opaque.*never unpickles") as e:
        ck.load_official(tmp_path / "b.pth")
    assert "weights_only=False" not in str(e.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load_official(tmp_path / "missing.pth")
