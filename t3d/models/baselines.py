"""Baselines for comparisons: a 2D per-frame ConvNet whose clip score is the average over frames.

Averaging over frames makes it blind to frame order: it cannot tell a video from its time reversal. On the
synthetic motion-direction data (:mod:`t3d.synthetic`) it is the control that a 3D model must beat.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FrameAverage2d", "frame2d"]


class FrameAverage2d(nn.Module):
    """Small 2D ConvNet applied to every frame; features averaged over time, then a linear classifier.

    Input (N, 3, T, H, W); output logits (N, num_classes). :meth:`forward_features` gives (N, width * 4).
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, width * 2, width * 4):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.num_features = c_in
        self.classifier = nn.Linear(c_in, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"x: expected a clip batch (N, 3, T, H, W), got shape {tuple(x.shape)}")
        n, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)
        f = self.features(frames).mean((2, 3))  # (N*T, C)
        return f.view(n, t, -1).mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def frame2d(num_classes: int = 10, backend: str = "auto", **kwargs) -> FrameAverage2d:
    """Constructor with the model registry's signature (``backend`` is ignored: no fused ops inside)."""
    return FrameAverage2d(num_classes=num_classes, **kwargs)
