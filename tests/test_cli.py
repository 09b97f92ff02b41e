"""The `maskar` command line: help texts, info, errors, and the cache -> train path."""

import pytest

from maskar.cli import COMMANDS, command_names, main


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_subcommand_has_informative_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"maskar {cmd}" in out
    assert len(out.splitlines()) >= 5


@pytest.mark.parametrize(
    "what,name",
    [("bench", n) for n in command_names("maskar.bench")]
    + [("convert", n) for n in command_names("maskar.convert")],
)
def test_every_bench_and_converter_answers_help(what, name, capsys):
    """``maskar bench NAME --help`` / ``maskar convert NAME --help`` print the usage and exit 0,
    whether the command parses with argparse or reads ``key=value`` only."""
    try:
        code = main([what, name, "--help"])
    except SystemExit as e:  # argparse's own --help
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    assert f"maskar {what} {name}" in out
    assert len(out.splitlines()) >= 3


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "sample", "edit", "eval", "bench", "convert", "info"):
        assert cmd in out


def test_info_prints_versions_backends_presets(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "attention backends:" in out and "sdpa" in out
    assert "hmar" in out and "presets:" in out


def test_info_prints_the_environment_switches(monkeypatch, capsys):
    from maskar import env

    for name in env.SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASKAR_HEAD_FUSED", "1")
    monkeypatch.setenv("MASKAR_SAMPLER_KERNEL", "0")
    assert main(["info"]) == 0
    lines = {ln.split("=")[0].strip(): ln for ln in capsys.readouterr().out.splitlines() if "MASKAR_" in ln}
    assert set(env.SWITCHES) <= set(lines)
    assert "MASKAR_HEAD_FUSED=on" in lines["MASKAR_HEAD_FUSED"]
    assert "MASKAR_LINEAR_ACT=off" in lines["MASKAR_LINEAR_ACT"]
    assert "MASKAR_SAMPLER_KERNEL=off" in lines["MASKAR_SAMPLER_KERNEL"]
    assert "MASKAR_GRAPH_POOL_RESERVE=on" in lines["MASKAR_GRAPH_POOL_RESERVE"]
    assert "MASKAR_PSA_QKV=in CUDA inference" in lines["MASKAR_PSA_QKV"]
    assert "MASKAR_FUSED_GELU=each layer's default" in lines["MASKAR_FUSED_GELU"]
    monkeypatch.setenv("MASKAR_GRAPH_POOL_MARGIN", "1.25")
    assert main(["info"]) == 0
    assert "MASKAR_GRAPH_POOL_MARGIN=1.25" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "value", "words"), [
    ("MASKAR_PSA_QKV", "yes", "MASKAR_PSA_QKV: expected 0 or 1 (or unset), got 'yes'"),
    ("MASKAR_SAMPLER_KERNEL", "off", "MASKAR_SAMPLER_KERNEL: expected 0 or 1 (or unset), got 'off'"),
    ("MASKAR_GRAPH_POOL_MARGIN", "0.9", "MASKAR_GRAPH_POOL_MARGIN: expected a number >= 1, got '0.9'"),
])  # fmt: skip
def test_a_mistyped_switch_stops_a_command_before_its_work(monkeypatch, capsys, tmp_path, name, value, words):
    monkeypatch.setenv(name, value)
    out = tmp_path / "never.png"
    assert main(["sample", f"ckpt={tmp_path}", f"out={out}"]) == 2  # checked before the checkpoint
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_info_preset_prints_resolved_config_with_overrides(capsys):
    assert main(["info", "preset=hmar-tiny", "sample.cfg=2.5"]) == 0
    out = capsys.readouterr().out
    assert "arch: hmar" in out and "cfg: 2.5" in out


def test_info_ckpt_describes_a_checkpoint_and_checks_its_digests(tmp_path, capsys):
    import shutil
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "checkpoints" / "casmar-fmnist"
    assert main(["info", f"ckpt={shipped}"]) == 0
    out = capsys.readouterr().out
    assert "architecture casmar" in out and "tokenizer (klvae, bundled)" in out
    assert "BF16 100%" in out and "2 file(s) verified" in out and "num_iter:" in out
    copy = tmp_path / "ck"
    shutil.copytree(shipped, copy)
    with open(copy / "config.yaml", "a") as f:
        f.write("\n")  # the same config, but no longer the file SHA256SUMS lists
    assert main(["info", f"ckpt={copy}"]) == 2
    assert "config.yaml does not match its SHA-256" in capsys.readouterr().err
    assert main(["info", f"ckpt={copy}", "verify=false"]) == 0
    assert "not checked (verify=false)" in capsys.readouterr().out
    assert main(["info", f"ckpt={copy}", "preset=mar-b"]) == 2
    assert "give it alone" in capsys.readouterr().err


def test_bad_override_is_one_clear_error(capsys):
    assert main(["info", "preset=hmar-tiny", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key train.stepz" in err


def test_unknown_bench_and_convert_names(capsys):
    assert main(["bench", "nope"]) == 2
    assert "expected one of" in capsys.readouterr().err
    assert main(["convert"]) == 2


def test_only_command_modules_are_bench_and_convert_names(capsys):
    import importlib

    from maskar.cli import COMMAND_ENTRY, command_names

    for package, entry in COMMAND_ENTRY.items():
        names = command_names(package)
        for name in names:  # the listing (read from the source) matches the modules
            assert callable(getattr(importlib.import_module(f"{package}.{name}"), entry)), name
    assert "kernel_time" not in command_names("maskar.bench")  # helpers, not commands
    assert {"attention", "quality"} <= set(command_names("maskar.bench"))  # quality imports its main
    assert "common" not in command_names("maskar.convert")
    assert main(["bench", "kernel_time"]) == 2
    assert "bench: expected one of attention, casmar," in capsys.readouterr().err
    assert main(["convert", "common", "src=a.pth", "out=b"]) == 2
    err = capsys.readouterr().err
    assert "expected one of casmar, dtype, hmar, klvae, mar, var, vqvae, got 'common'" in err


def test_sample_requires_ckpt(capsys):
    assert main(["sample"]) == 2
    assert "ckpt=DIR" in capsys.readouterr().err


def test_cache_then_train_on_latents(tmp_path):
    cache = tmp_path / "cache"
    args = ["preset=mar-tiny", "data.synthetic_size=8", f"out={cache}", "batch_size=4", "device=cpu"]
    assert main(["cache", *args]) == 0
    assert (cache / "index.json").exists()
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "preset=mar-tiny",
                "data.name=latents",
                f"data.root={cache}",
                "train.steps=2",
                "train.batch_size=4",
                f"train.out_dir={run}",
                "train.progress=false",
            ]
        )
        == 0
    )
    assert (run / "latest").exists()
