"""What a run is configured with: :class:`TrainConfig` (the paper's SGD settings by default)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of a run (defaults: the paper's SGD settings).

    ``lr`` is per optimizer step at the global batch. ``schedule``: "cosine" (to 0 over all steps), "step"
    (x ``gamma`` at each epoch in ``milestones``) or "constant"; all with ``warmup_steps`` of linear warmup.
    ``accum_steps`` micro-batches per optimizer step. ``amp``: "auto" (CUDA: bf16 where supported, else fp16 with
    GradScaler; CPU: off), "off", "bf16", "fp16". ``save_every``: optimizer steps between checkpoints (0: only at
    epoch ends). ``max_steps``: stop after this many optimizer steps in total, with a checkpoint (the schedule still
    spans ``epochs``: used to simulate an interruption, or to cap a run). ``freeze_bn``: BatchNorm uses its running
    statistics and does not update them (affine parameters still train). ``sync_bn``: BatchNorm statistics over
    all processes (:func:`t3d.training.batchnorm.convert_sync_batchnorm`; a no-op in a single process).
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
    sync_bn: bool = False
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
