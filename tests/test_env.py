"""maskar.env: every MASKAR_* switch parsed in one place, a bad value named."""

from __future__ import annotations

import pytest

from maskar import env
from maskar.config_base import ConfigError


def test_switches_take_0_1_or_unset_and_name_anything_else(monkeypatch):
    for name, sw in env.SWITCHES.items():
        default = sw.default
        monkeypatch.delenv(name, raising=False)
        assert env.switch(name) is default
        monkeypatch.setenv(name, "")
        assert env.switch(name) is default
        monkeypatch.setenv(name, "1")
        assert env.switch(name) is True and env.shown(name) == "on"
        monkeypatch.setenv(name, "0")
        assert env.switch(name) is False and env.shown(name) == "off"
        monkeypatch.setenv(name, "true")
        with pytest.raises(ConfigError, match=f"{name}: expected 0 or 1 \\(or unset\\), got 'true'"):
            env.switch(name)
        with pytest.raises(ConfigError, match=name):
            env.check()
        monkeypatch.delenv(name)
    env.check()


def test_unset_tristate_switches_say_what_unset_means(monkeypatch):
    monkeypatch.delenv("MASKAR_PSA_QKV", raising=False)
    monkeypatch.delenv("MASKAR_FUSED_GELU", raising=False)
    assert env.shown("MASKAR_PSA_QKV") == "in CUDA inference"
    assert env.shown("MASKAR_FUSED_GELU") == "each layer's default"


def test_margin_is_a_number_at_least_one(monkeypatch):
    monkeypatch.delenv(env.MARGIN, raising=False)
    assert env.margin() == env.MARGIN_DEFAULT
    monkeypatch.setenv(env.MARGIN, "1.25")
    assert env.margin() == 1.25
    for bad in ("0.99", "nan", "x"):
        with pytest.raises(ConfigError, match=f"{env.MARGIN}: expected a number >= 1, got '{bad}'"):
            env.margin(bad)
