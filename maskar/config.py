"""Dataclass configs, YAML presets and dotted ``key=value`` overrides.

A run is described by one :class:`Config`. Its ``model`` and ``sample`` sections are
polymorphic: the ``model.arch`` string picks the dataclass registered for that
architecture in :mod:`maskar.registry`, so every key is type-checked against the
model that will actually read it.

Field constraints are declared once with :func:`field` (``min``, ``max``,
``choices``) and checked when a config is built from a dict, so a bad value fails
with one message naming the dotted key and what was expected.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from maskar.config_base import ConfigError, ModelConfig, SampleConfig, field

# The base types live in maskar.config_base so that maskar.registry can use them while this
# module looks architectures up in the registry, without the two importing each other.

# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    name: str = field(
        "synthetic",
        choices=("imagefolder", "fashion_mnist", "digits", "synthetic", "latents"),
        help="dataset kind",
    )
    root: str | None = field(None, help="dataset folder (imagefolder, fashion_mnist, latents)")
    split: str = field("train", help="split folder / IDX split name")
    resolution: int = field(32, min=1, help="output side length in pixels")
    channels: int = field(3, choices=(1, 3), help="1 keeps grayscale; 3 converts grayscale to RGB")
    hflip: bool = field(False, help="random horizontal flip")
    strict: bool = field(False, help="fail on the first unreadable file instead of skipping it")
    num_classes: int | None = field(None, min=1, help="override the number of classes")
    num_workers: int = field(0, min=0, help="DataLoader workers")
    synthetic_size: int = field(256, min=1, help="number of synthetic images")
    synthetic_classes: int = field(10, min=1, help="number of synthetic classes")
    synthetic_seed: int = field(0, min=0, help="seed of the synthetic images")
    resize: str = field(
        "bicubic",
        choices=("bicubic", "bilinear", "nearest", "pad"),
        help="fashion_mnist/digits resize filter, or pad (center on black); imagefolder uses the ADM crop",
    )
    limit: int | None = field(None, min=1, help="use only the first N samples")


@dataclass
class TrainConfig:
    steps: int = field(1000, min=0, help="optimizer steps")
    batch_size: int = field(32, min=1, help="global batch size (split across ranks)")
    grad_accum: int = field(
        1, min=1, help="micro-batches per optimizer step (each rank: batch_size / world / grad_accum)"
    )
    lr: float = field(1e-4, min=0.0, help="peak learning rate (absolute)")
    min_lr: float = field(0.0, min=0.0, help="final learning rate of decaying schedules")
    weight_decay: float = field(0.05, min=0.0)
    betas: tuple[float, float] = field((0.9, 0.95))
    schedule: str = field("constant", choices=("constant", "cosine", "linear", "lin0"))
    warmup_steps: int = field(0, min=0)
    warmup_start: float = field(0.005, min=0.0, max=1.0, help="warm-up starts at this fraction of lr")
    grad_clip: float = field(2.0, min=0.0, help="max grad norm; 0 disables clipping")
    ema: float = field(0.0, min=0.0, max=1.0, help="EMA decay; 0 disables EMA")
    ema_warmup: bool = field(
        False,
        help="EMA decay of update t = min(ema, (1 + t) / (10 + t)): a short run's EMA is not "
        "dominated by the random initialisation (the recipes keep it off)",
    )
    precision: str = field("auto", choices=("auto", "bf16", "fp16", "fp32"))
    out_dir: str = field("runs/default", help="checkpoints, logs and TensorBoard files")
    ckpt_every: int = field(1000, min=0, help="save every N steps (0: only at the end)")
    log_every: int = field(50, min=1)
    keep_last: int = field(2, min=1, help="number of step checkpoints kept")
    resume: bool = field(True, help="continue from out_dir's latest checkpoint if present")
    init_from: str | None = field(None, help="checkpoint dir whose weights initialise the model")
    seed: int = field(0)
    compile: bool | str = field(
        "auto",
        choices=("auto", True, False, "blocks", "full"),
        help="torch.compile: blocks (each repeated block once), full (the whole step), true (= full), "
        "false; auto = blocks on CUDA for models with repeated blocks (VAR, HMAR), else false",
    )
    activation_checkpointing: bool = field(False, help="recompute each block's activations in the backward")
    cuda_graph: bool | str = field(
        "auto",
        choices=("auto", True, False),
        help="capture the whole step (loss, backward, clipping, AdamW) as one CUDA graph after "
        "3 eager steps and replay it: one CUDA process, grad_accum 1, bf16 / fp32, no activation "
        "checkpointing, not fsdp2, models whose step is graph-safe (VAR, HMAR); auto = on wherever all "
        "of that holds (the log's step: line says which), true = refuse to run otherwise, false = eager "
        "launches",
    )
    master_weights: bool | str = field(
        "auto",
        choices=("auto", True, False),
        help="with cuda_graph and bf16: the linears compute with bf16 copies of their weights that "
        "AdamW writes beside the fp32 masters (no casts in the step, bf16 gradients; docs/training.md); "
        "auto = on wherever cuda_graph runs under bf16 (1.9-2.7 ms a d16 step faster, every pair "
        "measured), false = autocast's casts",
    )
    peak_tflops: float = field(0.0, min=0.0, help="bf16 peak per GPU for the logged MFU; 0: known GPUs")
    disc_lr: float | None = field(None, min=0.0, help="discriminator lr (tokenizer GAN); default lr")
    tensorboard: bool = field(True)
    progress: bool = field(True, help="tqdm progress bar")
    verify_checkpoints: bool = field(
        True, help="check the SHA-256 of every checkpoint file read on resume / init_from (false: skip)"
    )
    parallel: str = field(
        "ddp",
        choices=("ddp", "fsdp2"),
        help="several processes: ddp (replicated weights) or fsdp2 (weights, gradients, optimizer and "
        "EMA sharded per block; distributed checkpoints)",
    )
    fsdp_param_dtype: str = field(
        "auto",
        choices=("auto", "bf16", "fp32"),
        help="fsdp2: dtype the blocks' weights are gathered and computed in (auto: the autocast dtype); "
        "gradients are reduced in fp32",
    )
    fsdp_cpu_offload: bool = field(
        False, help="fsdp2: keep sharded weights, gradients and optimizer state in CPU memory"
    )
    fsdp_reshard_after_forward: bool = field(
        True, help="fsdp2: free each block's gathered weights after its forward (gathered again in backward)"
    )

    def graph_refusal(self) -> str | None:
        """Why these settings keep the step from one CUDA graph (``cuda_graph``), or None; the
        trainer adds the device's and the model's reasons (maskar.train.trainer.graph_refusal)."""
        if self.grad_accum != 1:
            return f"needs grad_accum=1, got {self.grad_accum}"
        if self.precision == "fp16":  # auto is bf16 on CUDA
            return "precision fp16 (its loss scaler steps on the host) is not supported; use bf16 or fp32"
        if self.activation_checkpointing:
            return "not supported with activation_checkpointing=true"
        if self.parallel == "fsdp2":  # even one process: FSDP2's hooks gather and free on the host
            return "not supported with parallel=fsdp2"
        return None

    def validate(self) -> None:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {list(self.betas)}")
        if not self.out_dir.strip():
            raise ValueError("out_dir: expected a directory path, got an empty string")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: expected a value <= lr ({self.lr}), got {self.min_lr}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum: batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if self.parallel == "fsdp2" and (self.compile is True or self.compile == "full"):
            raise ValueError(
                f"compile: {self.compile!r} compiles the whole step, which parallel=fsdp2 does not support; "
                "use compile=blocks (or auto: blocks on CUDA)"
            )
        if self.cuda_graph is True and (why := self.graph_refusal()):  # auto steps aside instead
            raise ValueError(f"cuda_graph: {why}")
        if self.master_weights is True:
            if self.cuda_graph is False:
                raise ValueError("master_weights: needs cuda_graph=true (the step it is built into)")
            if self.precision not in ("auto", "bf16"):
                raise ValueError(f"master_weights: needs precision bf16, got {self.precision}")
        if self.parallel == "fsdp2" and self.precision == "fp16":
            raise ValueError(
                "precision: fp16 is not supported with parallel=fsdp2 (its loss scaler is not sharded); "
                "use bf16 (or fp32)"
            )


@dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    attention_backend: str = field(
        "auto", choices=("auto", "sdpa", "flex", "varlen", "triton", "scales", "fa4"),
        help="fa4 needs flash-attn-4 installed (docs/kernels.md)",
    )  # fmt: skip
    device: str = field("auto", help="auto | cpu | cuda | cuda:N")

    def validate(self) -> None:
        check_device_name(self.device, "device")


DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def check_device_name(name: object, key: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether it exists is checked on use)."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ConfigError(f"{key}: expected {DEVICE_NAMES}, got {name!r}")
    return name


# ----------------------------------------------------------------------------- typed building

_POLYMORPHIC = {ModelConfig: "model", SampleConfig: "sample"}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists/tuples/dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # nan passes every min/max comparison and inf every min; neither is a usable setting.
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _check_range(value: Any, meta: typing.Mapping, key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    items = value if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if lo is not None and v < lo:
            raise ConfigError(f"{key}: expected a value >= {lo}, got {value!r}")
        if hi is not None and v > hi:
            raise ConfigError(f"{key}: expected a value <= {hi}, got {value!r}")


def _resolve_polymorphic(base: type, data: dict, key: str, arch: str | None) -> type:
    from maskar import registry

    if base is ModelConfig:
        arch = data.get("arch", arch)
        if arch is not None and not isinstance(arch, str):
            raise ConfigError(f"{key}.arch: expected an architecture name, got {arch!r}")
        if arch in (None, "none"):
            return ModelConfig
        return registry.get_model_spec(arch, key=f"{key}.arch").config_cls
    if base is SampleConfig:
        if arch in (None, "none"):
            return SampleConfig
        return registry.get_model_spec(arch, key="model.arch").sample_cls
    return base


def build(cls: type, data: Any, key: str = "", arch: str | None = None) -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict, validating every key."""
    if is_dataclass(data) and not isinstance(data, type):
        data = to_dict(data)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {data!r}")
    if cls in _POLYMORPHIC:
        cls = _resolve_polymorphic(cls, data, key, arch)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; valid keys of {key or 'the config'}: {sorted(known)}"
        )
    kwargs = {}
    model_arch = None
    if cls is Config:
        model_arch = (data.get("model") or {}).get("arch") if isinstance(data.get("model"), dict) else None
    for name, f in known.items():
        sub = f"{key}.{name}" if key else name
        if name not in data:
            continue
        tp = hints[name]
        if tp in _POLYMORPHIC or (isinstance(tp, type) and issubclass(tp, (ModelConfig, SampleConfig))):
            base = ModelConfig if issubclass(tp, ModelConfig) else SampleConfig
            value = build(base, data[name], sub, arch=model_arch)
        else:
            value = _coerce(data[name], tp, sub)
        _check_range(value, f.metadata, sub)
        kwargs[name] = value
    if cls is Config and "sample" not in kwargs and model_arch not in (None, "none"):
        kwargs["sample"] = build(SampleConfig, {}, "sample", arch=model_arch)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"{key or 'config'}: {e}") from None
    post = getattr(obj, "validate", None)
    if callable(post):
        try:
            post()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{key or 'config'}: {e}") from None
        except (LookupError, TypeError, ArithmeticError) as e:
            # A cross-field check tripped over a value it did not expect (e.g. an empty list):
            # still the user's value, so still one message naming the section.
            raise ConfigError(f"{key or 'config'}: inconsistent values ({type(e).__name__}: {e})") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-Python (YAML-safe) view of a config: tuples become lists."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- presets & overrides


def preset_names() -> list[str]:
    root = resources.files("maskar") / "presets"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path: Path | Any) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: cannot read {str(path)!r} ({e})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config: {str(path)!r} is not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {str(path)!r}: expected a YAML mapping at the top level")
    return data


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def load_preset_dict(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict:
    """Raw dict of a preset (shipped name or YAML path), with ``base:`` inheritance applied."""
    if name_or_path in _seen:
        raise ConfigError(f"preset: inheritance cycle {' -> '.join(_seen + (name_or_path,))}")
    p = Path(name_or_path)
    if _looks_like_path(name_or_path):
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "does not exist"
            raise ConfigError(
                f"config: {name_or_path!r} {what}; expected a YAML file (or preset=NAME, see `maskar info`)"
            )
        data = _read_yaml(p)
    else:
        res = resources.files("maskar") / "presets" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"preset: unknown preset {name_or_path!r}; available: {preset_names()}")
        data = _read_yaml(res)
    base = data.pop("base", None)
    if base is None:
        return data
    bases = base if isinstance(base, list) else [base]
    if not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{name_or_path}: base: expected a preset name or a list of them, got {base!r}")
    merged: dict = {}
    for b in bases:
        merged = merge(merged, load_preset_dict(b, _seen + (name_or_path,)))
    return merge(merged, data)


def merge(a: dict, b: dict) -> dict:
    """Recursive dict merge; values of ``b`` win."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-4" as a string; accept the usual float spellings.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and value.lower() != "e" else value
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def load_config(
    preset: str | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> Config:
    """Resolve preset (+ optional base dict) + overrides into a validated :class:`Config`."""
    data: dict = copy.deepcopy(base) if base else {}
    if preset:
        data = merge(data, load_preset_dict(preset))
    data = apply_overrides(data, overrides or [])
    return build(Config, data)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
