"""Running a kernel test script under the Triton interpreter (TRITON_INTERPRET=1) in a subprocess.

The interpreter flag is read when Triton is imported, so the kernel tests run their cases in a fresh
interpreter; each case prints one ``RESULT {json}`` line with a ``case`` key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_under_interpreter(runner: str, timeout: int) -> dict:
    """Run ``runner`` (formatted with ``tests_dir``) under the interpreter; its results by case.
    Skips where Triton is missing or this process already runs under the interpreter."""
    import pytest

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter already enabled in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    code = runner.format(tests_dir=TESTS_DIR)
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    res = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            res[r.pop("case")] = r
    return res
