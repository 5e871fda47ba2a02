"""The training loop: :class:`Trainer` (any model, loader and step function).

The Trainer owns: AMP (autocast + GradScaler for fp16), gradient accumulation (``no_sync`` on the micro-batches
before the last under DDP), the LR schedule (stepped once per optimizer step), progress bars (tqdm: loss, accuracy,
clips/s), atomic checkpoints (``last.pt`` every ``save_every`` optimizer steps and at every epoch end, rank 0 only)
and bit-exact resume: model, optimizer, scheduler, scaler, RNG states (torch, CUDA, numpy, python) and the data
position ``(epoch, batches consumed)``; the sampler reproduces the order from (seed, epoch) and every sample's
augmentation from (seed, epoch, index).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from ..checkpoint import CHECKPOINT_FORMAT, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from ..distributed import DistContext, all_reduce_sum, unwrap, wrap_ddp
from .amp import amp_settings
from .batchnorm import check_sync_backends, convert_sync_batchnorm, freeze_batchnorm
from .config import TrainConfig
from .step import StepOutput, classification_step

__all__ = ["Trainer"]


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
        if self.config.sync_bn:
            # before DDP: it must see the converted modules; parameters stay the same tensors (optimizer unchanged)
            model = convert_sync_batchnorm(model)
            check_sync_backends(model, self.device)
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
                total=micro_total,
                initial=self.position,
                desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
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
        if int(total[4]) and ctx.is_main and not cfg.progress:
            # with progress on, the epoch line below carries the count
            print(f"epoch {self.epoch + 1}: skipped {int(total[4])} unreadable/too-short videos", file=sys.stderr)
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
        context = self.model.no_sync() if not sync else nullcontext()
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
