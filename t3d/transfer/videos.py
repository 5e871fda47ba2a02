"""Unlabeled videos for the transfer: every video under a folder, and which clips share a source video (they must
never be each other's negatives)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch

from ..data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

__all__ = ["find_unlabeled_videos", "video_ids", "video_key"]

# UCF101/HMDB-style names "v_<Class>_g<group>_c<clip>": clips of one group are cut from one source video
_UCF_GROUP = re.compile(r"^(v_.+_g\d+)_c\d+$")


def video_key(path: str) -> str:
    """The source video a file belongs to: UCF101's "v_X_g08_c03" -> "v_X_g08" (clips c01..c07 of a group are
    cut from one YouTube video, so they must never be each other's negatives); any other name is its own video."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    match = _UCF_GROUP.match(stem)
    return os.path.join(os.path.dirname(os.path.normpath(path)), match.group(1)) if match else os.path.normpath(path)


def find_unlabeled_videos(root: str | os.PathLike) -> list[str]:
    """Every video under ``root``, recursively: video files (by extension) and folders of JPEG/PNG frames."""

    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data_dir: expected a directory of videos, got {root!r} (no such directory)")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if filenames and all(f.lower().endswith(IMAGE_EXTENSIONS) for f in filenames):
            found.append(dirpath)  # a frame folder is one video
            dirnames.clear()
            continue
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(VIDEO_EXTENSIONS)]
    if not found:
        raise FileNotFoundError(
            f"data_dir: no videos under {root!r} (looked for {', '.join(VIDEO_EXTENSIONS)} files and frame folders)"
        )
    return found


def video_ids(paths: Sequence[str]) -> torch.Tensor:
    """(len(paths),) int64: one id per source video (see :func:`video_key`), dataset index -> video id."""
    keys: dict[str, int] = {}
    return torch.tensor([keys.setdefault(video_key(p), len(keys)) for p in paths], dtype=torch.int64)
