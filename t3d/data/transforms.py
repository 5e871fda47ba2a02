"""Clip transforms on tensors: uint8 frames (T, H, W, 3) -> normalized float clip (3, T, H, W).

Randomness comes from an explicit ``random.Random`` so a sample's augmentation depends only on its seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ClipTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "resize_short_side",
    "crop",
    "three_crop",
    "to_float_clip",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float_clip(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W) in [0, 1]."""
    t = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if t.dim() != 4 or t.shape[-1] != 3:
        raise ValueError(f"frames: expected (T, H, W, 3), got shape {tuple(t.shape)}")
    return t.permute(3, 0, 1, 2).float().div_(255.0)


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of a (C, T, H, W) clip so that min(H, W) == size, keeping the aspect."""
    _, _, h, w = clip.shape
    if min(h, w) == size:
        return clip
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    # (C, T, H, W) -> frames as a batch (T, C, H, W)
    out = F.interpolate(clip.transpose(0, 1), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return out.transpose(0, 1)


def crop(clip: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    return clip[:, :, top : top + height, left : left + width]


def three_crop(clip: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The three test views along the long side (SlowFast / the "x 3 crops" of the paper's peers): start, center
    and end crops of ``size`` (H, W); left/center/right for a landscape clip, top/center/bottom for a portrait one.

    clip: (C, T, H, W) with H >= size[0] and W >= size[1] (resized so the short side covers the crop).
    Returns (3, C, T, size[0], size[1]).
    """
    ch, cw = int(size[0]), int(size[1])
    _, _, h, w = clip.shape
    if h < ch or w < cw:
        raise ValueError(f"clip: expected frames of at least the crop {ch}x{cw}, got {h}x{w}")
    center_top, center_left = (h - ch) // 2, (w - cw) // 2
    if w - cw >= h - ch:  # the spare room is along the width
        corners = [(center_top, 0), (center_top, center_left), (center_top, w - cw)]
    else:
        corners = [(0, center_left), (center_top, center_left), (h - ch, center_left)]
    return torch.stack([crop(clip, top, left, ch, cw) for top, left in corners])


class ClipTransform:
    """Resize the short side, crop (random for training, center for testing), flip (training), normalize.

    Args:
        size: crop (H, W).
        resize: short side before cropping; None: 8/7 of the crop's short side (112 -> 128), the usual ratio.
        train: random crop and optional flip; else center crop (or the three crops of ``crops=3``).
        hflip: random horizontal flip in training (turn it off when left/right motion is the label!).
        mean, std: per-channel normalization (ImageNet's by default, as the 2D teacher's).
        crops: test mode only: 1 (center crop) or 3 (:func:`three_crop`: start, center, end along the long side).

    ``__call__(frames, rng)``: frames uint8 (T, H, W, 3) -> float32 (3, T, size[0], size[1]); with ``crops=3``
    (3 crops, 3, T, size[0], size[1]).
    """

    def __init__(
        self,
        size: Sequence[int] = (112, 112),
        resize: int | None = None,
        train: bool = True,
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        crops: int = 1,
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"size: expected a positive crop (H, W), got {tuple(size)}")
        self.resize = int(resize) if resize else max(self.size[0], self.size[1], round(min(self.size) * 8 / 7))
        if self.resize < max(self.size):
            raise ValueError(f"resize: expected a short side >= the crop {self.size}, got {self.resize}")
        if crops not in (1, 3):
            raise ValueError(f"crops: expected 1 (center) or 3 (start, center, end), got {crops}")
        if crops == 3 and train:
            raise ValueError("crops: 3 crops are test views; expected train=False with crops=3")
        self.train, self.hflip, self.crops = train, hflip, crops
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)

    def __call__(self, frames: np.ndarray | torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random.Random(0)
        clip = resize_short_side(to_float_clip(frames), self.resize)
        _, _, h, w = clip.shape
        ch, cw = self.size
        if self.crops == 3:
            return ((three_crop(clip, self.size) - self.mean) / self.std).contiguous()
        if self.train:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        clip = crop(clip, top, left, ch, cw)
        if self.train and self.hflip and rng.random() < 0.5:
            clip = clip.flip(-1)
        return ((clip - self.mean) / self.std).contiguous()

    def __repr__(self) -> str:
        return (
            f"ClipTransform(size={self.size}, resize={self.resize}, train={self.train}, hflip={self.hflip}, "
            f"crops={self.crops})"
        )
