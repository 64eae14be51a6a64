"""Learning-rate schedules as closed forms of the iteration, like mmengine's schedulers.

* step: mmengine ``MultiStepLR(by_epoch=True)`` — factor ``gamma ** #(milestones <= epoch)``.
* cosine: mmengine ``CosineAnnealingLR(T_max=epochs, by_epoch=True, convert_to_iter_based=
  True)`` — ``eta_min + (lr - eta_min) * (1 + cos(pi * iter / (epochs * iters)))) / 2``.
* warm-up: mmengine ``LinearLR(start_factor=ratio, by_epoch=True, convert_to_iter_based=True)``
  over the first ``warmup_epochs`` — factor ``ratio + (1 - ratio) * iter / warmup_iters``.

The warm-up factor multiplies the main schedule, as chained mmengine schedulers do. Because
the value is a pure function of the iteration, resuming at any step restores it exactly.
"""

from __future__ import annotations

import bisect
import math

import torch

from i3d.train.recipe import TrainConfig


def lr_factor(config: TrainConfig, step: int, iters_per_epoch: int) -> float:
    """Multiplier of the base lr at global iteration ``step`` (0-based)."""
    epoch = step // iters_per_epoch
    if config.schedule == "step":
        factor = config.gamma ** bisect.bisect_right(sorted(config.milestones), epoch)
    else:
        total = config.epochs * iters_per_epoch
        ratio = config.eta_min / config.effective_lr
        factor = ratio + (1.0 - ratio) * (1.0 + math.cos(math.pi * min(step, total) / total)) / 2
    warmup_iters = round(config.warmup_epochs * iters_per_epoch)
    if warmup_iters > 0 and step < warmup_iters:
        factor *= config.warmup_ratio + (1.0 - config.warmup_ratio) * step / warmup_iters
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration scheduler (call ``.step()`` after every optimiser step)."""
    if iters_per_epoch < 1:
        raise ValueError("iters_per_epoch must be at least 1")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step, iters_per_epoch)
    )
