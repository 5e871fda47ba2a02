"""Training, split by concern: the loop (:mod:`.trainer`), the run's configuration (:mod:`.config`), step functions
(:mod:`.step`), optimizer and LR schedule (:mod:`.optim`), the mixed-precision policy (:mod:`.amp`), BatchNorm
policies (:mod:`.batchnorm`) and reproducibility (:mod:`.determinism`). The ``t3d train`` command is
:mod:`t3d.train`; the 2D->3D transfer (:mod:`t3d.transfer`) builds on the same pieces::

    from t3d.training import Trainer, TrainConfig, StepOutput, make_optimizer, make_scheduler
    from t3d.data import EpochSampler, make_loader

    sampler = EpochSampler(len(dataset), batch_size=32, seed=0, rank=ctx.rank, world_size=ctx.world_size)
    loader = make_loader(dataset, batch_size=32, sampler=sampler, workers=4, seed=0)
    cfg = TrainConfig(epochs=10, lr=0.1, out_dir="runs/x", save_every=500)
    opt = make_optimizer(model, cfg)          # SGD, Nesterov momentum 0.9, weight decay 1e-4 (the paper's)
    sched = make_scheduler(opt, cfg, steps_per_epoch=sampler.batches_per_epoch // cfg.accum_steps)
    trainer = Trainer(model, opt, loader, step_fn=my_step, scheduler=sched, config=cfg, ctx=ctx, meta={...})
    trainer.resume("runs/x/last.pt")          # optional: continue bit-exactly
    history = trainer.fit()

See :mod:`.step` for the step-function contract and :mod:`.trainer` for what the loop owns.
"""

from .amp import amp_settings, autocast_refusals, fused_ops_support_autocast
from .batchnorm import SyncBatchNorm, convert_sync_batchnorm, freeze_batchnorm
from .config import TrainConfig
from .determinism import seed_everything, set_deterministic
from .optim import WarmupSchedule, make_optimizer, make_scheduler
from .step import StepOutput, classification_step
from .trainer import Trainer

__all__ = [
    "StepOutput",
    "SyncBatchNorm",
    "TrainConfig",
    "Trainer",
    "WarmupSchedule",
    "amp_settings",
    "autocast_refusals",
    "classification_step",
    "convert_sync_batchnorm",
    "freeze_batchnorm",
    "fused_ops_support_autocast",
    "make_optimizer",
    "make_scheduler",
    "seed_everything",
    "set_deterministic",
]
