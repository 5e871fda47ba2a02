"""Classify videos with a trained checkpoint: the Python API (:class:`Predictor`, :func:`predict_videos`).

A checkpoint written by ``t3d train`` stores the model's name, its class names, the clip (T, H, W), the frame
stride and the short side clips were resized to; :meth:`Predictor.from_checkpoint` rebuilds the model from them
(fused backend, eval mode)::

    from t3d.predict import Predictor

    predictor = Predictor.from_checkpoint("runs/ucf/last.pt")           # model + classes, clip, normalisation
    predictor.predict("video.mp4", topk=5, clips=10, crops=3)           # [("PlayingGuitar", 0.93), ...]
    predictor.probabilities(clips)                                       # normalised (N, 3, T, H, W) -> (N, C)

Video-level scores are the softmax probabilities averaged over ``clips`` clips spread uniformly over the video and
over ``crops`` spatial views (1: center; 3: start, center, end along the long side). ``every`` classifies sliding
windows instead: one clip every ``every`` seconds, each with its own scores and time span.

The ``t3d predict`` command (inputs, output formats) is :mod:`t3d.predict`, which re-exports this module's names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, ClipTransform
from .data.video import VideoReadError, count_frames, read_frames, video_fps

__all__ = ["Predictor", "VideoPrediction", "clip_starts", "window_starts", "predict_videos"]

# frame folders state no frame rate: the rate --every assumes for them
FOLDER_FPS = 25.0
# clips (or windows) one loader item decodes: bounds the memory of long videos under --every
CHUNK = 16


def clip_starts(num_frames: int, span: int, clips: int) -> list[int]:
    """``clips`` first frames spread uniformly from the first to the last possible one (0 when the video is shorter
    than a clip: its frames are then repeated up to the clip's length)."""
    last = max(0, num_frames - span)
    if clips == 1:
        return [last // 2]
    return [round(i * last / (clips - 1)) for i in range(clips)]


def window_starts(num_frames: int, span: int, step: int) -> list[int]:
    """First frames of the sliding windows: 0, step, 2*step, ... while the window fits (at least one window)."""
    return list(range(0, max(0, num_frames - span) + 1, max(1, step)))


@dataclass
class VideoPrediction:
    """The result for one video: ``top`` [(class, probability)] of the averaged scores, ``scores`` (C,), and with
    ``every`` one entry per window in ``windows`` ({"start": s, "end": s, "top": [...]}, seconds)."""

    path: str
    top: list[tuple[str, float]]
    scores: torch.Tensor
    views: int
    windows: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "views": self.views, "top": _top_json(self.top)}
        if self.windows:
            out["windows"] = [{**w, "top": _top_json(w["top"])} for w in self.windows]
        return out


def _top_json(top: list[tuple[str, float]]) -> list[dict[str, Any]]:
    return [{"class": name, "probability": round(p, 6)} for name, p in top]


class Predictor:
    """A trained model with what is needed to feed it: classes, clip (T, H, W), frame stride, resize, mean/std.

    ``model`` is in eval mode on ``device``. Build it with :meth:`from_checkpoint`, or directly from a model.
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str],
        clip: Sequence[int],
        frame_stride: int = 1,
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: torch.device | str = "cpu",
        meta: dict[str, Any] | None = None,
    ) -> None:
        if len(clip) != 3 or min(int(v) for v in clip) < 1:
            raise ValueError(f"clip: expected (T, H, W) of positive sizes, got {tuple(clip)}")
        if frame_stride < 1:
            raise ValueError(f"frame_stride: expected an integer >= 1, got {frame_stride}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.classes = list(classes)
        self.clip = tuple(int(v) for v in clip)
        self.frame_stride = int(frame_stride)
        self.mean, self.std = tuple(mean), tuple(std)
        self.resize = ClipTransform(self.clip[1:], resize=resize, train=False).resize
        self.meta = dict(meta or {})

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device = "auto", backend: str = "auto"
    ) -> Predictor:
        """Load a checkpoint written by ``t3d train`` (its ``meta``: model, classes, clip ...); ``backend`` of the
        TTLs and dense blocks ("auto": the fused kernels), ``device`` "auto" (CUDA when available), "cpu", ..."""
        from .checkpoint import extract_state_dict, load_checkpoint
        from .distributed import resolve_device
        from .models import build_model

        ckpt = load_checkpoint(path)
        meta = ckpt.get("meta") or {}
        missing = [k for k in ("model", "classes", "clip") if k not in meta]
        if missing:
            raise ValueError(
                f"checkpoint: {os.fspath(path)!r} has no {missing} in its metadata (expected a checkpoint written "
                "by t3d train)"
            )
        model = build_model(meta["model"], len(meta["classes"]), backend)
        model.load_state_dict(extract_state_dict(ckpt))
        return cls(
            model,
            meta["classes"],
            meta["clip"],
            frame_stride=int(meta.get("frame_stride", 1)),
            resize=meta.get("resize"),
            mean=meta.get("mean", IMAGENET_MEAN),
            std=meta.get("std", IMAGENET_STD),
            device=resolve_device(str(device)),
            meta=meta,
        )

    @property
    def span(self) -> int:
        """Frames of the video one clip covers."""
        return (self.clip[0] - 1) * self.frame_stride + 1

    def transform(self, crops: int = 1) -> ClipTransform:
        """uint8 frames (T, H, W, 3) -> the normalised clip (3, T, H, W), or (3 crops, 3, T, H, W)."""
        return ClipTransform(self.clip[1:], resize=self.resize, train=False, mean=self.mean, std=self.std, crops=crops)

    def views(self, path: str, starts: Sequence[int], crops: int = 1, num_frames: int | None = None) -> torch.Tensor:
        """The clips of ``path`` starting at ``starts``: (len(starts) * crops, 3, T, H, W), normalised.

        Frame numbers past the end (a video shorter than a clip) repeat the last frame."""
        if crops not in (1, 3):
            raise ValueError(f"crops: expected 1 or 3, got {crops}")
        num = count_frames(path) if num_frames is None else num_frames
        offsets = [i * self.frame_stride for i in range(self.clip[0])]
        indices = [min(s + o, num - 1) for s in starts for o in offsets]
        frames = read_frames(path, indices, short_side=self.resize)
        transform = self.transform(crops)
        t = self.clip[0]
        clips = [transform(frames[k * t : (k + 1) * t]) for k in range(len(starts))]
        return torch.cat(clips) if crops == 3 else torch.stack(clips)

    @torch.no_grad()
    def probabilities(self, clips: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """Softmax scores of normalised clips (N, 3, T, H, W) (or one clip (3, T, H, W)) -> (N, C) float32 on the
        CPU; the model sees at most ``batch_size`` clips at a time."""
        if clips.dim() == 4:
            clips = clips[None]
        if clips.dim() != 5 or clips.shape[1] != 3:
            raise ValueError(f"clips: expected (N, 3, T, H, W) or (3, T, H, W), got shape {tuple(clips.shape)}")
        out = [
            self.model(chunk.to(self.device, non_blocking=True)).float().softmax(1).cpu()
            for chunk in clips.split(max(1, batch_size))
        ]
        return torch.cat(out)

    def top(self, scores: torch.Tensor, topk: int = 5) -> list[tuple[str, float]]:
        """[(class name, probability)] of the ``topk`` best of ``scores`` (C,)."""
        values, indices = scores.topk(min(topk, scores.numel()))
        return [(self.classes[int(i)], float(v)) for v, i in zip(values, indices)]

    def predict(
        self, video: str | torch.Tensor, topk: int = 5, clips: int = 10, crops: int = 1
    ) -> list[tuple[str, float]]:
        """Top-``topk`` [(class, probability)] of a video file / frame folder (scores averaged over ``clips`` x
        ``crops`` views), or of normalised clips (N, 3, T, H, W) / (3, T, H, W) (averaged over N)."""
        if isinstance(video, torch.Tensor):
            return self.top(self.probabilities(video).mean(0), topk)
        if clips < 1:
            raise ValueError(f"clips: expected at least 1 clip, got {clips}")
        num = count_frames(video)
        views = self.views(video, clip_starts(num, self.span, clips), crops, num)
        return self.top(self.probabilities(views).mean(0), topk)


# ------------------------------------------------------------------------------------------------- many videos
@dataclass
class _Item:
    video: int  # index into the video list
    starts: list[int]
    num_frames: int


class _ViewDataset(Dataset):
    """One item = up to CHUNK clips of one video (decoded in a DataLoader worker); errors come back as strings."""

    def __init__(self, predictor: Predictor, videos: list[str], items: list[_Item], crops: int) -> None:
        self.predictor, self.videos, self.items, self.crops = predictor, videos, items, crops

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        item = self.items[i]
        try:
            return i, self.predictor.views(self.videos[item.video], item.starts, self.crops, item.num_frames)
        except (VideoReadError, OSError, ValueError) as exc:
            return i, str(exc)


def _first(batch: list) -> Any:
    return batch[0]


def predict_videos(
    predictor: Predictor,
    videos: list[str],
    topk: int = 5,
    clips: int = 10,
    crops: int = 1,
    every: float | None = None,
    workers: int = 2,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[VideoPrediction], list[tuple[str, str]]]:
    """Classify many videos, decoding in DataLoader workers: (predictions in input order, [(path, error)])."""
    errors: dict[int, str] = {}
    items: list[_Item] = []
    fps: dict[int, float] = {}
    for v, path in enumerate(videos):
        try:
            num = count_frames(path)
            if num < 1:
                raise VideoReadError(f"{path}: no frame")
            if every is None:
                starts = clip_starts(num, predictor.span, clips)
            else:
                fps[v] = video_fps(path) or FOLDER_FPS
                starts = window_starts(num, predictor.span, round(every * fps[v]))
        except (VideoReadError, OSError) as exc:
            errors[v] = str(exc)
            continue
        items.extend(_Item(v, starts[i : i + CHUNK], num) for i in range(0, len(starts), CHUNK))
    loader = DataLoader(
        _ViewDataset(predictor, videos, items, crops), batch_size=1, collate_fn=_first, num_workers=workers
    )
    scores: dict[int, list[torch.Tensor]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len({item.video for item in items}), desc="predict", unit="video", file=sys.stderr)
    for i, views in loader:
        item = items[i]
        if bar is not None and (i + 1 == len(items) or items[i + 1].video != item.video):
            bar.update(1)
        if item.video in errors:
            continue
        if isinstance(views, str):
            errors[item.video] = views
            continue
        # (clips, crops, C): the crops of a clip are consecutive views
        probs = predictor.probabilities(views, batch_size).view(len(item.starts), crops, -1)
        scores.setdefault(item.video, []).append(probs)
    if bar is not None:
        bar.close()
    results = []
    for v, path in enumerate(videos):
        if v in errors or v not in scores:
            continue
        per_clip = torch.cat(scores[v]).mean(1)  # (clips or windows, C)
        mean = per_clip.mean(0)
        result = VideoPrediction(path, predictor.top(mean, topk), mean, per_clip.shape[0] * crops)
        if every is not None:
            starts = [s for item in items if item.video == v for s in item.starts]
            result.windows = [
                {
                    "start": round(s / fps[v], 3),
                    "end": round((s + predictor.span) / fps[v], 3),
                    "top": predictor.top(p, topk),
                }
                for s, p in zip(starts, per_clip)
            ]
        results.append(result)
    return results, [(videos[v], e) for v, e in sorted(errors.items())]
