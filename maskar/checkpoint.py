"""Checkpoint directories: ``model.safetensors`` + ``config.yaml`` (+ ``ema.safetensors``,
``trainer_state.pt``), atomic writes, strict loading with one readable error.

Layout of a model checkpoint directory::

    config.yaml         the full resolved Config (maskar.config.dump_yaml)
    model.safetensors   model.state_dict() (persistent tensors only)
    ema.safetensors     optional: EMA values of the trained parameters (a subset of the
                        model keys; loading overlays them on model.safetensors)
    trainer_state.pt    optional: optimizer(s), scaler, RNG states, step, data position

A training run directory holds ``step-XXXXXXX/`` checkpoint directories and a ``latest``
text file naming the newest one. :func:`load_model` accepts either kind of directory.

Every file is written to a temporary name in the same directory and moved into place
with ``os.replace``; a step directory is assembled under a temporary name and renamed,
and ``latest`` is updated last. A crash therefore leaves either the old or the new
checkpoint, never a half-written one.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from maskar.config import Config, ConfigError, build, dump_yaml

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"
TRAINER_STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
STEP_PREFIX = "step-"


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes | Callable[[io.BufferedWriter], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically."""
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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; use the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


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
) -> None:
    """Atomically write a safetensors file."""
    atomic_write_bytes(path, safetensors_bytes(_cpu_state(state), metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    out = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# ----------------------------------------------------------------------------- strict loading


def _short_list(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def state_dict_mismatch(module: nn.Module, state_dict: Mapping[str, Tensor]) -> str | None:
    """One human-readable line about missing / unexpected / mis-shaped keys, or None."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
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
) -> Path:
    """Write ``model.safetensors`` (+ ``ema.safetensors``) and ``config.yaml`` into ``directory``.

    Each file is replaced atomically. Only persistent tensors are saved (``state_dict``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "arch": str(cfg.model.arch)}
    save_tensors(directory / MODEL_FILE, unwrap_model(model).state_dict(), meta)
    if ema_state is not None:
        save_tensors(directory / EMA_FILE, ema_state, meta)
    elif (directory / EMA_FILE).exists():
        os.unlink(directory / EMA_FILE)  # a stale EMA file would be loaded in place of the new weights
    atomic_write_text(directory / CONFIG_FILE, dump_yaml(cfg))
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
    except yaml.YAMLError as e:
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_FILE} is not valid YAML: {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_FILE}: {e}") from None


def load_model(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    prefer_ema: bool = True,
    arch: str | None = None,
) -> tuple[nn.Module, Config]:
    """Rebuild the model from ``config.yaml`` and load its weights strictly.

    ``prefer_ema``: overlay ``ema.safetensors`` when present. ``arch``: the architecture
    the caller expects; another one is an error. Returns ``(model in eval mode, config)``.
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
    load_state_dict_checked(model, load_tensors(weights), context=f"checkpoint {directory}")
    if prefer_ema and (directory / EMA_FILE).is_file():
        load_subset_checked(
            model, load_tensors(directory / EMA_FILE), context=f"checkpoint {directory} ({EMA_FILE})"
        )
    model.to(device).eval()
    return model, cfg


# ----------------------------------------------------------------------------- trainer state


def save_trainer_state(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``trainer_state.pt``. Content must be tensors and plain Python values
    (dict/list/tuple/str/int/float/bool/None) so it loads with ``weights_only=True``."""
    path = Path(directory) / TRAINER_STATE_FILE
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    return path


def load_trainer_state(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {TRAINER_STATE_FILE} is missing (cannot resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: not a maskar trainer state (weights-only load refused it: {e})"
        ) from None


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
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit():
            out.append((int(p.name[len(STEP_PREFIX) :]), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``run_dir/latest`` (or the newest ``step-*`` dir), or None."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        target = run_dir / pointer.read_text().strip()
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
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=run_dir))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
        save_model(tmp, model, cfg, ema_state)
        if trainer_state is not None:
            save_trainer_state(tmp, trainer_state)
        _fsync_dir(tmp)
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
        raise CheckpointError(
            f"official checkpoint {path} cannot be read with torch.load(weights_only=True).{found} "
            "maskar never unpickles arbitrary objects. If you trust the file, extract the tensors once: "
            f"python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            f"torch.save(c['model'], 'weights.pth')\" (pick the entry you need), then convert that file. "
            f"Original error: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"official checkpoint {path} is not a readable torch file: {e}") from None
    if key is None:
        return obj
    if not isinstance(obj, Mapping) or key not in obj:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"official checkpoint {path}: no entry {key!r}; top-level entries: {keys}")
    return obj[key]
