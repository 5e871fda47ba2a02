"""Multi-process helpers for ``torchrun`` / DistributedDataParallel: nccl on CUDA, gloo on CPU.

Launch: ``torchrun --nproc_per_node N -m t3d train ...`` (or ``python -m torch.distributed.run``). torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK; :func:`init_distributed` reads them, and a plain ``t3d train`` (no such variables)
runs as a single process without any process group.

Data: :class:`t3d.data.EpochSampler` gives rank r the r-th slice of each *global* batch, so N processes with batch
B see exactly the samples of one process with batch N*B, in the same order. Only rank 0 writes checkpoints, logs
and progress bars.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "init_distributed", "cleanup", "wrap_ddp", "all_reduce_sum", "barrier", "unwrap"]


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # process-group backend, None when single-process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """ "auto" -> cuda:<local_rank> when CUDA is available, else cpu; anything else is parsed by torch."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Set up the process group when launched by torchrun (WORLD_SIZE > 1), else a single-process context.

    CUDA -> nccl (one GPU per process, ``cuda:LOCAL_RANK``); CPU -> gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, dev, backend)


def cleanup(ctx: DistContext) -> None:
    """End of a distributed run. nccl: destroy the process group. gloo: leave it to process exit — with torch
    2.13, destroying a gloo group while the peer is tearing down too aborts a process ~1 time in 8 ("terminate called
    without an active exception", seen with a 10-line DDP script as well); exiting without destroying never did."""
    if ctx.distributed and dist.is_initialized() and ctx.backend != "gloo":
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself.

    Buffers (BN running stats) are broadcast from rank 0 at every forward (DDP's default). BN *batch* statistics
    stay per process unless the model was converted (``--sync-bn``, :func:`t3d.training.convert_sync_batchnorm`).
    """
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or ``model``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``values`` over processes (a no-op when single-process); returns the summed tensor."""
    if not ctx.distributed:
        return values
    reduced = values.to(ctx.device if ctx.backend == "nccl" else "cpu").clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
