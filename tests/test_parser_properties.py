"""Property-based tests (hypothesis) of the parsers behind every user-facing value: ``key=value``
overrides and the config they build, ``labels=``, ``mask=box:`` and HMAR mask schedules.

Each parser is total: any input gives a valid result or one ``ConfigError``, never another
exception, and valid inputs round-trip unchanged (docs/reliability.md).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskar.config import Config, ConfigError, build, dump_yaml, load_config, to_dict

PROPS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
_yaml_scalars = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True)
    .map(repr)
    .map(lambda s: s.replace("inf", ".inf").replace("nan", ".nan")),
    st.sampled_from(
        ["true", "false", "null", "maybe", "", "[]", "{}", "[1, 2]", "[0.9, 0.99]", "abc", "1e-4"]
    ),
    st.text(max_size=12),
)


@PROPS
@given(st.text(max_size=40))
def test_parse_override_is_total(item: str) -> None:
    from maskar.config import parse_override

    try:
        path, _ = parse_override(item)
    except ConfigError:
        return
    assert ".".join(path) == item.split("=", 1)[0].strip()


def _dotted_keys(preset: str = "hmar-tiny") -> list[str]:
    cfg = to_dict(load_config(preset))
    out = []

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out.append(prefix + k)

    walk(cfg, "")
    return sorted(out)


KEYS = _dotted_keys()


@settings(PROPS, max_examples=60)
@given(st.sampled_from(KEYS), _yaml_scalars)
def test_config_override_is_validated_or_refused(key: str, value: str) -> None:
    """Any value for any key: a Config whose floats are finite and that survives a YAML round
    trip unchanged, or one ConfigError; never another exception."""
    try:
        cfg = load_config("hmar-tiny", [f"{key}={value}"])
    except ConfigError:
        return
    flat = json.dumps(to_dict(cfg))
    assert "NaN" not in flat and "Infinity" not in flat
    assert to_dict(build(Config, yaml.safe_load(dump_yaml(cfg)))) == to_dict(cfg)


@PROPS
@given(st.lists(st.integers(-5, 30), max_size=8), st.integers(1, 20))
def test_labels_in_range_or_refused(ids: list[int], num_classes: int) -> None:
    from maskar.cli_args import parse_labels

    text = ",".join(map(str, ids))
    for value in (text, ids):
        try:
            got = parse_labels(value, num_classes)
        except ConfigError:
            assert not ids or any(not 0 <= v < num_classes for v in ids)
            continue
        assert got == ids and all(0 <= v < num_classes for v in got)


@PROPS
@given(
    st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.booleans(), st.lists(st.text(max_size=3)))
)
def test_labels_parser_is_total(value) -> None:
    from maskar.cli_args import parse_labels

    try:
        got = parse_labels(value, 10)
    except ConfigError:
        return
    assert got and all(isinstance(v, int) and 0 <= v < 10 for v in got)


@st.composite
def _schedules(draw):
    sides = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    sched = []
    for pn in sides:
        total, parts = pn * pn, []
        while total:
            k = draw(st.integers(1, total))
            parts.append(k)
            total -= k
        sched.append(parts)
    return sides, sched


@PROPS
@given(_schedules(), st.integers(0, 3), st.integers(-2, 2))
def test_mask_schedule_valid_accepted_and_any_change_refused(case, where: int, delta: int) -> None:
    from maskar.models.hmar import validate_mask_schedule

    sides, sched = case
    assert validate_mask_schedule(sched, tuple(sides)) == sched
    broken = [list(e) for e in sched]
    si = where % len(sides)
    broken[si][-1] += delta
    if delta:
        with pytest.raises(ConfigError, match=rf"mask_schedule\[{si}\]"):
            validate_mask_schedule(broken, tuple(sides))
    with pytest.raises(ConfigError, match="expected"):
        validate_mask_schedule(sched[:-1] if len(sched) > 1 else sched + [[1]], tuple(sides))


@PROPS
@given(
    st.recursive(st.one_of(st.integers(-3, 40), st.booleans(), st.text(max_size=2)), st.lists, max_leaves=12)
)
def test_mask_schedule_any_value_is_refused_or_valid(value) -> None:
    from maskar.models.hmar import validate_mask_schedule

    sides = (1, 2, 3)
    try:
        got = validate_mask_schedule(value, sides)
    except ConfigError:
        return
    assert [sum(e) for e in got] == [pn * pn for pn in sides]


@PROPS
@given(st.text(max_size=30), st.integers(1, 64))
def test_box_mask_parser_is_total(spec: str, size: int) -> None:
    from maskar.sampling import parse_mask

    try:
        keep = parse_mask("box:" + spec, size)
    except ConfigError:
        return
    assert keep.shape == (1, 1, size, size) and keep.dtype == torch.bool


@PROPS
@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_box_mask_valid_boxes(a: float, b: float, c: float, d: float) -> None:
    from maskar.sampling import parse_mask

    x0, x1, y0, y1 = min(a, b), max(a, b), min(c, d), max(c, d)
    spec = f"box:{x0},{y0},{x1},{y1}"
    if x0 == x1 or y0 == y1:
        with pytest.raises(ConfigError):
            parse_mask(spec, 16)
        return
    keep = parse_mask(spec, 16)
    inside = (~keep).sum().item()
    assert inside == (round(y1 * 16) - round(y0 * 16)) * (round(x1 * 16) - round(x0 * 16))
