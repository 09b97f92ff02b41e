"""A snippet run in a fresh interpreter with one MASKAR_* switch set or unset: the switches are
read when their module is imported, so a test of a switch's effect needs a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_line_with(name: str, value: str | None, code: str) -> str:
    """The last line ``python -c code`` prints, run from the repository root with the environment
    variable ``name`` set to ``value`` (None: unset) and the rest of this process's environment."""
    env = {k: v for k, v in os.environ.items() if k != name}
    if value is not None:
        env[name] = value
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)  # fmt: skip
    return run.stdout.strip().splitlines()[-1]
