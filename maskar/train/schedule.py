"""Learning-rate schedules as pure functions of the optimizer step.

Every schedule starts with an optional linear warm-up from ``warmup_start * lr`` to ``lr``
over ``warmup_steps`` steps. After warm-up, ``progress`` runs from 0 (first step after
warm-up) to 1 (the last step, ``total_steps - 1``):

- ``constant``: ``lr``
- ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2``
- ``linear``: ``min_lr + (lr - min_lr) * (1 - progress)``
- ``lin0`` (VAR): hold ``lr`` while ``progress < 0.05``, then linear from ``lr`` to ``min_lr``
  over the remaining 95%: ``min_lr + (lr - min_lr) * (1 - progress) / 0.95``
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear", "lin0")
LIN0_HOLD = 0.05  # fraction of the post-warm-up steps that VAR's lin0 keeps at peak


def lr_at(
    step: int,
    *,
    lr: float,
    total_steps: int,
    schedule: str = "constant",
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate used by optimizer step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule: expected one of {list(SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (warmup_start + (1.0 - warmup_start) * step / warmup_steps)
    if schedule == "constant":
        return lr
    decay_steps = total_steps - 1 - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    # lin0
    if progress < LIN0_HOLD:
        return lr
    return min_lr + (lr - min_lr) * (1.0 - progress) / (1.0 - LIN0_HOLD)


def lr_from_config(step: int, train_cfg) -> float:  # train_cfg: maskar.config.TrainConfig
    return lr_at(
        step,
        lr=train_cfg.lr,
        total_steps=train_cfg.steps,
        schedule=train_cfg.schedule,
        warmup_steps=train_cfg.warmup_steps,
        warmup_start=train_cfg.warmup_start,
        min_lr=train_cfg.min_lr,
    )
