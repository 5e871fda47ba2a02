"""Optimizer and learning-rate schedule: SGD (Nesterov momentum 0.9, weight decay 1e-4: the paper's) and a
per-optimizer-step schedule with linear warmup, then cosine / step / constant."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig

__all__ = ["make_optimizer", "WarmupSchedule", "make_scheduler"]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the trainable parameters with (Nesterov) momentum and weight decay from ``config``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: expected trainable parameters, got none (all requires_grad=False)")
    nesterov = config.nesterov and config.momentum > 0
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=nesterov
    )


class WarmupSchedule:
    """LR multiplier per optimizer step: linear warmup, then cosine / step / constant.

    A plain object (not a closure) so ``LambdaLR.state_dict()`` stores its fields and a checkpoint of it loads
    with ``weights_only=True``.
    """

    def __init__(
        self, kind: str, total_steps: int, warmup_steps: int = 0, milestones: tuple[int, ...] = (), gamma: float = 0.1
    ) -> None:
        self.kind, self.total_steps, self.warmup_steps = kind, max(1, int(total_steps)), int(warmup_steps)
        self.milestones, self.gamma = [int(m) for m in milestones], float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule over ``config.epochs * steps_per_epoch`` steps (milestones in epochs)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected >= 1 optimizer steps per epoch, got {steps_per_epoch}")
    fn = WarmupSchedule(
        config.schedule,
        config.epochs * steps_per_epoch,
        config.warmup_steps,
        tuple(m * steps_per_epoch for m in config.milestones),
        config.gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
