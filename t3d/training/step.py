"""Step functions: one (micro-)batch -> :class:`StepOutput` (loss and counts); :func:`classification_step`.

A *step function* ``step_fn(model, batch, device) -> StepOutput`` computes the loss of one (micro-)batch: ``model``
is what the Trainer holds (DDP-wrapped when distributed; call it, don't reach into it), ``batch`` what the loader
yields. It returns the mean loss over its samples plus counts for logging. A transfer step function runs the frozen
teacher under ``torch.no_grad()`` and the student + head through ``model`` (:class:`t3d.transfer.TransferStep`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StepOutput", "classification_step"]


@dataclass
class StepOutput:
    """What a step function returns for one micro-batch: ``loss`` (scalar tensor, mean over the micro-batch),
    ``count`` samples, ``correct`` predictions (None when accuracy has no meaning) and extra scalar ``metrics``
    (summed over samples by the Trainer: pass per-batch sums)."""

    loss: torch.Tensor
    count: int
    correct: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def classification_step(model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> StepOutput:
    """Cross-entropy of ``model(batch["clips"])`` against ``batch["labels"]``.

    clips: (N, 3, T, H, W) float; labels: (N,) int64.
    """
    clips = batch["clips"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    logits = model(clips)
    loss = F.cross_entropy(logits.float(), labels)
    correct = int((logits.argmax(1) == labels).sum())
    return StepOutput(loss, int(labels.numel()), correct)
