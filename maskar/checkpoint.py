"""Checkpoint directories: ``model.safetensors`` + ``config.yaml`` (+ ``ema.safetensors``,
``trainer_state.pt``), atomic writes, strict loading with one readable error.

Layout of a model checkpoint directory::

    config.yaml         the full resolved Config (maskar.config.dump_yaml)
    model.safetensors   model.state_dict() (persistent tensors only)
    ema.safetensors     optional: EMA values of the trained parameters (a subset of the
                        model keys; loading overlays them on model.safetensors)
    trainer_state.pt    optional: optimizer(s), scaler, RNG states, step, data position
    dcp/                a run sharded with FSDP2: weights, EMA and optimizer state as a
                        ``torch.distributed.checkpoint`` (one file per rank + ``.metadata``),
                        loadable on any number of ranks (resharded on load). trainer_state.pt then
                        holds everything else (optimizer hyper-parameters, RNG, step); the
                        safetensors files are the gathered weights, for sampling and evaluation

    SHA256SUMS          the SHA-256 of the tensor files, the trainer state and each dcp/ file
                        (``sha256sum -c`` format), verified on load (``verify=False`` skips it); checkpoints
                        without it load unverified. config.yaml is left out: it is meant to be
                        readable and editable, and every value in it is validated on load

A training run directory holds ``step-XXXXXXX/`` checkpoint directories, a ``latest``
text file naming the newest one, ``config.yaml`` (the run's config: its ``model.arch`` is the
architecture the directory belongs to) and, while a trainer runs, a ``.lock`` file.
:func:`load_model` accepts either kind of directory.

Every file is written to a temporary name in the same directory and moved into place
with ``os.replace``; a step directory is assembled under a temporary name and renamed,
and ``latest`` is updated last. A crash therefore leaves either the old or the new
checkpoint, never a half-written one (and at worst a ``.step-*.tmp`` directory, which the
next trainer on the directory removes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from maskar.config import Config, ConfigError, build, dump_yaml

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"
TRAINER_STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
SUMS_FILE = "SHA256SUMS"
LOCK_FILE = ".lock"
DCP_DIR = "dcp"
STEP_PREFIX = "step-"
_STEP_RE = re.compile(r"step-\d+")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked (missing, wrong architecture, wrong keys).

    Subclasses :class:`ConfigError` so the CLI reports it as a user error, not a traceback.
    """


# ----------------------------------------------------------------------------- atomic writes


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible on every OS/filesystem, hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[io.BufferedWriter], None]) -> str:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    Returns the SHA-256 of what was written (read back from the page cache for a writer function).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        digest = hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else sha256_file(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return digest


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _write_denied(path: Path) -> str | None:
    """Why ``path`` (an existing file or directory) cannot be written, or None."""
    mode = path.stat().st_mode
    # Root passes os.access everywhere; a file or folder with no write bit is still meant read-only.
    if not os.access(path, os.W_OK) or not mode & 0o222:
        return f"is read-only (mode {mode & 0o777:o})"
    return None


def check_writable(path: str | os.PathLike, key: str, directory: bool = False) -> Path:
    """Fail now, with one message naming ``key``, if ``path`` cannot be written later.

    ``directory=False``: a file name (its folders are created on write); ``directory=True``: a
    folder that will hold files. The nearest existing folder is probed by creating and removing
    a temporary file in it, which also catches read-only mounts and pseudo filesystems (/proc).
    """
    p = Path(path)
    if directory:
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{key}: {str(p)!r} is a file; expected a directory")
        folder = p
    else:
        if p.is_dir():
            raise ConfigError(f"{key}: {str(p)!r} is a directory; expected a file name")
        if p.exists() or p.is_symlink():
            why = _write_denied(p) if p.exists() else None
            if why:
                raise ConfigError(f"{key}: {str(p)!r} {why}; remove it or choose another name")
        folder = p.parent
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: cannot create {str(p)!r}: {str(existing)!r} is a file")
    why = _write_denied(existing)
    if why:
        raise ConfigError(f"{key}: cannot write {str(p)!r}: folder {str(existing)!r} {why}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".maskar-write-probe.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write {str(p)!r}: {e.strerror or e}") from None
    return p


# ----------------------------------------------------------------------------- content hashes


def _listed_name_ok(name: str) -> bool:
    """A file of the checkpoint directory itself, or one inside its ``dcp/`` folder."""
    parts = name.split("/")
    if len(parts) == 2 and parts[0] != DCP_DIR:
        return False
    return len(parts) <= 2 and all(p not in ("", ".", "..") for p in parts)


def read_checksums(directory: str | os.PathLike) -> dict[str, str] | None:
    """``{file name: sha256}`` from ``directory/SHA256SUMS``, or None when there is none."""
    path = Path(directory) / SUMS_FILE
    if not path.is_file():
        return None
    sums = {}
    for line in path.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not _listed_name_ok(name):
            raise CheckpointError(f"checkpoint {directory}: {SUMS_FILE} is malformed (line {line!r})")
        sums[name] = digest
    return sums


def update_checksums(directory: str | os.PathLike, digests: Mapping[str, str | None]) -> None:
    """Set (or with None remove) entries of ``directory/SHA256SUMS``, written atomically."""
    directory = Path(directory)
    try:
        sums = read_checksums(directory) or {}
    except CheckpointError:
        sums = {}
    for name, digest in digests.items():
        if digest is None:
            sums.pop(name, None)
        else:
            sums[name] = digest
    sums = {n: d for n, d in sums.items() if (directory / n).is_file()}
    atomic_write_text(directory / SUMS_FILE, "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))


def verify_file(directory: str | os.PathLike, name: str) -> None:
    """Check ``directory/name`` against ``SHA256SUMS`` (no-op for a checkpoint without one)."""
    sums = read_checksums(directory)
    if sums is None:
        return
    if name not in sums:
        raise CheckpointError(
            f"checkpoint {directory}: {name} is not listed in {SUMS_FILE}; it was not written with the "
            f"checkpoint (verify=false / train.verify_checkpoints=false skips this check)"
        )
    if sha256_file(Path(directory) / name) != sums[name]:
        raise CheckpointError(
            f"checkpoint {directory}: {name} does not match its SHA-256 in {SUMS_FILE}: the file was "
            f"changed or corrupted after it was written (if you changed it on purpose, delete "
            f"{SUMS_FILE}; verify=false / train.verify_checkpoints=false skips this check)"
        )


# ----------------------------------------------------------------------------- tensors <-> safetensors


def _cpu_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors with no shared storage (safetensors refuses aliasing).

    Tied weights (two names, one tensor) are written twice; loading copies the same values
    into both names, which keeps the tie.
    """
    out: dict[str, Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, t in state.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, expected a tensor")
        t = t.detach()
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        whole = (
            t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        )
        if t.device.type != "cpu":
            t = t.to("cpu")  # a fresh tensor
        elif key in seen or not whole:
            t = t.contiguous().clone()
        seen.add(key)
        out[name] = t
    return out


def save_tensors(
    path: str | os.PathLike, state: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Atomically write a safetensors file; returns its SHA-256."""
    return atomic_write_bytes(path, safetensors_bytes(_cpu_state(state), metadata=metadata))


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {first}")


def load_tensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True
) -> dict[str, Tensor]:
    """All tensors of a safetensors file; with ``verify``, checked against its folder's SHA256SUMS."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if verify:
        verify_file(path.parent, path.name)
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None
    return out


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape from a safetensors header, without reading any tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise _unreadable(Path(path), e) from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise _unreadable(Path(path), e) from None


# ----------------------------------------------------------------------------- strict loading


def _short_list(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def state_dict_mismatch(module: nn.Module, state_dict: Mapping[str, Tensor]) -> str | None:
    """One human-readable line about missing / unexpected / mis-shaped keys, or None."""
    saved = {k: tuple(v.shape) for k, v in state_dict.items()}
    return shape_mismatch(saved, {k: tuple(v.shape) for k, v in module.state_dict().items()}, "model")


def shape_mismatch(saved: Mapping[str, tuple], expected: Mapping[str, tuple], what: str) -> str | None:
    """Missing / unexpected / mis-shaped names of ``saved`` (a checkpoint) against ``expected``."""
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {saved[k]} vs {what} {expected[k]})"
        for k in expected
        if k in saved and saved[k] != expected[k]
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
    if mis_shaped:
        parts.append(f"{len(mis_shaped)} shape mismatch(es): {_short_list(mis_shaped, 3)}")
    return "; ".join(parts) or None


def load_state_dict_checked(
    module: nn.Module, state_dict: Mapping[str, Tensor], context: str = "checkpoint"
) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with every problem in one message."""
    problem = state_dict_mismatch(module, state_dict)
    if problem:
        raise CheckpointError(f"{context}: weights do not match {type(module).__name__}: {problem}")
    module.load_state_dict(state_dict, strict=True)


def load_subset_checked(module: nn.Module, state_dict: Mapping[str, Tensor], context: str) -> None:
    """Overlay a subset of the module's keys (e.g. EMA parameters); unknown or mis-shaped keys fail."""
    expected = module.state_dict()
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k} (file {tuple(v.shape)} vs model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
    if mis_shaped:
        parts.append(f"{len(mis_shaped)} shape mismatch(es): {_short_list(mis_shaped, 3)}")
    if parts:
        raise CheckpointError(f"{context}: weights do not match {type(module).__name__}: {'; '.join(parts)}")
    module.load_state_dict(dict(state_dict), strict=False)


# ----------------------------------------------------------------------------- model checkpoints


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_model(
    directory: str | os.PathLike,
    model: nn.Module,
    cfg: Config,
    ema_state: Mapping[str, Tensor] | None = None,
    model_state: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``model.safetensors`` (+ ``ema.safetensors``) and ``config.yaml`` into ``directory``.

    Each file is replaced atomically. Only persistent tensors are saved (``state_dict``, or
    ``model_state`` when given: the gathered weights of a sharded model).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "arch": str(cfg.model.arch)}
    digests: dict[str, str | None] = {}
    weights = model_state if model_state is not None else unwrap_model(model).state_dict()
    digests[MODEL_FILE] = save_tensors(directory / MODEL_FILE, weights, meta)
    if ema_state is not None:
        digests[EMA_FILE] = save_tensors(directory / EMA_FILE, ema_state, meta)
    else:
        digests[EMA_FILE] = None
        if (directory / EMA_FILE).exists():
            os.unlink(directory / EMA_FILE)  # a stale EMA file would be loaded in place of the new weights
    atomic_write_text(directory / CONFIG_FILE, dump_yaml(cfg))
    update_checksums(directory, digests)
    return directory


def resolve_checkpoint_dir(directory: str | os.PathLike) -> Path:
    """A model checkpoint dir; a run dir (with a ``latest`` pointer) resolves to its newest checkpoint."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} is a file; expected a directory with {MODEL_FILE}")
    if not (directory / MODEL_FILE).exists():
        latest = latest_checkpoint(directory)
        if latest is not None:
            return latest
    return directory


def read_config(directory: str | os.PathLike) -> Config:
    """The validated Config of a checkpoint directory."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_FILE} is missing")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return build(Config, data)
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {directory}: cannot read {CONFIG_FILE} ({e})") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_FILE} is not valid YAML: {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_FILE}: {e}") from None


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def describe_checkpoint(directory: str | os.PathLike, verify: bool = True) -> list[str]:
    """What ``maskar info ckpt=DIR`` prints: architecture, parameters (read from the safetensors
    header, no weights loaded), dtypes, integrity, the training run and the stored sampling defaults."""
    d = resolve_checkpoint_dir(directory)
    cfg = read_config(d)
    path = d / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {d}: {MODEL_FILE} is missing")
    sums = read_checksums(d)
    if sums is not None and verify:
        for name in sorted(sums):
            verify_file(d, name)  # raises, naming the file, on a mismatch
        integrity = f"{SUMS_FILE}: {len(sums)} file(s) verified"
    elif sums is not None:
        integrity = f"{SUMS_FILE}: present, not checked (verify=false)"
    else:
        integrity = f"no {SUMS_FILE}: integrity not checkable"
    counts = {"generator": 0, "tokenizer": 0}
    dtypes: dict[str, int] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                n = math.prod(sl.get_shape())
                counts["tokenizer" if k.startswith("tokenizer.") else "generator"] += n
                dtypes[sl.get_dtype()] = dtypes.get(sl.get_dtype(), 0) + n
    except (SafetensorError, OSError) as e:
        raise _unreadable(path, e) from None
    model, train = cfg.model, cfg.train
    tok = getattr(model, "tokenizer", None)
    tok_ckpt = getattr(model, "tokenizer_ckpt", None)
    pinned = read_metadata(path).get(SHARED_TOKENIZER_KEY)
    if counts["tokenizer"]:
        tok_text = f" + {_count(counts['tokenizer'])} tokenizer ({getattr(tok, 'arch', '?')}, bundled)"
    elif pinned is not None:
        src_file = shared_tokenizer_source(d, cfg) / MODEL_FILE
        ok = _matches_pin(src_file, pinned)
        state = "pinned file present" if ok else "MISSING or CHANGED: this checkpoint will not load"
        tok_text = f"; tokenizer {getattr(tok, 'arch', '?')} shared with {src_file.parent} ({state})"
    elif tok is not None:
        tok_text = f"; tokenizer {getattr(tok, 'arch', '?')} not bundled (model.tokenizer_ckpt={tok_ckpt})"
    else:
        tok_text = ""
    total = sum(dtypes.values()) or 1  # a file of no tensors lists no dtype
    by_dtype = ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in sorted(dtypes.items())) or "no tensors"
    lines = [f"checkpoint {d}" + ("" if d == Path(directory) else f" (the newest of run {directory})")]
    lines.append(f"architecture {model.arch}")
    lines.append(f"parameters {_count(counts['generator'])} generator{tok_text}")
    lines.append(f"weights {MODEL_FILE} {path.stat().st_size / 1e6:.1f} MB ({by_dtype}); {integrity}")
    lines.append(
        f"training run: {train.steps} steps x batch {train.batch_size}, ema {train.ema}, precision "
        f"{train.precision}"
    )
    if (d / "README.md").is_file():
        lines.append(f"README: {d / 'README.md'}")
    sample = dump_yaml(cfg.sample).rstrip("\n")
    lines.append("sampling defaults (sample.KEY=VALUE overrides them):")
    lines += ["  " + line for line in sample.splitlines()]
    return lines


SHARED_TOKENIZER_KEY = "shared_tokenizer_sha256"  # model.safetensors metadata: the pinned source file


def shared_tokenizer_source(directory: str | os.PathLike, cfg: Config) -> Path:
    """The checkpoint a tokenizer-sharing checkpoint takes its tokenizer from: ``model.tokenizer_ckpt``,
    relative to ``directory`` unless absolute."""
    ref = getattr(cfg.model, "tokenizer_ckpt", None)
    if not ref:
        raise CheckpointError(
            f"checkpoint {directory}: its weights name a shared tokenizer but config.yaml sets no "
            f"model.tokenizer_ckpt"
        )
    return Path(os.path.normpath(Path(directory) / ref))  # an absolute ref replaces directory


def _matches_pin(path: Path, pinned: str) -> bool:
    return path.is_file() and sha256_file(path) == pinned


def shared_tokenizer_state(
    directory: str | os.PathLike, cfg: Config, metadata: Mapping[str, str]
) -> dict[str, Tensor]:
    """The ``tokenizer.*`` tensors of a checkpoint that shares another checkpoint's tokenizer
    (written by ``maskar convert dtype shared_tokenizer=DIR``; empty for every other checkpoint).

    The source is pinned: its ``model.safetensors`` must have the SHA-256 recorded when the
    sharing checkpoint was written, so a changed source fails loudly instead of decoding with
    another tokenizer (a check stronger than the source's own SHA256SUMS, which is not read again).
    """
    pinned = metadata.get(SHARED_TOKENIZER_KEY)
    if pinned is None:
        return {}
    source = shared_tokenizer_source(directory, cfg)
    path = source / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {directory}: its tokenizer is shared with {source} (model.tokenizer_ckpt), "
            f"which has no {MODEL_FILE}"
        )
    if not _matches_pin(path, pinned):
        raise CheckpointError(
            f"checkpoint {directory}: the shared tokenizer's source {path} is not the file it was written "
            f"against (SHA-256 {pinned[:12]}...); restore that checkpoint or re-export this one"
        )
    tok = {k: v for k, v in load_tensors(path, verify=False).items() if k.startswith("tokenizer.")}
    if not tok:
        raise CheckpointError(f"checkpoint {directory}: {path} holds no tokenizer.* weights to share")
    return tok


def load_model(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    prefer_ema: bool = True,
    arch: str | None = None,
    verify: bool = True,
) -> tuple[nn.Module, Config]:
    """Rebuild the model from ``config.yaml`` and load its weights strictly.

    ``prefer_ema``: overlay ``ema.safetensors`` when present. ``arch``: the architecture
    the caller expects; another one is an error. ``verify``: check every file read against
    the directory's ``SHA256SUMS`` (skip for huge files you trust). Returns
    ``(model in eval mode, config)``.
    """
    from maskar.registry import build_model

    directory = resolve_checkpoint_dir(directory)
    cfg = read_config(directory)
    if arch is not None and cfg.model.arch != arch:
        raise CheckpointError(
            f"checkpoint {directory} holds a {cfg.model.arch!r} model, expected a {arch!r} model"
        )
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {directory}: {MODEL_FILE} is missing")
    saved_arch = read_metadata(weights).get("arch")
    if saved_arch is not None and saved_arch != cfg.model.arch:
        raise CheckpointError(
            f"checkpoint {directory}: {MODEL_FILE} was written by a {saved_arch!r} model but "
            f"{CONFIG_FILE} says model.arch={cfg.model.arch!r}"
        )
    model = build_model(cfg.model)
    state = load_tensors(weights, verify=verify)
    state.update(shared_tokenizer_state(directory, cfg, read_metadata(weights)))
    load_state_dict_checked(model, state, context=f"checkpoint {directory}")
    if prefer_ema and (directory / EMA_FILE).is_file():
        ema = load_tensors(directory / EMA_FILE, verify=verify)
        load_subset_checked(model, ema, context=f"checkpoint {directory} ({EMA_FILE})")
    model.to(device).eval()
    return model, cfg


# ----------------------------------------------------------------------------- trainer state


def unpickling_reason(e: BaseException) -> str:
    """The diagnosis in torch's weights-only refusal, without its advice on how to unpickle anyway."""
    line = next((ln for ln in str(e).splitlines() if "WeightsUnpickler error" in ln), "")
    return re.sub(r"\x1b\[[0-9;]*m", "", line).split(". ")[0].strip()


def save_trainer_state(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``trainer_state.pt``. Content must be tensors and plain Python values
    (dict/list/tuple/str/int/float/bool/None) so it loads with ``weights_only=True``."""
    path = Path(directory) / TRAINER_STATE_FILE
    digest = atomic_write_bytes(path, lambda f: torch.save(state, f))
    update_checksums(directory, {TRAINER_STATE_FILE: digest})
    return path


def load_trainer_state(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {TRAINER_STATE_FILE} is missing (cannot resume)")
    if verify:
        verify_file(directory, TRAINER_STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: not a maskar trainer state (weights-only load refused it: {unpickling_reason(e)})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch file (truncated or corrupt?): {e}") from None


# ----------------------------------------------------------------------------- sharded state (DCP)

# What ``torch.distributed.checkpoint``'s ``.metadata`` pickle may name: DCP's own data classes, torch
# dtypes / sizes / layouts and paths. Anything else is refused before DCP unpickles the file.
_DCP_MODULE = "torch.distributed.checkpoint."
_DCP_OTHER_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name) if self._allowed(module, name) else None
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")
        return obj

    @staticmethod
    def _allowed(module: str, name: str) -> bool:
        if (module, name) in _DCP_OTHER_GLOBALS:
            return True
        if module == "torch":
            return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        if module.startswith(_DCP_MODULE) and not name.startswith("__"):
            import importlib

            return isinstance(getattr(importlib.import_module(module), name, None), type)
        return False


_ONE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def has_distributed_state(directory: str | os.PathLike) -> bool:
    """True for a checkpoint written by a sharded (FSDP2) run."""
    return (Path(directory) / DCP_DIR / ".metadata").is_file()


def distributed_files(directory: str | os.PathLike) -> list[str]:
    """``dcp/<file>`` names of the sharded state's files, sorted."""
    folder = Path(directory) / DCP_DIR
    return sorted(f"{DCP_DIR}/{p.name}" for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def save_distributed(directory: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dicts of tensors / DTensors) to ``directory/dcp``; every rank calls.

    Each rank writes its own shards (replicated tensors once); files are fsynced. Only tensors:
    other values belong in ``trainer_state.pt`` (loaded weights-only), never in the DCP pickle.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    bad = [k for k, v in _flatten(state) if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(
            f"save_distributed: only tensors are stored, got non-tensor entries {_short_list(bad)}"
        )
    no_dist = not (dist.is_available() and dist.is_initialized())
    writer = dcp.FileSystemWriter(str(Path(directory) / DCP_DIR), sync_files=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS_WARNING)  # one process is intended
        dcp.save(state, storage_writer=writer, no_dist=no_dist)


def _flatten(state: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in state.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, Mapping) else [(key, v)]
    return out


def read_distributed_metadata(directory: str | os.PathLike) -> Any:
    """The ``dcp/.metadata`` of a checkpoint, unpickled with an allow-list; tensors only."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = Path(directory) / DCP_DIR / ".metadata"
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {directory}: {DCP_DIR}/.metadata is missing (an interrupted save?)"
        )
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not a maskar distributed checkpoint ({e})") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not readable (truncated or corrupt?): {e}") from None
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path}: not a distributed checkpoint's metadata ({type(meta).__name__})")
    other = [k for k, v in meta.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if other:
        raise CheckpointError(
            f"{path}: holds non-tensor entries {_short_list(other)}; maskar stores only tensors"
        )
    return meta


def check_distributed_state(meta: Any, part: str, expected: Mapping[str, Tensor], context: str) -> None:
    """The ``part`` entries of a DCP checkpoint must match ``expected`` (names and global shapes)."""
    n = len(part) + 1
    saved = {k[n:]: tuple(v.size) for k, v in meta.state_dict_metadata.items() if k.startswith(part + ".")}
    problem = shape_mismatch(saved, {k: tuple(v.shape) for k, v in _flatten(expected)}, "run")
    if problem:
        raise CheckpointError(f"{context}: the sharded {part} state does not match this run: {problem}")


def load_distributed(directory: str | os.PathLike, state: dict[str, Any]) -> None:
    """Fill ``state`` (tensors / DTensors, any sharding) in place from ``directory/dcp``.

    Every rank calls; each reads the parts of the saved shards its own shards overlap, so a
    checkpoint saved on N ranks loads on M. Call :func:`read_distributed_metadata` first.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    no_dist = not (dist.is_available() and dist.is_initialized())
    reader = dcp.FileSystemReader(str(Path(directory) / DCP_DIR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ONE_PROCESS_WARNING)
            dcp.load(state, storage_reader=reader, no_dist=no_dist)
    except (RuntimeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {directory}: cannot read {DCP_DIR}/ ({first})") from None


# ----------------------------------------------------------------------------- run directories


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def list_step_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run dir, oldest first."""
    run_dir = Path(run_dir)
    out = []
    if not run_dir.is_dir():
        return out
    for p in run_dir.iterdir():
        if p.is_dir() and not p.is_symlink() and _STEP_RE.fullmatch(p.name):
            out.append((int(p.name[len(STEP_PREFIX) :]), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``run_dir/latest`` (or the newest ``step-*`` dir), or None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        # The pointer names a sibling step directory, nothing else: never a path out of the run dir.
        if not _STEP_RE.fullmatch(name):
            raise CheckpointError(
                f"{pointer} names {name!r}; expected a step-XXXXXXX directory inside {run_dir} "
                f"(fix or delete the file)"
            )
        target = run_dir / name
        if target.is_symlink():
            raise CheckpointError(f"{target} is a symbolic link; a run's step directories must be real")
        if (target / MODEL_FILE).is_file():
            return target
    steps = [p for _, p in list_step_checkpoints(run_dir) if (p / MODEL_FILE).is_file()]
    return steps[-1] if steps else None


def save_step_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    cfg: Config,
    trainer_state: dict[str, Any] | None = None,
    ema_state: Mapping[str, Tensor] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``run_dir/step-XXXXXXX`` atomically, point ``latest`` at it.

    With ``keep_last``, only the newest ``keep_last`` checkpoints up to ``step`` are kept, and
    checkpoints of later steps (left by an earlier run in the same directory) are deleted.
    """
    tmp = begin_step_checkpoint(run_dir, step)
    try:
        save_model(tmp, model, cfg, ema_state)
        if trainer_state is not None:
            save_trainer_state(tmp, trainer_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_step_checkpoint(run_dir, step, tmp, keep_last)


def begin_step_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary folder in ``run_dir`` to assemble step ``step``'s checkpoint in."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{step_dir_name(step)}.", suffix=".tmp", dir=run_dir))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
    return tmp


def commit_step_checkpoint(
    run_dir: str | os.PathLike, step: int, tmp: str | os.PathLike, keep_last: int | None = None
) -> Path:
    """Move the assembled ``tmp`` into place as ``step-XXXXXXX``, point ``latest`` at it, prune.

    See :func:`save_step_checkpoint` for ``keep_last``. ``tmp`` is removed if this fails.
    """
    run_dir, tmp = Path(run_dir), Path(tmp)
    final = run_dir / step_dir_name(step)
    try:
        for sub in [tmp / DCP_DIR, tmp]:
            if sub.is_dir():
                _fsync_dir(sub)
        if final.exists():
            # Re-saving a step (e.g. after resume): move the old one aside first, since a
            # directory cannot be replaced by rename while it is non-empty.
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=run_dir))
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(run_dir)
    atomic_write_text(run_dir / LATEST_FILE, final.name + "\n")
    if keep_last is not None:
        # Steps after this one belong to an abandoned run (restarted with resume=false).
        stale = [p for s, p in list_step_checkpoints(run_dir) if s > step]
        older = [p for s, p in list_step_checkpoints(run_dir) if s <= step]
        for old in stale + older[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- run directory safety


def clean_stale_temporaries(run_dir: str | os.PathLike) -> list[str]:
    """Remove what an interrupted save left in ``run_dir`` (``.step-*.tmp`` / ``.old`` folders,
    ``.*.tmp`` files). Call only while holding the run's lock, so no live save is touched."""
    run_dir = Path(run_dir)
    removed: list[str] = []
    if not run_dir.is_dir():
        return removed
    for p in run_dir.iterdir():
        if not p.name.startswith(".") or not p.name.endswith((".tmp", ".old")):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p.name)
    return sorted(removed)


def check_run_architecture(run_dir: str | os.PathLike, arch: str) -> None:
    """Refuse a run dir (its ``config.yaml`` or its latest checkpoint) of another architecture."""
    run_dir = Path(run_dir)
    sources = [run_dir / CONFIG_FILE]
    latest = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is not None:
        sources.append(latest / CONFIG_FILE)
    for path in sources:
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
            found = (data.get("model") or {}).get("arch") if isinstance(data, dict) else None
        except (yaml.YAMLError, OSError, UnicodeDecodeError, AttributeError):
            found = "unreadable"
        if found is not None and found != arch:
            raise CheckpointError(
                f"train.out_dir: {str(run_dir)!r} belongs to a {found!r} run ({path}), not {arch!r}; "
                f"choose another train.out_dir (or set train.resume=false to start over there)"
            )


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux /proc), which tells a live owner from a reused PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """``run_dir/.lock``: one trainer per run directory.

    The file holds the owner's PID, host name and process start time. A lock whose owner ran on
    this host and is gone (or whose PID now belongs to a newer process) is stale and is taken
    over; a lock held by a live process, or by another host (which cannot be checked from here),
    is refused with a message naming the owner and the file to delete if it is known to be dead.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self.took_over: dict[str, Any] | None = None

    def _owner(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self, owner: dict[str, Any]) -> bool:
        if owner.get("host") != socket.gethostname():
            return False
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return True  # unreadable owner written on this host: nobody can hold it
        if not _pid_alive(pid):
            return True
        started = owner.get("start")
        return started is not None and _process_start(pid) not in (None, started)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not self._stale(owner):
                    who = f"PID {owner.get('pid', '?')} on host {owner.get('host', '?')}"
                    raise ConfigError(
                        f"train.out_dir: {str(self.path.parent)!r} is in use by another trainer "
                        f"({who}, since {owner.get('since', '?')}); two trainers would overwrite each "
                        f"other's checkpoints. Wait for it, use another train.out_dir, or delete "
                        f"{self.path} if that process is gone"
                    ) from None
                # Stale: replace it. A rename of our own file keeps the take-over atomic.
                tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(me))
                os.replace(tmp, self.path)
                if self._owner().get("pid") == os.getpid():
                    self.took_over = owner
                    self.held = True
                    return self
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            return self
        raise ConfigError(f"train.out_dir: could not take the lock {self.path} (contended)")

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


# ----------------------------------------------------------------------------- official .pth files

# Harmless classes that official training scripts pickle next to the weights
# (MAR stores its argparse.Namespace under "args"). Allowed for weights_only loading.
_SAFE_EXTRA_GLOBALS = [argparse.Namespace]


def load_official(path: str | os.PathLike, key: str | None = None) -> Any:
    """Read an official ``.pth``/``.ckpt`` with ``torch.load(weights_only=True)`` only.

    ``key`` picks one top-level entry (``"model"``, ``"model_ema"``, ``"state_dict"``, ...).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_SAFE_EXTRA_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = ""
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            found = f" It pickles these Python objects: {names}."
        except Exception:  # noqa: BLE001 - only used to improve the message
            pass
        reason = unpickling_reason(e)
        raise CheckpointError(
            f"official checkpoint {path} cannot be read with torch.load(weights_only=True).{found} "
            "maskar reads only tensors and plain containers and never unpickles other Python objects: "
            "unpickling runs whatever code the file names. Use the checkpoint as its authors published "
            f"it (official releases hold only tensors).{' ' + reason + '.' if reason else ''}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"official checkpoint {path} is not a readable torch file: {e}") from None
    if key is None:
        return obj
    if not isinstance(obj, Mapping) or key not in obj:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"official checkpoint {path}: no entry {key!r}; top-level entries: {keys}")
    return obj[key]
