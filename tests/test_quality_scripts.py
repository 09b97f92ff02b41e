"""The quality study's device scripts: the logic that runs before any GPU work, on the CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN_FID = ROOT / "scripts" / "gpu" / "quality_main_fid.sh"
MAR_CASMAR = ROOT / "scripts" / "gpu" / "quality_mar_casmar.sh"


def _picker(tmp_path: Path, rows: list[dict], model: str, env: dict[str, str] | None = None) -> str:
    """Run call 3's `temperature MODEL` function against a call-2 JSON holding ``rows``."""
    (tmp_path / "study").mkdir(exist_ok=True)
    (tmp_path / "study" / "mar_casmar.json").write_text(json.dumps({"rows": rows}))
    fn = re.search(r"^temperature\(\) \{\n.*?^\}\n", MAIN_FID.read_text(), re.S | re.M)
    assert fn, "quality_main_fid.sh lost its temperature() function"
    script = f"PY={sys.executable}; Q2_RUNS={tmp_path}\n{fn.group(0)}\ntemperature {model}\n"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TEMP")} | (env or {})
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=full_env, check=True)
    return out.stdout.strip()


def _row(model: str, fd: float, *overrides: str, name: str = "temperature") -> dict:
    return {
        "row": name,
        "model": model,
        "overrides": ["sample.cfg=2.0", *overrides],
        "metrics": {"FD_clf": fd},
    }


def test_picker_takes_the_lowest_fd_clf_point_with_its_cfg(tmp_path: Path) -> None:
    rows = [
        _row("casmar", 99.0, "sample.re_cfg=2.0", "sample.temperature=1.0"),
        _row(
            "casmar",
            80.9,
            "sample.re_cfg=2.0",
            "sample.temperature=0.8",
            "sample.cfg=4.0",
            "sample.re_cfg=4.0",
        ),
        _row("casmar", 85.0, "sample.re_cfg=2.0", "sample.temperature=0.6"),
        _row("casmar", 10.0, "sample.temperature=0.1", name="cfg"),  # another row: never picked
        _row("mar", 50.0, "sample.temperature=0.4"),  # another model
    ]
    # the later cfg / re_cfg win, as they do in maskar's override order
    assert _picker(tmp_path, rows, "casmar") == "sample.cfg=4.0 sample.re_cfg=4.0 sample.temperature=0.8"
    assert _picker(tmp_path, rows, "mar") == "sample.cfg=2.0 sample.temperature=0.4"


def test_picker_without_rows_or_when_told(tmp_path: Path) -> None:
    rows = [_row("mar", 50.0, "sample.temperature=0.4")]
    assert _picker(tmp_path, rows, "casmar") == ""  # no temperature rows: the checkpoint's own
    assert _picker(tmp_path, rows, "mar", {"TEMP": "official"}) == ""
    assert _picker(tmp_path, rows, "mar", {"TEMP_MAR": "0.7"}) == "sample.temperature=0.7"


@pytest.mark.parametrize("phase", ["bogus", "Train"])
def test_mar_casmar_rejects_an_unknown_phase(tmp_path: Path, phase: str) -> None:
    env = os.environ | {"PHASE": phase, "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs")}
    out = subprocess.run(["bash", str(MAR_CASMAR)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 2
    assert f"PHASE: expected all, train or study, got '{phase}'" in out.stderr


def test_study_phase_stops_when_the_train_phase_left_nothing(tmp_path: Path) -> None:
    env = os.environ | {"PHASE": "study", "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
                        "PY": sys.executable}  # fmt: skip
    out = subprocess.run(["bash", str(MAR_CASMAR)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 3
    assert "PHASE=train did not finish" in out.stdout
    assert not (tmp_path / "runs" / "fmnist").exists()  # stopped before unpacking any data
