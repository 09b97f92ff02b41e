"""Shrink a checkpoint for shipping: cast its floating-point weights to bf16 / fp16 / fp32.

    maskar convert dtype src=RUN_OR_CKPT_DIR out=DIR [dtype=bf16] [ema=true] [shared_tokenizer=DIR]
        [model|sample|data.KEY=V]

Writes a plain model checkpoint (``model.safetensors`` + ``config.yaml``; the EMA weights
are merged in when ``ema=true`` and present). Models load such files in their own dtype,
so a bf16 checkpoint samples in fp32 on the CPU with bf16-rounded weights.

``shared_tokenizer=DIR`` leaves the tokenizer out of the written file and takes it, when the
checkpoint loads, from the generator checkpoint DIR (whose ``tokenizer.*`` weights must equal this
checkpoint's, after the cast, bit for bit): two shipped models over one tokenizer store it once.
The config's ``model.tokenizer_ckpt`` becomes DIR relative to ``out``, and the SHA-256 of DIR's
``model.safetensors`` is recorded, so loading fails if that file changes.

``model.*`` / ``sample.*`` / ``data.*`` overrides are written into the copied ``config.yaml``
(validated like any config): a shipped checkpoint's sampling defaults
(``sample.refine_num_sampling_steps=10``), or a tokenizer's measured latent scale
(``model.scale_factor=0.43``). A model override must not change the weights' shapes: the
checkpoint is loaded once with it to make sure.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from maskar.checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    SHARED_TOKENIZER_KEY,
    atomic_write_bytes,
    check_writable,
    load_model,
    load_tensors,
    read_config,
    read_metadata,
    resolve_checkpoint_dir,
    save_tensors,
    sha256_file,
    update_checksums,
)
from maskar.cli_args import bool_option, choice_option, str_option
from maskar.config import Config, ConfigError, apply_overrides, build, dump_yaml, parse_override, to_dict

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cast_checkpoint(
    src: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    ema: bool = True,
    overrides: list[str] | None = None,
    shared_tokenizer: str | Path | None = None,
) -> Path:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    src_dir = resolve_checkpoint_dir(src)
    out = Path(out)
    if out.resolve() in (src_dir.resolve(), Path(src).resolve()):
        raise ConfigError(f"out: {str(out)!r} is the source checkpoint; expected a different directory")
    check_writable(out, "out", directory=True)
    overrides = list(overrides or [])
    shared = None
    if shared_tokenizer is not None:  # checked before anything is written
        shared = Path(shared_tokenizer)
        if not (shared / MODEL_FILE).is_file():
            raise ConfigError(f"shared_tokenizer: {str(shared)!r} is not a checkpoint directory "
                              f"(no {MODEL_FILE})")
        rel = os.path.relpath(shared.resolve(), out.resolve())
        overrides.append(f"model.tokenizer_ckpt={rel}")
    config_text = (src_dir / CONFIG_FILE).read_bytes()
    if overrides:  # checked before anything is written
        cfg = build(Config, apply_overrides(to_dict(read_config(src_dir)), overrides))
        config_text = dump_yaml(cfg).encode()
    state = load_tensors(src_dir / MODEL_FILE)
    if ema and (src_dir / EMA_FILE).is_file():
        state.update(load_tensors(src_dir / EMA_FILE))
    target = DTYPES[dtype]
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    metadata = read_metadata(src_dir / MODEL_FILE)
    if shared is not None:
        state = _without_shared_tokenizer(state, shared)
        metadata[SHARED_TOKENIZER_KEY] = sha256_file(shared / MODEL_FILE)
    out.mkdir(parents=True, exist_ok=True)
    digest = save_tensors(out / MODEL_FILE, state, metadata)
    config = atomic_write_bytes(out / CONFIG_FILE, config_text)
    if (out / EMA_FILE).exists():
        os.unlink(out / EMA_FILE)  # merged into model.safetensors above
    update_checksums(out, {MODEL_FILE: digest, CONFIG_FILE: config, EMA_FILE: None})
    if overrides:
        load_model(out)  # the overridden config must still describe these weights
    return out


def _without_shared_tokenizer(state: dict[str, torch.Tensor], shared: Path) -> dict[str, torch.Tensor]:
    """``state`` less its ``tokenizer.*`` tensors, which must equal ``shared``'s bit for bit."""
    theirs = {k: v for k, v in load_tensors(shared / MODEL_FILE).items() if k.startswith("tokenizer.")}
    ours = {k: v for k, v in state.items() if k.startswith("tokenizer.")}
    if not ours:
        raise ConfigError("shared_tokenizer: the source checkpoint bundles no tokenizer.* weights to share")
    if set(ours) != set(theirs):
        missing = sorted(set(ours) ^ set(theirs))[:3]
        raise ConfigError(f"shared_tokenizer: {shared} holds other tokenizer weights (e.g. {missing})")
    for k, v in ours.items():
        if v.dtype != theirs[k].dtype or v.shape != theirs[k].shape or not torch.equal(v, theirs[k]):
            raise ConfigError(
                f"shared_tokenizer: {k} differs from {shared}'s ({theirs[k].dtype} "
                f"{tuple(theirs[k].shape)}); the tokenizers must be the same weights in the same dtype"
            )
    return {k: v for k, v in state.items() if not k.startswith("tokenizer.")}


def parse(argv: list[str]) -> tuple[dict[str, object], list[str]]:
    """The argument checks of :func:`cli`, reading no file: ``(options, overrides)``; the
    overrides are validated against the source's config by :func:`cast_checkpoint`."""
    opts = {"src": None, "out": None, "dtype": "bf16", "ema": True, "shared_tokenizer": None}
    overrides = []
    for item in argv:
        path, value = parse_override(item)
        if len(path) > 1 and path[0] in ("model", "sample", "data"):
            overrides.append(item)
            continue
        if len(path) != 1 or path[0] not in opts:
            raise ConfigError(
                f"convert dtype: unknown option {item!r}; options: {sorted(opts)}, model.*, sample.*, data.*"
            )
        opts[path[0]] = value
    if not opts["src"] or not opts["out"]:
        raise ConfigError("convert dtype: give src=DIR and out=DIR")
    checked = {  # checked in this order
        "src": str_option(opts["src"], "src"),
        "out": str_option(opts["out"], "out"),
        "dtype": choice_option(opts["dtype"], "dtype", tuple(DTYPES)),
        "shared_tokenizer": (
            str_option(opts["shared_tokenizer"], "shared_tokenizer") if opts["shared_tokenizer"] else None
        ),
        "ema": bool_option(opts["ema"], "ema"),
    }
    return checked, overrides


def cli(argv: list[str]) -> int:
    opts, overrides = parse(argv)
    out = cast_checkpoint(
        opts["src"], opts["out"], opts["dtype"], opts["ema"], overrides, opts["shared_tokenizer"]
    )
    print(f"wrote {out} ({opts['dtype']}{'; ' + ' '.join(overrides) if overrides else ''})")
    return 0
