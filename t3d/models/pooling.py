"""A max pool whose backward is deterministic on every device: T3D's stem pool under ``--deterministic``.

PyTorch's CUDA ``max_pool3d`` backward scatters every output's gradient into the input position that won its window
with atomic adds: where windows overlap (kernel 3, stride 1 in time) the order of the adds, hence the float32 sum,
changes from run to run, and a resumed run drifts from an uninterrupted one (max weight difference 0.29 after 8
steps measured on an H100). The backward here is a *gather* instead
(``t3d_kernels.composite.pool.max_pool3d_gather_backward``, shared with the fused stem op): each input position
sums the gradients of the outputs whose saved argmax is that position, visiting the outputs in increasing order. No
two threads write the same element, so the result is the same on every run; and since PyTorch's CPU kernel also adds
in increasing output order starting from zero, the result equals it bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from t3d_kernels.composite.pool import max_pool3d_gather_backward

__all__ = ["DeterministicMaxPool3d", "max_pool3d_deterministic"]


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (int(v),) * 3 if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"{name}: expected an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


class _MaxPool3dGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding):  # type: ignore[override]
        y, indices = F.max_pool3d(x, kernel, stride, padding, return_indices=True)
        ctx.save_for_backward(indices)
        ctx.geometry = (x.shape, kernel, stride, padding)
        ctx.mark_non_differentiable(indices)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        shape, kernel, stride, padding = ctx.geometry
        return (
            max_pool3d_gather_backward(grad_out.contiguous(), indices, shape, kernel, stride, padding),
            None,
            None,
            None,
        )


def max_pool3d_deterministic(
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> torch.Tensor:
    """``F.max_pool3d`` (dilation 1, floor mode) with the gather backward. x: (N, C, T, H, W)."""
    if x.dim() != 5:
        raise ValueError(f"x: expected (N, C, T, H, W), got shape {tuple(x.shape)}")
    kernel = _triple(kernel_size, "kernel_size")
    return _MaxPool3dGather.apply(
        x, kernel, kernel if stride is None else _triple(stride, "stride"), _triple(padding, "padding")
    )


class DeterministicMaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` (same arguments, no parameters) whose backward is the deterministic gather of
    :func:`max_pool3d_deterministic` on accelerators while ``torch.are_deterministic_algorithms_enabled()``
    (``--deterministic``), and PyTorch's own kernel otherwise: faster, and on the CPU already deterministic and equal
    to the gather bit for bit (the gather costs 6x PyTorch's CPU kernel: 1.9 s against 0.3 s forward + backward of
    (8, 16, 16, 56, 56) on 2 threads here). Dilation 1 and floor mode only."""

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None, padding=0) -> None:
        super().__init__(kernel_size, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gather = x.device.type != "cpu" and torch.are_deterministic_algorithms_enabled()
        if gather and torch.is_grad_enabled() and x.requires_grad:
            return max_pool3d_deterministic(x, self.kernel_size, self.stride, self.padding)
        return super().forward(x)
