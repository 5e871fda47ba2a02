"""Training: a reusable :class:`Trainer` and the ``t3d train`` command.

Reusable pieces (the 2D->3D transfer trainer builds on them)::

    from t3d.train import Trainer, TrainConfig, StepOutput, make_optimizer, make_scheduler
    from t3d.data import EpochSampler, make_loader

    sampler = EpochSampler(len(dataset), batch_size=32, seed=0, rank=ctx.rank, world_size=ctx.world_size)
    loader = make_loader(dataset, batch_size=32, sampler=sampler, workers=4, seed=0)
    cfg = TrainConfig(epochs=10, lr=0.1, out_dir="runs/x", save_every=500)
    opt = make_optimizer(model, cfg)          # SGD, Nesterov momentum 0.9, weight decay 1e-4 (the paper's)
    sched = make_scheduler(opt, cfg, steps_per_epoch=sampler.batches_per_epoch // cfg.accum_steps)
    trainer = Trainer(model, opt, loader, step_fn=my_step, scheduler=sched, config=cfg, ctx=ctx, meta={...})
    trainer.resume("runs/x/last.pt")          # optional: continue bit-exactly
    history = trainer.fit()

A *step function* ``step_fn(model, batch, device) -> StepOutput`` computes the loss of one (micro-)batch: ``model``
is what the Trainer holds (DDP-wrapped when distributed; call it, don't reach into it), ``batch`` what the loader
yields. It returns the mean loss over its samples plus counts for logging. :func:`classification_step` is the
default (cross-entropy on ``batch["clips"]``/``batch["labels"]``). A transfer step function would run the frozen
teacher under ``torch.no_grad()`` and the student + head through ``model`` (wrap student and head in one
``nn.Module`` so both are optimised, checkpointed and DDP-synchronised together).

The Trainer owns: AMP (autocast + GradScaler for fp16), gradient accumulation (``no_sync`` on the micro-batches
before the last under DDP), the LR schedule (stepped once per optimizer step), progress bars (tqdm: loss, accuracy,
clips/s), atomic checkpoints (``last.pt`` every ``save_every`` optimizer steps and at every epoch end, rank 0 only)
and bit-exact resume: model, optimizer, scheduler, scaler, RNG states (torch, CUDA, numpy, python) and the data
position ``(epoch, batches consumed)``; the sampler reproduces the order from (seed, epoch) and every sample's
augmentation from (seed, epoch, index).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    load_checkpoint,
    load_model_weights,
    restore_rng_state,
    save_checkpoint,
)
from .distributed import DistContext, all_reduce_sum, barrier, unwrap, wrap_ddp

__all__ = [
    "TrainConfig",
    "StepOutput",
    "Trainer",
    "classification_step",
    "make_optimizer",
    "make_scheduler",
    "WarmupSchedule",
    "amp_settings",
    "fused_ops_support_autocast",
    "freeze_batchnorm",
]


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of a run (defaults: the paper's SGD settings).

    ``lr`` is per optimizer step at the global batch. ``schedule``: "cosine" (to 0 over all steps), "step"
    (x ``gamma`` at each epoch in ``milestones``) or "constant"; all with ``warmup_steps`` of linear warmup.
    ``accum_steps`` micro-batches per optimizer step. ``amp``: "auto" (CUDA: bf16 where supported, else fp16 with
    GradScaler; CPU: off), "off", "bf16", "fp16". ``save_every``: optimizer steps between checkpoints (0: only at
    epoch ends). ``max_steps``: stop after this many optimizer steps in total, with a checkpoint (the schedule still
    spans ``epochs``: used to simulate an interruption, or to cap a run). ``freeze_bn``: BatchNorm uses its running
    statistics and does not update them (affine parameters still train).
    """

    epochs: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    schedule: str = "cosine"
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    accum_steps: int = 1
    amp: str = "auto"
    grad_clip: float | None = None
    save_every: int = 0
    max_steps: int | None = None
    out_dir: str | None = None
    seed: int = 0
    freeze_bn: bool = False
    progress: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs: expected an integer >= 1, got {self.epochs}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps: expected an integer >= 1, got {self.accum_steps}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule: expected 'cosine', 'step' or 'constant', got {self.schedule!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"amp: expected 'auto', 'off', 'bf16' or 'fp16', got {self.amp!r}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr}")
        self.milestones = tuple(int(m) for m in self.milestones)


@dataclass
class StepOutput:
    """What a step function returns for one micro-batch: ``loss`` (scalar tensor, mean over the micro-batch),
    ``count`` samples, ``correct`` predictions (None when accuracy has no meaning) and extra scalar ``metrics``
    (summed over samples by the Trainer: pass per-batch sums)."""

    loss: torch.Tensor
    count: int
    correct: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def classification_step(model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> StepOutput:
    """Cross-entropy of ``model(batch["clips"])`` against ``batch["labels"]``.

    clips: (N, 3, T, H, W) float; labels: (N,) int64.
    """
    clips = batch["clips"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    logits = model(clips)
    loss = F.cross_entropy(logits.float(), labels)
    correct = int((logits.argmax(1) == labels).sum())
    return StepOutput(loss, int(labels.numel()), correct)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD over the trainable parameters with (Nesterov) momentum and weight decay from ``config``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: expected trainable parameters, got none (all requires_grad=False)")
    nesterov = config.nesterov and config.momentum > 0
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=nesterov
    )


class WarmupSchedule:
    """LR multiplier per optimizer step: linear warmup, then cosine / step / constant.

    A plain object (not a closure) so ``LambdaLR.state_dict()`` stores its fields and a checkpoint of it loads
    with ``weights_only=True``.
    """

    def __init__(
        self, kind: str, total_steps: int, warmup_steps: int = 0, milestones: tuple[int, ...] = (), gamma: float = 0.1
    ) -> None:
        self.kind, self.total_steps, self.warmup_steps = kind, max(1, int(total_steps)), int(warmup_steps)
        self.milestones, self.gamma = [int(m) for m in milestones], float(gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step schedule over ``config.epochs * steps_per_epoch`` steps (milestones in epochs)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch: expected >= 1 optimizer steps per epoch, got {steps_per_epoch}")
    fn = WarmupSchedule(
        config.schedule,
        config.epochs * steps_per_epoch,
        config.warmup_steps,
        tuple(m * steps_per_epoch for m in config.milestones),
        config.gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


FUSED_OPS = ("t3d::ttl", "t3d::dense_block")


def fused_ops_support_autocast(model: nn.Module | None, device_type: str) -> bool:
    """Whether ``model`` can run under autocast on ``device_type``: True when it has no t3d_kernels module, or when
    every fused op it may call has an autocast rule registered (``torch.library.register_autocast``).

    The fused ops check that BN parameters have the dtype of ``x``; without an autocast rule, a bf16 activation
    meets fp32 BN weights and the op refuses it.
    """
    if model is None:
        return True
    from t3d_kernels.nn import DenseBlock3d, TemporalTransition

    if not any(isinstance(m, (TemporalTransition, DenseBlock3d)) for m in model.modules()):
        return True
    key = "AutocastCUDA" if device_type == "cuda" else "AutocastCPU"
    for op in FUSED_OPS:
        try:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
                return False
        except RuntimeError:  # op not registered on this install: modules fall back to plain PyTorch
            continue
    return True


def amp_settings(
    amp: str, device: torch.device, model: nn.Module | None = None
) -> tuple[bool, torch.dtype | None, bool]:
    """(autocast enabled, dtype, use GradScaler) for ``amp`` on ``device``.

    "auto": bf16 on CUDA where supported (else fp16 + GradScaler), off on CPU, and off when ``model``'s fused ops
    have no autocast rule yet (see :func:`fused_ops_support_autocast`); an explicit "bf16"/"fp16" for such a model
    is a ValueError.
    """
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return False, None, False
    supported = fused_ops_support_autocast(model, device.type)
    if amp == "auto":
        if not supported:
            return False, None, False
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        if not supported:
            raise ValueError(
                f"--amp: {amp} autocast is not supported by this model's fused ops ({', '.join(FUSED_OPS)} have no "
                "autocast rule registered yet); use --amp off"
            )
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"--amp: fp16 autocast needs a CUDA device, got {device}; use bf16 or off")
    return True, dtype, dtype == torch.float16


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm module in eval mode: running statistics are used and not updated. The fused ops read
    their mode from their BN modules, so this freezes them on every backend. Call after ``model.train()``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class Trainer:
    """Generic training loop: see the module docstring for the contract.

    Args:
        model: the module to train (moved to ``ctx.device``; wrapped in DDP when ``ctx.distributed``).
        optimizer: over ``model``'s parameters (build it before constructing the Trainer).
        loader: a DataLoader whose ``sampler`` has ``set_epoch(epoch, start_batch)`` and ``batches_per_epoch``
            (:class:`t3d.data.EpochSampler`); other samplers work but resume is then not exact mid-epoch.
        step_fn: ``(model, batch, device) -> StepOutput``.
        scheduler: stepped after every optimizer step (or None).
        config: :class:`TrainConfig`.
        ctx: :class:`t3d.distributed.DistContext` (default: single process on CPU).
        meta: JSON-able facts stored in every checkpoint (model name, classes, clip ...).
        on_epoch_end: ``callback(trainer, epoch, record)`` after each complete epoch, on every rank, before the
            record is logged: it may add entries (e.g. ``record["val_top1"]``). It must not draw from the global
            RNGs (or resume stops being exact); leave the model in any mode, the next epoch sets train mode.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Any,
        step_fn: Callable[[nn.Module, Any, torch.device], StepOutput] = classification_step,
        scheduler: Any = None,
        config: TrainConfig | None = None,
        ctx: DistContext | None = None,
        meta: Mapping[str, Any] | None = None,
        on_epoch_end: Callable[[Trainer, int, dict], None] | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self.ctx = ctx or DistContext()
        self.device = self.ctx.device
        self.model = wrap_ddp(model.to(self.device), self.ctx)
        self.optimizer, self.scheduler, self.loader, self.step_fn = optimizer, scheduler, loader, step_fn
        self.meta = dict(meta or {})
        self.on_epoch_end = on_epoch_end
        self.autocast, self.amp_dtype, use_scaler = amp_settings(self.config.amp, self.device, model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        sampler = getattr(loader, "sampler", None)
        self.sampler = sampler if hasattr(sampler, "set_epoch") else None
        micro = sampler.batches_per_epoch if hasattr(sampler, "batches_per_epoch") else len(loader)
        self.steps_per_epoch = micro // self.config.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"accum_steps: {self.config.accum_steps} micro-batches per step but an epoch has only {micro} batches"
            )
        self.epoch, self.position, self.step = 0, 0, 0  # position: micro-batches of `epoch` consumed
        self.skipped = 0  # samples dropped by the loader (corrupt/too-short videos), this run
        self._last_batch: Any = None  # DDP: replayed (with zero loss) when a micro-batch has no readable video
        self.history: list[dict] = []
        self.out_dir = self.config.out_dir
        if self.out_dir and self.ctx.is_main:
            os.makedirs(self.out_dir, exist_ok=True)

    # ---------------------------------------------------------------- checkpoints
    @property
    def raw_model(self) -> nn.Module:
        return unwrap(self.model)

    def state_dict(self) -> dict[str, Any]:
        """The full training state (see :mod:`t3d.checkpoint` for the layout)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": capture_rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "data": {"seed": self.config.seed, "epoch": self.epoch, "position": self.position},
            "meta": {**self.meta, "train_config": _jsonable(asdict(self.config))},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` (RNG included: call just before :meth:`fit`)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume: expected a t3d training checkpoint, got format {state.get('format')!r}")
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        data = state["data"]
        saved_batch, batch = (state.get("meta") or {}).get("global_batch"), self.meta.get("global_batch")
        if saved_batch is not None and batch is not None and saved_batch != batch:
            # the saved position counts batches of the old size: continuing would replay or skip samples
            raise ValueError(
                f"--resume: the checkpoint was trained with a global batch of {saved_batch} clips, this run has "
                f"{batch} (processes x --batch-size x --accum-steps must stay the same to resume)"
            )
        if int(data["seed"]) != self.config.seed:
            raise ValueError(f"--seed: the checkpoint was trained with seed {data['seed']}, got {self.config.seed}")
        self.epoch, self.position, self.step = int(data["epoch"]), int(data["position"]), int(state["step"])
        restore_rng_state(state["rng"])

    def resume(self, path: str | os.PathLike) -> None:
        """Load a checkpoint file written by :meth:`save` and continue from where it stopped."""
        # on the CPU: RNG states must stay there; load_state_dict moves weights and optimizer state to the device
        self.load_state_dict(load_checkpoint(path, map_location="cpu"))

    def save(self, name: str = "last.pt") -> str | None:
        """Write the training state atomically to ``out_dir/name`` (rank 0 only; others return None)."""
        if not self.out_dir or not self.ctx.is_main:
            return None
        return save_checkpoint(self.state_dict(), os.path.join(self.out_dir, name))

    # ---------------------------------------------------------------- loop
    def _set_train_mode(self) -> None:
        self.model.train()
        if self.config.freeze_bn:
            freeze_batchnorm(self.model)

    def _log(self, record: dict) -> None:
        if not self.ctx.is_main:
            return
        self.history.append(record)
        if self.out_dir:
            with open(os.path.join(self.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self) -> list[dict]:
        """Train from the current (epoch, position) to ``config.epochs`` (or ``max_steps``); returns the per-epoch
        records (rank 0: loss, acc, clips_per_s, skipped, lr) also appended to ``out_dir/log.jsonl``."""
        cfg = self.config
        micro_total = self.steps_per_epoch * cfg.accum_steps
        while self.epoch < cfg.epochs:
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
            if self.position < micro_total:
                self._run_epoch()
            if self.position < micro_total:  # stopped mid-epoch (max_steps): the checkpoint is written
                break
            self.epoch, self.position = self.epoch + 1, 0
            self.save()
        return self.history

    def _run_epoch(self) -> None:
        cfg, ctx = self.config, self.ctx
        micro_total = self.steps_per_epoch * cfg.accum_steps
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch, self.position)
        generator = getattr(self.loader, "generator", None)
        if isinstance(generator, torch.Generator):
            # the loader draws worker base seeds from its own generator: reseed per epoch, keep global RNG untouched
            generator.manual_seed(cfg.seed * 7919 + self.epoch)
        self._set_train_mode()
        sums = torch.zeros(4, dtype=torch.float64)  # loss*count, correct, count, counted-for-accuracy
        skipped_epoch = 0
        start_time, clips_seen = time.perf_counter(), 0
        bar = None
        if cfg.progress and ctx.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=micro_total, initial=self.position, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                leave=False, dynamic_ncols=True, file=sys.stderr,
            )
        stop = False
        iterator = iter(self.loader)
        try:
            while self.position < micro_total:
                try:
                    batch = next(iterator)
                except StopIteration:  # a loader shorter than announced: the epoch is over
                    self.position = micro_total
                    break
                skipped_epoch += int(batch.get("skipped", 0)) if isinstance(batch, Mapping) else 0
                micro_index = self.position % cfg.accum_steps
                last_micro = micro_index == cfg.accum_steps - 1
                out = self._forward_backward(batch, last_micro)
                if out is not None:
                    counted = out.count if out.correct is not None else 0
                    sums += torch.tensor(
                        [float(out.loss) * out.count, out.correct or 0, out.count, counted], dtype=torch.float64
                    )
                    clips_seen += out.count
                self.position += 1
                if last_micro:
                    self._optimizer_step()
                    self.step += 1
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        stop = True
                if bar is not None:
                    bar.update(1)
                    refresh = self.position % max(1, cfg.log_every) == 0 or stop or self.position == micro_total
                    if sums[2] > 0 and refresh:
                        rate = clips_seen * ctx.world_size / max(time.perf_counter() - start_time, 1e-9)
                        post = {"loss": f"{sums[0] / sums[2]:.4f}", "clips/s": f"{rate:.1f}"}
                        if sums[3] > 0:
                            post["acc"] = f"{sums[1] / sums[3]:.3f}"
                        bar.set_postfix(post)
                if stop:
                    if self.position < micro_total:
                        self.save()
                    break
        finally:
            if bar is not None:
                bar.close()
            del iterator
        elapsed = max(time.perf_counter() - start_time, 1e-9)
        total = all_reduce_sum(torch.cat([sums, torch.tensor([skipped_epoch, clips_seen], dtype=torch.float64)]), ctx)
        self.skipped += int(total[4])
        if int(total[4]):
            warnings.warn(f"epoch {self.epoch + 1}: skipped {int(total[4])} unreadable/too-short videos", stacklevel=2)
        record = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "loss": float(total[0] / total[2]) if total[2] > 0 else float("nan"),
            "acc": float(total[1] / total[3]) if total[3] > 0 else None,
            "clips": int(total[2]),
            "clips_per_s": float(total[5]) / elapsed,
            "skipped": int(total[4]),
            "lr": self.optimizer.param_groups[0]["lr"],
            "complete": self.position >= micro_total,
        }
        if self.on_epoch_end is not None and self.position >= micro_total:
            # may add entries (e.g. validation accuracy) to the record before it is logged
            self.on_epoch_end(self, self.epoch, record)
        self._log(record)
        if ctx.is_main and cfg.progress:
            acc = f" acc {record['acc']:.3f}" if record["acc"] is not None else ""
            extra = "".join(f", {k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and v is not None)
            print(
                f"epoch {record['epoch']}/{cfg.epochs} step {self.step}: loss {record['loss']:.4f}{acc} "
                f"{record['clips_per_s']:.1f} clips/s, skipped {record['skipped']}, lr {record['lr']:.3g}{extra}",
                flush=True,
            )

    def _forward_backward(self, batch: Any, last_micro: bool) -> StepOutput | None:
        empty = isinstance(batch, Mapping) and int(batch.get("count", 1)) == 0
        if empty and not self.ctx.distributed:
            # every sample of this micro-batch was unreadable: contribute nothing (the step still happens)
            return None
        if empty:
            # DDP: every rank must run forward/backward (the gradient all-reduce is collective). Replay the last
            # readable micro-batch with a zero loss: this rank adds a zero gradient.
            if self._last_batch is None:
                self._last_batch = self._readable_batch()
            batch = self._last_batch
        else:
            self._last_batch = batch if self.ctx.distributed else None
        sync = last_micro or not self.ctx.distributed
        context = self.model.no_sync() if not sync else _nullcontext()
        with context:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast):
                out = self.step_fn(self.model, batch, self.device)
            loss = out.loss / self.config.accum_steps
            self.scaler.scale(loss * 0.0 if empty else loss).backward()
        out.loss = out.loss.detach()
        return None if empty else out

    def _readable_batch(self) -> Any:
        """One readable sample of the loader's dataset, collated: the stand-in batch of a rank whose very first
        micro-batch had no readable video."""
        dataset, collate = getattr(self.loader, "dataset", None), getattr(self.loader, "collate_fn", None)
        if dataset is not None and collate is not None:
            # two samples where possible: BatchNorm in training mode needs more than one value per channel
            samples = [dataset[i] for i in range(min(len(dataset), 64))]
            batch = collate(samples)
            if isinstance(batch, Mapping) and int(batch.get("count", 1)) > 0:
                return collate([s for s in samples if isinstance(s, Mapping)][:2])
        raise RuntimeError(
            f"rank {self.ctx.rank}: a micro-batch has no readable video and no readable stand-in was found among the "
            "dataset's first 64 samples; check the dataset"
        )

    def _optimizer_step(self) -> None:
        if self.config.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def init_from(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """``--init``: load matching weights from a checkpoint or a transferred-student export; the classifier is
    re-initialised when its shape differs; anything else mismatching is a ValueError listing it."""
    return load_model_weights(model, path)


# ------------------------------------------------------------------------------------------------ t3d train CLI
def model_registry() -> dict[str, Callable[..., nn.Module]]:
    """Models ``--model`` accepts: the T3D family plus the frame-averaging 2D baseline ``frame2d``."""
    from .baselines import frame2d
    from .models import MODELS

    return {**MODELS, "frame2d": frame2d}


def build_model(name: str, num_classes: int, backend: str = "auto", dropout: float = 0.0) -> nn.Module:
    registry = model_registry()
    if name not in registry:
        raise ValueError(f"--model: expected one of {sorted(registry)}, got {name!r}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "backend": backend}
    if dropout and name != "frame2d":
        kwargs["dropout"] = dropout
    return registry[name](**kwargs)


def parse_clip(text: str) -> tuple[int, int, int]:
    """'16x112x112' -> (16, 112, 112) (frames x crop height x crop width)."""
    parts = str(text).lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--clip: expected TxHxW with positive integers (e.g. 16x112x112), got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic() -> None:
    """Deterministic kernels (cuDNN, cuBLAS, scatter ...): needed for bit-exact resume on GPUs, slower."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS initialises
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def _resolve_hflip(choice: str, data_dir: str) -> bool:
    from .data import dataset_hints

    if choice == "auto":
        return bool(dataset_hints(data_dir).get("hflip", True))
    return choice == "on"


def run(args: argparse.Namespace) -> int:
    from .data import ClipTransform, EpochSampler, build_dataset, make_loader
    from .distributed import cleanup, init_distributed

    clip = parse_clip(args.clip)
    if args.model in model_registry() and args.model != "frame2d":
        from .models import clip_stage_shapes

        try:
            clip_stage_shapes(clip)
        except ValueError as exc:
            raise ValueError(f"--clip: {exc}") from exc
    if args.resume and args.init:
        raise ValueError("--resume and --init: expected at most one (resume continues a run, init starts a new one)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deterministic:
        set_deterministic()
    ctx = init_distributed(args.device)
    try:
        hflip = _resolve_hflip(args.hflip, args.data_dir)
        transform = ClipTransform(clip[1:], resize=args.resize, train=True, hflip=hflip)
        dataset = build_dataset(
            args.data_dir, format=args.format, split=args.split, fold=args.fold, annotations=args.annotations,
            clip_len=clip[0], frame_stride=args.frame_stride, mode="train", transform=transform, seed=args.seed,
        )
        seed_everything(args.seed)
        model = build_model(args.model, len(dataset.classes), args.backend, args.dropout)
        if args.init:
            report = init_from(model, args.init)
            if ctx.is_main:
                print(
                    f"--init: loaded {len(report['loaded'])} tensors from {args.init}; "
                    f"re-initialised {report['reinitialized'] or 'none'}"
                )
        config = TrainConfig(
            epochs=args.epochs, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
            nesterov=not args.no_nesterov, schedule=args.schedule, warmup_steps=args.warmup_steps,
            milestones=tuple(args.milestones), gamma=args.gamma, accum_steps=args.accum_steps, amp=args.amp,
            grad_clip=args.grad_clip, save_every=args.save_every, max_steps=args.max_steps, out_dir=args.out,
            seed=args.seed, freeze_bn=args.freeze_bn, progress=not args.no_progress,
        )
        sampler = EpochSampler(len(dataset), args.batch_size, args.seed, rank=ctx.rank, world_size=ctx.world_size)
        loader = make_loader(
            dataset, args.batch_size, sampler=sampler, workers=args.workers, seed=args.seed,
            pin_memory=ctx.device.type == "cuda",
        )
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config, sampler.batches_per_epoch // config.accum_steps)
        meta = {
            "model": args.model, "backend": args.backend, "num_classes": len(dataset.classes),
            "classes": dataset.classes, "clip": list(clip), "frame_stride": args.frame_stride,
            "resize": transform.resize, "format": args.format, "fold": args.fold, "dropout": args.dropout,
            "data_dir": os.path.abspath(args.data_dir), "world_size": ctx.world_size,
            "global_batch": args.batch_size * ctx.world_size * config.accum_steps,
        }
        on_epoch_end = None
        if args.val_split:
            on_epoch_end = _validation_callback(args, dataset.classes, clip, transform.resize, ctx)
        trainer = Trainer(
            model, optimizer, loader, scheduler=scheduler, config=config, ctx=ctx, meta=meta, on_epoch_end=on_epoch_end
        )
        resume = args.resume
        if resume == "auto":
            candidate = os.path.join(args.out, "last.pt")
            resume = candidate if os.path.isfile(candidate) else None
        if resume:
            trainer.resume(resume)
            if ctx.is_main:
                print(f"resumed from {resume}: epoch {trainer.epoch + 1}, step {trainer.step}, "
                      f"batch {trainer.position}")
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
    from .data import ClipTransform, build_dataset, make_loader
    from .evaluate import evaluate

    val = build_dataset(
        args.data_dir, format=args.format, split=args.val_split, fold=args.fold, annotations=args.annotations,
        clip_len=clip[0], frame_stride=args.frame_stride, mode="test", num_clips=args.val_clips,
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


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def add_common_data_args(p: argparse.ArgumentParser) -> None:
    from .data import FORMATS

    p.add_argument("data_dir", help="dataset root (UCF101/HMDB51 with split files, Kinetics with CSVs, class folders)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="dataset layout (default: detected)")
    p.add_argument("--fold", type=int, default=1, help="official split number of UCF101/HMDB51 (1..3)")
    p.add_argument("--annotations", default=None, help="Kinetics CSV (default: DATA_DIR/<split>.csv)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--backend", default="auto", help="backend of the TTLs and dense blocks (auto, reference, ...)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (default: torch's)")


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
    p.add_argument("--hflip", default="auto", choices=("auto", "on", "off"),
                   help="random horizontal flip (auto: on unless the dataset declares otherwise)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifier")
    add_optimization_args(p, batch_size=8, batch_help="(default 8)", lr_help="at the global batch (default 0.1)")
    p.add_argument("--milestones", type=_int_list, default=[], help="epochs where --schedule step multiplies "
                   "the lr by --gamma, e.g. 10,20")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="mixed precision (auto: bf16/fp16 on CUDA, off on CPU)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value")
    p.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode (running statistics)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (and each epoch)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (checkpoint written)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from, or 'auto' (OUT/last.pt if present)")
    p.add_argument("--init", default=None, help="initialise from a checkpoint or transferred-student export")
    p.add_argument("--val-split", default=None, help="evaluate on this split (e.g. test) during training")
    p.add_argument("--val-every", type=int, default=1, help="epochs between validations (and after the last)")
    p.add_argument("--val-clips", type=int, default=1, help="clips per validation video (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (bit-exact resume on CUDA; slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar and no per-epoch lines")
    p.set_defaults(func=run)
