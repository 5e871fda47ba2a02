"""BatchNorm policies of a run: freezing (``--freeze-bn``)."""

from __future__ import annotations

from torch import nn

__all__ = ["freeze_batchnorm"]


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm module in eval mode: running statistics are used and not updated. The fused ops read
    their mode from their BN modules, so this freezes them on every backend. Call after ``model.train()``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
