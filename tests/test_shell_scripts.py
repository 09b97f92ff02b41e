"""The shell scripts users and the device calls run parse (``bash -n``), and the quality study's
shared helpers behave: a device call that dies on a syntax error costs minutes of GPU time."""

from __future__ import annotations

import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted({*ROOT.glob("scripts/*.sh"), *ROOT.glob("scripts/gpu/**/*.sh"), *ROOT.glob(".ci/*")})
BASH = shutil.which("bash")


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script: Path) -> None:
    r = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_unpack_idx_restores_the_carried_split(tmp_path: Path) -> None:
    """unpack_idx (scripts/gpu/quality/common.sh) unpacks .xz images and copies the rest as is."""
    carry = tmp_path / "carry"
    carry.mkdir()
    payload = bytes(range(256)) * 40
    with lzma.open(carry / "t10k-images-idx3-ubyte.xz", "wb") as f:
        f.write(payload)
    (carry / "t10k-labels-idx1-ubyte.gz").write_bytes(b"labels")
    dst = tmp_path / "out"
    cmd = f"source scripts/gpu/quality/common.sh && unpack_idx {carry} {dst}"
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable, "RUNS": str(tmp_path / "r")}
    env["OUT"] = str(tmp_path / "o")
    r = subprocess.run([BASH, "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (dst / "t10k-images-idx3-ubyte").read_bytes() == payload
    assert (dst / "t10k-labels-idx1-ubyte.gz").read_bytes() == b"labels"
    assert "data: ['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte.gz']" in r.stdout


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_fa4_rows_refuses_an_unknown_part_before_installing(tmp_path: Path) -> None:
    """A misspelt PART stops scripts/gpu/fa4_rows.sh at once (exit 2, the parts named), before
    the FlashAttention-4 unpack that needs both carried parts, not after minutes of the default."""
    env = {"PATH": "/usr/bin:/bin", "PART": "profile-1024", "OUT": str(tmp_path)}
    r = subprocess.run([BASH, "scripts/gpu/fa4_rows.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "profile1024" in r.stderr and "got profile-1024" in r.stderr
    assert "fa4_install" not in r.stderr


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("part", ["", "ab-1024"])
def test_membound_rows_refuses_a_missing_or_unknown_part(tmp_path: Path, part: str) -> None:
    """scripts/gpu/membound_rows.sh has no default part: a missing or misspelt PART stops at once
    (exit 2, the parts named) before nvidia-smi or any run."""
    env = {"PATH": "/usr/bin:/bin", "PART": part, "OUT": str(tmp_path)}
    script = "scripts/gpu/membound_rows.sh"
    r = subprocess.run([BASH, script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "sweep, ab256, ab1024 or gelu" in r.stderr and f"got '{part}'" in r.stderr
    assert r.stdout == ""
