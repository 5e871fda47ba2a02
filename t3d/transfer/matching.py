"""The match / no-match task of the transfer: the head over (2D feature, 3D feature) pairs, the module that trains
(student + head), the negative pairs and the Trainer's step function."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import T3D
from ..training import StepOutput
from .teacher import FrozenTeacher

__all__ = ["TransferHead", "TransferModel", "TransferStep", "sample_negatives"]


class TransferHead(nn.Module):
    """The match / no-match head: (N, dim2d + dim3d) -> fc 512 -> ReLU -> fc 128 -> ReLU -> fc 2, logits (N, 2).

    Class 1 is "match" (same video, same time), class 0 "no match". ``dropout`` (probability) follows each ReLU.
    """

    def __init__(self, dim2d: int, dim3d: int, hidden: Sequence[int] = (512, 128), dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        layers: list[tuple[str, nn.Module]] = []
        width = dim2d + dim3d
        for i, h in enumerate(hidden):
            layers += [(f"fc{i + 1}", nn.Linear(width, h)), (f"relu{i + 1}", nn.ReLU(inplace=True))]
            if dropout > 0:
                layers.append((f"drop{i + 1}", nn.Dropout(dropout)))
            width = h
        layers.append((f"fc{len(hidden) + 1}", nn.Linear(width, 2)))
        self.layers = nn.Sequential(OrderedDict(layers))
        self.dim2d, self.dim3d = dim2d, dim3d

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.layers(pairs)


class TransferModel(nn.Module):
    """What trains: the T3D student and the head, in one module (one optimizer, one checkpoint, one DDP wrap).

    The student's classifier plays no part in the transfer; it is frozen so DDP sees no unused parameters.
    """

    def __init__(self, student: T3D, head: TransferHead) -> None:
        super().__init__()
        if head.dim3d != student.num_features:
            raise ValueError(f"head: expected a 3D input of {student.num_features} features, got {head.dim3d}")
        self.student, self.head = student, head
        self.student.classifier.requires_grad_(False)

    def forward(self, clips: torch.Tensor, teacher_features: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
        """clips (N, 3, T, H, W), teacher_features (N, F2) of the same clips, partners (N,) the index of a clip of
        another video for each clip -> logits (2N, 2): rows [0, N) the positive pairs (teacher i, student i),
        rows [N, 2N) the negative pairs (teacher partners[i], student i)."""
        student = self.student.forward_features(clips)
        teacher = teacher_features.to(student.dtype)
        pos = torch.cat([teacher, student], 1)
        neg = torch.cat([teacher.index_select(0, partners), student], 1)
        return self.head(torch.cat([pos, neg]))


def sample_negatives(video_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each clip i, a clip j of the batch from another video (uniformly among those), drawn with ``generator``.

    video_ids: (N,) integers, the video each clip comes from (clips of the same video share an id).
    Returns partners (N,) long with ``video_ids[partners] != video_ids`` everywhere. A batch in which some clip
    has no clip of another video (e.g. all from one video) is a ValueError.
    """
    ids = torch.as_tensor(video_ids).flatten().cpu()
    if ids.numel() < 2:
        raise ValueError(
            f"video_ids: a negative pair needs clips of at least 2 videos per batch, got {ids.numel()} clip"
        )
    other = ids.view(-1, 1) != ids.view(1, -1)
    if not bool(other.any(1).all()):
        raise ValueError(
            f"video_ids: every clip needs a clip of another video in its batch to form a negative pair, got ids "
            f"{ids.tolist()[:16]}; use a larger batch or more videos"
        )
    return torch.multinomial(other.double(), 1, generator=generator).view(-1)


def _batch_seed(ids: torch.Tensor, batch: Mapping[str, Any], base_seed: int) -> int:
    # the negatives depend only on the batch (its ordered clips and, when given, their per-sample seeds) and the
    # run's seed: the same draw in a resumed run as in an uninterrupted one, and no draw from the global RNG
    data = ids.numpy().tobytes()
    if batch.get("seeds") is not None:
        data += torch.as_tensor(batch["seeds"]).cpu().numpy().tobytes()
    digest = hashlib.blake2b(data + str(base_seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TransferStep:
    """The Trainer's step function for the transfer: ``step(model, batch, device) -> StepOutput``.

    ``batch`` holds "clips" (N, 3, T, H, W) and either "video" (N,) video ids or "indices" (N,) dataset indices
    (mapped to video ids by ``video_of``, (len(dataset),) int64; without it every index is its own video), and
    optionally "seeds" (per-sample seeds, mixed into the negative draw). The loss is the cross-entropy over the N
    positive and N negative pairs. ``count`` is N clips (so clips/s stays clips/s) and ``correct`` is half the
    pairs classified right, so the Trainer's accuracy is the match / no-match accuracy over the 2N pairs.
    """

    def __init__(self, teacher: FrozenTeacher, seed: int = 0, video_of: torch.Tensor | None = None) -> None:
        self.teacher, self.seed = teacher, seed
        self.video_of = None if video_of is None else torch.as_tensor(video_of, dtype=torch.int64).cpu()

    def video_ids(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if batch.get("video") is not None:
            return torch.as_tensor(batch["video"], dtype=torch.int64).cpu()
        indices = torch.as_tensor(batch["indices"], dtype=torch.int64).cpu()
        return indices if self.video_of is None else self.video_of[indices]

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> StepOutput:
        clips = batch["clips"].to(device, non_blocking=True)
        ids = self.video_ids(batch)
        n = clips.shape[0]
        if ids.numel() != n:
            raise ValueError(f"batch: expected one video id per clip ({n}), got {ids.numel()}")
        teacher_features = self.teacher(clips)
        if bool((ids == ids[0]).all()):
            # every clip of this batch comes from one video (bad videos were dropped): no negative exists. Run
            # the graph with a zero loss so every process (DDP) still takes part in the step, and count nothing.
            logits = model(clips, teacher_features, torch.arange(n, device=device))
            return StepOutput(logits.float().sum() * 0.0, 0, 0)
        generator = torch.Generator().manual_seed(_batch_seed(ids, batch, self.seed))
        partners = sample_negatives(ids, generator).to(device)
        logits = model(clips, teacher_features, partners)
        labels = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)]).to(device)
        loss = F.cross_entropy(logits.float(), labels)
        correct_pairs = int((logits.argmax(1) == labels).sum())
        return StepOutput(loss, n, correct_pairs / 2)
