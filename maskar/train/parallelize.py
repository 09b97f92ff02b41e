"""Transforms applied to a model before training, as functions on the model, in torchtitan's
order: activation checkpointing, then compilation, then data parallelism (DDP, or FSDP2's
``fully_shard``). The model knows nothing of them; it only names its parts through optional hooks:

* ``repeated_blocks()``: the identical transformer blocks (checkpointed one by one; compiled once
  and reused by every block with ``train.compile=blocks``; one FSDP2 unit each);
* ``compiled_methods(mode)``: names of methods compiled in place: for ``blocks`` the small
  regions outside the blocks (e.g. the head and its loss), for ``full`` the methods that hold
  the whole differentiable step (the tokenizer and the random masking before them stay eager);
* ``train_flops_per_sample()``: matmul FLOPs of one sample's forward and backward (for MFU).

``train.compile``: ``auto`` (``blocks`` on CUDA for models with repeated blocks, else off),
``blocks``, ``full``, ``true`` (= ``full``) or ``false``.

The trainer wraps the model in a small root module whose ``forward`` calls ``model.loss(batch)``
(:class:`maskar.train.trainer._LossCall`): DDP and FSDP2 act on a module's ``forward``, and the
model surface is ``loss``. FSDP2 (``train.parallel=fsdp2``, :func:`apply_fsdp`):

* each repeated block is one unit: its weights are gathered just before its forward and freed
  after, its gradients reduce-scattered as soon as its backward ends. Its weights are gathered in
  ``train.fsdp_param_dtype`` (``auto``: bf16 under bf16 autocast) and its gradients reduced in
  fp32; its inputs are not cast, so the residual stream keeps the dtype autocast gives it;
* the root unit holds every other trained parameter (embeddings, heads, norms), gathered once per
  step in fp32, so the embeddings and the loss see the weights a one-GPU run sees, and a loss may
  read a head's weight directly; a model without ``repeated_blocks`` is this one unit;
* frozen parameters outside the blocks (a frozen tokenizer) are left unsharded and uncast
  (``ignored_params``): the model runs them in fp32 outside autocast, on every rank;
* ``train.fsdp_cpu_offload``: shards, gradients and the optimizer step live in CPU memory;
* sharded parameters are DTensors: the optimizer and the EMA work on this rank's shards, and
  checkpoints are written with ``torch.distributed.checkpoint`` (maskar.checkpoint).
"""

from __future__ import annotations

import torch
from torch import nn

from maskar.config import ConfigError
from maskar.train.distributed import DistInfo

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


# ----------------------------------------------------------------------------- data parallelism


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (its ``repeated_blocks()`` hook), or none."""
    hook = getattr(model, "repeated_blocks", None)
    return list(hook()) if callable(hook) else []


def fsdp_param_dtype(setting: str, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The blocks' gather/compute dtype for ``train.fsdp_param_dtype`` (None: keep fp32)."""
    if setting == "auto":
        return amp_dtype
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp32":
        return None
    raise ConfigError(f"train.fsdp_param_dtype: expected auto, bf16 or fp32, got {setting!r}")


def apply_ddp(root: nn.Module, info: DistInfo, find_unused_parameters: bool) -> nn.Module:
    """Replicate ``root`` on every rank; gradients are all-reduced (averaged) in the backward."""
    return nn.parallel.DistributedDataParallel(
        root,
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def apply_fsdp(
    root: nn.Module,
    model: nn.Module,
    info: DistInfo,
    param_dtype: torch.dtype | None,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` (held by ``root``) with FSDP2: one unit per repeated block, then the root.

    Call after activation checkpointing and per-block compilation, before building the
    optimizer: ``fully_shard`` replaces the parameters by sharded DTensor parameters (same names).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    offload = CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if cpu_offload else OffloadPolicy()
    block_policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    blocks = repeated_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's backward starts right after the forward: keeping its weights saves a gather.
        keep = not reshard_after_forward or i == len(blocks) - 1
        fully_shard(
            block, mesh=mesh, mp_policy=block_policy, offload_policy=offload, reshard_after_forward=not keep
        )
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    frozen_outside = {p for p in model.parameters() if not p.requires_grad and id(p) not in in_blocks}
    root_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(
        root,
        mesh=mesh,
        mp_policy=root_policy,
        offload_policy=offload,
        reshard_after_forward=reshard_after_forward,
        ignored_params=frozen_outside or None,
    )
    return root


def describe_fsdp(model: nn.Module, param_dtype: torch.dtype | None, cpu_offload: bool) -> str:
    """One line for the log: units, what is sharded and in which dtype."""
    blocks = repeated_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    n_block = sum(p.numel() for b in blocks for p in b.parameters())
    n_root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks and p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks and not p.requires_grad)
    dtype = "bf16" if param_dtype == torch.bfloat16 else "fp32" if param_dtype is None else str(param_dtype)
    return (
        f"fsdp2: {len(blocks)} block units ({n_block / 1e6:.4g}M parameters, gathered in {dtype}) + root "
        f"({n_root / 1e6:.4g}M, fp32); {n_frozen / 1e6:.4g}M frozen parameters outside the blocks kept "
        f"whole on every rank; gradients reduced in fp32{'; CPU offload' if cpu_offload else ''}"
    )
