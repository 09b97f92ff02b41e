"""Speed transforms applied to a model before training, as functions on the model (torchtitan's
order): activation checkpointing first, then compilation. The model knows nothing of them; it only
names its parts through optional hooks:

* ``repeated_blocks()``: the identical transformer blocks (checkpointed one by one; compiled once
  and reused by every block with ``train.compile=blocks``);
* ``compiled_methods(mode)``: names of methods compiled in place: for ``blocks`` the small
  regions outside the blocks (e.g. the head and its loss), for ``full`` the methods that hold
  the whole differentiable step (the tokenizer and the random masking before them stay eager);
* ``train_flops_per_sample()``: matmul FLOPs of one sample's forward and backward (for MFU).

``train.compile``: ``auto`` (``blocks`` on CUDA for models with repeated blocks, else off),
``blocks``, ``full``, ``true`` (= ``full``) or ``false``.
"""

from __future__ import annotations

import torch
from torch import nn

from maskar.config import ConfigError

COMPILE_CHOICES = ("auto", True, False, "blocks", "full")

# Dense bf16 matmul peak per GPU, TFLOP/s, for MFU: the H200's is measured (docs/benchmarks.md;
# the H100 SXM has the same tensor cores and clock class); others are datasheet numbers.
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def resolve_compile_mode(value: bool | str, model: nn.Module, device: torch.device) -> str:
    """``none`` | ``blocks`` | ``full`` for the ``train.compile`` setting on this model and device."""
    if value == "auto":
        return "blocks" if device.type == "cuda" and hasattr(model, "repeated_blocks") else "none"
    if value is True or value == "full":
        return "full"
    if value is False:
        return "none"
    if value == "blocks":
        if not hasattr(model, "repeated_blocks"):
            raise ConfigError(
                f"train.compile=blocks: {type(model).__name__} names no repeated blocks; use full or false"
            )
        return "blocks"
    raise ConfigError(f"train.compile: expected one of {list(COMPILE_CHOICES)}, got {value!r}")


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each repeated block's activations in the backward pass; returns the block count."""
    if not hasattr(model, "repeated_blocks"):
        raise ConfigError(
            f"train.activation_checkpointing: {type(model).__name__} names no repeated blocks to checkpoint"
        )
    blocks = model.repeated_blocks()
    for b in blocks:
        if not hasattr(b, "checkpoint"):
            raise ConfigError(f"train.activation_checkpointing: {type(b).__name__} has no checkpoint switch")
        b.checkpoint = True
    return len(blocks)


def apply_compile(model: nn.Module, mode: str, backend: str = "inductor", fullgraph: bool = True) -> bool:
    """Compile ``model`` in place for ``mode`` (``blocks`` or ``full``) with a torch.compile backend.

    ``fullgraph=False`` lets an unexpected graph break fall back to eager for that part instead
    of raising (the trainer's ``auto`` default; explicit modes and the benchmark insist on one graph).

    Returns False when the model offers nothing to compile in place for ``full`` (no
    ``compiled_methods``): the caller then compiles its whole loss call instead.
    """
    from maskar.nn.attention import load_backends

    load_backends()  # imports happen here, never inside a trace
    if mode == "blocks":
        for b in model.repeated_blocks():
            b.compile(fullgraph=fullgraph, dynamic=False, backend=backend)
    methods = model.compiled_methods(mode) if hasattr(model, "compiled_methods") else None
    if methods is None:
        return mode == "blocks"
    for name in methods:
        fn = torch.compile(getattr(model, name), fullgraph=fullgraph, dynamic=False, backend=backend)
        setattr(model, name, fn)
    return True


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """The bf16 peak used for MFU: ``override`` if > 0, else the table entry of this GPU (None if unknown)."""
    if override > 0:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops
    return None


def mfu(flops_per_sample: float, samples_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved matmul FLOP/s over the peak (None without a peak)."""
    if peak is None or not flops_per_sample or samples_per_s != samples_per_s:  # nan rate
        return None
    return flops_per_sample * samples_per_s / (peak * 1e12)
