"""Test-session settings shared by every test file."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The README's test command runs the suite in several pytest-xdist processes. Each keeps one
    # intra-op thread: with torch's default (every core in each process) the OpenMP pools spun
    # against each other, and two processes on two cores took longer than one (11.1 against
    # 10.6 min; 5.0 min with one thread each, README.md).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
