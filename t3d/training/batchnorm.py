"""BatchNorm policies of a run: freezing (``--freeze-bn``) and synchronising the statistics over the processes
(``--sync-bn``).

With DDP each process normalises with the statistics of its own slice of the global batch. ``--sync-bn``
all-reduces, per BN layer and step, what the statistics need (forward: the count, the sum, then the sum of squared
deviations; backward: their gradients), so N processes x batch b normalise exactly as one process x batch N*b.
PyTorch's ``nn.SyncBatchNorm`` does this on GPUs only (``torch.batch_norm_stats`` has no CPU kernel, the module
refuses CPU inputs and DDP refuses it in a CPU model), so :class:`SyncBatchNorm` computes the same in
differentiable collectives, one code path for gloo and nccl.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce

import t3d_kernels
from t3d_kernels import DenseBlock3d, TemporalTransition
from t3d_kernels.backends import BackendError, resolve

__all__ = ["SyncBatchNorm", "check_sync_backends", "convert_sync_batchnorm", "freeze_batchnorm"]


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm module in eval mode: running statistics are used and not updated. The fused ops read
    their mode from their BN modules, so this freezes them on every backend. Call after ``model.train()``."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C, ...) inputs whose training statistics are those of every process in ``process_group``
    (default: all), on any device; the parameters, buffers and state_dict keys of ``nn.BatchNorm*d``.

    In training mode with more than one process: mean = all_reduce(Σx) / all_reduce(count), biased var =
    all_reduce(Σ(x - mean)²) / count (two passes, as PyTorch's CPU batch norm computes them, so the result equals
    one process with the whole batch up to float32 summation order), computed in float32; the running variance
    takes the unbiased var over the global count. The collectives are autograd-aware: backward all-reduces the
    gradients of those sums (what ``nn.SyncBatchNorm`` all-reduces too). One process or eval mode: plain BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"x: expected (N, C, ...) with at least 2 dimensions, got shape {tuple(x.shape)}")

    def _syncs(self) -> bool:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.process_group or dist.group.WORLD) > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._syncs():
            return super().forward(x)
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        group = self.process_group or dist.group.WORLD
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local = torch.cat([xf.sum(dims), xf.new_tensor([x.numel() // x.shape[1]])])
        total = all_reduce(local, group=group)
        count = total[-1]
        mean = total[:-1] / count
        centered = xf - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims), group=group) / count
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                n = float(count)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * (n / max(n - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def _fused_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (TemporalTransition, DenseBlock3d))]


def check_sync_backends(model: nn.Module, device: torch.device) -> None:
    """A ValueError naming the reason when a fused module's backend cannot synchronise its BN on ``device`` (e.g.
    the ``reference`` backend leaves its BN modules to the caller), before training starts rather than at the first
    step."""
    for name, m in model.named_modules():
        if isinstance(m, (TemporalTransition, DenseBlock3d)):
            try:
                resolve(m._op, m.backend, device, group=True)
            except BackendError as exc:
                raise ValueError(f"--sync-bn: {name}: {exc}") from exc


def convert_sync_batchnorm(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``--sync-bn``: every BatchNorm of ``model`` synchronised over ``process_group`` (default: all processes).

    Plain BN modules (``nn.SyncBatchNorm`` too) become :class:`SyncBatchNorm` (parameters and buffers are the same
    tensors, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does). The BN inside the fused TTL and dense-block ops
    is reached by ``t3d_kernels.convert_sync_batchnorm`` where that exists; without it a model with fused modules is
    refused (its BN would silently stay per process). Returns the converted model (the same object unless
    ``model`` is itself a BN module). Call before DDP wraps the model.
    """
    fused = _fused_modules(model)
    if fused:
        convert_fused = getattr(t3d_kernels, "convert_sync_batchnorm", None)
        if convert_fused is None:
            raise ValueError(
                f"--sync-bn: this model's fused TTL/dense-block modules ({len(fused)}, e.g. {fused[0]!r}) cannot "
                "synchronise their BatchNorm in this version of t3d_kernels (no t3d_kernels.convert_sync_batchnorm); "
                "use --freeze-bn for exact multi-process training, or a model without fused ops"
            )
        model = convert_fused(model, process_group)
    return _convert_plain(model, process_group, tuple(fused))


def _convert_plain(
    module: nn.Module, group: dist.ProcessGroup | None, skip: tuple[str, ...], name: str = ""
) -> nn.Module:
    if name in skip:  # a fused module: its BN belongs to the op (converted above)
        return module
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) is not SyncBatchNorm:
        out = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, group
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for child_name, child in module.named_children():
        out.add_module(child_name, _convert_plain(child, group, skip, f"{name}.{child_name}" if name else child_name))
    return out
