import pytest

from maskar.config import (
    Config,
    ConfigError,
    DataConfig,
    TrainConfig,
    apply_overrides,
    build,
    dump_yaml,
    load_config,
    parse_override,
    to_dict,
)


def test_defaults_round_trip_through_dict():
    cfg = load_config()
    again = build(Config, to_dict(cfg))
    assert again == cfg


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["train.lr=3e-4", "train.steps=10", "data.name=digits", "train.betas=[0.9,0.99]"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 10
    assert cfg.data.name == "digits"
    assert cfg.train.betas == (0.9, 0.99)


def test_int_is_accepted_for_float_and_yaml_values_parse():
    assert parse_override("train.lr=1")[1] == 1
    assert parse_override("a.b=[[1],[1,3]]")[1] == [[1], [1, 3]]
    assert parse_override("x=true")[1] is True
    assert parse_override("x=null")[1] is None
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=1", "unknown key train.lrr"),
        ("train.steps=abc", "train.steps: expected an integer"),
        ("train.steps=-1", "train.steps: expected a value >= 0"),
        ("train.precision=fp64", "train.precision: expected one of"),
        ("data.channels=2", "data.channels: expected one of [1, 3]"),
        ("train.ema=1.5", "train.ema: expected a value <= 1.0"),
        ("train.betas=[0.9]", "train.betas: expected 2 items"),
        ("train.resume=maybe", "train.resume: expected true/false"),
        ("nosection.key=1", "unknown key nosection"),
        ("model.arch=nonexistent", "model.arch: unknown architecture 'nonexistent'"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("train..lr=1")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


def test_preset_file_inheritance(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  lr: 0.5\n  steps: 7\ndata:\n  name: digits\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\ntrain:\n  steps: 9\n")
    cfg = load_config(str(child), ["data.resolution=16"])
    assert (cfg.train.lr, cfg.train.steps, cfg.data.name, cfg.data.resolution) == (0.5, 9, "digits", 16)


def test_every_shipped_preset_resolves():
    from maskar.config import preset_names

    for name in preset_names():
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        assert "arch" in dump_yaml(cfg)


def test_sections_are_dataclasses():
    cfg = load_config()
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.train, TrainConfig)
