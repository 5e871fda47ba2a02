"""Classify videos with a trained checkpoint: the Python API (:class:`Predictor`) and ``t3d predict``.

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
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, ClipTransform
from .data.video import IMAGE_EXTENSIONS, VideoReadError, count_frames, is_video_path, read_frames, video_fps

__all__ = ["Predictor", "VideoPrediction", "expand_inputs", "clip_starts", "window_starts", "add_parser"]

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
