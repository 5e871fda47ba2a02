"""``t3d predict``: classify videos with a trained checkpoint from the command line.

Arguments, input listing (files, frame folders, folders of videos, globs) and the outputs (lines, JSON, CSV). The
Python API (:class:`Predictor`, :func:`predict_videos`, ...) lives in :mod:`t3d.predictor` and is re-exported here,
so ``from t3d.predict import Predictor`` keeps working.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from collections.abc import Sequence

import torch

from .data.video import IMAGE_EXTENSIONS, is_video_path
from .predictor import CHUNK as CHUNK  # re-exported: the names t3d.predict always had
from .predictor import (
    FOLDER_FPS,
    Predictor,
    VideoPrediction,
    clip_starts,
    predict_videos,
    window_starts,
)

__all__ = ["Predictor", "VideoPrediction", "expand_inputs", "clip_starts", "window_starts", "add_parser"]


# ------------------------------------------------------------------------------------------------- inputs
def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Video files, frame folders, folders of videos and glob patterns -> (videos, [(input, error)]) in order,
    without repeats."""
    videos: list[str] = []
    errors: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item) and not _has_images(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(item)
                for f in files
                if is_video_path(os.path.join(root, f))
            )
            found += sorted(root for root, _, files in os.walk(item) if root != item and _has_images(root))
            if not found:
                errors.append((item, "no video file or frame folder in this directory"))
            videos.extend(found)
        elif os.path.exists(item):
            videos.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                errors.append((item, "no such file, and no file matches it as a pattern"))
            videos.extend(matches)
    return list(dict.fromkeys(videos)), errors


def _has_images(folder: str) -> bool:
    return any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(folder))


# ------------------------------------------------------------------------------------------------- CLI
def _format_top(top: list[tuple[str, float]]) -> str:
    return " | ".join(f"{name} {p:.4f}" for name, p in top)


def _write_csv(path: str, results: list[VideoPrediction]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "start_s", "end_s", "rank", "class", "probability"])
        for r in results:
            spans = [(w_["start"], w_["end"], w_["top"]) for w_ in r.windows] or [("", "", r.top)]
            for start, end, top in spans:
                for rank, (name, p) in enumerate(top, 1):
                    w.writerow([r.path, start, end, rank, name, f"{p:.6f}"])


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise ValueError(f"--topk: expected an integer >= 1, got {args.topk}")
    if args.clips < 1:
        raise ValueError(f"--clips: expected an integer >= 1, got {args.clips}")
    if args.every is not None and args.every <= 0:
        raise ValueError(f"--every: expected a positive number of seconds, got {args.every}")
    if args.threads:
        torch.set_num_threads(args.threads)
    videos, errors = expand_inputs(args.videos)
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, backend=args.backend)
    results, read_errors = predict_videos(
        predictor,
        videos,
        topk=args.topk,
        clips=args.clips,
        crops=args.crops,
        every=args.every,
        workers=args.workers,
        batch_size=args.batch_size,
        progress=not args.no_progress and len(videos) > 1,
    )
    errors += read_errors
    for path, error in errors:
        print(f"t3d predict: cannot read {path}: {error}", file=sys.stderr)
    if args.json:
        doc = {
            "checkpoint": os.path.abspath(args.checkpoint),
            "model": predictor.meta.get("model"),
            "clip": list(predictor.clip),
            "clips": args.clips if args.every is None else None,
            "every_s": args.every,
            "crops": args.crops,
            "videos": [r.to_json() for r in results],
            "errors": [{"path": p, "error": e} for p, e in errors],
        }
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for r in results:
            if r.windows:
                for w in r.windows:
                    print(f"{r.path} {w['start']:.2f}-{w['end']:.2f}s: {_format_top(w['top'])}")
            else:
                print(f"{r.path}: {_format_top(r.top)}")
        if errors:
            print(f"{len(errors)} input(s) could not be read (listed above on stderr)", file=sys.stderr)
    if args.csv:
        _write_csv(args.csv, results)
    return 0 if results or not errors else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify videos with a trained checkpoint (top-k classes and probabilities)",
        description="Top-k classes of each video: softmax probabilities averaged over --clips uniformly spread clips "
        "(and --crops spatial views), or per sliding window with --every. Unreadable inputs are listed on stderr; "
        "the exit status is nonzero only when nothing could be read.",
    )
    p.add_argument("checkpoint", help="a checkpoint written by t3d train (e.g. OUT/last.pt)")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files, frame folders, folders of videos, globs")
    p.add_argument("--topk", type=int, default=5, help="classes shown per video (default 5)")
    p.add_argument("--clips", type=int, default=10, help="uniformly spread clips per video (default 10)")
    p.add_argument("--crops", type=int, default=1, choices=(1, 3), help="1: center crop, 3: start/center/end")
    p.add_argument(
        "--every",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"classify one clip every SECONDS (sliding windows; frame folders count {FOLDER_FPS:g} frames/s)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document on stdout (and nothing else there)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the predictions as CSV")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--backend", default="auto", help="backend of the TTLs and dense blocks (default auto: fused)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per model call (default 8)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding processes (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
