"""Synthetic motion videos for tests and demos, and ``t3d make-synthetic DIR``.

Each video shows one bright square moving in a straight line over a noisy dark background. The class is the
direction of motion only (MoveRight, MoveLeft, MoveDown, MoveUp): every class has the same distribution of square
sizes, colours, speeds and positions, and each "left" video is the exact time reversal of a "right" video (and "up"
of "down"). So a model that looks at frames independently and averages over time — a 2D frame model — sees the same
*set* of frames for a video and its reversed twin and cannot tell them apart: at most one of each twin pair is
right, i.e. <= 50% accuracy on any split, whatever it learned. A 3D net sees the order and can reach 100%.

Layout written (UCF101's)::

    DIR/MoveRight/v_MoveRight_g01_c01.avi ...        mpeg4 in AVI, as UCF101
    DIR/ucfTrainTestlist/classInd.txt                "1 MoveRight"
    DIR/ucfTrainTestlist/trainlist01.txt             "MoveRight/v_MoveRight_g01_c01.avi 1"
    DIR/ucfTrainTestlist/testlist01.txt              "MoveRight/v_MoveRight_g05_c01.avi"
    DIR/t3d_dataset.json                             {"hflip": false, ...}: flipping would swap left/right
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from .data.video import write_video

__all__ = ["CLASS_PAIRS", "render_motion_clip", "make_synthetic", "add_parser"]

# (class, its time reversal, (dy, dx) unit direction of the first)
CLASS_PAIRS = [("MoveRight", "MoveLeft", (0, 1)), ("MoveDown", "MoveUp", (1, 0))]


def render_motion_clip(direction: tuple[int, int], frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One video (frames, size, size, 3) uint8: a square moving along ``direction`` (dy, dx).

    Square side ~ size/5..size/4, speed 0.6..1 of the room available over the clip, random perpendicular position,
    colour and background level, Gaussian pixel noise.
    """
    side = int(rng.integers(max(2, size // 5), max(3, size // 4) + 1))
    room = size - side
    travel = rng.uniform(0.6, 1.0) * room  # distance covered over the clip
    start_along = rng.uniform(0, room - travel)
    across = int(rng.integers(0, room + 1))
    background = rng.uniform(10, 60)
    colour = rng.uniform(150, 255, size=3)
    video = np.empty((frames, size, size, 3), dtype=np.float32)
    for t in range(frames):
        along = int(round(start_along + travel * t / max(1, frames - 1)))
        y, x = (along, across) if direction[0] else (across, along)
        frame = np.full((size, size, 3), background, dtype=np.float32)
        frame[y : y + side, x : x + side] = colour
        video[t] = frame
    video += rng.normal(0, 8, size=video.shape).astype(np.float32)
    return np.clip(video, 0, 255).astype(np.uint8)


def make_synthetic(
    out_dir: str,
    num_classes: int = 4,
    train_per_class: int = 12,
    test_per_class: int = 6,
    frames: int = 20,
    size: int = 40,
    seed: int = 0,
    fps: int = 25,
) -> dict:
    """Write the dataset (see the module docstring); returns a summary dict (also in ``t3d_dataset.json``).

    ``num_classes``: 2 (MoveRight/MoveLeft) or 4 (+ MoveDown/MoveUp). ``size`` even (yuv420p).
    """
    if num_classes not in (2, 4):
        raise ValueError(f"--classes: expected 2 (right/left) or 4 (right/left/down/up), got {num_classes}")
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(
            f"--train-per-class/--test-per-class: expected >= 1 videos, got {train_per_class}/{test_per_class}"
        )
    if frames < 2:
        raise ValueError(f"--frames: expected at least 2 frames per video, got {frames}")
    if size < 16 or size % 2:
        raise ValueError(f"--size: expected an even frame size >= 16, got {size}")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"out_dir: {out_dir!r} exists and is not an empty directory; choose a new one")
    pairs = CLASS_PAIRS[: num_classes // 2]
    classes = [name for forward, backward, _ in pairs for name in (forward, backward)]
    rng = np.random.default_rng(seed)
    split_dir = os.path.join(out_dir, "ucfTrainTestlist")
    os.makedirs(split_dir)
    for name in classes:
        os.makedirs(os.path.join(out_dir, name))
    lists: dict[str, list[str]] = {"train": [], "test": []}
    # UCF101 splits by group (g01..g25); here train and test use disjoint groups too
    for split, per_class, group0 in (("train", train_per_class, 1), ("test", test_per_class, 1 + train_per_class)):
        for forward, backward, direction in pairs:
            for i in range(per_class):
                video = render_motion_clip(direction, frames, size, rng)
                for name, clip in ((forward, video), (backward, video[::-1])):
                    rel = f"{name}/v_{name}_g{group0 + i:02d}_c01.avi"
                    write_video(os.path.join(out_dir, rel), np.ascontiguousarray(clip), fps=fps)
                    lists[split].append(rel)
    with open(os.path.join(split_dir, "classInd.txt"), "w") as f:
        f.writelines(f"{i + 1} {name}\n" for i, name in enumerate(classes))
    with open(os.path.join(split_dir, "trainlist01.txt"), "w") as f:
        f.writelines(f"{rel} {classes.index(rel.split('/')[0]) + 1}\n" for rel in sorted(lists["train"]))
    with open(os.path.join(split_dir, "testlist01.txt"), "w") as f:
        f.writelines(f"{rel}\n" for rel in sorted(lists["test"]))
    summary = {
        "generator": "t3d make-synthetic",
        "hflip": False,
        "classes": classes,
        "frames": frames,
        "size": size,
        "seed": seed,
        "train_videos": len(lists["train"]),
        "test_videos": len(lists["test"]),
    }
    with open(os.path.join(out_dir, "t3d_dataset.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def run(args: argparse.Namespace) -> int:
    s = make_synthetic(
        args.out_dir, args.classes, args.train_per_class, args.test_per_class, args.frames, args.size, args.seed
    )
    print(
        f"wrote {s['train_videos']} train + {s['test_videos']} test videos ({s['frames']} frames, "
        f"{s['size']}x{s['size']}) of classes {s['classes']} to {args.out_dir} (UCF101 layout, split 1)"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-synthetic", help="write a small synthetic motion-direction video dataset in the UCF101 layout"
    )
    p.add_argument("out_dir", help="new (or empty) directory to create")
    p.add_argument("--classes", type=int, default=4, help="2 (right/left) or 4 (right/left/down/up); default 4")
    p.add_argument("--train-per-class", type=int, default=12, help="training videos per class (default 12)")
    p.add_argument("--test-per-class", type=int, default=6, help="test videos per class (default 6)")
    p.add_argument("--frames", type=int, default=20, help="frames per video (default 20)")
    p.add_argument("--size", type=int, default=40, help="frame height = width in pixels, even (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
