"""The frozen 2D teacher of the transfer: a 2D DenseNet with ImageNet weights (from a file) that turns a clip's
frames into one feature (the per-frame features averaged over the frames)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..inflate import check_state_matches, densenet2d_like, normalize_densenet2d_state, read_densenet2d_state
from ..models import T3D, DenseNet2d, densenet121

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TEACHERS", "FrozenTeacher", "build_teacher"]


def _densenet169() -> DenseNet2d:
    return DenseNet2d((6, 12, 32, 32))


# teacher architectures by name; "matching" (not listed: it depends on the student) is the student's 2D twin
TEACHERS: dict[str, Callable[[], DenseNet2d]] = {"densenet121": densenet121, "densenet169": _densenet169}


class FrozenTeacher(nn.Module):
    """The frozen 2D teacher: clip (N, 3, T, H, W) -> frame features averaged over the frames (N, F).

    Args:
        model2d: a 2D DenseNet with ImageNet weights (``forward_features`` -> (N, F)).
        input_mean, input_std: the per-channel normalisation the clips arrive with. The teacher undoes it and
            applies ImageNet's (RGB in [0, 1], :data:`IMAGENET_MEAN`/:data:`IMAGENET_STD`); the default assumes
            the clips already use ImageNet's normalisation.
        frames: use this many frames, evenly spaced over the clip (None: every frame, as in the paper).
        chunk: at most this many frames per teacher forward (bounds memory at large clips and batches).

    The module stays in eval mode whatever ``.train()`` is called with; its parameters never require grad.
    """

    def __init__(
        self,
        model2d: DenseNet2d,
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
        frames: int | None = None,
        chunk: int = 256,
    ) -> None:
        super().__init__()
        if frames is not None and frames < 1:
            raise ValueError(f"frames: expected None (all frames) or an integer >= 1, got {frames}")
        if chunk < 1:
            raise ValueError(f"chunk: expected an integer >= 1, got {chunk}")
        self.model = model2d
        self.model.requires_grad_(False)
        self.frames, self.chunk = frames, chunk
        self.feature_dim = model2d.num_features
        in_mean, in_std = torch.tensor(input_mean), torch.tensor(input_std)
        im_mean, im_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x_imagenet = (x * in_std + in_mean - im_mean) / im_std = x * scale + shift
        self.register_buffer("scale", (in_std / im_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((in_mean - im_mean) / im_std).view(1, 3, 1, 1), persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        # frozen: BN uses the ImageNet running statistics and never updates them
        return super().train(False)

    def frame_indices(self, num_frames: int) -> torch.Tensor:
        """The frames of a T-frame clip the teacher sees: all of them, or ``frames`` evenly spaced."""
        if self.frames is None or self.frames >= num_frames:
            return torch.arange(num_frames)
        return torch.linspace(0, num_frames - 1, self.frames).round().long()

    @torch.no_grad()
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """clips: (N, 3, T, H, W), normalised with ``input_mean``/``input_std`` -> (N, F) float32."""
        if clips.dim() != 5 or clips.shape[1] != 3:
            raise ValueError(f"clips: expected (N, 3, T, H, W), got shape {tuple(clips.shape)}")
        n, _, t, h, w = clips.shape
        idx = self.frame_indices(t).to(clips.device)
        frames = clips.index_select(2, idx).transpose(1, 2).reshape(-1, 3, h, w)
        frames = frames * self.scale.to(frames.dtype) + self.shift.to(frames.dtype)
        feats = torch.cat([self.model.forward_features(part) for part in frames.split(self.chunk)])
        return feats.float().view(n, len(idx), -1).mean(1)


def build_teacher(
    student: T3D,
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    arch: str = "densenet121",
    **kwargs: Any,
) -> FrozenTeacher:
    """The frozen teacher for ``student``: a 2D DenseNet of ``arch`` loaded from ``weights`` (a file or a state_dict
    with torchvision key names; the ImageNet classifier is not needed). ``arch``: a name in :data:`TEACHERS` (the
    paper's DenseNet-121 by default, whatever the student: the transfer head takes any pair of feature sizes) or
    "matching", the student's 2D twin (DenseNet-169 for T3D-169, the tiny 2D net for ``t3d_tiny``).
    ``kwargs`` go to :class:`FrozenTeacher`. Missing keys, unexpected keys, wrong shapes or a file that is not a
    state_dict are a clear ValueError."""
    if arch == "matching":
        model2d = densenet2d_like(student)
    elif arch in TEACHERS:
        model2d = TEACHERS[arch]()
    else:
        raise ValueError(f"teacher arch: expected 'matching' or one of {sorted(TEACHERS)}, got {arch!r}")
    what = "teacher weights"
    if isinstance(weights, Mapping):
        if not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ValueError(
                "teacher weights: expected a state_dict (a mapping of name -> tensor), got non-tensor values"
            )
        state = normalize_densenet2d_state(weights)
    else:
        state = read_densenet2d_state(weights)
        what = f"teacher weights {os.fspath(weights)!r}"
    own = model2d.state_dict()
    # the teacher's classifier (ImageNet's 1000 classes) is never used: load it only if present and fitting
    classifier = {k: state.pop(k) for k in ("classifier.weight", "classifier.bias") if k in state}
    expected = {k: v.shape for k, v in own.items() if not k.startswith("classifier.")}
    check_state_matches(state, expected, what)
    if all(k in classifier and classifier[k].shape == own[k].shape for k in ("classifier.weight", "classifier.bias")):
        state.update(classifier)
    model2d.load_state_dict(state, strict=False)
    return FrozenTeacher(model2d, **kwargs)
