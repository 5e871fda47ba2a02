"""Evaluation: clip-level and video-level top-1/top-5 accuracy, confusion matrix (CSV + PNG); ``t3d eval``.

Clip level: every sampled view is classified on its own. Video level: the softmax scores of a video's views are
averaged, as in the paper's testing protocol: ``num_clips`` uniformly spread clips, each one center crop or (``--crops
3``) three crops along the long side (the "10 x 3 views" peers report). The confusion matrix is video-level
(rows: true class, columns: predicted class).

Reusable: :func:`evaluate` (a model and a test-mode loader -> metrics), :func:`topk_correct`,
:func:`write_confusion_csv`, :func:`plot_confusion`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .checkpoint import extract_state_dict, load_checkpoint
from .cli_args import AMP_CHOICES, add_common_data_args
from .data import ClipTransform, build_dataset, make_loader
from .distributed import resolve_device
from .models import build_model
from .training import amp_settings

__all__ = ["evaluate", "topk_correct", "write_confusion_csv", "plot_confusion", "add_parser"]


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows of ``scores`` (N, C) have their label among the top-``min(k, C)`` scores."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return int((top == labels[:, None]).any(1).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Any,
    num_classes: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``model`` in eval mode over a loader of test-mode batches.

    Batches: {"clips": (N, K, 3, T, H, W) (or (N, 3, T, H, W) for K = 1, or (N, K, S, 3, T, H, W) for K clips x S
    spatial crops), "labels": (N,), "count", "skipped"}. Every view (clip x crop) counts as one clip.
    Returns {"clip_top1", "clip_top5", "video_top1", "video_top5" (fractions), "clips", "videos", "skipped",
    "confusion": (C, C) int64 tensor, "video_scores": (V, C), "video_labels": (V,), "video_indices": (V,)}.
    """
    device = torch.device(device)
    model.eval()
    clip_c1 = clip_c5 = clip_n = 0
    skipped = 0
    v_scores, v_labels, v_indices = [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(loader), desc="eval", leave=False)
    for batch in loader:
        skipped += int(batch.get("skipped", 0))
        if bar is not None:
            bar.update(1)
        if batch["count"] == 0:
            continue
        clips = batch["clips"]
        if clips.dim() == 5:
            clips = clips[:, None]
        clips = clips.flatten(1, -5)  # (N, views, 3, T, H, W): K clips x S crops
        n, k = clips.shape[:2]
        labels = batch["labels"]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(clips.flatten(0, 1).to(device, non_blocking=True))
        probs = logits.float().softmax(1).cpu().view(n, k, -1)
        clip_labels = labels.repeat_interleave(k)
        flat = probs.flatten(0, 1)
        clip_c1 += topk_correct(flat, clip_labels, 1)
        clip_c5 += topk_correct(flat, clip_labels, 5)
        clip_n += n * k
        v_scores.append(probs.mean(1))
        v_labels.append(labels)
        v_indices.append(batch["indices"])
    if bar is not None:
        bar.close()
    if clip_n == 0:
        raise ValueError(f"data: no readable video to evaluate ({skipped} skipped)")
    scores, labels = torch.cat(v_scores), torch.cat(v_labels)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((labels, scores.argmax(1)), torch.ones_like(labels), accumulate=True)
    return {
        "clip_top1": clip_c1 / clip_n,
        "clip_top5": clip_c5 / clip_n,
        "video_top1": topk_correct(scores, labels, 1) / len(labels),
        "video_top5": topk_correct(scores, labels, 5) / len(labels),
        "clips": clip_n,
        "videos": len(labels),
        "skipped": skipped,
        "confusion": confusion,
        "video_scores": scores,
        "video_labels": labels,
        "video_indices": torch.cat(v_indices),
    }


def write_confusion_csv(confusion: torch.Tensor, classes: Sequence[str], path: str) -> None:
    """Rows: true class, columns: predicted class; header row and first column hold the class names."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *classes])
        for name, row in zip(classes, confusion.tolist(), strict=True):
            w.writerow([name, *row])


def plot_confusion(confusion: torch.Tensor, classes: Sequence[str], path: str, title: str = "") -> None:
    """Row-normalized confusion matrix as a PNG (matplotlib, Agg backend; labels shown up to 40 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = confusion.double()
    norm = c / c.sum(1, keepdim=True).clamp_min(1)
    n = len(classes)
    side = min(20.0, 3.0 + 0.3 * n)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        int(c[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion (video level, row-normalized)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    meta = ckpt.get("meta") or {}
    need = ("model", "classes", "clip")
    if not all(k in meta for k in need):
        raise ValueError(
            f"--checkpoint: {args.checkpoint!r} has no training metadata {list(need)} (not written by t3d train?)"
        )
    if args.clips < 1:
        raise ValueError(f"--clips: expected at least 1 clip per video, got {args.clips}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    clip = [int(v) for v in meta["clip"]]
    transform = ClipTransform(clip[1:], resize=meta.get("resize"), train=False, crops=args.crops)
    dataset = build_dataset(
        args.data_dir,
        format=args.format,
        split=args.split,
        fold=args.fold,
        annotations=args.annotations,
        clip_len=clip[0],
        frame_stride=int(meta.get("frame_stride", 1)),
        mode="test",
        num_clips=args.clips,
        transform=transform,
    )
    if list(dataset.classes) != list(meta["classes"]):
        raise ValueError(
            f"data_dir: the classes of {args.data_dir!r} ({len(dataset.classes)}: {dataset.classes[:5]} ...) differ "
            f"from the checkpoint's ({len(meta['classes'])}: {list(meta['classes'])[:5]} ...)"
        )
    backend = args.backend or meta.get("backend", "auto")
    model = build_model(meta["model"], len(meta["classes"]), backend)
    model.load_state_dict(extract_state_dict(ckpt))
    model.to(device)
    enabled, dtype, _ = amp_settings(args.amp, device, model)
    loader = make_loader(dataset, args.batch_size, workers=args.workers)
    result = evaluate(model, loader, len(dataset.classes), device, dtype if enabled else None, progress=args.progress)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval_{args.split}")
    os.makedirs(out, exist_ok=True)
    write_confusion_csv(result["confusion"], dataset.classes, os.path.join(out, "confusion.csv"))
    plot_confusion(
        result["confusion"],
        dataset.classes,
        os.path.join(out, "confusion.png"),
        f"{meta['model']} on {os.path.basename(os.path.abspath(args.data_dir))} ({args.split})",
    )
    summary = {
        k: result[k] for k in ("clip_top1", "clip_top5", "video_top1", "video_top5", "clips", "videos", "skipped")
    }
    summary.update(
        checkpoint=os.path.abspath(args.checkpoint), split=args.split, clips_per_video=args.clips, crops=args.crops
    )
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "label", "predicted", "score"])
        for idx, label, s in zip(
            result["video_indices"].tolist(), result["video_labels"].tolist(), result["video_scores"], strict=True
        ):
            w.writerow(
                [
                    dataset.records[idx].path,
                    dataset.classes[label],
                    dataset.classes[int(s.argmax())],
                    f"{float(s.max()):.4f}",
                ]
            )
    print(
        f"{summary['videos']} videos ({summary['clips']} {'views' if args.crops > 1 else 'clips'}, "
        f"{summary['skipped']} skipped): "
        f"clip top-1 {summary['clip_top1']:.4f} top-5 {summary['clip_top5']:.4f} | "
        f"video top-1 {summary['video_top1']:.4f} top-5 {summary['video_top5']:.4f}; wrote {out}/confusion.csv, "
        "confusion.png, metrics.json, predictions.csv"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="clip- and video-level accuracy and confusion matrix of a trained checkpoint")
    add_common_data_args(p)
    p.set_defaults(backend=None)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by t3d train (e.g. OUT/last.pt)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--clips", type=int, default=5, help="uniformly spread clips per video (default 5)")
    p.add_argument(
        "--crops",
        type=int,
        default=1,
        choices=(1, 3),
        help="spatial crops per clip: 1 center crop (default) or 3 along the long side (the 10x3 views)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="videos per batch (default 4)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES)
    p.add_argument("--out", default=None, help="output directory (default: next to the checkpoint, eval_<split>)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=run)
