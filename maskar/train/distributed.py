"""Process-group setup (torchrun / env://), the epoch-seeded resumable batch sampler, RNG state,
and the few DTensor helpers the trainer needs for sharded (FSDP2) state."""

from __future__ import annotations

import gc
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from maskar.config import ConfigError

_OWNS_PROCESS_GROUP = False


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU if CUDA is available, else CPU; ``cuda`` -> this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available (use device=cpu)")
    return device


def init_distributed(device_name: str = "auto", need_group: bool = False) -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Single process when those are absent. NCCL for CUDA, gloo for CPU. Works across nodes
    because only ``env://`` initialisation is used. ``need_group``: a single process still gets
    a one-rank process group (FSDP2 shards over a device mesh, which needs one).
    """
    global _OWNS_PROCESS_GROUP
    if not _launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = pick_device(device_name, local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if need_group and not dist.is_initialized():
            _OWNS_PROCESS_GROUP = True
            # An in-process store: one rank needs no rendezvous (and no free port).
            store = dist.HashStore()
            if device.type == "cuda":
                dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
            else:
                dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        return DistInfo(0, 1, local, device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name, local)
    if not dist.is_initialized():
        _OWNS_PROCESS_GROUP = True
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", init_method="env://", device_id=device)
        else:
            dist.init_process_group("gloo", init_method="env://")
    return DistInfo(rank, world, local, device)


def shutdown_distributed() -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    global _OWNS_PROCESS_GROUP
    if _OWNS_PROCESS_GROUP and dist.is_available() and dist.is_initialized():
        # Reference cycles (FSDP2's module state) can hold gloo work objects; left to the
        # interpreter's exit they are freed after the group is gone, and the rank aborts with
        # "terminate called without an active exception" (5 of 8 two-rank CPU bench runs under
        # load; 0 of 20 with this collect).
        gc.collect()
        dist.barrier()  # no rank tears the group down while another still talks to it
        dist.destroy_process_group()
    _OWNS_PROCESS_GROUP = False


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True if ``flag`` is set on any rank (all ranks must call this together)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_from_main(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (all ranks call)."""
    return all_gather_objects(info, obj)[0]


def mean_over_ranks(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (so (seed, epoch) pairs never collide trivially)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class EpochBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of each global batch, in a permutation fixed by (seed, epoch).

    Global batch ``b`` of an epoch is ``perm[b*B:(b+1)*B]`` whatever the world size; rank ``r``
    takes the ``r``-th ``B/world`` chunk of it. ``set_epoch(epoch, start_batch)`` lets a
    resumed run skip the batches it already consumed without loading them.
    """

    def __init__(
        self, dataset_len: int, global_batch: int, rank: int, world_size: int, seed: int, shuffle: bool = True
    ) -> None:
        if global_batch % world_size:
            raise ConfigError(
                f"train.batch_size: {global_batch} is not divisible by the {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        if dataset_len < global_batch:
            raise ConfigError(
                f"train.batch_size: {global_batch} is larger than the dataset ({dataset_len} samples); "
                "lower the batch size or use more data"
            )
        self.n, self.global_batch, self.rank, self.world = dataset_len, global_batch, rank, world_size
        self.per_rank = global_batch // world_size
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = dataset_len // global_batch  # the ragged tail is dropped
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.global_batch + self.rank * self.per_rank
            yield perm[start : start + self.per_rank]


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def iter_with_workers_shielded(loader):
    """``iter(loader)`` with SIGINT / SIGTERM blocked while its workers start.

    A worker ignores both from ``seed_worker`` on, but one that is signalled before that (a
    new epoch's workers starting as the whole group gets SIGTERM) died, and the DataLoader's
    SIGCHLD handler then raised in the main process before its clean stop. Children inherit
    the blocked mask, so the signal waits in each worker until it is ignored (and dropped);
    the main process gets it once the workers exist, then stops cleanly."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def seed_worker(worker_id: int) -> None:
    # Ctrl-C, `timeout` and batch schedulers signal the whole process group; the main process
    # saves and stops the workers, which must not die first (it would fail fetching the next
    # batch). Workers still exit on their own when the main process is gone (torch's watchdog).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked while it started (iter_with_workers_shielded)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    # torch seeds each worker from the loader generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------- RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states of python / numpy / torch / CUDA as weights-only-loadable values."""
    _, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- sharded tensors


def is_sharded(t: Any) -> bool:
    """True for a DTensor (a parameter or state sharded by FSDP2)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor; all ranks must call it for a DTensor (it all-gathers)."""
    if not is_sharded(t):
        return t
    if t.device.type != t.device_mesh.device_type:
        t = t.to(t.device_mesh.device_type)  # CPU-offloaded shards gather over the GPU mesh
    return t.full_tensor()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) laid out like the DTensor ``like`` (its mesh and placements)."""
    if not is_sharded(like) or is_sharded(full):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(device=like.device_mesh.device_type, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements)


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, info: DistInfo) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for sharded (DTensor) gradients, also when the shards live
    in CPU memory (FSDP2 CPU offload): the squared norms of this rank's shards are summed over the
    ranks on the process group's device. ``max_norm <= 0``: the total norm only."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=info.device)
    squares = torch.stack([n.float().to(info.device) for n in torch._foreach_norm(grads)]).square().sum()
    if info.distributed:
        dist.all_reduce(squares)
    total = squares.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
