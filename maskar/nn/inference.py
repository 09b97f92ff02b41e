"""Weights stored for inference in the dtype autocast computes in.

Under bf16 / fp16 autocast a linear layer's weight and bias are cast to that dtype at every
call (``F.linear`` is on autocast's lower-precision list), with the rounding ``Tensor.to``
uses. Storing them in that dtype up front therefore changes no output, bit for bit, while the
cast stops running at every call: autocast's cast cache cannot help inside CUDA graphs and
compiled code, where the samplers spend their time. The fp32 copies' memory is freed too.
"""

from __future__ import annotations

import torch
from torch import nn


def cast_linears_(model: nn.Module, dtype: torch.dtype, skip: tuple[str, ...] = ("tokenizer",)) -> int:
    """Store every ``nn.Linear`` of ``model`` outside the ``skip`` submodules (a generator's frozen
    tokenizer, which runs in fp32) in ``dtype``; returns how many were cast. Captured CUDA graphs
    (``_graphs`` caches) are dropped, since they read the old weights' memory. Irreversible:
    ``model._linears_dtype`` records it, and the models refuse ``train()`` afterwards."""
    done = getattr(model, "_linears_dtype", None)
    if done is not None and done != dtype:  # a second rounding would change the weights
        raise RuntimeError(
            f"{type(model).__name__}: its linears are already {done}; reload the checkpoint for {dtype}"
        )
    n = 0
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, nn.Linear) and m.weight.dtype != dtype:
            m.to(dtype)
            n += 1
    if n:
        for m in model.modules():
            graphs = getattr(m, "_graphs", None)
            if graphs is not None and hasattr(graphs, "clear"):
                graphs.clear()
        model._linears_dtype = dtype
    return n


def refuse_training_if_cast(model: nn.Module, mode: bool) -> None:
    """For ``train()`` overrides: training needs the fp32 weights :func:`cast_linears_` dropped."""
    dtype = getattr(model, "_linears_dtype", None)
    if mode and dtype is not None:
        raise RuntimeError(
            f"{type(model).__name__}: its linear weights were cast to {dtype} for inference "
            "(cast_linears_); reload the checkpoint to train"
        )
