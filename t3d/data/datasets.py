"""Video datasets in the standard layouts and clip sampling.

Layouts (``format=``):

- ``ucf101``: ``ROOT/<Class>/<video>.avi`` (or under ``ROOT/UCF-101``) plus the official split files
  ``classInd.txt``, ``trainlist0K.txt``, ``testlist0K.txt`` in ``ROOT``, ``ROOT/ucfTrainTestlist`` or next to ROOT.
- ``hmdb51``: ``ROOT/<class>/<video>.avi`` plus ``<class>_test_splitK.txt`` files (lines ``video.avi N``:
  1 = train, 2 = test, 0 = unused) in ``ROOT``, ``ROOT/testTrainMulti_7030_splits`` or ``ROOT/splits``.
- ``kinetics``: a CSV ``label,youtube_id,time_start,time_end,split`` (``ROOT/<split>.csv`` or
  ``ROOT/annotations/<split>.csv``, or ``annotations=``) with videos at
  ``ROOT/<split>/<label>/<youtube_id>_<start:06d>_<end:06d>.mp4``.
- ``folder``: ``ROOT/<split>/<class>/<video>`` when ``ROOT/<split>`` exists, else ``ROOT/<class>/<video>``.

A video is a file (PyAV) or a folder of JPEG frames. ``format="auto"`` recognises the layout from its files.

:class:`VideoDataset` samples clips of ``clip_len`` frames ``frame_stride`` apart: one random clip per video for
training, ``num_clips`` clips uniformly spread for testing. A video that cannot be read or is too short returns a
:class:`SkippedSample` (and prints one line naming it and why); :func:`t3d.data.collate_clips` drops and counts those.
"""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .video import VideoReadError, VideoTooShort, count_frames, is_video_path, read_frames

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

FORMATS = ("auto", "ucf101", "hmdb51", "kinetics", "folder")
HINTS_FILE = "t3d_dataset.json"


@dataclass(frozen=True)
class VideoRecord:
    """One video: ``path`` (file or frame folder) and its class ``label`` (index into the class list)."""

    path: str
    label: int


@dataclass(frozen=True)
class SkippedSample:
    """Placeholder a dataset returns for a video it could not use; the collate function drops and counts it."""

    path: str
    reason: str


def _require_dir(root: str, what: str = "data_dir") -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what}: expected a dataset directory, got {root!r} (no such directory)")
    return root


def _check_split(split: str, allowed: Sequence[str]) -> str:
    if split not in allowed:
        raise ValueError(f"--split: expected one of {list(allowed)}, got {split!r}")
    return split


def _check_fold(fold: int, folds: int = 3) -> int:
    if not 1 <= int(fold) <= folds:
        raise ValueError(f"--fold: expected an official split number 1..{folds}, got {fold}")
    return int(fold)


def _find_file(candidates: Sequence[str]) -> str | None:
    return next((c for c in candidates if os.path.isfile(c)), None)


def _ucf_split_dir(root: str) -> str | None:
    for d in (root, os.path.join(root, "ucfTrainTestlist"), os.path.join(os.path.dirname(root), "ucfTrainTestlist")):
        if os.path.isfile(os.path.join(d, "classInd.txt")):
            return d
    return None


def _hmdb_split_dir(root: str) -> str | None:
    for d in (root, os.path.join(root, "testTrainMulti_7030_splits"), os.path.join(root, "splits"),
              os.path.join(os.path.dirname(root), "testTrainMulti_7030_splits")):
        if os.path.isdir(d) and any(f.endswith("_test_split1.txt") for f in os.listdir(d)):
            return d
    return None


def _kinetics_csv(root: str, split: str) -> str | None:
    names = [split] + (["validate", "val"] if split in ("val", "validate") else [])
    return _find_file(
        [os.path.join(root, f"{n}.csv") for n in names] + [os.path.join(root, "annotations", f"{n}.csv") for n in names]
    )


def detect_format(root: str) -> str:
    """The layout of ``root``: ucf101, hmdb51, kinetics or folder (see the module docstring)."""
    root = _require_dir(root)
    if _ucf_split_dir(root):
        return "ucf101"
    if _hmdb_split_dir(root):
        return "hmdb51"
    if any(_kinetics_csv(root, s) for s in ("train", "val", "test")):
        return "kinetics"
    return "folder"


def _resolve_case_insensitive(base: str, rel: str) -> str | None:
    """UCF101's lists and folders disagree on case for a few classes (HandStandPushups)."""
    path = os.path.join(base, rel)
    if os.path.exists(path):
        return path
    current = base
    for part in rel.split("/"):
        if not os.path.isdir(current):
            return None
        match = next((e for e in os.listdir(current) if e.lower() == part.lower()), None)
        if match is None:
            return None
        current = os.path.join(current, match)
    return current


def _ucf101(root: str, split: str, fold: int) -> tuple[list[VideoRecord], list[str], list[str]]:
    _check_split(split, ("train", "test"))
    fold = _check_fold(fold)
    split_dir = _ucf_split_dir(root)
    if split_dir is None:
        raise FileNotFoundError(f"data_dir: no UCF101 classInd.txt in {root!r} or {root!r}/ucfTrainTestlist")
    classes = []
    with open(os.path.join(split_dir, "classInd.txt")) as f:
        for line in f:
            if line.strip():
                _, name = line.split()
                classes.append(name)
    list_file = os.path.join(split_dir, f"{split}list0{fold}.txt")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"--fold: split file {list_file!r} does not exist (fold {fold}, split {split!r})")
    video_root = os.path.join(root, "UCF-101") if os.path.isdir(os.path.join(root, "UCF-101")) else root
    lower = {c.lower(): i for i, c in enumerate(classes)}
    records, missing = [], []
    with open(list_file) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            rel = parts[0].replace("\\", "/")
            cls = rel.split("/")[0].lower()
            if cls not in lower:
                raise ValueError(f"{list_file}: class {rel.split('/')[0]!r} is not in classInd.txt")
            path = _resolve_case_insensitive(video_root, rel)
            if path is None:
                missing.append(os.path.join(video_root, rel))
            else:
                records.append(VideoRecord(path, lower[cls]))
    return records, classes, missing


def _hmdb51(root: str, split: str, fold: int) -> tuple[list[VideoRecord], list[str], list[str]]:
    _check_split(split, ("train", "test"))
    fold = _check_fold(fold)
    split_dir = _hmdb_split_dir(root)
    if split_dir is None:
        raise FileNotFoundError(f"data_dir: no HMDB51 *_test_split1.txt files in {root!r}")
    suffix = f"_test_split{fold}.txt"
    files = sorted(f for f in os.listdir(split_dir) if f.endswith(suffix))
    if not files:
        raise FileNotFoundError(f"--fold: no *{suffix} files in {split_dir!r}")
    classes = [f[: -len(suffix)] for f in files]
    wanted = "1" if split == "train" else "2"
    records, missing = [], []
    for label, (cls, fname) in enumerate(zip(classes, files, strict=True)):
        with open(os.path.join(split_dir, fname)) as f:
            for line in f:
                parts = line.split()
                if len(parts) != 2 or parts[1] != wanted:
                    continue
                path = os.path.join(root, cls, parts[0])
                if os.path.exists(path):
                    records.append(VideoRecord(path, label))
                else:
                    missing.append(path)
    return records, classes, missing


def _kinetics(root: str, split: str, annotations: str | None) -> tuple[list[VideoRecord], list[str], list[str]]:
    _check_split(split, ("train", "val", "validate", "test"))
    csv_path = annotations or _kinetics_csv(root, split)
    if csv_path is None or not os.path.isfile(csv_path):
        raise FileNotFoundError(f"--annotations: no Kinetics CSV for split {split!r} in {root!r} (or annotations/)")

    def read(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            need = {"label", "youtube_id", "time_start", "time_end"}
            if not need.issubset(reader.fieldnames or ()):
                raise ValueError(f"{path}: expected CSV columns {sorted(need)}, got {reader.fieldnames}")
            return list(reader)

    rows = read(csv_path)
    train_csv = _kinetics_csv(root, "train")
    # class indices come from the training annotations, so every split numbers classes the same way
    classes = sorted({r["label"] for r in (read(train_csv) if train_csv else rows)})
    index = {c: i for i, c in enumerate(classes)}
    split_dirs = [split] + (["val", "validate"] if split in ("val", "validate") else [])
    records, missing = [], []
    for r in rows:
        if r["label"] not in index:
            missing.append(f"{r['youtube_id']} (class {r['label']!r} not in the training annotations)")
            continue
        start, end = int(float(r["time_start"])), int(float(r["time_end"]))
        names = [f"{r['youtube_id']}_{start:06d}_{end:06d}", f"{r['youtube_id']}_{start}_{end}", r["youtube_id"]]
        found = None
        for d in split_dirs:
            for name in names:
                for ext in (".mp4", ".webm", ".mkv", ".avi", ""):
                    p = os.path.join(root, d, r["label"], name + ext)
                    if os.path.exists(p):
                        found = p
                        break
                if found:
                    break
            if found:
                break
        if found:
            records.append(VideoRecord(found, index[r["label"]]))
        else:
            missing.append(os.path.join(root, split, r["label"], names[0] + ".mp4"))
    return records, classes, missing


def _folder(root: str, split: str) -> tuple[list[VideoRecord], list[str], list[str]]:
    base = os.path.join(root, split) if split and os.path.isdir(os.path.join(root, split)) else root
    if base == root and split not in ("", "all"):
        present = [d for d in ("train", "val", "test") if os.path.isdir(os.path.join(root, d))]
        if present:
            raise ValueError(f"--split: expected one of {present} (folders of {root!r}), got {split!r}")
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
    if not classes:
        raise FileNotFoundError(f"data_dir: expected class folders in {base!r}, found none")
    records = []
    for label, cls in enumerate(classes):
        cdir = os.path.join(base, cls)
        entries = sorted(os.listdir(cdir))
        if entries and all(e.lower().endswith((".jpg", ".jpeg", ".png")) for e in entries):
            records.append(VideoRecord(cdir, label))  # the class folder is itself a single frame folder
            continue
        for e in entries:
            p = os.path.join(cdir, e)
            if is_video_path(p):
                records.append(VideoRecord(p, label))
    return records, classes, []


def report_skip(message: str) -> None:
    """Say that data is skipped: one plain line on stderr (from a DataLoader worker too), not a Python warning that
    repeats its source line; training goes on and the skip is counted."""
    print(message, file=sys.stderr, flush=True)


def find_records(
    root: str, format: str = "auto", split: str = "train", fold: int = 1, annotations: str | None = None
) -> tuple[list[VideoRecord], list[str]]:
    """(videos, class names) of one split. Videos listed but missing on disk are skipped with one warning."""
    root = _require_dir(root)
    if format not in FORMATS:
        raise ValueError(f"--format: expected one of {list(FORMATS)}, got {format!r}")
    if format == "auto":
        format = detect_format(root)
    if format == "ucf101":
        records, classes, missing = _ucf101(root, split, fold)
    elif format == "hmdb51":
        records, classes, missing = _hmdb51(root, split, fold)
    elif format == "kinetics":
        records, classes, missing = _kinetics(root, split, annotations)
    else:
        records, classes, missing = _folder(root, split)
    if missing:
        report_skip(
            f"{root}: {len(missing)} videos of split {split!r} listed but missing, skipped (first: {missing[0]})"
        )
    if not records:
        raise FileNotFoundError(f"data_dir: no videos found for split {split!r} in {root!r} (format {format})")
    return records, classes


def dataset_hints(root: str) -> dict[str, Any]:
    """Optional facts a dataset declares in ``ROOT/t3d_dataset.json`` (the synthetic generator writes
    ``{"hflip": false}``: flipping would swap its left/right classes)."""
    path = os.path.join(root, HINTS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


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
