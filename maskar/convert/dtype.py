"""Shrink a checkpoint for shipping: cast its floating-point weights to bf16 / fp16 / fp32.

    maskar convert dtype src=RUN_OR_CKPT_DIR out=DIR [dtype=bf16] [ema=true]

Writes a plain model checkpoint (``model.safetensors`` + ``config.yaml``; the EMA weights
are merged in when ``ema=true`` and present). Models load such files in their own dtype,
so a bf16 checkpoint samples in fp32 on the CPU with bf16-rounded weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from maskar.checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    load_tensors,
    read_metadata,
    resolve_checkpoint_dir,
    save_tensors,
)
from maskar.config import ConfigError, parse_override

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cast_checkpoint(src: str | Path, out: str | Path, dtype: str = "bf16", ema: bool = True) -> Path:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    src_dir = resolve_checkpoint_dir(src)
    state = load_tensors(src_dir / MODEL_FILE)
    if ema and (src_dir / EMA_FILE).is_file():
        state.update(load_tensors(src_dir / EMA_FILE))
    target = DTYPES[dtype]
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / MODEL_FILE, state, read_metadata(src_dir / MODEL_FILE))
    shutil.copyfile(src_dir / CONFIG_FILE, out / CONFIG_FILE)
    return out


def cli(argv: list[str]) -> int:
    opts = {"src": None, "out": None, "dtype": "bf16", "ema": True}
    for item in argv:
        path, value = parse_override(item)
        if len(path) != 1 or path[0] not in opts:
            raise ConfigError(f"convert dtype: unknown option {item!r}; options: {sorted(opts)}")
        opts[path[0]] = value
    if not opts["src"] or not opts["out"]:
        raise ConfigError("convert dtype: give src=DIR and out=DIR")
    out = cast_checkpoint(str(opts["src"]), str(opts["out"]), str(opts["dtype"]), bool(opts["ema"]))
    print(f"wrote {out} ({opts['dtype']})")
    return 0
