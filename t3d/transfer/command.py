"""``t3d transfer``: the paper's 2D -> 3D supervision transfer from the command line."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from ..checkpoint import load_model_weights
from ..cli_args import (
    add_device_args,
    add_optimization_args,
    add_run_args,
    check_clip_fits,
    make_trainer,
    parse_clip,
    resolve_hflip,
    train_config_from_args,
)
from ..data import FORMATS, ClipTransform, VideoDataset, VideoRecord, build_dataset
from ..distributed import cleanup, init_distributed
from ..models import MODELS
from ..training import seed_everything
from .export import export_student
from .matching import TransferHead, TransferModel, TransferStep
from .teacher import TEACHERS, build_teacher
from .videos import find_unlabeled_videos, video_ids

__all__ = ["build_transfer_dataset", "run", "add_parser"]


def build_transfer_dataset(args: argparse.Namespace, clip: tuple[int, int, int], transform: Any) -> Any:
    """The unlabeled training clips: every video under DATA_DIR (``--format videos``), or one split of a labelled
    layout (labels unused)."""
    if args.format == "videos":
        paths = find_unlabeled_videos(args.data_dir)
        dataset = VideoDataset(
            [VideoRecord(p, 0) for p in paths], ["video"], clip[0], args.frame_stride, "train", 1, transform, args.seed
        )
        dataset.check_clip_fits()
        return dataset
    return build_dataset(
        args.data_dir,
        format=args.format,
        split=args.split,
        fold=args.fold,
        annotations=args.annotations,
        clip_len=clip[0],
        frame_stride=args.frame_stride,
        mode="train",
        transform=transform,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    clip = parse_clip(args.clip)
    if args.model not in MODELS:
        raise ValueError(f"--model: expected a T3D model, one of {sorted(MODELS)}, got {args.model!r}")
    check_clip_fits(args.model, clip)
    if args.batch_size < 2:
        raise ValueError(
            f"--batch-size: expected >= 2 (a negative pair needs a clip of another video), got {args.batch_size}"
        )
    if args.resume and args.init:
        raise ValueError("--resume and --init: expected at most one (resume continues a run, init starts a new one)")
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    try:
        hflip = resolve_hflip(args.hflip, args.data_dir)
        transform = ClipTransform(clip[1:], resize=args.resize, train=True, hflip=hflip)
        dataset = build_transfer_dataset(args, clip, transform)
        video_of = video_ids([r.path for r in dataset.records])
        seed_everything(args.seed)
        student = MODELS[args.model](num_classes=1, backend=args.backend)
        if args.init:
            report = load_model_weights(student, args.init)
            if ctx.is_main:
                print(f"--init: student initialised from {args.init} ({len(report['loaded'])} tensors)")
        mean = tuple(float(v) for v in transform.mean.flatten())
        std = tuple(float(v) for v in transform.std.flatten())
        teacher = build_teacher(
            student,
            args.teacher_weights,
            args.teacher,
            input_mean=mean,
            input_std=std,
            frames=args.teacher_frames,
            chunk=args.teacher_chunk,
        ).to(ctx.device)
        head = TransferHead(teacher.feature_dim, student.num_features, dropout=args.head_dropout)
        model = TransferModel(student, head)
        config = train_config_from_args(args)
        meta = {
            "task": "transfer",
            "model": args.model,
            "backend": args.backend,
            "clip": list(clip),
            "frame_stride": args.frame_stride,
            "resize": transform.resize,
            "teacher": args.teacher,
            "teacher_weights": os.path.abspath(args.teacher_weights),
            "teacher_frames": args.teacher_frames,
            "data_dir": os.path.abspath(args.data_dir),
            "videos": len(dataset),
            "world_size": ctx.world_size,
        }
        trainer = make_trainer(
            model, dataset, args, config, ctx, meta, step_fn=TransferStep(teacher, args.seed, video_of)
        )
        if ctx.is_main:
            print(
                f"transfer {args.teacher} teacher ({teacher.feature_dim}-d, frozen) -> {args.model} student on "
                f"{len(dataset)} videos ({int(video_of.max()) + 1} sources), clip {args.clip}, global batch "
                f"{meta['global_batch']} ({ctx.world_size} process(es), device {ctx.device}), "
                f"{trainer.steps_per_epoch} steps/epoch; accuracy = match/no-match over balanced pairs"
            )
        history = trainer.fit()
        export = args.export or os.path.join(args.out, "student.pt")
        if ctx.is_main:
            export_student(model, export, {**meta, "step": trainer.step, "epoch": trainer.epoch})
            last = f", last epoch loss {history[-1]['loss']:.4f} acc {history[-1]['acc']:.3f}" if history else ""
            print(f"done: step {trainer.step}{last}; student exported to {export} (t3d train --init {export})")
    finally:
        cleanup(ctx)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transfer",
        help="2D->3D supervision transfer: train T3D on unlabeled videos from a frozen 2D DenseNet",
        description="The T3D paper's supervision transfer (section 3.2): a frozen 2D DenseNet (ImageNet weights) and "
        "the T3D student see the same clip; a head learns match / no match (same video vs different videos) and "
        "only the student and the head train. Writes OUT/last.pt (resumable) and OUT/student.pt for "
        "`t3d train --init`. Multi-process: torchrun --nproc_per_node N -m t3d transfer ...",
    )
    p.add_argument("data_dir", help="videos to learn from: any folder (searched recursively), labels unused")
    p.add_argument("--teacher-weights", required=True, help="2D DenseNet weights file (torchvision key names)")
    p.add_argument(
        "--teacher",
        default="densenet121",
        choices=(*TEACHERS, "matching"),
        help="2D teacher architecture, matching --teacher-weights (default densenet121, the paper's, for any "
        "student; matching: the 2D twin of --model)",
    )
    p.add_argument(
        "--teacher-frames",
        type=int,
        default=None,
        help="frames per clip the teacher sees, evenly spaced (default: all, as the paper)",
    )
    p.add_argument("--teacher-chunk", type=int, default=256, help="frames per teacher forward (bounds memory)")
    p.add_argument("--out", required=True, help="output directory (last.pt, log.jsonl, student.pt)")
    p.add_argument("--export", default=None, help="where to write the student (default OUT/student.pt)")
    p.add_argument(
        "--format",
        default="videos",
        choices=("videos", *FORMATS),
        help="videos: every video under DATA_DIR (default); or a labelled layout's --split",
    )
    p.add_argument("--split", default="train", help="split of a labelled layout (default train)")
    p.add_argument("--fold", type=int, default=1, help="official split number of UCF101/HMDB51 (1..3)")
    p.add_argument("--annotations", default=None, help="Kinetics CSV (default: DATA_DIR/<split>.csv)")
    p.add_argument("--model", default="t3d121", help="student: t3d121, t3d169 or t3d_tiny (default t3d121)")
    p.add_argument("--init", default=None, help="initialise the student from a checkpoint (e.g. t3d inflate's)")
    p.add_argument("--clip", default="16x112x112", help="frames x crop height x crop width (default 16x112x112)")
    p.add_argument("--frame-stride", type=int, default=1, help="temporal stride between sampled frames")
    p.add_argument("--resize", type=int, default=None, help="short side before cropping (default 8/7 of the crop)")
    p.add_argument(
        "--hflip",
        default="auto",
        choices=("auto", "on", "off"),
        help="random horizontal flip (auto: on unless the dataset declares otherwise)",
    )
    p.add_argument("--head-dropout", type=float, default=0.0, help="dropout after each ReLU of the head")
    add_optimization_args(p, batch_size=32, batch_help="(paper: 32)", lr_help="(paper: 0.1)")
    add_run_args(p)
    add_device_args(p)
    p.set_defaults(func=run)
