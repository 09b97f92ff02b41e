"""Exponential moving average of the trained parameters.

``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step. Buffers are
not averaged: a checkpoint's EMA file holds only the averaged parameters and loading
overlays them on the model's own weights (and buffers).

With ``warmup=True`` the decay of update t (0-based) is ``min(decay, (1 + t) / (10 + t))``
(the ``num_updates`` rule of TensorFlow's ``ExponentialMovingAverage``). Why: with a fixed decay d
the random initialisation keeps the weight d^T in the shadow after T updates (0.999^1110 = 33%),
so the EMA of a short run samples like a barely trained model. With the warm-up that weight is
the product of the decays, 9! T! / (T + 9)! (1e-5 after 10 updates), and the shadow is an average
of the recent weights from the start; once (1 + t) / (10 + t) exceeds d (t > (10d - 1) / (1 - d):
8,990 updates for 0.999) it is the plain EMA.

Under FSDP2 the parameters are sharded DTensors and so is the shadow (each rank averages its
own shard: no communication, 1/world of the memory); the update works on the local shards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from maskar.train.distributed import local_tensor, shard_like


class EMA:
    def __init__(
        self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float, warmup: bool = False
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema: expected a decay in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.params: dict[str, Tensor] = dict(named_params)
        # fp32 shadow copies even when parameters are kept in lower precision.
        self.shadow: dict[str, Tensor] = {k: p.detach().float().clone() for k, p in self.params.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        shadow = [local_tensor(s) for s in self.shadow.values()]
        current = [local_tensor(p.detach()).float() for p in self.params.values()]
        torch._foreach_mul_(shadow, decay)
        torch._foreach_add_(shadow, current, alpha=1.0 - decay)
        self.num_updates += 1

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses (``num_updates`` is restored on resume)."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged values under the model's parameter names (DTensors when sharded)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(
                f"EMA state does not match the trained parameters: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for k, v in self.shadow.items():
            # a full tensor (a checkpoint of an unsharded run) is cut to this rank's shard
            local_tensor(v).copy_(local_tensor(shard_like(state[k], v)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged values into ``model``'s parameters (e.g. for evaluation)."""
        named = dict(model.named_parameters())
        for k, v in self.shadow.items():
            named[k].copy_(v)
