"""Learning-rate schedules, stepped once per optimizer step.

The optimizer is a ``_partial_`` in conf/schedule/*.yaml whose ``lr`` interpolates
``schedule.lr``. The scheduler is a ``_partial_`` of one of the functions below; the run calls it
with the optimizer, the number of epochs and the number of steps per epoch. Every schedule takes an
optional linear warm-up from ``warmup_start`` × lr over ``warmup_epochs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _with_warmup(
    factor: Callable[[int], float], warmup_steps: int, warmup_start: float
) -> Callable[[int], float]:
    def scaled(step: int) -> float:
        if step < warmup_steps:
            return warmup_start + (1.0 - warmup_start) * step / warmup_steps
        return factor(step)

    return scaled


def cosine(
    optimizer: Optimizer,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start: float = 0.1,
    min_factor: float = 0.0,
) -> LambdaLR:
    """Cosine decay (Loshchilov & Hutter 2017, without restarts) from lr to ``min_factor`` × lr."""
    total = epochs * steps_per_epoch
    warmup = int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, _with_warmup(factor, warmup, warmup_start))


def multistep(
    optimizer: Optimizer,
    epochs: int,
    steps_per_epoch: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0,
    warmup_start: float = 0.1,
) -> LambdaLR:
    """Multiply lr by ``gamma`` at each milestone epoch (He et al. 2016; the CIFAR KD recipes)."""
    bounds = sorted(m * steps_per_epoch for m in milestones)

    def factor(step: int) -> float:
        return gamma ** sum(step >= b for b in bounds)

    warmup = int(warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, _with_warmup(factor, warmup, warmup_start))


def constant(
    optimizer: Optimizer,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    warmup_start: float = 0.1,
) -> LambdaLR:
    """A constant lr after the optional warm-up."""
    warmup = int(warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, _with_warmup(lambda _: 1.0, warmup, warmup_start))
