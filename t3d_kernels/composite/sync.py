"""Synchronised BatchNorm statistics inside the fused ops (docs/design.md, "Synchronised BatchNorm").

With a process group, the per-channel numbers BN needs are combined over the group before use, exactly what
``nn.SyncBatchNorm`` combines: in forward each process's count, mean and M2 (all-gathered, merged stably by Chan et
al.'s formula in float64), in backward the sums of dy and dy * xhat (all-reduced). The parameter gradients stay
local (DDP averages them), as in ``nn.SyncBatchNorm``. The custom ops' schemas cannot carry a ProcessGroup, so a
group travels through them by name (:func:`group_name`; "" = no synchronisation). Collectives run on the tensors'
device: gloo on CPU, nccl on CUDA, the same code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sums", "group_name", "merge_stats", "total_count"]

_GROUPS: dict[str, dist.ProcessGroup] = {}


def group_name(group: dist.ProcessGroup | None) -> str:
    """The name under which the ops find ``group`` (None: the default group); "" when there is nothing to
    synchronise (torch.distributed not initialised, or a group of one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    group = group if group is not None else dist.group.WORLD
    if dist.get_world_size(group) < 2:
        return ""
    name = group.group_name
    _GROUPS[name] = group
    return name


def _group(name: str) -> dist.ProcessGroup:
    return _GROUPS[name]


def merge_stats(mean: torch.Tensor, var: torch.Tensor, count: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's biased mean and variance per channel from this process's (C,) ``mean``/``var`` over ``count``
    elements per channel; float64."""
    group = _group(name)
    local = torch.stack([torch.full_like(mean, count, dtype=torch.float64), mean.double(), var.double() * count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local.contiguous(), group=group)
    n, m, m2 = torch.stack(gathered).unbind(1)  # (world, C) each
    total = n.sum(0)
    merged = (n * m).sum(0) / total
    return merged, (m2.sum(0) + (n * (m - merged) ** 2).sum(0)) / total


def all_reduce_sums(sums: list[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Every tensor of ``sums`` summed over the group (one collective for all), in float64."""
    flat = torch.cat([s.double().reshape(-1) for s in sums])
    dist.all_reduce(flat, group=_group(name))
    return list(flat.split([s.numel() for s in sums]))


def total_count(count: int, device: torch.device, name: str) -> int:
    """The group's element count per channel, from this process's ``count``."""
    t = torch.tensor([count], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=_group(name))
    return int(t.item())
