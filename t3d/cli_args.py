"""Command-line pieces shared by ``t3d train``, ``t3d eval``, ``t3d transfer`` and ``t3d info``: argument groups,
the one ``--clip`` parser, the one ``--resume auto`` resolution and the mapping of parsed options onto a
:class:`t3d.training.TrainConfig`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from torch import nn

from .data import FORMATS, EpochSampler, dataset_hints, make_loader
from .distributed import DistContext
from .models import MODELS, clip_stage_shapes
from .training import TrainConfig, Trainer, make_optimizer, make_scheduler

__all__ = [
    "add_common_data_args",
    "add_device_args",
    "add_optimization_args",
    "add_run_args",
    "check_clip_fits",
    "int_list",
    "make_trainer",
    "parse_clip",
    "resolve_hflip",
    "resolve_resume",
    "resume_trainer",
    "train_config_from_args",
]

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def parse_clip(text: str) -> tuple[int, int, int]:
    """'16x112x112' -> (16, 112, 112) (frames x crop height x crop width)."""
    parts = str(text).lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--clip: expected TxHxW with positive integers (e.g. 16x112x112), got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def check_clip_fits(model: str, clip: tuple[int, int, int]) -> None:
    """A clip too small for a T3D model's downsampling is a ``--clip`` error before any data is read (other models
    take any clip)."""
    if model not in MODELS:
        return
    try:
        clip_stage_shapes(clip)
    except ValueError as exc:
        raise ValueError(f"--clip: {exc}") from exc


def int_list(text: str) -> list[int]:
    """'10,20' -> [10, 20] (an argparse ``type``)."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def resolve_hflip(choice: str, data_dir: str) -> bool:
    """``--hflip auto|on|off``: auto is on unless the dataset's ``t3d_dataset.json`` says otherwise."""
    if choice == "auto":
        return bool(dataset_hints(data_dir).get("hflip", True))
    return choice == "on"


def resolve_resume(resume: str | None, out_dir: str) -> str | None:
    """``--resume PATH|auto``: the checkpoint to continue from; ``auto`` is ``OUT/last.pt`` when it exists (a fresh
    start otherwise)."""
    if resume == "auto":
        candidate = os.path.join(out_dir, "last.pt")
        return candidate if os.path.isfile(candidate) else None
    return resume or None


def resume_trainer(trainer: Trainer, resume: str | None, out_dir: str) -> str | None:
    """Resume ``trainer`` as ``--resume`` asks (see :func:`resolve_resume`); rank 0 says from where. Returns the
    checkpoint used, or None for a fresh start."""
    path = resolve_resume(resume, out_dir)
    if path:
        trainer.resume(path)
        if trainer.ctx.is_main:
            print(f"resumed from {path}: epoch {trainer.epoch + 1}, step {trainer.step}, batch {trainer.position}")
    return path


def make_trainer(
    model: nn.Module,
    dataset: Any,
    args: argparse.Namespace,
    config: TrainConfig,
    ctx: DistContext,
    meta: dict[str, Any],
    **trainer_kwargs: Any,
) -> Trainer:
    """The :class:`Trainer` of ``t3d train`` and ``t3d transfer``: this rank's share of the epoch's batches
    (``--batch-size`` per process, ``--seed``), ``--workers`` loader processes, the optimizer and LR schedule of
    ``config``, then resumed as ``--resume`` asks. ``meta`` is stored in every checkpoint; its ``global_batch``
    is filled in here. ``trainer_kwargs`` go to the Trainer (``step_fn``, ``on_epoch_end``)."""
    sampler = EpochSampler(len(dataset), args.batch_size, args.seed, rank=ctx.rank, world_size=ctx.world_size)
    loader = make_loader(
        dataset,
        args.batch_size,
        sampler=sampler,
        workers=args.workers,
        seed=args.seed,
        pin_memory=ctx.device.type == "cuda",
    )
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, sampler.batches_per_epoch // config.accum_steps)
    meta["global_batch"] = args.batch_size * ctx.world_size * config.accum_steps
    trainer = Trainer(
        model, optimizer, loader, scheduler=scheduler, config=config, ctx=ctx, meta=meta, **trainer_kwargs
    )
    resume_trainer(trainer, args.resume, args.out)
    return trainer


def train_config_from_args(args: argparse.Namespace, **extra: Any) -> TrainConfig:
    """The :class:`TrainConfig` of the options :func:`add_optimization_args` and :func:`add_run_args` added;
    ``extra`` sets the fields a command adds itself (e.g. ``milestones``, ``freeze_bn``)."""
    return TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        nesterov=not args.no_nesterov,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        accum_steps=args.accum_steps,
        amp=args.amp,
        grad_clip=args.grad_clip,
        save_every=args.save_every,
        max_steps=args.max_steps,
        out_dir=args.out,
        seed=args.seed,
        progress=not args.no_progress,
        sync_bn=args.sync_bn,
        **extra,
    )


def add_device_args(p: argparse.ArgumentParser) -> None:
    """Where and how the model runs: DataLoader workers, fused-op backend, device, CPU threads."""
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--backend", default="auto", help="backend of the TTLs and dense blocks (auto, reference, ...)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default: torch's)")


def add_common_data_args(p: argparse.ArgumentParser) -> None:
    """A labelled dataset (DATA_DIR, layout, split number, annotations) plus :func:`add_device_args`."""
    p.add_argument("data_dir", help="dataset root (UCF101/HMDB51 with split files, Kinetics with CSVs, class folders)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="dataset layout (default: detected)")
    p.add_argument("--fold", type=int, default=1, help="official split number of UCF101/HMDB51 (1..3)")
    p.add_argument("--annotations", default=None, help="Kinetics CSV (default: DATA_DIR/<split>.csv)")
    add_device_args(p)


def add_optimization_args(parser: argparse.ArgumentParser, batch_size: int, batch_help: str, lr_help: str) -> None:
    """The epoch / batch / SGD / schedule options shared by `t3d train` and `t3d transfer` (paper defaults: SGD with
    Nesterov momentum 0.9, weight decay 1e-4, lr 0.1)."""
    p = parser
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"clips per process per micro-batch {batch_help}")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=0.1, help=f"learning rate {lr_help}")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "step", "constant"))
    p.add_argument("--warmup-steps", type=int, default=0, help="optimizer steps of linear warmup")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """How a training run runs, shared by `t3d train` and `t3d transfer`: precision, clipping, checkpoints, resume,
    seed, progress output."""
    p.add_argument(
        "--amp",
        default="auto",
        choices=AMP_CHOICES,
        help="mixed precision (auto: bf16/fp16 on CUDA, off on CPU; fp16 always with loss scaling)",
    )
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (and each epoch)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (checkpoint written)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' (OUT/last.pt if present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar and no per-epoch lines")
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="BatchNorm statistics over all processes (torchrun): N processes x batch b normalise as 1 x N*b; "
        "one all-reduce per BN layer per step",
    )
