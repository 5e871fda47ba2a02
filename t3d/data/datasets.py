"""Video datasets in the standard layouts and clip sampling.

The layouts (``format=`` ucf101, hmdb51, kinetics, folder, auto) and their annotation / split-file parsers live in
:mod:`t3d.data.layouts` (:func:`find_records`, :func:`detect_format`, :func:`dataset_hints`); they are re-exported
here.

A video is a file (PyAV) or a folder of JPEG frames. ``format="auto"`` recognises the layout from its files.

:class:`VideoDataset` samples clips of ``clip_len`` frames ``frame_stride`` apart: one random clip per video for
training, ``num_clips`` clips uniformly spread for testing. A video that cannot be read or is too short returns a
:class:`SkippedSample` (and prints one line naming it and why); :func:`t3d.data.collate_clips` drops and counts those.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .layouts import (
    FORMATS,
    HINTS_FILE,  # noqa: F401  (re-exported: the layout parsers live in .layouts)
    VideoRecord,
    dataset_hints,
    detect_format,
    find_records,
    report_skip,
)
from .video import VideoReadError, VideoTooShort, count_frames, read_frames

__all__ = [
    "FORMATS",
    "VideoRecord",
    "SkippedSample",
    "VideoDataset",
    "detect_format",
    "find_records",
    "build_dataset",
    "dataset_hints",
    "clip_indices",
]


@dataclass(frozen=True)
class SkippedSample:
    """Placeholder a dataset returns for a video it could not use; the collate function drops and counts it."""

    path: str
    reason: str


def clip_indices(num_frames: int, clip_len: int, stride: int, start: int) -> list[int]:
    return [start + i * stride for i in range(clip_len)]


def uniform_starts(num_frames: int, span: int, num_clips: int) -> list[int]:
    """``num_clips`` clip starts spread uniformly from the first to the last possible one (symmetric in time)."""
    last = num_frames - span
    if num_clips == 1:
        return [last // 2]
    return [round(i * last / (num_clips - 1)) for i in range(num_clips)]


class VideoDataset(Dataset):
    """Clips of videos with labels.

    Args:
        records: the videos (see :func:`find_records`).
        classes: class names (labels index them).
        clip_len: frames per clip T.
        frame_stride: temporal stride between the clip's frames.
        mode: "train" (one random clip per video) or "test" (``num_clips`` uniformly spread clips).
        num_clips: clips per video in test mode.
        transform: ``(frames uint8 (T, H, W, 3), rng) -> (3, T, H, W)`` (e.g. :class:`ClipTransform`); None gives
            float [0, 1] clips unchanged in size.
        seed: used when indexed by a plain int (not by an :class:`EpochSampler` pair).

    ``dataset[i]`` or ``dataset[(i, sample_seed)]`` returns {"clip": (3, T, H, W) — or (K, 3, T, H, W) in test
    mode —, "label": int, "index": i} or a :class:`SkippedSample`.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        classes: Sequence[str],
        clip_len: int = 16,
        frame_stride: int = 1,
        mode: str = "train",
        num_clips: int = 1,
        transform: Callable[[np.ndarray, random.Random], torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in ("train", "test"):
            raise ValueError(f"mode: expected 'train' or 'test', got {mode!r}")
        if clip_len < 1 or frame_stride < 1 or num_clips < 1:
            raise ValueError(
                "clip_len, frame_stride, num_clips: expected integers >= 1, "
                f"got {clip_len}, {frame_stride}, {num_clips}"
            )
        if not records:
            raise ValueError("records: expected at least one video, got none")
        self.records, self.classes = list(records), list(classes)
        self.clip_len, self.frame_stride, self.mode, self.num_clips = clip_len, frame_stride, mode, num_clips
        self.transform, self.seed = transform, seed
        # frame counts seen so far (per process: each DataLoader worker fills its own); saves a container open, or
        # a full decode where the container does not store the count
        self._num_frames: dict[int, int] = {}

    @property
    def span(self) -> int:
        """Frames of the video one clip covers."""
        return (self.clip_len - 1) * self.frame_stride + 1

    def __len__(self) -> int:
        return len(self.records)

    def check_clip_fits(self, max_probe: int = 16) -> int:
        """Raise a ValueError when the clip is longer than the videos (probing up to ``max_probe`` of them, spread
        over the dataset); returns the longest probed frame count. Single too-short videos are only skipped."""
        step = max(1, len(self.records) // max_probe)
        longest, probed = 0, 0
        for rec in self.records[::step][:max_probe]:
            try:
                longest = max(longest, count_frames(rec.path))
                probed += 1
            except VideoReadError:
                continue
            if longest >= self.span:
                return longest
        if probed and longest < self.span:
            raise ValueError(
                f"--clip: a clip of {self.clip_len} frames at stride {self.frame_stride} spans {self.span} frames, "
                f"longer than the videos (longest of {probed} probed: {longest} frames); use a shorter clip or stride"
            )
        return longest

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any] | SkippedSample:
        index, seed = item if isinstance(item, tuple) else (int(item), self.seed * 1_000_003 + int(item))
        rec = self.records[index]
        rng = random.Random(seed)
        try:
            num = self._num_frames.get(index)
            if num is None:
                num = self._num_frames[index] = count_frames(rec.path)
            try:
                clips = self._load(rec.path, num, rng)
            except VideoTooShort as exc:  # the container over-reported its frame count
                self._num_frames[index] = exc.num_frames
                clips = self._load(rec.path, exc.num_frames, random.Random(seed))
        except (VideoReadError, OSError, ValueError) as exc:
            report_skip(f"skipping video {rec.path}: {exc}")
            return SkippedSample(rec.path, str(exc))
        return {"clip": clips, "label": rec.label, "index": index}

    def _load(self, path: str, num: int, rng: random.Random) -> torch.Tensor:
        if num < self.span:
            raise VideoTooShort(f"{path}: {num} frames, a clip needs {self.span}", num)
        if self.mode == "train":
            starts = [rng.randint(0, num - self.span)]
        else:
            starts = uniform_starts(num, self.span, self.num_clips)
        indices = [s + i * self.frame_stride for s in starts for i in range(self.clip_len)]
        # FFmpeg resizes to the transform's short side while converting (a full-resolution float clip costs more)
        frames = read_frames(path, indices, short_side=getattr(self.transform, "resize", None))
        out = []
        for k in range(len(starts)):
            f = frames[k * self.clip_len : (k + 1) * self.clip_len]
            if self.transform is not None:
                out.append(self.transform(f, rng))
            else:
                out.append(torch.from_numpy(f).permute(3, 0, 1, 2).float().div_(255.0))
        return out[0] if self.mode == "train" else torch.stack(out)


def build_dataset(
    root: str,
    *,
    format: str = "auto",
    split: str = "train",
    fold: int = 1,
    annotations: str | None = None,
    clip_len: int = 16,
    frame_stride: int = 1,
    mode: str | None = None,
    num_clips: int = 1,
    transform: Callable[[np.ndarray, random.Random], torch.Tensor] | None = None,
    seed: int = 0,
    check_clip: bool = True,
) -> VideoDataset:
    """:func:`find_records` + :class:`VideoDataset` (+ the clip-length check). ``mode`` defaults to "test" for the
    test/val splits, else "train"."""
    records, classes = find_records(root, format, split, fold, annotations)
    mode = mode or ("test" if split in ("test", "val", "validate") else "train")
    ds = VideoDataset(records, classes, clip_len, frame_stride, mode, num_clips, transform, seed)
    if check_clip:
        ds.check_clip_fits()
    return ds
