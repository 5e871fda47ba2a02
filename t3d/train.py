"""``t3d train``: train (or fine-tune with ``--init``) a model on a labelled video dataset.

The loop and its pieces are :mod:`t3d.training`; this module maps the command line onto them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

from .checkpoint import load_model_weights
from .cli_args import (
    add_common_data_args,
    add_optimization_args,
    add_run_args,
    check_clip_fits,
    int_list,
    make_trainer,
    parse_clip,
    resolve_hflip,
    train_config_from_args,
)
from .data import ClipTransform, build_dataset, make_loader
from .distributed import DistContext, barrier, cleanup, init_distributed
from .evaluate import evaluate
from .models import build_model
from .training import Trainer, seed_everything, set_deterministic

__all__ = ["run", "add_parser"]


def run(args: argparse.Namespace) -> int:
    clip = parse_clip(args.clip)
    check_clip_fits(args.model, clip)
    if args.resume and args.init:
        raise ValueError("--resume and --init: expected at most one (resume continues a run, init starts a new one)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        set_deterministic()
    ctx = init_distributed(args.device)
    try:
        hflip = resolve_hflip(args.hflip, args.data_dir)
        transform = ClipTransform(clip[1:], resize=args.resize, train=True, hflip=hflip)
        dataset = build_dataset(
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
        seed_everything(args.seed)
        model = build_model(args.model, len(dataset.classes), args.backend, args.dropout)
        if args.init:
            report = load_model_weights(model, args.init)
            if ctx.is_main:
                print(
                    f"--init: loaded {len(report['loaded'])} tensors from {args.init}; "
                    f"re-initialised {report['reinitialized'] or 'none'}"
                )
        config = train_config_from_args(
            args, milestones=tuple(args.milestones), gamma=args.gamma, freeze_bn=args.freeze_bn
        )
        meta = {
            "model": args.model,
            "backend": args.backend,
            "num_classes": len(dataset.classes),
            "classes": dataset.classes,
            "clip": list(clip),
            "frame_stride": args.frame_stride,
            "resize": transform.resize,
            "format": args.format,
            "fold": args.fold,
            "dropout": args.dropout,
            "data_dir": os.path.abspath(args.data_dir),
            "world_size": ctx.world_size,
        }
        on_epoch_end = None
        if args.val_split:
            on_epoch_end = _validation_callback(args, dataset.classes, clip, transform.resize, ctx)
        trainer = make_trainer(model, dataset, args, config, ctx, meta, on_epoch_end=on_epoch_end)
        if ctx.is_main:
            print(
                f"training {args.model} (backend {args.backend}) on {len(dataset)} videos, {len(dataset.classes)} "
                f"classes, clip {args.clip}, global batch {meta['global_batch']} ({ctx.world_size} process(es), "
                f"device {ctx.device}), {trainer.steps_per_epoch} steps/epoch, hflip {hflip}"
            )
        history = trainer.fit()
        # every rank waits for rank 0's last checkpoint before the process group goes away (a rank tearing gloo
        # down while its peer is still in a collective aborts the peer)
        barrier(ctx)
        if ctx.is_main and history:
            last = history[-1]
            print(f"done: step {trainer.step}, last epoch loss {last['loss']:.4f}; checkpoint {args.out}/last.pt")
    finally:
        cleanup(ctx)
    return 0


def _validation_callback(
    args: argparse.Namespace, classes: list[str], clip: tuple[int, int, int], resize: int, ctx: DistContext
) -> Callable[[Trainer, int, dict], None]:
    """``--val-split``: video-level accuracy on rank 0 every ``--val-every`` epochs (center crop, ``--val-clips``)."""
    val = build_dataset(
        args.data_dir,
        format=args.format,
        split=args.val_split,
        fold=args.fold,
        annotations=args.annotations,
        clip_len=clip[0],
        frame_stride=args.frame_stride,
        mode="test",
        num_clips=args.val_clips,
        transform=ClipTransform(clip[1:], resize=resize, train=False),
    )
    if list(val.classes) != list(classes):
        raise ValueError(f"--val-split: the classes of split {args.val_split!r} differ from the training split's")
    loader = make_loader(val, args.batch_size, workers=args.workers)

    def callback(trainer: Trainer, epoch: int, record: dict) -> None:
        if (epoch + 1) % max(1, args.val_every) and epoch + 1 != trainer.config.epochs:
            return
        if ctx.is_main:
            dtype = trainer.amp_dtype if trainer.autocast else None
            result = evaluate(trainer.raw_model, loader, len(classes), trainer.device, dtype)
            record.update({f"val_{k}": result[k] for k in ("clip_top1", "video_top1", "video_top5")})

    return callback


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune a T3D model on a video dataset",
        description="Train (or fine-tune with --init) a model on a video dataset. Multi-process: "
        "torchrun --nproc_per_node N -m t3d train ... (gloo on CPU, nccl on GPUs).",
    )
    add_common_data_args(p)
    p.add_argument("--out", required=True, help="output directory (checkpoints last.pt, log.jsonl)")
    p.add_argument("--split", default="train", help="split to train on (default train)")
    p.add_argument("--model", default="t3d121", help="t3d121, t3d169, t3d_tiny or frame2d (default t3d121)")
    p.add_argument("--clip", default="16x112x112", help="frames x crop height x crop width (default 16x112x112)")
    p.add_argument("--frame-stride", type=int, default=1, help="temporal stride between sampled frames")
    p.add_argument("--resize", type=int, default=None, help="short side before cropping (default 8/7 of the crop)")
    p.add_argument(
        "--hflip",
        default="auto",
        choices=("auto", "on", "off"),
        help="random horizontal flip (auto: on unless the dataset declares otherwise)",
    )
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifier")
    add_optimization_args(p, batch_size=8, batch_help="(default 8)", lr_help="at the global batch (default 0.1)")
    p.add_argument(
        "--milestones",
        type=int_list,
        default=[],
        help="epochs where --schedule step multiplies the lr by --gamma, e.g. 10,20",
    )
    p.add_argument("--gamma", type=float, default=0.1)
    add_run_args(p)
    p.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode (running statistics)")
    p.add_argument("--init", default=None, help="initialise from a checkpoint or transferred-student export")
    p.add_argument("--val-split", default=None, help="evaluate on this split (e.g. test) during training")
    p.add_argument("--val-every", type=int, default=1, help="epochs between validations (and after the last)")
    p.add_argument("--val-clips", type=int, default=1, help="clips per validation video (default 1)")
    p.add_argument(
        "--deterministic", action="store_true", help="deterministic GPU kernels (bit-exact resume on CUDA; slower)"
    )
    p.set_defaults(func=run)
