"""bf16 working copies of the linear weights, with the fp32 parameters as the optimizer's masters.

Under bf16 autocast every ``nn.Linear`` casts its fp32 weight and bias to bf16 at each forward
(4 bytes read, 2 written a weight) and its bf16 gradients back to fp32 in the backward (2 read,
4 written); clipping then reads the fp32 gradients and fused AdamW writes them back clipped.
Here the linears hold bf16 copies during the step instead (:meth:`MasterWeights.swapped`): the
forward reads them as they are and the backward leaves bf16 gradients on them. One AdamW pass
(:mod:`maskar.kernels.adamw_master`) reads each fp32 master with its bf16 gradient and writes the
master, the moments and the next bf16 copy. Counted a weight and step, 18 bytes fewer
(docs/training.md): ≈ 5.6 GB of HMAR-d16's (310M token-path weights).

What stays as before, so checkpoints, EMA and resume do not know the difference:

- the model's registered parameters are the fp32 masters outside the step (the copies are
  swapped in for the loss and backward only); the optimizer is torch's AdamW, whose parameters,
  state (``exp_avg``, ``exp_avg_sq``, ``step``) and state dict are what an ordinary run has;
- the forward and backward compute exactly what autocast computes: the copies hold the values
  autocast's casts give (``Tensor.to`` rounding, written by the kernel with the same rounding),
  and a bf16 gradient is the value autocast's cast back to fp32 receives (eagerly; under
  torch.compile Inductor may leave a bias gradient of autocast's graph unrounded in fp32). Only
  the optimizer's arithmetic differs from torch's fused kernel, by rounding (its own ``b^t``).

Parameters the step does not swap (norms, embeddings, positional tables, AdaLN tables, and the
heads, whose gradients the fused cross-entropy sums in fp32: ``fp32_gradient_linears()``) keep
fp32 gradients and take the same kernel's fp32-gradient launch. Limits: one process (DDP's and
FSDP's hooks sit on the fp32 parameters), ``grad_accum`` 1 (bf16 gradients would be summed in
bf16), bf16 autocast, AdamW without amsgrad / maximize, CUDA (or the Triton interpreter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from maskar.kernels import adamw_master as K
from maskar.train.clipping import clip_divisor


def swappable(model: nn.Module, skip: tuple[str, ...] = ("tokenizer",)) -> list[tuple[nn.Module, str]]:
    """(module, name) of every trainable ``nn.Linear`` weight and bias outside ``skip`` and the
    model's ``fp32_gradient_linears()``: the parameters autocast casts to bf16 at every use and
    whose gradients autograd forms in bf16."""
    keep = getattr(model, "fp32_gradient_linears", None)
    skip = (*skip, *(keep() if keep is not None else ()))
    out = []
    for mname, m in model.named_modules():
        if any(mname == s or mname.startswith(s + ".") for s in skip) or not isinstance(m, nn.Linear):
            continue
        for name in ("weight", "bias"):
            p = m._parameters.get(name)
            if p is not None and p.requires_grad and p.dtype == torch.float32:
                out.append((m, name))
    return out


class MasterWeights:
    """bf16 copies of ``model``'s linear weights for the loss and backward, and the AdamW step over
    the fp32 masters (``optimizer``'s parameters) that also writes the copies.

    ``kernel=False`` runs :func:`maskar.kernels.adamw_master.adamw_reference_` instead of the
    Triton pass (CPU tests of the swap and the bookkeeping)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, kernel: bool = True) -> None:
        why = self.unsupported(optimizer)
        if why:
            raise ValueError(f"master weights: {why}")
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.slots = [(m, n) for m, n in swappable(model) if id(m._parameters[n]) in in_opt]
        masters = [m._parameters[n] for m, n in self.slots]
        if not masters:
            name = type(model).__name__
            raise ValueError(f"master weights: {name} has no trainable linear in the optimizer")
        self.masters = masters
        self.lows = [nn.Parameter(p.detach().to(torch.bfloat16)) for p in masters]
        self._low_of = {id(p): i for i, p in enumerate(masters)}
        self.optimizer, self.kernel = optimizer, kernel
        self._launches: dict[bool, K.AdamWLaunch] = {}

    @staticmethod
    def unsupported(optimizer: torch.optim.Optimizer) -> str | None:
        """Why ``optimizer`` cannot take this step, or None."""
        if not isinstance(optimizer, torch.optim.AdamW):
            return f"needs torch.optim.AdamW, got {type(optimizer).__name__}"
        for i, g in enumerate(optimizer.param_groups):
            if g.get("amsgrad") or g.get("maximize"):
                return f"param group {i}: amsgrad and maximize are not supported"
            if not isinstance(g["lr"], Tensor):
                return f"param group {i}: lr must be a device tensor (maskar.train.graph_step.as_capturable)"
        return None

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: the linears hold the bf16 copies (their gradients land there)."""
        for (m, n), low in zip(self.slots, self.lows):
            m._parameters[n] = low
        try:
            yield
        finally:
            for (m, n), p in zip(self.slots, self.masters):
                m._parameters[n] = p

    def zero_grad(self) -> None:
        """Drop every gradient (the copies' and the optimizer's parameters'): backward allocates anew."""
        self.optimizer.zero_grad(set_to_none=True)
        for low in self.lows:
            low.grad = None

    def grad(self, p: Tensor) -> Tensor | None:
        """Optimizer parameter ``p``'s gradient: its copy's where ``p`` is swapped."""
        i = self._low_of.get(id(p))
        return self.lows[i].grad if i is not None else p.grad

    def grads(self) -> list[Tensor | None]:
        """Each optimizer parameter's gradient, in ``param_groups`` order."""
        return [self.grad(p) for g in self.optimizer.param_groups for p in g["params"]]

    def _state(self, p: Tensor) -> dict:
        st = self.optimizer.state[p]
        if not st:  # as torch's AdamW initialises it (capturable / fused: the step on the device)
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    @torch.no_grad()
    def step(self, max_norm: float) -> Tensor:
        """Clip every gradient to total norm ``max_norm`` (``<= 0``: none) and take one AdamW step
        over the masters, writing the copies. Returns the norm before clipping (on the device)."""
        parts: dict[bool, K.AdamWTensors] = {}
        betas: set[tuple[float, float, float]] = set()
        for g in self.optimizer.param_groups:
            betas.add((float(g["betas"][0]), float(g["betas"][1]), float(g["eps"])))
            for p in g["params"]:
                grad = self.grad(p)
                if grad is None:
                    continue
                st = self._state(p)
                i = self._low_of.get(id(p))
                swapped = i is not None
                if swapped not in parts:
                    parts[swapped] = K.AdamWTensors([], [], [], [], [], [], [], [] if swapped else None)
                ts = parts[swapped]
                ts.params.append(p)
                ts.grads.append(grad)
                ts.exp_avgs.append(st["exp_avg"])
                ts.exp_avg_sqs.append(st["exp_avg_sq"])
                ts.lrs.append(g["lr"])
                ts.steps.append(st["step"])
                ts.weight_decays.append(float(g["weight_decay"]))
                if swapped:
                    ts.lows.append(self.lows[i])
        if len(betas) > 1:
            raise ValueError(f"master weights: param groups with different betas / eps: {sorted(betas)}")
        grads = [g for ts in parts.values() for g in ts.grads]
        device = self.masters[0].device
        if not grads:
            return torch.zeros((), device=device)
        b1, b2, eps = betas.pop()
        if not self.kernel:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
            scale = clip_divisor(norm, max_norm) if max_norm > 0 else None
            for ts in parts.values():
                K.adamw_reference_(ts, b1, b2, eps, scale)
            return norm
        launches = []
        for low, ts in parts.items():
            launch = self._launches.get(low)
            if launch is None or launch.shapes != [tuple(p.shape) for p in ts.params]:
                launch = self._launches[low] = K.AdamWLaunch(ts)
            launches.append((launch, ts))
        # the launches' block sums, added in a fixed order: one kernel a launch, not one a tensor
        norm = torch.stack([launch.sum_squares(ts).sum() for launch, ts in launches]).sum().sqrt()
        scale = clip_divisor(norm, max_norm) if max_norm > 0 else None
        for launch, ts in launches:
            launch(ts, b1, b2, eps, scale, bound=True)
        return norm

    def fill_pending(self) -> None:
        """After a CUDA graph capture of :meth:`step`: the launches' address tables for the replays."""
        for launch in self._launches.values():
            launch.fill_pending()


__all__ = ["MasterWeights", "swappable"]
