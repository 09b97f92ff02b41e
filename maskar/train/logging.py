"""Run logging: a human-readable ``log.txt`` and TensorBoard scalars (when installed)."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    return f"{v:.3e}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.4f}"


def max_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class RunLogger:
    """Writes only when ``enabled`` (rank 0). Lines go to ``out_dir/log.txt`` and the console."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "log.txt"
        self.tb = None
        self.tb_error: str | None = None
        self._console = print
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
            except ImportError as e:  # tensorboard is an optional extra
                self.tb_error = f"TensorBoard logging off ({e}); pip install tensorboard"

    def set_console(self, write) -> None:
        """Console writer (``tqdm.write`` while a progress bar is shown)."""
        self._console = write

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        with open(self.path, "a") as f:
            f.write(line + "\n")
        self._console(line)

    def scalars(self, step: int, total: int, values: dict[str, float]) -> None:
        """One log line ``step N/T | key value | ...`` and one TensorBoard scalar per key."""
        if not self.enabled:
            return
        self.info(f"step {step}/{total} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in values.items()))
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
