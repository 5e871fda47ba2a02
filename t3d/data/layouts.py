"""Dataset layouts: finding the videos and class names of one split from the annotation / split files.

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

:func:`find_records` returns the :class:`VideoRecord` list of one split; :mod:`t3d.data.datasets` turns it into a
:class:`~t3d.data.datasets.VideoDataset` of clips.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .video import is_video_path

__all__ = [
    "FORMATS",
    "HINTS_FILE",
    "VideoRecord",
    "detect_format",
    "find_records",
    "dataset_hints",
    "report_skip",
]

FORMATS = ("auto", "ucf101", "hmdb51", "kinetics", "folder")
HINTS_FILE = "t3d_dataset.json"


@dataclass(frozen=True)
class VideoRecord:
    """One video: ``path`` (file or frame folder) and its class ``label`` (index into the class list)."""

    path: str
    label: int


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
    for d in (
        root,
        os.path.join(root, "testTrainMulti_7030_splits"),
        os.path.join(root, "splits"),
        os.path.join(os.path.dirname(root), "testTrainMulti_7030_splits"),
    ):
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
